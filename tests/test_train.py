"""The training loop, checkpoints, evaluation and generation, on a tiny real corpus (CPU, fp32)."""
import json
import math
import re
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmlabs import checkpoint, cli, common, engine, preflight, tracking, train
from llmlabs.common import LabError
from llmlabs.data.shards import DataDir
from llmlabs.scaling import hyperparams_for

REPO = Path(__file__).resolve().parents[1]
# a model small enough that a step takes milliseconds on 2 cores
TINY = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "16", "--seq-len", "64", "--window-pattern", "SL",
        "--device-batch-size", "4", "--total-batch-size", "512", "--eval-tokens", "2048", "--device", "cpu"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A real corpus (80 stdlib modules), prepared with a small vocab and large held-out splits."""
    import sysconfig

    from llmlabs.data.prepare import prepare

    src = tmp_path_factory.mktemp("src")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for f in sorted(stdlib.glob("*.py"))[:80]:
        (src / f.name).write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
    return prepare(str(src), out=tmp_path_factory.mktemp("data") / "d", vocab_size=512, val_frac=0.1, test_frac=0.1)


def run_train(data_dir, run_dir, *extra):
    return train.main(TINY + ["--data", str(data_dir), "--run-dir", str(run_dir), *extra])


def metrics(run_dir):
    return [json.loads(r) for r in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_a_complete_run(data_dir, tmp_path, capsys):
    assert run_train(data_dir, tmp_path / "run", "--tokens", "8192", "--save-every", "4") == 0
    out = capsys.readouterr().out
    block = out.split("\n---\n")[-1]
    summary = dict(line.split(":", 1) for line in block.strip().splitlines())
    for key in ("val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent", "total_tokens_M",
                "num_steps", "num_params_M", "depth", "tok_per_sec", "attention", "run_dir"):
        assert key in summary, key
    assert int(summary["num_steps"]) == 16 and float(summary["total_tokens_M"]) == round(16 * 512 / 1e6, 2)
    assert summary["mfu_percent"].strip() == "n/a"  # a CPU's peak is unknown: not 0.0
    assert summary["run_dir"].strip() == str(tmp_path / "run")
    assert "; scoring val_bpb on " in out and "; writing samples.txt and loss.png ..." in out  # no silent tail
    # TINY's d2 takes the scaling rules' learning rates, made for the rules' batch, not TINY's 512 tokens
    rules = hyperparams_for(train._model_config(json.loads((tmp_path / "run" / "config.json").read_text()), 512))
    assert f"optimizer: Muon matrix lr {rules['matrix_lr']:.4g}; AdamW embedding {rules['embedding_lr']:.4g}" in out
    assert f"(the scaling rules' for a {rules['total_batch_size']:,}-token batch, not this run's 512; " in out
    # samples continue the openings of validation documents, whatever the corpus is
    data = DataDir.open(data_dir)
    prompts = engine.sample_prompts(data)
    tokens, offsets = data.shards("val")[0]
    assert len(prompts) == 4 and prompts[0] == data.tokenizer.decode(tokens[offsets[0] + 1:offsets[0] + 9].tolist())
    assert (tmp_path / "run" / "samples.txt").read_text().split("\n\n-----\n\n")[1].startswith(prompts[1])
    # `llmlabs sample RUN` with no prompt starts a new document: no corpus is assumed
    capsys.readouterr()
    assert cli.main(["sample", str(tmp_path / "run"), "--max-tokens", "8", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip()
    # a real model after 16 steps beats nothing yet; the unigram comparison is the main job's (README)
    assert 0 < float(summary["val_bpb"]) < 20
    run = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "summary.json", "samples.txt", "loss.png", "tokenizer.json"):
        assert (run / name).exists(), name
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 17)) and rows[-1]["tokens"] == 16 * 512
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert json.loads((run / "summary.json").read_text())["num_steps"] == 16
    # what it read, as `sweep table` compares it
    assert json.loads((run / "summary.json").read_text())["data_id"] == data.data_id
    assert f"data: {data.path} (data_id {data.data_id}; {data.num_tokens('train'):,} train tokens)" in out


def test_eval_split_none_and_the_launchers_event_pipe(data_dir, tmp_path, monkeypatch, capsys):
    """What the autoresearch runner uses: no final evaluation, samples or plot, and one line per
    step on the pipe named by LLMLABS_EVENTS_FD ("timed" when the timed steps begin)."""
    import os

    r, w = os.pipe()
    monkeypatch.setenv(train.EVENTS_FD_VAR, str(w))
    assert run_train(data_dir, tmp_path / "run", "--tokens", "2048", "--eval-split", "none") == 0
    with os.fdopen(r) as f:
        events = f.read().split()
    # an eager run's first step is warm-up (EAGER_UNTIMED_STEPS): "timed" after it; then the saved checkpoint
    assert " ".join(events) == "step 1 timed step 2 step 3 step 4 saved"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "val_bpb" not in summary and summary["num_steps"] == 4
    assert not (tmp_path / "run" / "samples.txt").exists() and not (tmp_path / "run" / "loss.png").exists()
    assert (tmp_path / "run" / "checkpoints" / "LATEST").exists()
    assert "val_bpb" not in capsys.readouterr().out


def test_loss_goes_down(data_dir, tmp_path):
    run_train(data_dir, tmp_path / "run", "--tokens", "40960", "--matrix-lr", "0.02")
    rows = metrics(tmp_path / "run")
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 0.5, (first, last)


def test_budgets_pick_the_same_token_count(data_dir, tmp_path):
    """--tokens, --target-flops and --param-data-ratio all become a token budget; each ends the run
    at the step where that budget is used up."""
    run_train(data_dir, tmp_path / "a", "--tokens", "4096")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    from llmlabs.config import config_for_depth
    from llmlabs.model import build_model

    model = build_model(config_for_depth(2, vocab_size=512, sequence_len=64, aspect_ratio=32, head_dim=16,
                                         window_pattern="SL"), "cpu")
    fpt, nparams = model.flops_per_token(), model.num_params()["total"]
    run_train(data_dir, tmp_path / "b", "--target-flops", str(fpt * 4096))
    run_train(data_dir, tmp_path / "c", "--param-data-ratio", str(4096 / nparams))
    for name in "abc":
        assert metrics(tmp_path / name)[-1]["tokens"] == 4096, name
    assert cfg["tokens"] == 4096


def test_short_window_flag_sets_the_s_layers_span(data_dir):
    """--short-window reaches the model; unset, a CPU run keeps GPTConfig's quarter of the context
    (here 64 // 4 rounded up to 128: a full causal layer)."""
    import argparse

    p = argparse.ArgumentParser()
    train.add_args(p)
    for extra, windows in (([], [None, None]), (["--short-window", "8"], [8, None])):
        cfg = train.resolve_config(p.parse_args(TINY + ["--data", str(data_dir)] + extra), torch.device("cpu"))
        assert train.setup(cfg, torch.device("cpu")).model.windows == windows


def test_time_budget_stops_on_time(data_dir, tmp_path, capsys, monkeypatch):
    # so that 3 s of training read "too many" passes however slow the machine: 75 tokens, where one timed
    # step of 512 tokens projects >= 341 (0.01, 7.5K tokens, failed under two xdist workers' load)
    monkeypatch.setattr(preflight, "PASSES_WARN", 1e-4)
    run_train(data_dir, tmp_path / "run", "--time-budget", "3")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 3.0 <= summary["training_seconds"] < 4.5
    assert metrics(tmp_path / "run")[-1]["progress"] >= 1.0
    # the passes a time budget will read: said once, projected from the speed of the first timed steps
    out = capsys.readouterr().out
    assert out.count("warning: --time-budget 3 s at ") == 1 and "memorises them" in out
    train_tokens = DataDir.open(data_dir).manifest["splits"]["train"]["tokens"]
    assert summary["data_passes"] == round(metrics(tmp_path / "run")[-1]["tokens"] / train_tokens, 2)


def test_lr_schedule_shape():
    f = train.lr_multiplier
    assert f(0.0, 0.1, 0.5, 0.0) == pytest.approx(0.01)  # warmup starts low but not at zero
    assert f(0.05, 0.1, 0.5, 0.0) == pytest.approx(0.5)
    assert f(0.3, 0.1, 0.5, 0.0) == 1.0
    assert f(0.75, 0.0, 0.5, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(1.0, 0.0, 0.5, 0.1) == pytest.approx(0.1)


def test_resume_after_ctrl_c_equals_uninterrupted(data_dir, tmp_path):
    """Ctrl-C saves a checkpoint and exits 130; --resume continues to the same loss trajectory."""
    args = ["--tokens", str(512 * 30)]
    run_train(data_dir, tmp_path / "full", *args)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "llmlabs", "train", *TINY, "--data", str(data_dir),
           "--run-dir", str(tmp_path / "cut"), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    mpath = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not mpath.exists() or len(mpath.read_text().splitlines()) < 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "interrupted at step" in out and "--resume" in out
    cut_step = checkpoint.load(checkpoint.latest(tmp_path / "cut"))["step"]
    assert 5 <= cut_step < 30
    assert train.main(["--resume", str(tmp_path / "cut")]) == 0
    full, resumed = metrics(tmp_path / "full"), metrics(tmp_path / "cut")
    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    for a, b in zip(full, resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), a["step"]
    sa = json.loads((tmp_path / "full" / "summary.json").read_text())
    sb = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert sb["val_bpb"] == pytest.approx(sa["val_bpb"], rel=1e-5)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path, monkeypatch, capsys):
    from llmlabs.model import GPT

    calls = {"n": 0}
    real_forward = GPT.forward

    def poisoned(self, idx, targets=None, **kw):
        out = real_forward(self, idx, targets, **kw)
        if targets is not None:
            calls["n"] += 1
            if calls["n"] > 14:  # 2 micro-batches a step: step 8 onwards
                return out * float("nan")
        return out

    monkeypatch.setattr(GPT, "forward", poisoned)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # a terminal: the status line is redrawn with \r
    with pytest.raises(LabError, match=r"loss became nan at step 8.*step_000006"):
        run_train(data_dir, tmp_path / "run", "--tokens", "20480", "--save-every", "3")
    out = capsys.readouterr().out
    assert "\rstep " in out and out.endswith("\n")  # the error line will not land on the status line
    good = checkpoint.latest(tmp_path / "run")
    ck = checkpoint.load(good)
    assert ck["step"] == 6 and all(torch.isfinite(t).all() for t in ck["model"].values())


def test_out_of_memory_names_the_flag(data_dir, tmp_path, monkeypatch):
    from llmlabs.model import GPT

    def oom(self, *a, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(GPT, "forward", oom)
    with pytest.raises(LabError, match="lower --device-batch-size"):
        run_train(data_dir, tmp_path / "run", "--tokens", "2048")


def test_killed_checkpoint_write_leaves_previous_loadable(data_dir, tmp_path, monkeypatch):
    run_train(data_dir, tmp_path / "run", "--tokens", "2048")
    before = checkpoint.latest(tmp_path / "run")
    ck = checkpoint.load(before)

    def killed(tensors, path, *a, **kw):  # the process dies half-way through writing the weights
        Path(path).write_bytes(b"\x00" * 100)
        raise KeyboardInterrupt

    from llmlabs.config import GPTConfig
    from llmlabs.model import build_model

    model = build_model(GPTConfig(**ck["state"]["model_config"]), "cpu")
    model.load_state_dict(ck["model"])
    monkeypatch.setattr(checkpoint, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path / "run", 99, model, torch.optim.SGD(model.parameters(), lr=0.1), {})
    assert checkpoint.latest(tmp_path / "run") == before
    again = checkpoint.load(before)
    assert all(torch.equal(again["model"][k], ck["model"][k]) for k in ck["model"])


def test_corrupt_checkpoint_is_one_line_error(data_dir, tmp_path):
    run_train(data_dir, tmp_path / "run", "--tokens", "2048")
    path = checkpoint.latest(tmp_path / "run")
    blob = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(LabError, match=r"checkpoint .*step_000004 is unreadable"):
        checkpoint.load(path)


def test_checkpoint_state_round_trip():
    state = {"a": [1, 2.5, "x", None, True], "b": {3: torch.randn(4, 5), "c": (torch.arange(3), 7)},
             "nested": [{"t": torch.randn(2, dtype=torch.float64)}]}
    skel, tensors = checkpoint.flatten(state)
    json.dumps(skel)  # everything that is not a tensor is plain JSON
    back = checkpoint.unflatten(json.loads(json.dumps(skel)), tensors)
    assert back["a"] == [1, 2.5, "x", None, True]
    assert torch.equal(back["b"][3], state["b"][3]) and 3 in back["b"]
    assert torch.equal(back["b"]["c"][0], torch.arange(3)) and back["b"]["c"][1] == 7
    assert torch.equal(back["nested"][0]["t"], state["nested"][0]["t"])


def test_val_bpb_equals_hand_computation(data_dir):
    """evaluate_bpb against a float64 loop over the same rows (600 tokens: the first 10 rows of 64, the
    last batch cut to one row): nats of non-special targets over ln 2 x their UTF-8 bytes, with token
    bytes counted from the tokenizer's own byte strings."""
    from llmlabs.config import config_for_depth
    from llmlabs.data.loader import BestFitLoader
    from llmlabs.data.shards import DataDir
    from llmlabs.evaluate import evaluate_bpb
    from llmlabs.model import build_model

    data = DataDir.open(data_dir)
    torch.manual_seed(0)
    model = build_model(config_for_depth(2, vocab_size=512, sequence_len=64, aspect_ratio=32, head_dim=16,
                                         window_pattern="SL"), "cpu")
    with torch.no_grad():  # random weights everywhere, so the logits are far from uniform
        for p in model.parameters():
            p.normal_(0, 0.3)
    res = evaluate_bpb(model, data, "val", batch_size=3, seq_len=64, max_tokens=600, device=torch.device("cpu"))
    tb = data.tokenizer.token_bytes()
    nats = nbytes = 0.0
    seen = 0
    for x, y in BestFitLoader(data, "val", 3, 64, seed=0, loop=False):
        if seen >= 600:
            break
        x, y = x[:(640 - seen) // 64], y[:(640 - seen) // 64]
        with torch.no_grad():
            logp = F.log_softmax(model(x).double(), dim=-1)
        for b in range(y.shape[0]):
            for t in range(y.shape[1]):
                tok = int(y[b, t])
                if tb[tok] > 0:
                    nats -= float(logp[b, t, tok])
                    nbytes += int(tb[tok])
        seen += y.numel()
    assert res["tokens"] == 10 * 64 and seen == res["tokens"]
    assert res["bpb"] == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-6)
    assert res["bytes"] == nbytes


def test_eval_and_sample_commands(data_dir, tmp_path, capsys):
    run_train(data_dir, tmp_path / "run", "--tokens", "4096")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert float(out.split("val_bpb:")[1].split()[0]) == pytest.approx(summary["val_bpb"], rel=1e-5)
    assert cli.main(["eval", str(tmp_path / "run"), "--split", "test", "--tokens", "1024"]) == 0
    assert "test_bpb:" in capsys.readouterr().out
    assert cli.main(["sample", str(tmp_path / "run"), "--prompt", "import os", "--max-tokens", "8",
                     "--num-samples", "2", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    first, second = out.split("-" * 40 + "\n")
    assert first.startswith("import os") and first == second  # greedy: the same text twice


def test_eval_with_other_tokenizer_is_one_line_error(data_dir, tmp_path, capsys):
    from llmlabs.data.prepare import prepare

    run_train(data_dir, tmp_path / "run", "--tokens", "2048")
    src = tmp_path / "other"
    src.mkdir()
    for i in range(30):
        (src / f"{i}.txt").write_text(f"completely different text {i} " * 50 + "".join(chr(0x4e00 + i + j) for j in range(40)))
    other = prepare(str(src), out=tmp_path / "other-data", vocab_size=300, val_frac=0.3, test_frac=0.3)
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "run"), "--data", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: tokenizer of") and "--data" in err and "\n" not in err


def test_tensorboard_logging(data_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_train(data_dir, tmp_path / "run", "--tokens", "4096", "--tensorboard")
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("loss")]
    assert losses == pytest.approx([r["loss"] for r in metrics(tmp_path / "run")], rel=1e-6)


def wandb_history(path: Path) -> list[dict]:
    """The history rows of a wandb run file (offline mode writes it): a LevelDB-style log (7-byte file
    header; records of crc32, uint16 length, type in 32 KiB blocks) of wandb's Record protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunk, rows = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(chunk)
            chunk = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


def test_wandb_logging_offline_and_resumed(data_dir, tmp_path, monkeypatch):
    """--wandb with no network (WANDB_MODE=offline): wandb's own run file holds the losses of
    metrics.jsonl, and a resumed run goes on in the same wandb run (RUN/wandb-id)."""
    pytest.importorskip("wandb", reason="the wandb package (an optional extra) is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    run_train(data_dir, run, "--tokens", "2048", "--wandb", "--save-every", "2")
    run_id = (run / "wandb-id").read_text()
    first = wandb_history(next((run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")))
    assert [r["loss"] for r in first] == pytest.approx([r["loss"] for r in metrics(run)], rel=1e-7)
    assert [r["_step"] for r in first] == [1, 2, 3, 4]
    (run / "checkpoints" / "LATEST").write_text("step_000002")  # as if stopped at step 2, then resumed
    time.sleep(1.1)  # wandb names a process's folder by the second it started
    shutil.rmtree(run / "checkpoints" / "step_000004")
    assert train.main(["--resume", str(run)]) == 0
    files = sorted((run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))  # one per process, by time
    assert (run / "wandb-id").read_text() == run_id and len(files) == 2
    again = wandb_history(files[1])
    assert [r["_step"] for r in again] == [3, 4]
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in metrics(run)][2:], rel=1e-7)


def test_existing_run_dir_is_refused(data_dir, tmp_path):
    run_train(data_dir, tmp_path / "run", "--tokens", "2048")
    with pytest.raises(LabError, match="--resume"):
        run_train(data_dir, tmp_path / "run", "--tokens", "2048")


def test_eval_every_logs_val_bpb(data_dir, tmp_path):
    run_train(data_dir, tmp_path / "run", "--tokens", "4096", "--eval-every", "4")
    vals = [r for r in metrics(tmp_path / "run") if "val_bpb" in r]
    assert [r["step"] for r in vals] == [4, 8]


def test_seed_changes_weights_and_data_order(data_dir, tmp_path):
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        run_train(data_dir, tmp_path / name, "--tokens", "2048", "--seed", seed)
    a, b, c = ([r["loss"] for r in metrics(tmp_path / n)] for n in "abc")
    assert a == b and a != c


def test_optimizer_and_schedule_flags_reach_the_optimizer(data_dir, tmp_path, capsys):
    lrs = {"--matrix-lr": 0.011, "--embedding-lr": 0.12, "--unembedding-lr": 0.0013, "--scalar-lr": 0.17}
    flags = [str(x) for kv in lrs.items() for x in kv]
    run_train(data_dir, tmp_path / "run", "--tokens", str(512 * 20), "--weight-decay", "0.05", "--warmup-frac", "0.2",
              "--warmdown-frac", "0.3", "--final-lr-frac", "0.25", "--n-kv-head", "1", "--eval-split", "test", *flags)
    ck = checkpoint.load(checkpoint.latest(tmp_path / "run"))
    initial = {round(g["initial_lr"], 6) for g in ck["optimizer"]["param_groups"]}
    width_scale = (64 / 768) ** -0.5  # AdamW embedding/unembedding LRs are given for width 768
    expect = {0.011, 0.17, round(0.12 * width_scale, 6), round(0.0013 * width_scale, 6)}
    assert expect <= initial, (expect, initial)
    out = capsys.readouterr().out  # given learning rates: printed, with no note about the rules' batch
    assert "optimizer: Muon matrix lr 0.011; AdamW embedding 0.12, unembedding 0.0013, scalars 0.17; weight decay 0.05\n" in out
    cfg = ck["state"]["model_config"]
    assert cfg["n_kv_head"] == 1 and cfg["n_head"] == 4
    rows = metrics(tmp_path / "run")
    # progress before step k (1-based) is (k-1)/20: warmup over the first 20%, warmdown over the last 30%
    expect = [train.lr_multiplier((k - 1) / 20, 0.2, 0.3, 0.25) for k in range(1, 21)]
    assert [r["lr_mult"] for r in rows] == pytest.approx(expect)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "test_bpb" in summary and "val_bpb" not in summary


def test_attention_flag_forces_backend(data_dir, tmp_path):
    run_train(data_dir, tmp_path / "run", "--tokens", "1024", "--attention", "cpu")
    assert "cpu" in json.loads((tmp_path / "run" / "summary.json").read_text())["attention"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: compile and bf16 autocast path")
def test_cuda_compiled_and_eager_runs_agree(data_dir, tmp_path):
    common = ["--tokens", str(512 * 12), "--device", "cuda"]
    tiny = [a for a in TINY if a not in ("--device", "cpu")]
    train.main(tiny + ["--data", str(data_dir), "--run-dir", str(tmp_path / "c"), *common])
    train.main(tiny + ["--data", str(data_dir), "--run-dir", str(tmp_path / "e"), *common, "--no-compile"])
    c, e = metrics(tmp_path / "c"), metrics(tmp_path / "e")
    assert [r["loss"] for r in c] == pytest.approx([r["loss"] for r in e], rel=2e-2)


def test_presets_and_the_depth_dial(monkeypatch):
    """No --depth: the hardware preset is a fixed experiment (GPU: the autoresearch d8 run with its
    2^19 batch). With --depth: the batch comes from the scaling rules and the device batch shrinks
    with the width. Where twice the rows fit (40 bytes per layer x row x channel x position in 80%
    of the GPU) they double, at any depth, the total batch unchanged; given rows are kept."""
    import argparse

    p = argparse.ArgumentParser()
    train.add_args(p)
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    # 64 rows at width 512 -> 16 at width 1280 and 1664; d8 at 128 rows needs 42.9 GB, d20 at 32
    # 67.1 GB, d26 at 32 113.4 GB
    for gib, d8_rows, d20_rows, d26_rows in ((24, 64, 16, 16), (48, 64, 16, 16), (80, 128, 32, 16), (141, 128, 32, 32)):
        monkeypatch.setattr(preflight, "gpu_memory", lambda device: gib * 2**30)
        d8 = train.resolve_config(p.parse_args([]), gpu)
        assert (d8["depth"], d8["total_batch_size"], d8["seq_len"], d8["time_budget"]) == (8, 2**19, 2048, 300.0)
        assert (d8["window_pattern"], d8["short_window"]) == ("SSSL", 1024)  # autoresearch's windows
        assert d8["device_batch_size"] == d8_rows
        d20 = train.resolve_config(p.parse_args(["--depth", "d20", "--tokens", "1e9"]), gpu)
        assert "total_batch_size" not in d20 and "time_budget" not in d20  # scaling rules; --tokens is the budget
        assert d20["device_batch_size"] == d20_rows
        assert train.resolve_config(p.parse_args(["--depth", "26"]), gpu)["device_batch_size"] == d26_rows
        assert train.resolve_config(p.parse_args(["--device-batch-size", "32"]), gpu)["device_batch_size"] == 32
        short = train.resolve_config(p.parse_args(["--depth", "20", "--seq-len", "1024"]), gpu)
        assert short["device_batch_size"] == 32 if gib >= 48 else 16  # half the positions, half the bytes
    small = train.resolve_config(p.parse_args(["--device-batch-size", "3"]), cpu)
    assert small["device_batch_size"] == 3 and small["depth"] == train.CPU_PRESET["depth"]
    # the CPU main job is budgeted in tokens (its val_bpb does not depend on how busy the machine is);
    # a budget of the user's replaces the preset's
    main_job = train.resolve_config(p.parse_args([]), cpu)
    assert main_job["tokens"] == 2**20 and "time_budget" not in main_job
    timed = train.resolve_config(p.parse_args(["--time-budget", "60"]), cpu)
    assert timed["time_budget"] == 60 and "tokens" not in timed


def test_data_takes_a_prepared_corpus_name(monkeypatch, data_dir, tmp_path):
    from llmlabs.data.shards import locate

    monkeypatch.setenv("LLMLABS_HOME", str(tmp_path))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mycorpus-v8192").symlink_to(data_dir)
    for spec in ("mycorpus", "mycorpus-v8192"):
        assert DataDir.open(spec).path == tmp_path / "data" / "mycorpus-v8192"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mycorpus").mkdir()  # a path of that name wins: it is what the user typed
    assert locate("mycorpus") == Path("mycorpus")
    with pytest.raises(LabError, match="othercorpus is not a data directory: it does not exist"):
        DataDir.open("othercorpus")


def test_default_corpus_by_device_and_the_passes_warning(monkeypatch, data_dir):
    from llmlabs.data import prepare as prepare_mod
    from llmlabs.data.shards import DataDir

    asked = []
    monkeypatch.setattr(prepare_mod, "default_data_dir", lambda source, vocab: asked.append(source) or data_dir)
    for device, source in (("cuda", "pysrc"), ("cpu", "pystdlib")):
        assert train._open_data(None, torch.device(device)).path == DataDir.open(data_dir).path
        assert asked[-1] == source
    data = DataDir.open(data_dir)
    n = data.manifest["splits"]["train"]["tokens"]
    # the GPU default reads pysrc 5.5 times (H200, 5 minutes): no warning; 10 passes: one
    assert preflight.passes_warning(5.5 * n, data, "this budget") is None
    assert preflight.passes_warning(8 * n, data, "this budget") is None
    warning = preflight.passes_warning(10 * n, data, "this budget")
    assert warning.startswith(f"warning: this budget reads about {10 * n / 1e6:.0f}M tokens, the ")
    assert "10 times" in warning and "llmlabs prepare climbmix" in warning


def test_a_batch_that_rows_cannot_fill_names_the_nearest_that_they_can(data_dir, tmp_path, capsys):
    """TINY's 512-token batch over rows of 4 x 48 tokens (192): refused before any of the run is written,
    in one line that offers 576, the nearest multiple (the seq len alone changed: the batch may be
    the preset's, which the user never typed)."""
    assert cli.main(["train", *TINY, "--data", str(data_dir), "--run-dir", str(tmp_path / "r"), "--seq-len", "48"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a batch of 512 tokens" in err[0] and "= 4 x 48 x 1" in err[0]
    assert "pass --total-batch-size 576 (the nearest multiple)" in err[0]
    assert [f.name for f in (tmp_path / "r").iterdir()] == [".lock"]  # no config, metrics or checkpoint


def test_status_line_eta_extrapolates_the_timed_steps_only(capsys):
    row = {"progress": 0.25, "loss": 2.5, "tok_per_sec": 1.5e6, "mfu": 40.0, "train_time": 30.0}
    train._status(7, row)
    train._status(1, {**row, "progress": 0.001, "train_time": 0.0})  # compile steps: nothing timed yet
    first, second = capsys.readouterr().out.splitlines()
    assert first.startswith("step     7 |  25.0% | loss 2.5000 |") and first.endswith("ETA    90s")
    assert second.endswith("ETA     ?")
    train._status(8, {**row, "mfu": None})  # a CPU: no known peak, so no MFU
    assert "| MFU    n/a | ETA" in capsys.readouterr().out
    train._status(9, {**row, "progress": 1.038})  # a time budget's last step ends past it
    assert capsys.readouterr().out.rstrip().endswith("| 103.8% | loss 2.5000 |   1500.0K tok/s | MFU  40.0% | ETA     0s")


def test_ranks_start_from_identical_weights_and_read_other_data(data_dir):
    import argparse

    p = argparse.ArgumentParser()
    train.add_args(p)
    runs = []
    for rank in (0, 1):
        cfg = train.resolve_config(p.parse_args(TINY + ["--data", str(data_dir)]), torch.device("cpu"))
        runs.append(train.setup(cfg, torch.device("cpu"), rank=rank, world=2))
    a, b = (r.model.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(next(runs[0].loader)[0], next(runs[1].loader)[0])


def torchrun(ranks, args, **kw):
    return subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", str(ranks),
                           "-m", "llmlabs", "train", *args], env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=300, **kw)


def cut_at(run, tmp, step):
    """A copy of `run` as if it had been stopped after its checkpoint at `step`."""
    cut = tmp / f"{run.name}-cut"
    shutil.copytree(run, cut)
    for ck in (cut / "checkpoints").glob("step_*"):
        if int(ck.name.split("_")[1]) > step:
            shutil.rmtree(ck)
    (cut / "checkpoints" / "LATEST").write_text(f"step_{step:06d}")
    return cut


def test_torchrun_ranks_follow_one_process_and_resume_on_another_rank_count(data_dir, tmp_path):
    """The multi-process path end to end (gloo on CPU). 2 ranks x 4 rows and 4 ranks x 2 rows against
    one rank of 4 rows x 2 accumulation steps: each step sees the same rows (the loader's one
    stream), so the losses and val_bpb agree up to float summation order (2 ranks: to the bit here). The 2-rank run's step-5 checkpoint then finishes on one
    process, and the one process's on 2 ranks, each as the uninterrupted run did."""
    one, two = tmp_path / "one", tmp_path / "two"
    # torchrun at one rank: the distributed optimizer and its collectives with nothing to share
    out = torchrun(1, [*TINY, "--data", str(data_dir), "--run-dir", str(one), "--tokens", "5120", "--save-every", "5"])
    assert out.returncode == 0 and "distributed MuonAdamW over 1 rank(s): 0.0 MiB" in out.stdout, out.stderr[-2000:]
    out = torchrun(2, [*TINY, "--data", str(data_dir), "--run-dir", str(two), "--tokens", "5120", "--save-every", "5"])
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stdout.count("\n---\n") == 1  # one summary: rank 0 prints
    assert "x 2 ranks x 1 accum" in out.stdout and "distributed MuonAdamW over 2 rank(s)" in out.stdout
    ref = [r["loss"] for r in metrics(one)]
    assert len(ref) == 10 and [r["loss"] for r in metrics(two)] == pytest.approx(ref, rel=1e-6)
    bpb = json.loads((one / "summary.json").read_text())["val_bpb"]
    assert json.loads((two / "summary.json").read_text())["val_bpb"] == pytest.approx(bpb, rel=1e-6)
    four = tmp_path / "four"  # 4 ranks x 2 rows
    out = torchrun(4, [*TINY, "--data", str(data_dir), "--run-dir", str(four), "--tokens", "5120", "--eval-split", "none"])
    assert out.returncode == 0 and "= 2 x 64 x 4 ranks x 1 accum" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    # 4 ranks sum a step's gradient in another order: 1.5e-7 apart at step 2, and this tiny model at its
    # learning rates grows the difference ~4x a step, to 2.6e-4 by step 8 (measured 2026-12-03)
    got = [r["loss"] for r in metrics(four)]
    assert got[:3] == pytest.approx(ref[:3], rel=1e-5) and got == pytest.approx(ref, rel=2e-3)

    assert train.main(["--resume", str(cut_at(two, tmp_path, 5))]) == 0  # 2 ranks -> 1
    out = torchrun(2, ["--resume", str(cut_at(one, tmp_path, 5))])  # 1 rank -> 2
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    for name in ("two-cut", "one-cut"):
        assert [r["loss"] for r in metrics(tmp_path / name)] == pytest.approx(ref, rel=1e-6), name
        assert json.loads((tmp_path / name / "summary.json").read_text())["val_bpb"] == pytest.approx(bpb, rel=1e-6)


def multi_gpu_bench(*args, **kw):
    return subprocess.run([sys.executable, str(REPO / "bench" / "multi_gpu.py"), *args], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=600, **kw)


def test_the_multi_gpu_benchmark_reports_what_its_runs_measured(data_dir, tmp_path):
    """bench/multi_gpu.py end to end on 2 gloo ranks (the x8 measurement's dry run): every figure in
    report.md is recomputed here from the runs' own summaries and metrics, and each run had the
    shape the report says (the floor's micro-batches cut in two, the resume on half the ranks)."""
    from conftest import bench_script

    out = tmp_path / "mg"
    res = multi_gpu_bench("--data", str(data_dir), "--ranks", "1,2", "--depth", "2", "--rows", "4", "--seq-len", "64",
                          "--steps", "3", "--trajectory-steps", "6", "--out-dir", str(out), "--aspect-ratio", "32",
                          "--head-dim", "16", "--window-pattern", "SL", "--device", "cpu")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    report = (out / "report.md").read_text()
    assert "- device: cpu (" in report and "a dry run" in report and "- commit: " in report and (out / "trajectory.png").stat().st_size > 10_000
    tok = {n: json.loads((out / f"scaling-{n}" / "summary.json").read_text())["tok_per_sec"] for n in (1, 2)}
    assert f"| 2 | 512 | {tok[2]:,.0f} | n/a | {tok[2] / (2 * tok[1]):.3f} |" in report
    assert "= 4 x 64 x 2 ranks x 1 accum" in (out / "scaling-2.log").read_text()

    bench = bench_script("multi_gpu")
    two, one, halves = (bench.losses(out / name) for name in ("trajectory-2", "trajectory-1", "trajectory-1-halves"))
    assert len(two) == len(one) == len(halves) == 6
    assert "= 2 x 64 x 1 ranks x 4 accum" in (out / "trajectory-1-halves.log").read_text()
    assert f"largest relative loss gap {bench.gap(two, one):.2e}" in report
    assert bench.gap(two, one) < 1e-5 and bench.gap(halves, one) < 1e-4  # the same rows each step, summed apart
    assert f"against 1 rank: largest relative gap {bench.gap(halves, one):.2e}" in report
    cut = bench.losses(out / "trajectory-2-cut")
    assert "x 1 ranks x 2 accum" in (out / "trajectory-2-cut.log").read_text()
    assert sorted(s for s in cut if s > 3) == [4, 5, 6]
    assert bench.gap({s: cut[s] for s in (4, 5, 6)}, two) < 1e-5
    assert "checkpoint finished on 1 rank: largest relative loss gap" in report


@pytest.mark.parametrize("args, error", [
    (["--parts", "scaling,trajectory,bogus"], "--parts: unknown bogus"),
    (["--parts", "floor", "--rows", "1"], "--parts floor runs --rows cut in two"),
    (["--ranks", "2,4"], "--ranks must start at 1"),
    (["--device-batch-size=8", "--time-budget", "60"], "--device-batch-size, --time-budget: set by this script"),
])
def test_the_multi_gpu_benchmark_refuses_bad_flags_before_any_run(args, error, tmp_path):
    res = multi_gpu_bench("--data", str(tmp_path), "--out-dir", str(tmp_path / "mg"), *args)
    assert res.returncode == 2 and error in res.stderr.splitlines()[-1], res.stderr
    assert not (tmp_path / "mg").exists()


def test_a_second_run_on_a_locked_run_dir_is_refused(data_dir, tmp_path):
    """Two processes on one run directory would interleave checkpoints and metrics: the second one
    (new run or --resume) is refused, naming the holder; once the holder dies the lock is free."""
    run_train(data_dir, tmp_path / "run", "--tokens", "2048", "--eval-split", "none")
    hold = ("import sys; from llmlabs import checkpoint; held = checkpoint.lock_run(sys.argv[1]); print('locked', flush=True); "
            "sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path / "run")], env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(LabError, match=rf"locked by process {proc.pid}"):
            run_train(data_dir, tmp_path / "run", "--tokens", "2048")
        with pytest.raises(LabError, match=rf"locked by process {proc.pid}"):
            train.main(["--resume", str(tmp_path / "run")])
    finally:
        proc.kill()
        proc.wait()
    assert train.main(["--resume", str(tmp_path / "run")]) == 0


def test_resume_falls_back_past_a_damaged_newest_checkpoint(data_dir, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run_train(data_dir, run, "--tokens", "4096", "--save-every", "4", "--eval-split", "none")
    newest = checkpoint.latest(run)
    assert newest.name == "step_000008" and (run / "checkpoints" / "step_000004").exists()
    blob = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(blob[: len(blob) // 2])  # a write cut short
    capsys.readouterr()
    assert checkpoint.load_run(run, "cpu")[1]["step"] == 4  # eval and sample fall back too
    assert "skipped checkpoint" in capsys.readouterr().out
    with pytest.raises(LabError, match=r"continues the run as its config.json says, so --depth, --tokens would be ign"):
        train.main(["--resume", str(run), "--depth", "4", "--tokens", "1e6"])
    # a GPU machine's default device: the run goes on where it started, and says so
    monkeypatch.setattr(common, "autodetect_device", lambda: "cuda")
    assert train.main(["--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "skipped checkpoint" in out and "step_000008" in out and f"resumed {run} at step 4" in out
    assert "resuming on cpu, the run's own device" in out
    assert [r["step"] for r in metrics(run)] == list(range(1, 9))
    assert checkpoint.load(checkpoint.latest(run))["step"] == 8
    for name in ("step_000004", "step_000008"):
        (run / "checkpoints" / name / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(LabError, match=r"no checkpoint of .* loads.*step_000008.*step_000004") as e:
        checkpoint.load_run(run, "cpu")
    assert "\n" not in str(e.value)


def test_resume_drops_a_torn_last_metrics_line(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3)]
    path.write_text("\n".join(rows) + '\n{"step": 4, "lo')  # killed mid-write
    tracking.truncate(path, 2)
    assert path.read_text() == rows[0] + "\n" + rows[1] + "\n"
    assert "torn" in capsys.readouterr().out
    path.write_text(rows[0] + "\n\n{\"step\": 2, \"lo\n" + rows[2] + "\n")
    with pytest.raises(LabError, match=r"line 3 is not JSON"):
        tracking.truncate(path, 3)


def test_ctrl_c_in_the_final_evaluation_keeps_the_run(data_dir, tmp_path, monkeypatch, capsys):
    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "_evaluate", interrupted)
    assert run_train(data_dir, tmp_path / "run", "--tokens", "2048") == 130
    out = capsys.readouterr().out
    assert "saved" in out and f"llmlabs eval {tmp_path / 'run'}" in out
    assert checkpoint.load(checkpoint.latest(tmp_path / "run"))["step"] == 4


def test_a_model_too_large_for_the_memory_is_refused_before_allocating(data_dir, tmp_path, monkeypatch):
    have = 2**30
    monkeypatch.setattr(preflight, "memory_available", lambda device: have)
    with pytest.raises(LabError, match=r"--depth 64 needs at least .* GiB .* the cpu has 1.0 GiB: the largest depth "
                                       r"that fits is (\d+) \(--depth \1\) at --device-batch-size 4") as e:
        run_train(data_dir, tmp_path / "run", "--tokens", "1024", "--depth", "64")
    fits = int(re.search(r"fits is (\d+)", str(e.value)).group(1))
    from llmlabs.config import config_for_depth

    def need(d):
        return preflight.memory_need(config_for_depth(d, vocab_size=512, sequence_len=64, aspect_ratio=32, head_dim=16,
                                                   window_pattern="SL"), 4)[1]
    assert need(fits) <= have < need(fits + 1)  # the largest, by the same estimate
    assert not (tmp_path / "run" / "checkpoints").exists()
