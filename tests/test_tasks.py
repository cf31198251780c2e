"""The offline downstream tasks (llmlabs/tasks.py) and `llmlabs eval --tasks`: items built from the
held-out source as described, scores equal to the model's own log-likelihoods, acc by hand."""
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from llmlabs import cli, tasks
from llmlabs.data.shards import DataDir
from llmlabs.config import GPTConfig
from llmlabs.model import build_model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from conftest import prepared_stdlib

    return DataDir.open(prepared_stdlib(tmp_path_factory.mktemp("tasks"), 60, 400, 0.3, 0.1))


def test_items_are_real_held_out_choices(data):
    docs = list(tasks._documents(data, "val"))
    for task in tasks.TASKS:
        items = tasks.build(data, task, "val", n=40)
        assert items == tasks.build(data, task, "val", n=40)  # deterministic
        assert len(items) >= 20 and {i["answer"] for i in items} == set(range(tasks.CHOICES))  # the answer moves
        for item in items:
            choices, true = item["choices"], item["choices"][item["answer"]]
            assert len(set(choices)) == tasks.CHOICES and all(len(c) <= tasks.MAX_CHOICE_CHARS for c in choices)
            doc = next(d for d in docs if d.startswith(item["context"] + true))  # the true one continues the file
            if task == "next_line":
                assert item["context"].endswith("\n") and (doc[len(item["context"]):] + "\n").startswith(true + "\n")
                lines = set(doc.split("\n"))
                assert all(c in lines for c in choices)  # distractors: lines of the same file
            else:
                assert re.search(r"(^|\s)def \w+\($", item["context"].split("\n")[-1])  # async def too
                assert all(f"({c}\n" in doc + "\n" for c in choices)


def tiny_model():
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=512, vocab_size=400, n_layer=2, n_embd=32, n_head=2, n_kv_head=2, head_dim=16,
                       window_pattern="L")
    model = build_model(config, "cpu").double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    return model


def test_scores_are_the_models_log_likelihoods_and_acc_is_their_argmax(data):
    model, tok = tiny_model(), data.tokenizer
    items = tasks.build(data, "next_line", "val", n=8)
    hits = hits_norm = 0
    for item in items:
        got = tasks.continuation_logprobs(model, tok, item["context"], item["choices"], "cpu")
        want = []
        for c in item["choices"]:  # one unpadded forward per choice
            ctx = ([tok.bos_id] + tok.encode(item["context"]))[-tasks.CONTEXT_TOKENS:]
            ids = torch.tensor([ctx + tok.encode(c)])
            with torch.no_grad():
                logp = F.log_softmax(model(ids)[0].double(), -1)
            want.append(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(tok.encode(c))))
        assert got == pytest.approx(want, rel=1e-9, abs=1e-9)
        hits += max(range(4), key=lambda k: want[k]) == item["answer"]
        per_byte = [w / len(c.encode()) for w, c in zip(want, item["choices"])]
        hits_norm += max(range(4), key=lambda k: per_byte[k]) == item["answer"]
    res = tasks.evaluate(model, tok, items, "cpu")
    assert res == {"acc": hits / 8, "acc_norm": hits_norm / 8, "chance": 0.25, "items": 8}
    assert all(math.isfinite(v) for v in res.values())


def test_eval_command_scores_every_checkpoint_and_plots(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(data.path), "--run-dir", str(run), "--tokens", "8192", "--depth", "1",
                     "--aspect-ratio", "32", "--head-dim", "16", "--seq-len", "128", "--device-batch-size", "4",
                     "--total-batch-size", "512", "--eval-tokens", "512", "--device", "cpu", "--eval-split", "none",
                     "--save-every", "8"]) == 0
    capsys.readouterr()
    assert cli.main(["eval", str(run), "--tasks", "offline,bpb", "--checkpoints", "all", "--items", "10",
                     "--tokens", "512", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(r) for r in (run / "evals.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows}) == [8, 16]  # both kept checkpoints
    assert {r["task"] for r in rows} == {"next_line", "signature", "bpb"} and len(rows) == 6
    assert all(r["items"] == 10 and 0 <= r["acc_norm"] <= 1 for r in rows if r["task"] != "bpb")
    assert "next_line" in out and "chance 0.25" in out and (run / "evals.png").stat().st_size > 0
