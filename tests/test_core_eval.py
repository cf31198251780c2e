"""CORE (llmlabs/core_eval.py) on a small bundle in the real bundle's layout (eval_bundle/core.yaml,
eval_meta_data.csv, eval_data/<category>/<task>.jsonl), zipped and served from 127.0.0.1: the download
is checksummed and unpacked atomically (a bad checksum is one error line and leaves nothing), prompts
render as nanochat's templates do, the batched scorer agrees with one plain forward per prompt, and
centering and the CORE mean match values worked out by hand. `llmlabs train --eval-core-every` logs CORE
and `llmlabs eval --tasks core` scores it."""
import csv
import hashlib
import io
import json
import random
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import WORDS, random_text
from llmlabs import checkpoint, cli, core_eval
from llmlabs.common import LabError
from llmlabs.data.tokenizer import Tokenizer
from llmlabs.model import build_model
from test_model import randomized, tiny_config

# label, type, shots, delimiter, random baseline (%), the golds of its 6 items (None: language modeling)
TASKS = [("mc_zero", "multiple_choice", 0, " ", 25, [0, 1, 0, 2, 3, 0]),
         ("mc_few", "multiple_choice", 2, "\nAnswer: ", 25, [1, 0, 2, 0, 3, 1]),
         ("schema_zero", "schema", 0, " ", 50, [0, 0, 1, 0, 1, 0]),
         ("schema_few", "schema", 1, " ", 50, [1, 0, 0, 1, 0, 1]),
         ("lm_zero", "language_modeling", 0, " ", 0, None),
         ("lm_few", "language_modeling", 3, "\nA: ", 0, None)]


def bundle_zip(tok, seed=0) -> bytes:
    rng = random.Random(seed)
    # multiple-choice choices of 1 (mc_zero) or 2 (mc_few) words that are one token each: the choices of
    # an item have answers of one length, so a model with constant logits ties them exactly
    one = sorted({w for w in WORDS if len(tok.encode(" " + w)) == 1})
    files, config = {}, []
    for label, kind, shots, delim, _, golds in TASKS:
        if kind == "multiple_choice":
            n = 1 if label == "mc_zero" else 2
            items = [{"query": random_text(rng, rng.randint(3, 12)), "gold": g,
                      "choices": [" ".join(rng.sample(one, n)) for _ in range(4)]} for g in golds]
        elif kind == "schema":
            items = [{"context_options": [random_text(rng, rng.randint(2, 8)) for _ in range(2)], "gold": g,
                      "continuation": random_text(rng, 3)} for g in golds]
        else:
            items = [{"context": random_text(rng, rng.randint(2, 10)) + " ", "continuation": random_text(rng, 2)}
                     for _ in range(6)]
        uri = f"{kind}_tasks/{label}.jsonl"
        files[f"eval_bundle/eval_data/{uri}"] = "".join(json.dumps(i) + "\n" for i in items)
        config.append({"label": label, "dataset_uri": uri, "num_fewshot": [shots], "icl_task_type": kind,
                       **({"continuation_delimiter": delim} if delim != " " else {})})
    files["eval_bundle/core.yaml"] = yaml.safe_dump({"icl_tasks": config})
    meta = io.StringIO()
    w = csv.writer(meta)
    w.writerow(["Eval Task", "Task Category", "Task Type", "#shots", "#datapoints", "Random baseline",
                "Centered Metric?", "Description"])
    for label, kind, shots, _, base, _ in [*TASKS, ("unused_task", "schema", 0, " ", 50, None)]:
        w.writerow([label, "test", kind.replace("_", " "), shots, 6, base, "", f"the {label} fixture, with, commas"])
    files["eval_bundle/eval_meta_data.csv"] = meta.getvalue()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(4)
    return Tokenizer.train(iter([random_text(rng, 300) for _ in range(60)]), 400)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tok):
    """The bundle zip on a local HTTP server: (url, sha256, server with its request log)."""
    root = tmp_path_factory.mktemp("www")
    data = bundle_zip(tok)
    (root / "eval_bundle.zip").write_bytes(data)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(root)))
    server.paths = []
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/eval_bundle.zip", hashlib.sha256(data).hexdigest(), server
    server.shutdown()
    server.server_close()


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        self.server.paths.append(self.path)


@pytest.fixture(scope="module")
def home(served, tmp_path_factory):
    """$LLMLABS_HOME with the bundle prepared by `llmlabs prepare core` (the first download)."""
    url, sha, server = served
    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("home")
    mp.setenv("LLMLABS_HOME", str(home))
    mp.setenv(core_eval.URL_VAR, url)
    mp.setenv(core_eval.SHA_VAR, sha)
    assert cli.main(["prepare", "core"]) == 0
    yield home
    mp.undo()


def test_prepare_downloads_checks_and_unpacks_once(home, served, capsys):
    _, sha, server = served
    out = home / "core"
    assert sorted(p.name for p in home.iterdir()) == ["core"]  # no zip, no temporary folder left
    assert json.loads((out / "bundle.json").read_text())["sha256"] == sha
    tasks = core_eval.load_tasks()
    assert [(t["label"], t["type"], t["fewshot"], t["delimiter"], t["baseline"]) for t in tasks] == \
        [(label, kind, shots, delim, base) for label, kind, shots, delim, base, _ in TASKS]
    asked = len(server.paths)
    assert cli.main(["prepare", "core"]) == 0 and len(server.paths) == asked  # prepared: nothing fetched
    assert "already prepared" in capsys.readouterr().out


def test_a_bad_checksum_is_one_line_and_leaves_nothing(served, tmp_path, monkeypatch, capsys):
    url, sha, _ = served
    monkeypatch.setenv("LLMLABS_HOME", str(tmp_path))
    monkeypatch.setenv(core_eval.URL_VAR, url)
    monkeypatch.setenv(core_eval.SHA_VAR, "0" * 64)
    assert cli.main(["prepare", "core"]) == 2
    monkeypatch.delenv(core_eval.SHA_VAR)  # the pinned sha256 of the real bundle refuses the fixture too
    assert cli.main(["prepare", "core"]) == 2
    err = [e for e in capsys.readouterr().err.splitlines() if not e.startswith("download ") and e.strip()]  # tqdm's
    assert len(err) == 2 and all(e.startswith(f"error: {url} has sha256 {sha[:16]}..., not the expected ") for e in err)
    assert "0000000000000000" in err[0] and core_eval.BUNDLE_SHA256[:16] in err[1] and core_eval.SHA_VAR in err[1]
    assert list(tmp_path.iterdir()) == []  # the download deleted, no bundle
    with pytest.raises(LabError, match=r"no CORE bundle in .*core: run `llmlabs prepare core`"):
        core_eval.load_tasks()


def test_prompts_and_draws_are_nanochats(tmp_path):
    shots = [{"query": "Q1", "choices": ["a", "b"], "gold": 1}]
    assert core_eval._render("multiple_choice", {"query": "Q2", "choices": ["c", "d"]}, shots, "\nA: ") == \
        ["Q1\nA: b\n\nQ2\nA: c", "Q1\nA: b\n\nQ2\nA: d"]
    shots = [{"context_options": ["x1", "x2"], "continuation": "y", "gold": 0}]
    assert core_eval._render("schema", {"context_options": ["u", "v"], "continuation": "w"}, shots, " ") == \
        ["x1 y\n\nu w", "x1 y\n\nv w"]
    shots = [{"context": " c1 ", "continuation": "k1"}]  # contexts trimmed; the prompt without the answer stripped
    assert core_eval._render("language_modeling", {"context": "c2\n", "continuation": "k2"}, shots, " ") == \
        ["c1 k1\n\nc2", "c1 k1\n\nc2 k2"]
    # nanochat's draws: items shuffled by Random(1337) (a cap takes the first), item i's shots by Random(1234 + i)
    (tmp_path / "t.jsonl").write_text("".join(f"{i}\n" for i in range(10)))
    order = list(range(10))
    random.Random(1337).shuffle(order)
    assert core_eval._items({"path": tmp_path / "t.jsonl"}, None) == order
    assert core_eval._items({"path": tmp_path / "t.jsonl"}, 4) == order[:4]
    assert core_eval._shots(order, 3, 2) == [order[j] for j in random.Random(1237).sample([0, 1, 2, 4, 5, 6, 7, 8, 9], 2)]
    assert core_eval._shots(order, 3, 0) == []
    rows = [[9, 1, 2, 3], [9, 1, 5], [9, 1, 2, 6]]
    assert [s for _, s, _ in core_eval._spans("multiple_choice", rows)] == [2, 2, 2]
    assert [(s, e) for _, s, e in core_eval._spans("schema", [[9, 4, 7, 8], [9, 5, 5, 7, 8]])] == [(2, 4), (3, 5)]
    assert [(s, e) for _, s, e in core_eval._spans("language_modeling", [[9, 4], [9, 4, 6, 7]])] == [(2, 4)]


def test_centering_and_core_by_hand(home, tok):
    """All-zero logits (lm_head zeroed): the choices of an item tie (answers of one length), and the first
    wins; greedy decoding gives token 0, a byte no continuation holds. So acc = the share of items whose
    gold is 0, and 0 for language modeling."""
    model = build_model(tiny_config(sequence_len=256, vocab_size=tok.vocab_size), "cpu")
    with torch.no_grad():
        model.lm_head.weight.zero_()
    res = core_eval.evaluate_core(model, tok, "cpu")
    acc = {k: v["acc"] for k, v in res["tasks"].items()}
    assert acc == {"mc_zero": 3 / 6, "mc_few": 2 / 6, "schema_zero": 4 / 6, "schema_few": 3 / 6, "lm_zero": 0, "lm_few": 0}
    # (acc - b/100) / (1 - b/100): (1/2 - 1/4) / (3/4) = 1/3; (1/3 - 1/4) / (3/4) = 1/9; (2/3 - 1/2) / (1/2) = 1/3; 0
    centered = {k: v["centered"] for k, v in res["tasks"].items()}
    assert centered == pytest.approx({"mc_zero": 1 / 3, "mc_few": 1 / 9, "schema_zero": 1 / 3, "schema_few": 0,
                                      "lm_zero": 0, "lm_few": 0})
    assert res["core"] == pytest.approx((1 / 3 + 1 / 9 + 1 / 3) / 6) == pytest.approx(7 / 54)
    assert all(v["items"] == 6 for v in res["tasks"].values())


def reference_acc(model, tok, task, items):
    """One unpadded forward per prompt, in float64: the definitions in core_eval's docstring."""
    right = 0
    for i, item in enumerate(items):
        shots = core_eval._shots(items, i, task["fewshot"])
        prompts = core_eval._render(task["type"], item, shots, task["delimiter"])
        scores, greedy = [], True
        for tokens, s, e in core_eval._spans(task["type"], [[tok.bos_id] + tok.encode(p) for p in prompts]):
            cut = max(0, len(tokens) - model.config.sequence_len)
            tokens, s, e = tokens[cut:], s - cut, e - cut
            logp = F.log_softmax(model(torch.tensor([tokens]))[0].double(), -1)
            scores.append(-sum(float(logp[j - 1, tokens[j]]) for j in range(s, e)) / (e - s))
            greedy = all(int(logp[j - 1].argmax()) == tokens[j] for j in range(s, e))
        right += greedy if task["type"] == "language_modeling" else scores.index(min(scores)) == item["gold"]
    return right / len(items)


@torch.no_grad()
def test_batched_scoring_equals_one_forward_per_prompt(home, tok, monkeypatch):
    # a context of 40 tokens: the few-shot prompts are cut to their last 40; 3 items a forward
    model = randomized(build_model(tiny_config(sequence_len=40, vocab_size=tok.vocab_size), "cpu"), seed=3).double()
    monkeypatch.setattr(core_eval, "BATCH_TOKENS", 3 * 4 * 40)
    tasks = core_eval.load_tasks()
    for max_items in (None, 4):
        res = core_eval.evaluate_core(model, tok, "cpu", tasks, max_items=max_items)
        for t in tasks:
            items = core_eval._items(t, max_items)
            assert res["tasks"][t["label"]]["acc"] == reference_acc(model, tok, t, items), t["label"]
    with pytest.raises(LabError, match="mc_few is 2-shot and has 2 items here: score at least 3"):
        core_eval.evaluate_core(model, tok, "cpu", tasks, max_items=2)


def test_train_logs_core_and_eval_scores_it(home, tmp_path, capsys):
    from conftest import prepared_stdlib

    data = prepared_stdlib(tmp_path, 20, 300, 0.2, 0.2)
    run = tmp_path / "run"
    train = ["train", "--data", str(data), "--run-dir", str(run), "--tokens", "1024", "--depth", "1", "--aspect-ratio",
             "32", "--head-dim", "16", "--seq-len", "64", "--device-batch-size", "4", "--total-batch-size", "256",
             "--eval-tokens", "256", "--device", "cpu", "--eval-split", "none", "--save-every", "2"]
    assert cli.main([*train, "--eval-core-every", "3"]) == 0  # 4 steps: CORE after step 3 and the last
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    core = {r["step"]: r["core"] for r in rows if "core" in r}
    assert sorted(core) == [3, 4] and json.loads((run / "summary.json").read_text())["core"] == pytest.approx(core[4], abs=1e-6)
    model, _ = checkpoint.load_run(run, "cpu")  # the final checkpoint scores the CORE the run logged last
    want = core_eval.evaluate_core(model, Tokenizer.load(run / "tokenizer.json"), "cpu", max_items=core_eval.TRAIN_ITEMS)
    assert want["core"] == pytest.approx(core[4], abs=1e-12)
    capsys.readouterr()
    assert cli.main(["eval", str(run), "--tasks", "core", "--checkpoints", "all", "--device", "cpu"]) == 0
    evals = [json.loads(r) for r in (run / "evals.jsonl").read_text().splitlines()]
    assert [(r["step"], r["task"]) for r in evals] == [(2, "core"), (4, "core")]
    assert evals[1]["core"] == pytest.approx(core[4], abs=1e-12) and evals[1]["items"] == 36
    assert evals[1]["tasks"]["mc_few"] == want["tasks"]["mc_few"]
    out = capsys.readouterr().out
    assert "core mc_few" in out and "chance 0 (centered; 6 tasks, 36 items)" in out
    # no bundle: refused before any training step
    (home / "core" / "core.yaml").rename(home / "core.yaml.away")
    try:
        assert cli.main([*train, "--run-dir", str(tmp_path / "run2"), "--eval-core-every", "1"]) == 2
    finally:
        (home / "core.yaml.away").rename(home / "core" / "core.yaml")
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: no CORE bundle in ")
    assert not (tmp_path / "run2").exists()
