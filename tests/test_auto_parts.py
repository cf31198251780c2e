"""Autoresearch parts that need no training: the ledger under concurrent writers, the keep rule's
statistics, summary parsing, the causality check, the fingerprint, and both agents (the OpenAI one
against a real HTTP server on 127.0.0.1)."""
import json
import math
import multiprocessing as mp
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from llmlabs.auto import runner, surface
from llmlabs.auto.agents import CommandAgent, OpenAIAgent, Tools
from llmlabs.auto.causal import check_causal
from llmlabs.auto.ledger import COLUMNS, Ledger
from llmlabs.common import LabError


def _rand_row(rng, writer, i):
    # long, unicode, with tabs/newlines that the ledger must flatten
    desc = f"w{writer}-{i} " + "".join(rng.choice("abcdef \t\nxyzé→") for _ in range(rng.randint(5, 400)))
    return {"commit": f"{writer:04x}{i:08x}", "val_bpb": rng.random() * 3, "status": "discard", "description": desc,
            "seed": i, "worker": f"gpu{writer}", "started": 1.7e9 + rng.random()}


def _writer(path, writer, n, seed):
    rng = random.Random(seed)
    led = Ledger(path)
    i = 0
    while i < n:
        batch = [_rand_row(rng, writer, i + j) for j in range(min(rng.randint(1, 3), n - i))]
        led.append(batch)
        i += len(batch)
        led.read()  # readers interleave with writers


def test_ledger_concurrent_writers_lose_and_interleave_nothing(tmp_path):
    path = tmp_path / "results.tsv"
    procs = [mp.get_context("fork").Process(target=_writer, args=(path, w, 60, w)) for w in range(6)]
    threads = [threading.Thread(target=_writer, args=(path, 100 + w, 60, 100 + w)) for w in range(3)]
    for p in procs + threads:
        p.start()
    for p in procs + threads:
        p.join()
    assert all(p.exitcode == 0 for p in procs)
    rows = Ledger(path).read()
    assert path.read_text().count("commit\tval_bpb") == 1  # one header, from whoever wrote first
    expected = {}
    for w in list(range(6)) + [100 + w for w in range(3)]:
        rng = random.Random(w)
        i = 0
        while i < 60:
            k = min(rng.randint(1, 3), 60 - i)
            for j in range(k):
                r = _rand_row(rng, w, i + j)
                expected[r["commit"]] = r
            i += k
    assert len(rows) == len(expected) == 9 * 60
    for r in rows:
        e = expected[r["commit"]]
        assert r["description"] == " ".join(e["description"].split())[:300]
        assert float(r["val_bpb"]) == pytest.approx(e["val_bpb"], abs=1e-6)
        assert r["worker"] == e["worker"] and int(r["seed"]) == e["seed"]
    # each writer's rows appear in its own order
    for w in range(6):
        seeds = [int(r["seed"]) for r in rows if r["worker"] == f"gpu{w}"]
        assert seeds == list(range(60))


def test_ledger_refuses_a_torn_row_and_a_foreign_header(tmp_path):
    led = Ledger(tmp_path / "results.tsv")
    led.append([{"commit": "abc", "status": "keep", "description": "x"}])
    with open(led.path, "a") as f:
        f.write("def\t1.2\t")  # a writer killed mid-row
    with pytest.raises(LabError, match="cut short"):
        led.read()
    (tmp_path / "other.tsv").write_text("commit\tval_bpb\tstatus\n")
    with pytest.raises(LabError, match="header"):
        Ledger(tmp_path / "other.tsv").read()
    with pytest.raises(ValueError, match="unknown ledger columns"):
        led.append([{"bogus": 1, "status": "keep"}])
    with pytest.raises(ValueError, match="a status not in"):
        led.append([{"commit": "abc", "status": "kept"}])


def _rows(status_commit_bpb):
    return [{**{c: "" for c in COLUMNS}, "status": s, "commit": c, "val_bpb": str(v)} for s, c, v in status_commit_bpb]


def test_noise_sigma_is_pooled_within_commit_std():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.5, 0.02, 5), rng.normal(1.3, 0.05, 3)
    rows = _rows([("baseline", "a", x) for x in a] + [("discard", "z", 9.0)] + [("baseline", "b", x) for x in b])
    sigma, dof = runner.noise_sigma(rows)
    ref = math.sqrt((((a - a.mean()) ** 2).sum() + ((b - b.mean()) ** 2).sum()) / (len(a) + len(b) - 2))
    assert dof == 6 and sigma == pytest.approx(ref, rel=1e-9)
    single = _rows([("baseline", "a", x) for x in a])
    assert runner.noise_sigma(single)[0] == pytest.approx(statistics.stdev(a), rel=1e-9)
    assert runner.noise_sigma(_rows([("baseline", "a", 1.0)])) == (None, 0)


def test_keep_rule_and_frontier():
    rng = np.random.default_rng(1)
    for _ in range(200):
        new, ref = list(rng.normal(1.0, 0.1, rng.integers(1, 4))), list(rng.normal(1.0, 0.1, rng.integers(1, 5)))
        sigma, k = float(rng.uniform(0.01, 0.1)), float(rng.uniform(1, 3))
        verdict, delta, sd, near = runner.decide(new, ref, sigma, k)
        assert delta == pytest.approx(np.mean(new) - np.mean(ref))
        assert sd == pytest.approx(sigma * math.sqrt(1 / len(new) + 1 / len(ref)))
        assert verdict == ("keep" if np.mean(new) - np.mean(ref) < -k * sd else "discard")
        assert near == (abs(delta + k * sd) < sd)
    rows = _rows([("baseline", "a", 1.5), ("baseline", "a", 1.6), ("keep", "b", 1.2), ("discard", "c", 1.1),
                  ("keep", "d", 1.0), ("keep", "d", 1.1), ("crash", "e", "")])
    assert runner.frontier(rows) == "d" and runner.scores(rows, "d") == [1.0, 1.1]
    assert runner.frontier(rows[:2]) == "a" and runner.frontier([]) is None
    assert runner.next_seed(_rows([]) + [{"seed": "4"}, {"seed": "2"}, {"seed": ""}]) == 5


def test_parse_summary_and_crash_reason():
    text = "step 1 | loss 3\n---\nnot the end\n---\nval_bpb:          1.234567\ndevice:           cpu\nnum_steps:  12\n"
    assert runner.parse_summary(text) == {"val_bpb": 1.234567, "device": "cpu", "num_steps": 12.0}
    assert runner.parse_summary("no block") == {}
    tb = "Traceback (most recent call last):\n  File x\nRuntimeError: deliberate crash\n"
    assert runner.crash_reason(tb, 1) == "RuntimeError: deliberate crash"
    assert runner.crash_reason("error: loss became nan at step 3: stopped\n", 2).startswith("error: loss became nan")
    assert runner.crash_reason("", -9) == "exit code -9 without a summary block"


def test_causality_check_passes_the_model_and_catches_lookahead(monkeypatch):
    from llmlabs.config import config_for_depth
    from llmlabs.model import GPT, build_model

    torch.manual_seed(0)
    model = build_model(config_for_depth(2, vocab_size=300, sequence_len=96, aspect_ratio=32, head_dim=16,
                                         window_pattern="SL"), "cpu")
    with torch.no_grad():  # random weights everywhere (the real init zeroes some projections)
        for p in model.parameters():
            p.normal_(0, 0.2)
    dev = torch.device("cpu")
    res = check_causal(model, 300, 96, dev, probes=5, seed=3)
    assert res["causal"] and res["max_leak"] <= 1e-4 and len(res["probes"]) == 5 and 95 in res["probes"]
    real = GPT.forward

    def peeks_one_ahead(self, idx, *a, **kw):  # a classic bug: inputs shifted by one position
        return real(self, torch.roll(idx, -1, dims=1), *a, **kw)

    monkeypatch.setattr(GPT, "forward", peeks_one_ahead)
    res = check_causal(model, 300, 96, dev, probes=5, seed=3)
    assert not res["causal"] and res["max_leak"] > 1e-2
    assert res["position"] == res["changed"] - 1  # the logits just before the changed token moved


def _git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def test_fingerprint_covers_the_harness_not_the_research_surface(tmp_path):
    for rel in ("llmlabs/model.py", "llmlabs/config.py", "llmlabs/evaluate.py", "llmlabs/data/loader.py",
                "pyproject.toml", "README.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"# {rel}\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a")
    h0 = surface.harness_hashes(tmp_path)
    assert set(h0) == {"llmlabs/evaluate.py", "llmlabs/data/loader.py", "pyproject.toml"}
    blob = _git(tmp_path, "hash-object", "llmlabs/evaluate.py")
    assert h0["llmlabs/evaluate.py"] == blob
    (tmp_path / "llmlabs/model.py").write_text("changed\n")
    (tmp_path / "README.md").write_text("changed\n")
    (tmp_path / "llmlabs/evaluate.py").write_text("cheat\n")
    (tmp_path / "llmlabs/helper.py").write_text("new harness module\n")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "b")
    h1 = surface.harness_hashes(tmp_path)
    exp = {"harness": h0, "data": "d", "train": {"a": 1}}
    msg = surface.explain_mismatch(exp, h1, "d", {"a": 1})
    assert msg == "harness files changed: llmlabs/evaluate.py, llmlabs/helper.py"
    assert surface.fingerprint(h0, "d", {"a": 1}) != surface.fingerprint(h1, "d", {"a": 1})
    assert surface.fingerprint(h0, "d", {"a": 1}) != surface.fingerprint(h0, "e", {"a": 1})
    assert "data" in surface.explain_mismatch(exp, h0, "e", {"a": 1})
    assert "train flags" in surface.explain_mismatch(exp, h0, "d", {"a": 2})
    with pytest.raises(LabError, match="llmlabs prepare"):
        surface.data_hash(tmp_path)


# ---------------------------------------------------------------------------------------------
# agents

KEY = "sk-test-" + "".join(random.Random(7).choice("abcdefghijk0123456789") for _ in range(24))


class ChatServer:
    """A scripted OpenAI-compatible endpoint on 127.0.0.1: `script(request) -> message` decides each
    reply; every request is recorded with whether its Authorization header was right."""

    def __init__(self, script, key=KEY):
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                ok = self.headers.get("Authorization") == f"Bearer {key}"
                outer.requests.append({"path": self.path, "auth_ok": ok, "body": body})
                if not ok:
                    return self._send(401, {"error": {"message": "bad key"}})
                self._send(200, {"id": "x", "object": "chat.completion",
                                 "choices": [{"index": 0, "message": script(body), "finish_reason": "stop"}]})

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def tool_call(i, name, **args):
    return {"role": "assistant", "content": None,
            "tool_calls": [{"id": f"call{i}", "type": "function",
                            "function": {"name": name, "arguments": json.dumps(args)}}]}


def test_openai_agent_edits_only_the_research_surface_and_hides_the_key(tmp_path, monkeypatch):
    wt = tmp_path / "wt"
    (wt / "llmlabs").mkdir(parents=True)
    (wt / "llmlabs/config.py").write_text("LR = 0.02\nWD = 0.1\n")
    (wt / "llmlabs/evaluate.py").write_text("def bpb(): ...\n")

    def script(body):
        tools_done = sum(m["role"] == "tool" for m in body["messages"])
        steps = [tool_call(0, "read_file", path="llmlabs/config.py"),
                 tool_call(1, "write_file", path="llmlabs/evaluate.py", content="def bpb(): return 0\n"),
                 tool_call(2, "edit_file", path="llmlabs/config.py", old_string="LR = 0.02", new_string="LR = 0.04"),
                 tool_call(3, "read_file", path="../outside.txt"),
                 {"role": "assistant", "content": "I will double the LR.\nDouble the matrix LR"}]
        return steps[tools_done]

    server = ChatServer(script)
    try:
        monkeypatch.setenv("MY_KEY", KEY)
        agent = OpenAIAgent(server.url, "test-model", "MY_KEY", timeout=30)
        desc = agent.step("system part\n\n<!-- iteration -->\n\nuser part", wt, tmp_path / "t", {})
    finally:
        server.close()
    assert desc == "Double the matrix LR"
    assert (wt / "llmlabs/config.py").read_text() == "LR = 0.04\nWD = 0.1\n"
    assert (wt / "llmlabs/evaluate.py").read_text() == "def bpb(): ...\n"  # harness untouched
    reqs = server.requests
    assert len(reqs) == 5 and all(r["auth_ok"] and r["path"] == "/v1/chat/completions" for r in reqs)
    first = reqs[0]["body"]
    assert first["model"] == "test-model" and {t["function"]["name"] for t in first["tools"]} == {
        "read_file", "edit_file", "write_file"}
    assert first["messages"][0] == {"role": "system", "content": "system part"}
    results = [m["content"] for m in reqs[-1]["body"]["messages"] if m["role"] == "tool"]
    assert results[0] == "LR = 0.02\nWD = 0.1\n"
    assert results[1].startswith("error: llmlabs/evaluate.py is not on the research surface")
    assert results[2] == "edited llmlabs/config.py" and results[3].startswith("error: ../outside.txt: outside")
    transcript = (tmp_path / "t.json").read_text()
    assert "Double the matrix LR" in transcript and KEY not in transcript


def test_openai_agent_bad_key_is_one_line_without_the_key(tmp_path, monkeypatch):
    server = ChatServer(lambda body: {"role": "assistant", "content": "x"}, key="the-right-one")
    try:
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        agent = OpenAIAgent(server.url + "/chat/completions", "m", "OPENAI_API_KEY", timeout=30)
        with pytest.raises(LabError) as e:
            agent.step("s", tmp_path, tmp_path / "t", {})
    finally:
        server.close()
    msg = str(e.value)
    assert "HTTP 401" in msg and "$OPENAI_API_KEY" in msg and KEY not in msg and "\n" not in msg
    with pytest.raises(LabError, match="--model"):
        OpenAIAgent(server.url, None, "OPENAI_API_KEY", timeout=1)


def test_tools_refuse_paths_outside_the_worktree(tmp_path):
    (tmp_path / "llmlabs").mkdir()
    t = Tools(tmp_path)
    assert t.call("write_file", json.dumps({"path": "llmlabs/model.py", "content": "x"})) .startswith("wrote")
    assert t.call("edit_file", json.dumps({"path": "llmlabs/model.py", "old_string": "y", "new_string": "z"})) \
        == "error: old_string occurs 0 times in llmlabs/model.py; it must occur exactly once (add context)"
    assert t.call("read_file", json.dumps({"path": ".git/config"})).startswith("error:")
    assert t.call("read_file", json.dumps({"path": "/etc/passwd"})).startswith("error:")
    assert t.call("shell", "{}") == "error: unknown tool 'shell'"
    assert t.call("read_file", "{not json").startswith("error:")


def test_command_agent_gets_the_prompt_and_reports_failures(tmp_path):
    script = tmp_path / "agent.py"
    script.write_text(
        "import os, sys\n"
        "text = open(sys.argv[1]).read() if len(sys.argv) > 1 else sys.stdin.read()\n"
        "open('got.txt', 'w').write(text + os.environ['LLMLABS_AUTO_WORKER'])\n"
        "if 'fail' in text: sys.exit('agent broke: ' + 'x' * 5)\n"
        "print('thinking...')\nprint('  halve the warmup  ')\n")
    env = {"LLMLABS_AUTO_WORKER": "gpu3"}
    agent = CommandAgent(f"{sys.executable} {script}", timeout=60)
    assert agent.step("the prompt", tmp_path, tmp_path / "a1", env) == "halve the warmup"
    assert (tmp_path / "got.txt").read_text() == "the promptgpu3"
    agent = CommandAgent(f"{sys.executable} {script} {{prompt_file}}", timeout=60)
    assert agent.step("prompt in a file", tmp_path, tmp_path / "a2", env) == "halve the warmup"
    assert (tmp_path / "a2.prompt.md").read_text() == "prompt in a file"
    with pytest.raises(LabError, match=r"exited with code 1: agent broke: xxxxx"):
        agent.step("please fail", tmp_path, tmp_path / "a3", env)
    assert "agent broke" in (tmp_path / "a3.log").read_text()
    with pytest.raises(LabError, match="agent-timeout"):
        CommandAgent(f"{sys.executable} -c 'import time; time.sleep(30)'", timeout=1).step("p", tmp_path, tmp_path / "a4", {})


# ---------------------------------------------------------------------------------------------
# sessions

def test_init_checks_its_inputs_and_commands_find_their_session(tmp_path, monkeypatch, capsys):
    from llmlabs import cli
    from llmlabs.data.prepare import prepare

    rng = random.Random(0)
    src = tmp_path / "src"
    src.mkdir()
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "import", "class", "(", ")", ":", "\n"]
    for i in range(60):
        (src / f"doc{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(300)))
    data = prepare(str(src), out=tmp_path / "data", vocab_size=300, val_frac=0.2, test_frac=0.2)
    repo = tmp_path / "repo"
    (repo / "llmlabs").mkdir(parents=True)
    (repo / "llmlabs/model.py").write_text("# research\n")
    (repo / "llmlabs/train.py").write_text("# harness\n")
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a")
    (repo / "llmlabs/model.py").write_text("# uncommitted\n")
    monkeypatch.chdir(repo)
    monkeypatch.setenv("LLMLABS_HOME", str(tmp_path / "home"))

    def auto(*args):
        code = cli.main(["auto", *args])
        return code, capsys.readouterr()

    code, out = auto("init", "--tag", "bad tag", "--data", str(data))
    assert code == 2 and "cannot name a git branch" in out.err
    code, out = auto("init", "--tag", "t", "--data", str(tmp_path / "nowhere"))
    assert code == 2 and "llmlabs prepare" in out.err and "\n" not in out.err.strip()
    code, out = auto("init", "--tag", "t", "--data", str(data), "--train-args", "--depth 2 --seed 3")
    assert code == 2 and "may not set --seed" in out.err
    code, out = auto("init", "--tag", "t", "--data", str(data), "--time-budget", "10", "--timeout", "5")
    assert code == 2 and "timeout longer" in out.err
    code, out = auto("run", "-m", "x")
    assert code == 2 and "no autoresearch session" in out.err
    code, out = auto("init", "--tag", "t", "--data", str(data), "--time-budget", "7", "--train-args", "--depth 2")
    assert code == 0 and "uncommitted changes" in out.out
    assert _git(repo, "rev-parse", "--abbrev-ref", "HEAD") == "main"  # the user's checkout stays as it was
    assert (repo / "llmlabs/model.py").read_text() == "# uncommitted\n"
    wt = repo / ".auto/t/main"
    assert (wt / "llmlabs/model.py").read_text() == "# research\n"
    assert _git(wt, "rev-parse", "--abbrev-ref", "HEAD") == "auto/t"
    # .auto/ is excluded locally (.git/info/exclude), no tracked file changes
    assert _git(repo, "status", "--porcelain") == "M llmlabs/model.py"
    cfg = json.loads((repo / ".auto/t/session.json").read_text())
    assert cfg["train_args"] == ["--depth", "2"] and cfg["timeout"] == 7 * 1.5 + 180
    assert set(cfg["expected"]["harness"]) == {"llmlabs/train.py"}
    code, out = auto("init", "--tag", "t", "--data", str(data))
    assert code == 2 and "exists already" in out.err
    code, out = auto("run", "-m", "x")  # found from the main checkout; the baseline is missing
    assert code == 2 and "auto baseline" in out.err
    from llmlabs.auto.session import locate

    assert locate(wt / "llmlabs")[1] == "main" and locate(wt)[0].tag == "t"
    auto("init", "--tag", "u", "--data", str(data))
    code, out = auto("report")
    assert code == 2 and "several sessions (t, u): pass --tag" in out.err
    assert locate(repo, "u")[0].tag == "u" and locate(wt)[0].tag == "t"  # inside a worktree: its session
    with pytest.raises(LabError, match="inside the worktree of session t"):
        locate(wt, "u")


# ---------------------------------------------------------------------------------------------
# the runner's judgement of a run, with stand-in trainers (a fake `llmlabs` package on the run's path)

FAKE_TRAIN = """
import os, subprocess, sys, time
args = sys.argv[sys.argv.index("train") + 1:]
mode = open(os.path.join(os.path.dirname(__file__), "MODE")).read().strip()
print("secret seen:", os.environ.get("LAB_API_KEY"), flush=True)
if mode == "hang":  # a child that would outlive a careless kill
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    open(os.path.join(os.path.dirname(__file__), "CHILD"), "w").write(str(child.pid))
    time.sleep(120)
if mode == "nan":
    print("error: loss became nan at step 7: stopped; lower the learning rates", file=sys.stderr)
    sys.exit(2)
bpb = {"nanbpb": "nan"}.get(mode, 1.25)
if mode.startswith("{"):  # val_bpb per seed, as JSON
    bpb = __import__("json").loads(mode)[args[args.index("--seed") + 1]]
print("step 1 | loss 3.0\\n---")
print(f"val_bpb:          {bpb}")
print(f"training_seconds: {12.5 if mode == 'slow' else 10.4}")
print("peak_vram_mb:     2048.0\\ntotal_tokens_M:   3.5\\nmfu_percent:      41.5")
print("seed:", args[args.index("--seed") + 1])
"""


@pytest.fixture
def fake_lab(tmp_path, monkeypatch):
    from types import SimpleNamespace

    wt = tmp_path / "wt"
    (wt / "llmlabs").mkdir(parents=True)
    (wt / "llmlabs/__init__.py").write_text("")
    (wt / "llmlabs/__main__.py").write_text(FAKE_TRAIN)
    session = SimpleNamespace(dir=tmp_path / "s", data="/data", time_budget=10.0, timeout=3.0, train_args=["--depth", "2"])
    monkeypatch.setenv("LAB_API_KEY", KEY)
    monkeypatch.setenv("LLMLABS_HOME", str(tmp_path / "home"))

    def run(mode, seed=5):
        (wt / "llmlabs/MODE").write_text(mode)
        worker = runner.Worker("gpu3", wt, "b", 3)
        return runner.train(session, worker, wt, runner.new_run(session, "abcdef1234567", seed))

    return run


def _alive(pid):
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_runner_judges_runs_by_output_wall_clock_and_budget(fake_lab):
    r = fake_lab("ok")
    assert r.status is None and r.bpb() == 1.25 and r.summary["seed"] == 5 and r.name == "abcdef12-s5"
    log = r.log.read_text()
    assert "--time-budget 10.0 --seed 5" in log and "--depth 2" in log and "--eval-split val" in log
    assert "secret seen: None" in log and KEY not in log  # no credentials reach a run
    out = runner.row("abcdef1234567", r, "keep", "d", None, "0123456789abcdef", -0.1, 0.02)
    assert (out["commit"], out["memory_gb"], out["tokens_M"], out["mfu"], out["worker"], out["parent"]) == \
        ("abcdef123456", 2.0, 3.5, 41.5, "gpu3", "0123456789ab")
    assert fake_lab("ok").name == "abcdef12-s5-2"  # the same commit and seed again: a new run directory
    r = fake_lab("slow")  # 12.5 s of training for a 10 s budget (allowed: 10 x 1.05 + 1)
    assert r.status == "invalid" and r.reason == "over budget: trained 12.5 s, budget 10 s"
    r = fake_lab("nan")
    assert r.status == "crash" and r.reason.startswith("error: loss became nan at step 7")
    r = fake_lab("nanbpb")
    assert r.status == "crash" and r.reason == "val_bpb is nan"
    r = fake_lab("hang")
    assert r.status == "crash" and r.reason.startswith("timeout: killed after 3 s") and 3 <= r.wall_s < 8
    child = int((r.log.parents[2] / "wt/llmlabs/CHILD").read_text())
    deadline = time.time() + 5
    while _alive(child) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(child)  # the whole process group went, the trainer's own children too


def test_device_lock_serialises_experiments_on_one_gpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMLABS_HOME", str(tmp_path))
    events = []
    a, b = runner.Worker("gpu0", tmp_path, "x", 0), runner.Worker("main", tmp_path, "y", None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # `main` runs on the first visible GPU: the same one

    def hold(worker, tag):
        with runner.device_lock(worker):
            events.append(f"{tag} in")
            threading.Event().wait(0.3)
            events.append(f"{tag} out")

    t = threading.Thread(target=hold, args=(a, "a"))
    t.start()
    while not events:
        threading.Event().wait(0.01)
    hold(b, "b")
    t.join()
    assert events == ["a in", "a out", "b in", "b out"]
    assert "waiting for GPU 0" in capsys.readouterr().out
    with runner.device_lock(runner.Worker("gpu1", tmp_path, "z", 1)), runner.device_lock(a):
        pass  # two GPUs: no waiting


FAKE_CAUSAL = """
import json, os, sys
verdict = open(os.path.join(os.path.dirname(__file__), "..", "CAUSAL")).read().strip() == "yes"
print(json.dumps({"causal": verdict, "max_leak": 0.0 if verdict else 0.7, "position": 11, "changed": 12,
                  "tolerance": 1e-4, "probes": [12]}))
"""


def test_near_threshold_repeats_and_causality_gate_the_keep(tmp_path, monkeypatch):
    """Through runner.experiment with stand-in trainer and checker: a result near the threshold is
    measured again and decided on the mean; a clear improvement is kept only if causal."""
    from types import SimpleNamespace

    wt = tmp_path / "wt"
    (wt / "llmlabs/auto").mkdir(parents=True)
    for rel, text in (("__init__.py", ""), ("__main__.py", FAKE_TRAIN), ("auto/__init__.py", ""),
                      ("auto/causal.py", FAKE_CAUSAL), ("MODE", "ok"), ("CAUSAL", "yes")):
        (wt / "llmlabs" / rel).write_text(text)
    _git(wt, "init", "-q", "-b", "auto/t")
    _git(wt, "add", "-A")
    _git(wt, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "start")
    start = _git(wt, "rev-parse", "--short=12", "HEAD")
    led = Ledger(tmp_path / "s/results.tsv")
    led.append([{"commit": start, "status": "baseline", "val_bpb": v, "seed": i} for i, v in enumerate((1.0, 1.02))])
    session = SimpleNamespace(dir=tmp_path / "s", data="/d", time_budget=10.0, timeout=20.0, train_args=[], k=2.0,
                              repeat_near=2, ledger=led, check_fingerprint=lambda wt, commit: None)
    monkeypatch.setenv("LLMLABS_HOME", str(tmp_path / "home"))
    worker = runner.Worker("main", wt, "auto/t", None)
    sigma = statistics.stdev([1.0, 1.02])

    # seed 2 lands near the threshold (delta -0.025, threshold -2 x 0.0173): seed 3 decides on the mean
    (wt / "llmlabs/MODE").write_text('{"2": 0.985, "3": 1.01, "4": 0.9, "5": 0.9}')
    out = runner.experiment(session, worker, "near miss")
    rows = led.read()[2:]
    assert [(r["seed"], r["status"]) for r in rows] == [("2", "discard"), ("3", "discard")]
    assert float(out["delta"]) == pytest.approx((0.985 + 1.01) / 2 - 1.01, abs=1e-6)
    assert out["sigma"] == pytest.approx(sigma * math.sqrt(1 / 2 + 1 / 2), rel=1e-6)
    assert _git(wt, "rev-parse", "--short=12", "HEAD") == start and _git(wt, "status", "--porcelain") == ""

    # a clear improvement from a model that looks ahead: invalid, never kept
    (wt / "llmlabs/MODE").write_text('{"4": 0.9}')
    (wt / "llmlabs/CAUSAL").write_text("no")
    out = runner.experiment(session, worker, "peeks")
    assert out["status"] == "invalid" and out["seed"] == 4
    assert out["reason"] == "non-causal: changing token 12 moved the logits at position 11 by 0.7 (tolerance 0.0001)"
    assert _git(wt, "rev-parse", "--short=12", "HEAD") == start

    (wt / "llmlabs/MODE").write_text('{"5": 0.9}')
    out = runner.experiment(session, worker, "honest")
    assert out["status"] == "keep" and _git(wt, "rev-parse", "--short=12", "HEAD") == out["commit"] != start
    assert runner.frontier(led.read()) == out["commit"]
