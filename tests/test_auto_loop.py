"""`llmlabs auto loop` housekeeping without training: transcripts numbered across loop calls,
--hours and --plateau, findings.md, and earlier sessions' findings as priors in the prompt. The
agent is a fake object and runner.experiment a stub that commits the change and appends one ledger
row with a scripted status, so each test takes well under a second."""
import json
import subprocess

import pytest

from llmlabs import cli
from llmlabs.auto import gitops, loop as loop_mod, runner
from llmlabs.auto.findings import PRIOR_CHARS, experiments, priors, render
from llmlabs.auto.session import Session
from llmlabs.common import LabError


def git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def make_session(repo, tag, created="2025-01-02 03:04:05", budget=300.0):
    """A session directory as `llmlabs auto init` leaves it (no fingerprint needed: nothing trains),
    with two baseline rows, so `loop` starts experimenting at once."""
    sdir = repo / ".auto" / tag
    sdir.mkdir(parents=True)
    base = git(repo, "rev-parse", "HEAD")
    (sdir / "session.json").write_text(json.dumps({
        "tag": tag, "repo": str(repo), "base": base, "created": created, "data": "unused", "time_budget": budget,
        "timeout": 600.0, "train_args": ["--depth", "4"], "k": 2.0, "repeat_near": 0,
        "alpha": 0.01, "baselines": 2, "eval": {}}))  # k, or alpha/baselines/eval: the runner's keep rule is changing
    s = Session(sdir)
    short = base[:12]
    s.ledger.append([{"commit": short, "val_bpb": v, "status": "baseline", "description": "baseline: unchanged code",
                      "seed": i, "worker": "main", "parent": short, "sigma": 0.01, "started": 1.0}
                     for i, v in enumerate((1.50, 1.52))])
    return s


@pytest.fixture
def repo(tmp_path):
    repo = tmp_path / "lab"
    (repo / "llmlabs").mkdir(parents=True)
    (repo / "llmlabs" / "config.py").write_text("LR = 1.0\n")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "start")
    (repo / ".git" / "info" / "exclude").write_text("/.auto/\n")
    return repo


class FakeAgent:
    """Appends a line to the config (or nothing, on the iterations in `idle`) and leaves a log."""

    def __init__(self, idle=()):
        self.calls, self.prompts, self.idle = 0, [], set(idle)

    def step(self, prompt, wt, transcript, env):
        self.calls += 1
        self.prompts.append(prompt)
        log = transcript.with_suffix(".log")
        assert not log.exists(), f"{log} would be overwritten"
        log.write_text(f"call {self.calls} iteration {env['LLMLABS_AUTO_ITERATION']}\n")
        if self.calls in self.idle:
            return "nothing to change"
        with open(wt / "llmlabs" / "config.py", "a") as f:
            f.write(f"X{self.calls} = {self.calls}\n")
        return f"idea {self.calls}"


@pytest.fixture
def experiment(monkeypatch):
    """runner.experiment as a stub: commit, one ledger row with the next scripted status (val_bpb
    1.4 - 0.05 a keep, 1.6 otherwise), reset unless kept. Set `.statuses` before the loop runs."""

    class Stub:
        statuses, calls, tick = [], 0, None

        def __call__(self, session, worker, description, seed=None):
            wt = worker.path
            rows = session.ledger.read()
            parent = runner.frontier(rows)
            gitops.commit_all(wt, description)
            status = self.statuses[self.calls % len(self.statuses)]
            self.calls += 1
            bpb = {"keep": 1.45 - 0.05 * self.calls, "crash": None}.get(status, 1.6)
            out = {"commit": gitops.short(wt, "HEAD"), "val_bpb": bpb, "status": status, "description": description,
                   "delta": None if bpb is None else bpb - 1.51, "sigma": None if bpb is None else 0.0122,
                   "worker": worker.name, "parent": parent, "started": 2.0, "run": f"r{self.calls}",
                   "reason": "RuntimeError: boom" if status == "crash" else ""}
            session.ledger.append([out])
            if status != "keep":
                gitops.reset_to(wt, gitops.resolve(wt, parent))
            if self.tick:
                self.tick()
            return out

    stub = Stub()
    monkeypatch.setattr(runner, "experiment", stub)
    return stub


def transcripts(s):
    return sorted(p.name for p in (s.dir / "agent").glob("main-*.log"))


def test_two_loop_calls_keep_every_transcript(repo, experiment, capsys):
    s = make_session(repo, "a")
    experiment.statuses = ["discard", "keep", "crash"]
    agent = FakeAgent()
    loop_mod.loop(s, [s.worker("main")], agent, 2, 2)
    (s.dir / "agent" / "main-0004.json").write_text("{}")  # a stray transcript: numbering goes on after it
    loop_mod.loop(s, [s.worker("main")], agent, 2, 2)
    assert transcripts(s) == ["main-0001.log", "main-0002.log", "main-0005.log", "main-0006.log"]
    texts = [(s.dir / "agent" / n).read_text() for n in transcripts(s)]
    assert texts == ["call 1 iteration 1\n", "call 2 iteration 2\n", "call 3 iteration 5\n", "call 4 iteration 6\n"]
    assert "# Iteration 5 of `llmlabs auto loop`" in agent.prompts[2]
    out = capsys.readouterr().out
    assert out.count("loop stopped: --iterations 2 done on every worker") == 2
    rows = s.ledger.read()
    assert [r["status"] for r in rows[2:]] == ["discard", "keep", "crash", "discard"]
    assert [r["description"] for r in rows[2:]] == ["idea 1", "idea 2", "idea 3", "idea 4"]
    # the worktree is back at the kept commit; findings.md follows the ledger after every experiment
    assert git(s.dir / "main", "rev-parse", "--short=12", "HEAD") == rows[3]["commit"]
    findings = (s.dir / "findings.md").read_text()
    assert "| idea 4 |" in findings and f"| {rows[3]['commit']} | idea 2 |" in findings.split("## The kept chain")[1]


def test_plateau_counts_experiments_of_this_call_only(repo, experiment, capsys):
    s = make_session(repo, "p")
    experiment.statuses = ["discard", "discard", "keep"]
    loop_mod.loop(s, [s.worker("main")], FakeAgent(), 3, 2)  # ends on a keep: the streak starts at 0 again
    experiment.statuses = ["discard", "keep", "crash", "invalid", "discard", "keep"]
    experiment.calls = 0
    agent = FakeAgent(idle={4})  # the 4th call changes nothing: no experiment, the streak stands
    loop_mod.loop(s, [s.worker("main")], agent, 0, 2, plateau=3)
    assert agent.calls == 6 and experiment.calls == 5
    assert [r["status"] for r in s.ledger.read()[5:]] == ["discard", "keep", "crash", "invalid", "discard"]
    assert capsys.readouterr().out.strip().splitlines()[-1] == \
        "loop stopped: --plateau 3: 3 experiments in a row without a keep"


def test_hours_stops_starting_iterations(repo, experiment, monkeypatch, capsys):
    s = make_session(repo, "h")
    now = [1000.0]
    monkeypatch.setattr(loop_mod, "clock", lambda: now[0])
    experiment.statuses = ["discard"]

    def tick():  # each experiment takes 20 minutes
        now[0] += 1200

    experiment.tick = tick
    loop_mod.loop(s, [s.worker("main")], FakeAgent(), 0, 2, hours=1.0)
    assert experiment.calls == 3  # started at 0, 20 and 40 minutes; none at 60
    assert capsys.readouterr().out.strip().splitlines()[-1] == "loop stopped: --hours 1: 1.00 h of wall time have passed"
    with pytest.raises(LabError, match="--hours 0"):
        loop_mod.loop(s, [s.worker("main")], FakeAgent(), 0, 2, hours=0)


def test_cli_loop_flags_and_report(repo, experiment, monkeypatch, capsys):
    s = make_session(repo, "c")
    experiment.statuses = ["discard"]
    monkeypatch.setattr("llmlabs.auto.agents.make_agent", lambda *a, **k: FakeAgent())
    monkeypatch.chdir(repo)
    assert cli.main(["auto", "loop", "--agent", "fake", "--plateau", "2", "--iterations", "5"]) == 0
    assert experiment.calls == 2
    assert "loop stopped: --plateau 2" in capsys.readouterr().out
    assert cli.main(["auto", "report"]) == 0
    out = capsys.readouterr().out
    assert f"findings: {s.dir / 'findings.md'}" in out and (s.dir / "report.png").exists()
    assert "| idea 2 |" in (s.dir / "findings.md").read_text()


def row(commit, status, bpb="", parent="s", **kw):
    return {"commit": commit, "status": status, "val_bpb": str(bpb), "parent": parent, "description": f"d-{commit}",
            "delta": "", "sigma": "", "reason": "", **kw}


def test_findings_table_chain_and_confirmation():
    rows = [row("s", "baseline", 1.50), row("s", "baseline", 1.52), row("s", "crash", parent="s", reason="out of memory"),
            row("a", "keep", 1.40, delta="-0.11", sigma="0.02"), row("a", "keep", 1.42, delta="-0.11", sigma="0.02"),
            row("b", "discard", 1.45, parent="a", delta="0.04", sigma="0.02", description="x | y"),
            row("c", "crash", parent="a", reason="RuntimeError: boom", result_sha="f00", chain="?"),
            row("d", "invalid", parent="a", reason="harness files changed: llmlabs/evaluate.py"),
            row("e", "keep", 1.30, parent="a", delta="-0.11", sigma="0.022"),
            row("s", "test", 1.55), row("e", "test", 1.35), row("e", "test", 1.37),
            row("e", "confirmed", parent="s", delta="-0.20", sigma="0.02", reason="held-out")]
    assert [e["commit"] for e in experiments(rows)] == ["a", "b", "c", "d", "e"]  # baseline rows are not experiments
    md = render(rows, tag="t", time_budget=300, train_args=["--depth", "8"], start="s")
    assert "budget 300 s per run; train flags `--depth 8`" in md
    assert "start s: val_bpb 1.5100 -> best e: val_bpb 1.3000 (-0.2100); 5 experiments: 2 keep, 1 discard" in md
    exp, chain = md.split("## Experiments")[1].split("## The kept chain")
    assert "| a | d-a | 1.4100 (2 runs) | -0.1100 | -5.5 | keep |" in exp
    assert "| b | x \\| y | 1.4500 | +0.0400 | +2.0 | discard |" in exp
    assert "| c | d-c | - | - | - | crash: RuntimeError: boom |" in exp
    assert "invalid: harness files changed: llmlabs/evaluate.py" in exp and "out of memory" not in md
    chain, conf = chain.split("## Confirmation")
    assert chain.strip().splitlines()[2:] == ["| s | the starting commit | 1.5100 | | |",
                                              "| a | d-a | 1.4100 | -0.1000 | -0.1000 |",
                                              "| e | d-e | 1.3000 | -0.1100 | -0.2100 |"]
    assert "| s | d-s | 1 | 1.5500 | - |" in conf
    assert "| e | d-e | 2 | 1.3600 | confirmed delta -0.2000 t -10.0 (held-out) |" in conf


def test_prompt_carries_earlier_sessions_findings_capped(repo, experiment):
    experiment.statuses = ["discard", "keep", "crash"]
    old = make_session(repo, "old", created="2025-01-01 00:00:00", budget=60)
    loop_mod.loop(old, [old.worker("main")], FakeAgent(), 3, 2)
    mid = make_session(repo, "mid", created="2025-02-01 00:00:00", budget=120)
    (mid.dir / "findings.md").write_text(  # a long session: far more than the cap
        "# Findings: auto/mid\n\nbudget 120 s per run; train flags `--depth 4`\nstart x\n\n## Experiments\n\n"
        "| commit | hypothesis | val_bpb | delta | t | status |\n|---|---|---|---|---|---|\n"
        + "".join(f"| c{i:03d} | mid idea {i} {'pad ' * 10}| 1.6 | +0.1 | +5.0 | discard |\n" for i in range(200))
        + "\n## The kept chain\n\n| commit | description | val_bpb | step | from start |\n|---|---|---|---|---|\n"
        "| x | the starting commit | 1.5 | | |\n")
    later = make_session(repo, "later", created="2025-04-01 00:00:00")
    (later.dir / "findings.md").write_text("# Findings: auto/later\n\n## Experiments\n\n| z | later idea |\n")
    new = make_session(repo, "new", created="2025-03-01 00:00:00")

    text = priors(new)
    assert len(text) <= PRIOR_CHARS and "later idea" not in text  # a session created afterwards is no prior
    assert text.index("### Session mid") < text.index("### Session old")  # newest first
    assert "budget 120 s per run" in text and "budget 60 s per run" in text
    assert "mid idea 0 " in text and "mid idea 199" not in text and "more lines of session mid cut" in text
    assert "idea 2" in text.split("### Session old")[1] and "RuntimeError: boom" in text  # old: complete
    w = new.worker("main")
    gitops.add_worktree(repo, w.path, w.branch, new.base)
    prompt = loop_mod.build_prompt(new, w, new.ledger.read(), 1)
    assert "## Priors from earlier sessions of this repository" in prompt and text in prompt
    assert prompt.index("## Priors") < prompt.index("## Ledger so far")
    assert "## Priors" not in loop_mod.build_prompt(old, old.worker("main"), old.ledger.read(), 9)  # none before it

    for i in range(4):  # beyond 3 sessions: the oldest are named, not shown
        make_session(repo, f"x{i}", created=f"2025-02-0{i + 2} 00:00:00").dir.joinpath("findings.md").write_text("x\n")
    text = priors(new)
    assert len(text) <= PRIOR_CHARS and "(3 older sessions not shown: x0, mid, old)" in text
