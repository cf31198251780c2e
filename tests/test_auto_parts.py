"""Autoresearch parts, each on real inputs without a real training run: the ledger statistics
(frontier, scores, noise), crash reasons, the budget and phase rules, the causality check, the
research-surface allowlist and the environment fingerprint, both agents (the OpenAI one against a
real HTTP server on 127.0.0.1), `llmlabs auto init`, the device lock, seed claims, and the keep /
repeat / reset logic of runner.experiment on a real session with a stand-in trainer. Real training
runs end to end live in test_auto_sessions.py; the statistics in test_auto_stats.py."""
import json
import math
import random
import shlex
import shutil
import stat
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import prepared_stdlib
import torch

from llmlabs.auto import gitops, runner, runs, stats, surface
from llmlabs.auto.agents import CommandAgent, OpenAIAgent, Tools
from llmlabs.auto.causal import check_causal
from llmlabs.auto.session import Worker, init_session
from llmlabs.common import LabError

REPO = Path(__file__).resolve().parents[1]


def _git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _commit_all(cwd, msg="c"):
    _git(cwd, "add", "-A")
    _git(cwd, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", msg)
    return _git(cwd, "rev-parse", "HEAD")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A real prepared data directory: 20 stdlib modules, vocab 300 (~0.2 s)."""
    return prepared_stdlib(tmp_path_factory.mktemp("stdlib"), 20, 300, 0.2, 0.2)


# ---------------------------------------------------------------------------------------------
# statistics over ledger rows, crash reasons

def _rows(status_commit_bpb):
    return [{"status": s, "commit": c, "val_bpb": str(v), "run": ""} for s, c, v in status_commit_bpb]


def test_frontier_scores_and_noise_from_rows():
    rows = _rows([("baseline", "a", 1.5), ("baseline", "a", 1.6), ("keep", "b", 1.2), ("discard", "c", 1.1),
                  ("keep", "d", 1.0), ("keep", "d", 1.1), ("crash", "e", ""), ("invalid", "f", ""),
                  ("baseline", "d", 1.05), ("baseline", "d", 1.07), ("test", "d", 0.5), ("confirmed", "d", 0.5)])
    assert runner.frontier(rows) == "d"  # the last keep, not the lowest val_bpb (c was discarded)
    assert runner.scores(rows, "d") == [1.0, 1.1, 1.05, 1.07]  # keeps and baselines, never test rows
    assert runner.scores(rows, "c") == [] and runner.baseline_count(rows) == 4
    sigma, dof = runner.noise(rows)  # pooled within commit: a (ss 0.005) and d (ss 0.0002), 2 dof
    assert dof == 2 and sigma == pytest.approx(math.sqrt((0.005 + 0.0002) / 2), rel=1e-9)
    assert runner.frontier(rows[:2]) == "a" and runner.frontier(rows[:4]) == "b" and runner.frontier([]) is None
    assert runner.frontier(_rows([("baseline", "x", 1), ("baseline", "y", 1)])) == "x"  # the commit measured first
    assert runner.noise(rows[:3]) == (pytest.approx(statistics.stdev([1.5, 1.6])), 1)
    assert runner.noise(rows[2:8]) == (None, 0)


def test_crash_reason_and_tail(tmp_path):
    tb = "step 3 | loss 2\nTraceback (most recent call last):\n  File x\nRuntimeError: deliberate crash\n\n"
    assert runs.crash_reason(tb, 1) == "RuntimeError: deliberate crash"
    nan = "error: loss became nan at step 3: stopped\nTraceback (most recent call last):\nSystemExit: 2\n"
    assert runs.crash_reason(nan, 2) == "error: loss became nan at step 3: stopped"  # the harness's line wins
    assert runs.crash_reason("", -9) == "exit code -9"
    assert runs.crash_reason("step 1 | loss 3\nKilled\n", 137) == "exit code 137"
    log = tmp_path / "run.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert runs.tail(log, 3) == "line 97\nline 98\nline 99" and len(runs.tail(log).splitlines()) == runs.TAIL_LINES
    assert runs.tail(tmp_path / "missing.log") == ""


# ---------------------------------------------------------------------------------------------
# the budget rule: phases timed by the harness's clock, then checked

def test_phases_from_timestamped_events():
    # warm-up steps 1-2 before "timed", then steps 3-6 (gaps from "timed": 1, 1, 1, 2 s); start 100, exit 112.5
    ev = [(101.0, "step 1"), (102.0, "step 2"), (103.0, "timed"), (104.0, "step 3"), (105.0, "step 4"),
          (106.0, "step 5"), (108.0, "step 6")]
    def ph(*values):
        return dict(zip(("warm_s", "train_s", "tail_s", "steps", "step_s"), values))

    assert runs._phases(ev, 100.0, 112.5) == ph(3.0, 5.0, 4.5, 6, 1.0)
    # without "timed" everything is warm-up, however many steps were reported
    assert runs._phases(ev[:2] + ev[3:], 100.0, 110.0) == ph(10.0, 0.0, 0.0, 6, 0.0)
    # "timed" but no step after it: no training time, the rest is tail
    assert runs._phases(ev[:3], 100.0, 104.0) == ph(3.0, 0.0, 1.0, 2, 0.0)

def _ph(train_s, step_s, steps=20, warm_s=5.0, tail_s=1.0):
    return {"warm_s": warm_s, "train_s": train_s, "tail_s": tail_s, "steps": steps, "step_s": step_s}


def test_check_budget_and_allowances():
    # budget 10 s: 10 x 1.05 + 0.5 + one median step (at most 1 s = 10% of the budget)
    assert runs.check_budget(_ph(10.4, 0.2), 10, None) == ""
    assert runs.check_budget(_ph(11.1, 0.2), 10, None) == ""  # the step that crossed the budget: allowed
    reason = runs.check_budget(_ph(11.3, 0.2), 10, None)
    assert reason == ("over budget: trained 11.3 s by the harness's clock (budget 10 s, allowed 11.2 s with one "
                      "step's slack)")
    # one huge step: the slack is capped at 10% of the budget, so a 8 s step cannot buy 8 s more
    assert runs.check_budget(_ph(11.9, 8.0, steps=2), 10, None) == ""
    assert runs.check_budget(_ph(12.1, 8.0, steps=2), 10, None).startswith("over budget: trained 12.1 s")
    assert runs.check_budget(_ph(0.0, 0.0, steps=0), 10, None).startswith("the training process reported no step")
    # the untimed phases against the baselines' allowances (none before the baselines exist)
    base = [{"phases": {"warm_s": 4.0, "train_s": 10.0, "tail_s": 1.0, "eval_s": 2.0}},
            {"phases": {"warm_s": 6.0, "train_s": 10.1, "tail_s": 0.4, "eval_s": 3.0}},
            {"phases": {"warm_s": 90.0, "train_s": 0.0, "tail_s": 0.0}},  # crashed: never evaluated, ignored
            {"status": "crash"}]
    allow = runs.allowances(base)
    assert allow == {"warm_s": 19.0, "tail_s": 11.5, "eval_s": 14.5}  # longest x 1.5 + 10 s
    assert runs.allowances([]) is None and runs.allowances(base[2:]) is None
    assert runs.check_budget(_ph(10.0, 0.5, warm_s=19.0, tail_s=11.5), 10, allow) == ""
    assert runs.check_budget(_ph(10.0, 0.5, warm_s=25.0), 10, allow) == (
        "warm-up (start-up, compilation, untimed steps) took 25.0 s, more than the 19.0 s the baselines allow: "
        "training work outside the timed steps would escape the budget")
    assert runs.check_budget(_ph(10.0, 0.5, tail_s=12.0), 10, allow).startswith(
        "time after the last step took 12.0 s, more than the 11.5 s")
    assert runs.check_budget(_ph(10.0, 0.5, warm_s=25.0, tail_s=99.0), 10, None) == ""


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


# ---------------------------------------------------------------------------------------------
# the research surface (an allowlist) and the fingerprint of harness, data, flags and environment

def _repo(path, files):
    """A fresh git repo on branch main holding `files` (each a comment line), committed; its commit."""
    for rel in files:
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(f"# {rel}\n")
    _git(path, "init", "-q", "-b", "main")
    return _commit_all(path, "start")


def test_outside_surface_names_every_change_off_the_allowlist(tmp_path):
    repo = tmp_path / "r"
    base = _repo(repo, ("llmlabs/__init__.py", "llmlabs/config.py", "llmlabs/model.py", "llmlabs/train.py",
                        "README.md"))

    def commit(change):  # a commit of base + change(), then back to base
        change()
        c = _commit_all(repo)
        _git(repo, "reset", "-q", "--hard", base)
        _git(repo, "clean", "-fdq")
        return c

    def write(*rels):
        return lambda: [(repo / r).parent.mkdir(parents=True, exist_ok=True) or (repo / r).write_text("x\n")
                        for r in rels]

    assert surface.outside_surface(repo, base, commit(write("llmlabs/model.py", "llmlabs/config.py"))) is None
    assert surface.outside_surface(repo, base, base) is None
    for rel, what in (("llmlabs/train.py", "changed"), ("sitecustomize.py", "added"), ("x.pth", "added"),
                      ("conftest.py", "added"), ("llmlabs/evil/__init__.py", "added"), ("README.md", "changed")):
        reason = surface.outside_surface(repo, base, commit(write(rel)))
        assert reason.startswith(f"{rel} {what} outside the research surface"), reason
    both = commit(write("llmlabs/model.py", "llmlabs/train.py"))  # a research change carries no harness change
    assert surface.outside_surface(repo, base, both).startswith("llmlabs/train.py changed")
    gone = commit(lambda: (repo / "llmlabs/config.py").unlink())
    assert surface.outside_surface(repo, base, gone).startswith("llmlabs/config.py deleted")
    link = commit(lambda: ((repo / "llmlabs/model.py").unlink(), (repo / "llmlabs/model.py").symlink_to("train.py")))
    reason = surface.outside_surface(repo, base, link)
    assert reason.startswith("llmlabs/model.py is not a regular file") and "120000" in reason
    executable = commit(lambda: (repo / "llmlabs/model.py").chmod(0o755))
    assert "100755" in surface.outside_surface(repo, base, executable)
    with pytest.raises(LabError, match="cannot compare"):
        surface.outside_surface(repo, base, "f" * 40)


def test_fingerprint_covers_harness_data_flags_and_startup_files(tmp_path, monkeypatch):
    repo = tmp_path / "r"
    a = _repo(repo, ("llmlabs/model.py", "llmlabs/config.py", "llmlabs/evaluate.py", "llmlabs/data/loader.py",
                     "pyproject.toml", "README.md"))
    h0 = surface.harness_hashes(repo, a)
    assert set(h0) == {"llmlabs/evaluate.py", "llmlabs/data/loader.py", "pyproject.toml"}
    assert h0["llmlabs/evaluate.py"] == _git(repo, "hash-object", "llmlabs/evaluate.py")
    for rel in ("llmlabs/model.py", "llmlabs/evaluate.py", "llmlabs/helper.py"):  # research, harness, new harness
        (repo / rel).write_text("changed\n")
    h1 = surface.harness_hashes(repo, _commit_all(repo, "b"))
    assert surface.harness_hashes(repo, a) == h0  # by commit, whatever HEAD is

    site_dir = tmp_path / "site-packages"
    site_dir.mkdir()
    (site_dir / "x.pth").write_text("import os\n")
    (site_dir / "notes.txt").write_text("not run at start-up\n")
    monkeypatch.setattr(surface.site, "getsitepackages", lambda: [str(site_dir)])
    monkeypatch.setattr(surface.site, "getusersitepackages", lambda: str(tmp_path / "no-user-site"))
    env0 = surface.environment()
    assert env0["startup_files"] == {str(site_dir / "x.pth"): surface.hashlib.sha256(b"import os\n").hexdigest()}
    assert env0["python"] == sys.executable and env0["torch"] == torch.__version__
    for name in ("x.pth", "sitecustomize.py"):
        (site_dir / name).write_text("import evil\n")
    env1 = surface.environment()
    assert set(env1["startup_files"]) == {str(site_dir / "x.pth"), str(site_dir / "sitecustomize.py")}
    train = {"a": 1}
    fp = surface.fingerprint(h0, "d", train, env0)
    assert fp == surface.fingerprint(dict(h0), "d", {"a": 1}, json.loads(json.dumps(env0)))
    for other in ((h1, "d", train, env0), (h0, "e", train, env0), (h0, "d", {"a": 2}, env0), (h0, "d", train, env1)):
        assert surface.fingerprint(*other) != fp
    exp = {"harness": h0, "data": "d", "train": train, "env": env0}
    assert surface.explain_mismatch(exp, h1, "d", train, env0) == \
        "harness files changed: llmlabs/evaluate.py, llmlabs/helper.py"
    assert surface.explain_mismatch(exp, h0, "e", train, env0) == "the data directory's manifest changed"
    assert surface.explain_mismatch(exp, h0, "d", {"a": 2}, env0) == "the session's train flags changed"
    assert surface.explain_mismatch(exp, h0, "d", train, env1) == \
        f"the Python environment changed (start-up file {site_dir / 'sitecustomize.py'})"
    (site_dir / "sitecustomize.py").unlink()  # only the .pth's content differs now
    assert surface.explain_mismatch(exp, h0, "d", train, surface.environment()).endswith(
        f"(start-up file {site_dir / 'x.pth'})")
    assert surface.explain_mismatch(exp, h0, "d", train, {**env0, "torch": "0.0"}) == \
        "the Python environment changed (interpreter or torch version)"
    with pytest.raises(LabError, match="llmlabs prepare"):
        surface.data_hash(tmp_path)


# ---------------------------------------------------------------------------------------------
# agents

KEY = "sk-test-" + "".join(random.Random(7).choice("abcdefghijk0123456789") for _ in range(24))


class ChatServer:
    """A scripted OpenAI-compatible endpoint on 127.0.0.1: `script(request) -> message` decides each
    reply; every request (a GET too, as a 302/303 redirect turns the POST into one) is recorded with
    its headers and whether its Authorization header was right."""

    def __init__(self, script, key=KEY):
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                ok = self.headers.get("Authorization") == f"Bearer {key}"
                outer.requests.append({"path": self.path, "auth_ok": ok, "body": body,
                                       "headers": dict(self.headers)})
                if not ok:
                    return self._send(401, {"error": {"message": "bad key"}})
                self._send(200, {"id": "x", "object": "chat.completion",
                                 "choices": [{"index": 0, "message": script(body), "finish_reason": "stop"}]})

            def do_GET(self):
                outer.requests.append({"path": self.path, "auth_ok": None, "body": None,
                                       "headers": dict(self.headers)})
                self._send(405, {"error": {"message": "POST only"}})

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


@pytest.mark.parametrize("code", [307, 302])
def test_openai_agent_refuses_redirects_and_never_sends_the_key_on(tmp_path, monkeypatch, code):
    target = ChatServer(lambda body: {"role": "assistant", "content": "x"})

    class Redirect(BaseHTTPRequestHandler):
        def do_POST(self):
            self.send_response(code)
            self.send_header("Location", target.url + "/chat/completions")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    first = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=first.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{first.server_port}/v1"
    try:
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        agent = OpenAIAgent(url, "m", "OPENAI_API_KEY", timeout=30)
        with pytest.raises(LabError) as e:
            agent.step("s", tmp_path, tmp_path / "t", {})
    finally:
        first.shutdown()
        first.server_close()
        target.close()
    msg = str(e.value)
    assert msg == (f"{url}/chat/completions answered a redirect (HTTP {code} to {target.url}/chat/completions): "
                   "refused, the key is never sent on; point --agent at the final URL")
    assert KEY not in msg and "Traceback" not in msg and "\n" not in msg
    assert target.requests == []  # no request, so no Authorization header, ever reached the other host


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
# init, locate, the device lock

TINY = ("--depth 2 --aspect-ratio 32 --head-dim 16 --seq-len 64 --window-pattern SL --device-batch-size 4 "
        "--total-batch-size 128 --eval-tokens 2048 --device cpu --tokens 1280")


def test_init_checks_its_inputs_and_commands_find_their_session(tmp_path, monkeypatch, capsys, data_dir):
    from llmlabs import cli
    from llmlabs.auto.cli import sandbox_line
    from llmlabs.auto.session import locate
    from llmlabs.data.shards import DataDir

    repo = tmp_path / "repo"
    _repo(repo, ("llmlabs/model.py", "llmlabs/train.py"))
    (repo / "llmlabs/model.py").write_text("# uncommitted\n")
    monkeypatch.chdir(repo)
    monkeypatch.setenv("LLMLABS_HOME", str(tmp_path / "home"))

    def auto(*args):
        code = cli.main(["auto", *args])
        return code, capsys.readouterr()

    d = ("--data", str(data_dir))
    for flags, message in (
            ("--tag 'bad tag'", "cannot name a git branch"),
            (f"--tag t --data {tmp_path / 'nowhere'}", "llmlabs prepare"),
            ("--tag t --train-args '--depth 2 --seed 3'", "may not set --seed"),
            ("--tag t --train-args '--eval-every 5'", "may not set --eval-every"),
            ("--tag t --train-args '--eval-every=5 --eval-split=val'", "may not set --eval-every=5, --eval-split=val"),
            ("--tag t --time-budget 10 --timeout 5", "timeout longer"),
            ("--tag t --alpha 0.5", "--alpha 0.5: the false-keep rate must be between 0 and 0.5"),
            ("--tag t --alpha 0", "--alpha 0.0"),
            (f"--tag t --baselines {stats.MIN_BASELINES - 1}", f"at least {stats.MIN_BASELINES} baseline runs")):
        code, out = auto("init", *d, *shlex.split(flags))
        assert code == 2 and message in out.err and "\n" not in out.err.strip(), (flags, out.err)
    assert not (repo / ".auto").exists()  # a refused init leaves nothing behind
    code, out = auto("run", "-m", "x")
    assert code == 2 and "no autoresearch session" in out.err
    code, out = auto("init", "--tag", "t", *d, "--time-budget", "7", "--train-args", TINY, "--alpha", "0.05",
                     "--baselines", "4")
    assert code == 0 and "uncommitted changes" in out.out
    assert "research surface (the only files an experiment may change): " + ", ".join(surface.RESEARCH_SURFACE) \
        in out.out
    assert sandbox_line() in out.out and "keep rule: one-sided t-test at alpha 0.05 after 4 baseline runs" in out.out
    assert _git(repo, "rev-parse", "--abbrev-ref", "HEAD") == "main"  # the user's checkout stays as it was
    assert (repo / "llmlabs/model.py").read_text() == "# uncommitted\n"
    sdir, wt = repo / ".auto/t", repo / ".auto/t/main"
    assert (wt / "llmlabs/model.py").read_text() == "# llmlabs/model.py\n"
    assert _git(wt, "rev-parse", "--abbrev-ref", "HEAD") == "auto/t"
    assert _git(repo, "status", "--porcelain") == "M llmlabs/model.py"  # .auto/ excluded locally
    cfg = json.loads((sdir / "session.json").read_text())
    assert cfg["train_args"] == TINY.split() and cfg["timeout"] == 7 * 1.5 + 180
    assert (cfg["alpha"], cfg["baselines"], cfg["repeat_near"]) == (0.05, 4, 1)
    # the harness scores every run with settings fixed here: rows = min(4, 128 // 64)
    assert cfg["eval"] == {"rows": 2, "seq_len": 64, "tokens": 2048, "device": "cpu"}
    assert set(cfg["expected"]["harness"]) == {"llmlabs/train.py"} and "startup_files" in cfg["expected"]["env"]
    key = sdir / "secret/ledger.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_bytes()) == 32
    # training runs get a data directory holding the train split only
    full, train = DataDir.open(data_dir), DataDir.open(sdir / "data-train")
    shards = {n for s in full.manifest["splits"]["train"]["shards"] for n in (s["tokens"], s["docs"])}
    assert {p.name for p in (sdir / "data-train").iterdir()} == shards | {"manifest.json", "tokenizer.json"}
    assert train.manifest["splits"]["train"] == full.manifest["splits"]["train"]
    assert all(train.manifest["splits"][s]["shards"] == [] for s in ("val", "test"))
    assert set(train.manifest["files"]) == shards and train.tokenizer.hash == full.tokenizer.hash

    code, out = auto("init", "--tag", "t", *d)
    assert code == 2 and "exists already" in out.err
    code, out = auto("run", "-m", "x")  # found from the main checkout; the baselines are missing
    assert code == 2 and "0 of the 4 baseline runs" in out.err and "auto baseline" in out.err
    assert locate(wt / "llmlabs")[1] == "main" and locate(wt)[0].tag == "t"
    assert auto("init", "--tag", "u", *d, "--no-compile-cache")[0] == 0
    # the session's shared compile cache, or with --no-compile-cache an empty one per run
    from llmlabs.auto.runs import Run, child_env, compile_cache
    from llmlabs.auto.session import Session

    t, u = Session(sdir), Session(repo / ".auto/u")
    run = Run("r", 0, tmp_path / "r", tmp_path / "r.log")
    assert (t.compile_cache, u.compile_cache) == (True, False)
    assert compile_cache(t, run) == t.cache and compile_cache(u, run) == run.run_dir / "compile-cache"
    env = child_env(t, wt, t.worker("main"), compile_cache(t, run))
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(t.cache / "inductor") and env["PYTHONPATH"] == str(wt)
    assert "TORCHINDUCTOR_CACHE_DIR" not in child_env(t, wt, t.worker("main"))  # the evaluator's: none
    code, out = auto("report")
    assert code == 2 and "several sessions (t, u): pass --tag" in out.err
    assert locate(repo, "u")[0].tag == "u" and locate(wt)[0].tag == "t"  # inside a worktree: its session
    with pytest.raises(LabError, match="inside the worktree of session t"):
        locate(wt, "u")


def test_device_lock_serialises_experiments_on_one_gpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMLABS_HOME", str(tmp_path))
    events = []
    a, b = Worker("gpu0", tmp_path, "x", 0), Worker("main", tmp_path, "y", None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # `main` runs on the first visible GPU: the same one

    def hold(worker, tag):
        with runs.device_lock(worker):
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
    with runs.device_lock(Worker("gpu1", tmp_path, "z", 1)), runs.device_lock(a):
        pass  # two GPUs: no waiting


# ---------------------------------------------------------------------------------------------
# a real session: seed claims, and runner.experiment (keep, repeat, discard, crash, invalid) with a
# stand-in trainer

@pytest.fixture
def session(tmp_path, monkeypatch, data_dir):
    """A real session (init_session) in a small copy of this repository: two research files and a few
    harness files, committed as a fresh repo. LLMLABS_HOME (device locks) points into tmp."""
    repo = tmp_path / "lab"
    for rel in ("llmlabs/__init__.py", "llmlabs/config.py", "llmlabs/model.py", "llmlabs/train.py",
                "llmlabs/evaluate.py", "pyproject.toml"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, repo / rel)
    _git(repo, "init", "-q", "-b", "main")
    _commit_all(repo, "lab")
    monkeypatch.setenv("LLMLABS_HOME", str(tmp_path / "home"))
    return init_session(repo, "t", data=data_dir, time_budget=10, train_args=TINY, baselines=3, repeat_near=1)


class StandIn:
    """runner.train replaced: each call takes the next scripted outcome (a val_bpb, or (status, reason))
    and leaves what a real run leaves: a result.json by runs.write_result (the ledger verifies its
    sha256) and, for a scored run, a checkpoint (only a keep may keep it)."""

    def __init__(self, monkeypatch):
        self.script, self.calls = [], []
        monkeypatch.setattr(runner, "train", self)

    def __call__(self, session, worker, commit, run, split="val", allow=None):
        self.calls.append({"commit": commit, "seed": run.seed, "split": split, "allow": allow})
        out = self.script.pop(0)
        run.started, run.worker, run.wall_s = time.time(), worker.name, 12.0
        run.phases = {"warm_s": 4.0 + 0.5 * len(self.calls), "train_s": 10.0, "tail_s": 1.0, "steps": 20, "step_s": 0.5}
        if isinstance(out, tuple):
            run.status, run.reason = out
        else:
            run.phases["eval_s"] = 3.0
            run.result = {"ok": True, "bpb": out}
            (run.run_dir / "checkpoints").mkdir()
            (run.run_dir / "checkpoints/LATEST").write_text("step 20\n")
        runs.write_result(run, commit, split)
        return run


def test_claim_seeds_from_two_threads_never_repeat(session):
    got = {0: [], 1: []}
    threads = [threading.Thread(target=lambda i=i: [got[i].extend(session.claim_seeds(1 + n % 3)) for n in range(40)])
               for i in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seeds = got[0] + got[1]
    assert len(seeds) == 2 * sum(1 + n % 3 for n in range(40)) and sorted(seeds) == list(range(len(seeds)))
    assert session.claim_seeds(2) == [len(seeds), len(seeds) + 1]


BASE = [1.00, 1.02, 0.99, 1.01]


def edit(wt, text):
    with open(wt / "llmlabs/config.py", "a") as f:
        f.write(f"\n# {text}\n")


def test_experiment_waits_for_the_session_baselines(session, monkeypatch):
    stand_in, worker = StandIn(monkeypatch), session.worker("main")
    start = gitops.short(session.repo, session.base)
    edit(worker.path, "an idea")
    with pytest.raises(LabError, match="0 of the 3 baseline runs"):
        runner.experiment(session, worker, "too early")
    stand_in.script = BASE[:2]
    first = runner.baseline(session, [worker], repeats=2)
    assert [(r["commit"], r["status"], r["seed"]) for r in first] == [(start, "baseline", 0), (start, "baseline", 1)]
    with pytest.raises(LabError, match="2 of the 3 baseline runs"):
        runner.experiment(session, worker, "still too early")
    assert gitops.is_dirty(worker.path) and gitops.short(worker.path, "HEAD") == start  # the edit left as it was
    with pytest.raises(LabError, match="--repeats 1"):
        runner.baseline(session, [worker], repeats=1)
    stand_in.script = BASE[2:]
    runner.baseline(session, [worker])  # what the session still needs: 1, but a spread takes 2 runs
    rows = session.ledger.read()
    assert [float(r["val_bpb"]) for r in rows] == BASE and [r["seed"] for r in rows] == ["0", "1", "2", "3"]
    assert float(rows[1]["sigma"]) == pytest.approx(statistics.stdev(BASE[:2]), abs=1e-6)  # sigma so far
    assert float(rows[3]["sigma"]) == pytest.approx(statistics.stdev(BASE), abs=1e-6)
    assert runner.noise(rows) == (pytest.approx(statistics.stdev(BASE)), 3)
    assert all(c["allow"] is None and c["split"] == "val" for c in stand_in.calls)  # baselines set the allowances
    assert not any((session.dir / "runs" / r["run"] / "checkpoints").exists() for r in rows)


def test_experiment_keeps_repeats_discards_and_resets(session, monkeypatch):
    stand_in, worker = StandIn(monkeypatch), session.worker("main")
    wt, led = worker.path, session.ledger
    stand_in.script = list(BASE)
    runner.baseline(session, [worker], repeats=4)
    mean, sigma, t_crit = statistics.fmean(BASE), statistics.stdev(BASE), stats.threshold(3, session.alpha)
    sd1, sd2 = sigma * math.sqrt(1 + 1 / 4), sigma * math.sqrt(1 / 2 + 1 / 4)  # 1 or 2 runs against 4
    start = gitops.short(wt, "HEAD")
    allow = runs.allowances([json.loads((session.dir / "runs" / r["run"] / "result.json").read_text())
                             for r in led.read()])
    assert allow == {"warm_s": 19.0, "tail_s": 11.5, "eval_s": 14.5}  # warm-ups of 4.5 to 6 s

    def run(message, *outcomes):
        stand_in.script, before, n = list(outcomes), len(stand_in.calls), len(led.read())
        parent, text = gitops.short(wt, "HEAD"), (wt / "llmlabs/config.py").read_text()
        edit(wt, message)
        out = runner.experiment(session, worker, message)
        assert stand_in.script == [] and all(c["allow"] == allow for c in stand_in.calls[before:])
        new = led.read()[n:]
        assert new[-1]["commit"] == out["commit"] and new[-1]["status"] == out["status"]
        if out["status"] != "keep":  # back at the frontier, the edit gone
            assert gitops.short(wt, "HEAD") == parent and not gitops.is_dirty(wt)
            assert (wt / "llmlabs/config.py").read_text() == text
        return new

    # a marginal keep (t just past -t_crit) is measured again and decided on both runs: here a discard
    marginal = mean - (t_crit + 0.5) * sd1
    rows = run("marginal", marginal, mean)
    assert [r["status"] for r in rows] == ["discard", "discard"] and rows[0]["commit"] == rows[1]["commit"] != start
    assert [float(r["val_bpb"]) for r in rows] == pytest.approx([marginal, mean], abs=1e-6)
    for r in rows:  # the decision on both runs, on both rows
        assert float(r["delta"]) == pytest.approx((marginal + mean) / 2 - mean, abs=1e-6)
        assert float(r["sigma"]) == pytest.approx(sd2, abs=1e-6) and r["parent"] == start
        assert not (session.dir / "runs" / r["run"] / "checkpoints").exists()
    assert len({r["seed"] for r in led.read()}) == 6  # every run its own seed

    rows = run("worse", mean + 0.02)  # a discard is not measured again
    assert [(r["status"], float(r["delta"]), float(r["sigma"])) for r in rows] == \
        [("discard", pytest.approx(0.02, abs=1e-6), pytest.approx(sd1, abs=1e-6))]
    rows = run("broken forward", ("crash", "RuntimeError: deliberate crash"))
    assert [(r["status"], r["reason"], r["val_bpb"], r["delta"]) for r in rows] == \
        [("crash", "RuntimeError: deliberate crash", "", "")]
    assert rows[0]["run"] and rows[0]["result_sha"]  # its result file is on record too
    over = "over budget: trained 13.0 s by the harness's clock (budget 10 s, allowed 11.0 s with one step's slack)"
    assert [(r["status"], r["reason"]) for r in run("slow", ("invalid", over))] == [("invalid", over)]

    # a change outside the research surface: invalid before any training, the file named
    calls = len(stand_in.calls)
    with open(wt / "llmlabs/evaluate.py", "a") as f:
        f.write("\n# cheat\n")
    rows = run("better evaluation")
    assert len(stand_in.calls) == calls and len(rows) == 1
    assert rows[0]["status"] == "invalid" and rows[0]["reason"].startswith("llmlabs/evaluate.py changed outside")
    assert rows[0]["run"] == rows[0]["val_bpb"] == rows[0]["seed"] == "" and rows[0]["parent"] == start

    # a clear keep (t = -8, beyond the marginal band): kept after one run, the worktree stays on it
    good = mean - 8 * sd1
    rows = run("better", good)
    assert [r["status"] for r in rows] == ["keep"]
    assert float(rows[0]["delta"]) / float(rows[0]["sigma"]) == pytest.approx(-8, abs=1e-3)
    kept = rows[0]["commit"]
    assert gitops.short(wt, "HEAD") == kept != start and not gitops.is_dirty(wt)
    assert (session.dir / "runs" / rows[0]["run"] / "checkpoints/LATEST").exists()
    rows = led.read()
    assert runner.frontier(rows) == kept and runner.scores(rows, kept) == pytest.approx([good], abs=1e-6)
    assert [r["status"] for r in rows] == ["baseline"] * 4 + ["discard"] * 3 + ["crash", "invalid", "invalid", "keep"]
    # the next experiment is compared with the keep (m = 1 now): equal to it is no gain
    rows = run("same again", good)
    assert rows[0]["status"] == "discard" and rows[0]["parent"] == kept and gitops.short(wt, "HEAD") == kept
    assert float(rows[0]["sigma"]) == pytest.approx(sigma * math.sqrt(2), abs=1e-6)
