"""Autoresearch end to end on CPU: real `llmlabs train` subprocesses on real (tiny) data, in a copy of
this repository made into a fresh git repo, driven three ways: a scripted agent through
`auto run`, `auto loop` with an OpenAI-compatible server on 127.0.0.1, and two workers sharing one
ledger.

Runs are capped at 30 steps (--tokens) on top of the time budget, so a seed gives the same val_bpb
however loaded the machine is. The starting commit is made deliberately weak (learning rates x 0.1,
about 0.6 bpb worse after 30 steps, ~10 sigma), so that restoring the tuned rates is a real
improvement the keep rule must accept."""
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import bench_script, prepared_stdlib

from llmlabs import cli

REPO = Path(__file__).resolve().parents[1]
TINY = ("--depth 2 --aspect-ratio 32 --head-dim 16 --seq-len 128 --window-pattern SL --device-batch-size 4 "
        "--total-batch-size 512 --eval-tokens 2048 --device cpu --tokens 15360")
BUDGET = "10"  # 30 steps take ~0.7 s on an idle 2-core machine; the rest is slack for a loaded one

# Edits are appended to the research files, so they hold whatever those files look like inside.
WEAK = ("\n\n_tuned_hyperparams_for = hyperparams_for\n\n\n"
        "def hyperparams_for(config):  # weak start: every learning rate x 0.1\n"
        "    return {k: v * 0.1 if k.endswith('_lr') else v for k, v in _tuned_hyperparams_for(config).items()}\n")
# harmful for sure: 30 steps at a hundredth of the learning rates barely move the weights
HARMFUL = ("\n\n_before_harm = hyperparams_for\n\n\n"
           "def hyperparams_for(config):  # every learning rate x 0.01\n"
           "    return {k: v * 0.01 if k.endswith('_lr') else v for k, v in _before_harm(config).items()}\n")
CRASH = ("\n\ndef _broken_forward(self, *args, **kwargs):\n"
         "    raise RuntimeError('deliberate crash in forward')\n\n\nGPT.forward = _broken_forward\n")
SLOW = ("\n\nimport time as _time\n_fast_forward = GPT.forward\n\n\n"
        "def _slow_forward(self, idx, targets=None, **kwargs):\n"
        "    if targets is not None:  # training steps only: 15 s, past the 10 s budget in one step\n"
        "        _time.sleep(15)\n"
        "    return _fast_forward(self, idx, targets, **kwargs)\n\n\nGPT.forward = _slow_forward\n")
CHEAT = ("\n\n_honest_bpb = evaluate_bpb\n\n\ndef evaluate_bpb(*args, **kwargs):\n"
         "    res = _honest_bpb(*args, **kwargs)\n    return {**res, 'bpb': res['bpb'] * 0.5}\n")


def git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepared_stdlib(tmp_path_factory.mktemp("stdlib"), 80, 512, 0.1, 0.1)


def copy_lab(repo):
    """This repository's current files as a fresh git repo on branch main, with the weak start on top."""
    for rel in git(REPO, "ls-files", "-co", "--exclude-standard").splitlines():
        if (REPO / rel).is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, repo / rel)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "lab")
    with open(repo / "llmlabs/scaling.py", "a") as f:
        f.write(WEAK)
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "weak start")
    return repo


@pytest.fixture
def lab(tmp_path, monkeypatch, data_dir):
    """A copy of this repository (its current files) as a fresh git repo on branch main, with the
    weak starting commit on top. LLMLABS_HOME (device locks) points into tmp."""
    repo = copy_lab(tmp_path / "lab")
    monkeypatch.setenv("LLMLABS_HOME", str(tmp_path / "home"))
    # one thread per training run: as fast for this model, and a loaded machine (other test suites,
    # two workers) slows it down gracefully instead of stalling OpenMP's spinning threads
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(repo)
    return repo


def auto(cwd, monkeypatch, *args):
    monkeypatch.chdir(cwd)
    return cli.main(["auto", *args])


def init(lab, monkeypatch, data_dir, tag):
    assert auto(lab, monkeypatch, "init", "--tag", tag, "--data", str(data_dir), "--time-budget", BUDGET,
                "--train-args", TINY, "--repeat-near", "0", "--baselines", "3") == 0
    return lab / ".auto" / tag


def ledger(sdir):
    from llmlabs.auto.ledger import Ledger

    return Ledger(sdir / "results.tsv").read()


def append(path, text):
    with open(path, "a") as f:
        f.write(text)


def assert_at(wt, commit, branch):
    """The worktree is exactly `commit`: HEAD, branch and files, nothing uncommitted."""
    assert git(wt, "rev-parse", "--short=12", "HEAD") == commit
    assert git(wt, "rev-parse", "--short=12", branch) == commit
    assert git(wt, "status", "--porcelain") == ""


def test_scripted_agent_keep_discard_crash_invalid_over_budget(lab, data_dir, monkeypatch, capsys):
    user_head = git(lab, "rev-parse", "main")
    sdir = init(lab, monkeypatch, data_dir, "s")
    wt = sdir / "main"
    assert git(wt, "rev-parse", "--abbrev-ref", "HEAD") == "auto/s"
    assert auto(lab, monkeypatch, "baseline") == 0  # as many runs as the session needs: 3
    rows = ledger(sdir)
    assert [r["status"] for r in rows] == ["baseline"] * 3 and len({r["seed"] for r in rows}) == 3
    start = rows[0]["commit"]
    sigma = statistics.stdev(float(r["val_bpb"]) for r in rows)
    assert float(rows[-1]["sigma"]) == pytest.approx(sigma, abs=1e-6) and sigma > 0  # the ledger keeps 6 decimals

    # 1. a real improvement: restore the tuned learning rates -> keep
    cfg = wt / "llmlabs/scaling.py"
    cfg.write_text(cfg.read_text().replace(WEAK, ""))
    assert auto(wt, monkeypatch, "run", "-m", "restore the tuned learning rates") == 0
    keep = ledger(sdir)[-1]
    assert keep["status"] == "keep" and keep["parent"] == start and keep["worker"] == "main"
    assert float(keep["delta"]) / float(keep["sigma"]) < -6.96  # t_{0.99, 2 dof}
    assert float(keep["sigma"]) == pytest.approx(sigma * (1 + 1 / 3) ** 0.5, rel=1e-3)
    result = json.loads((sdir / "runs" / keep["run"] / "result.json").read_text())
    assert result["causal"]["causal"] and result["bpb"] == pytest.approx(float(keep["val_bpb"]), abs=1e-6)
    assert result["phases"]["train_s"] > 0 and result["phases"]["eval_s"] > 0
    assert (sdir / "runs" / keep["run"] / "checkpoints" / "LATEST").exists()  # kept runs keep their weights
    assert_at(wt, keep["commit"], "auto/s")
    kept = keep["commit"]
    assert "status:    keep" in capsys.readouterr().out

    # 2. a harmful change: learning rates x 0.01 on top -> discard, branch reset to the kept commit
    append(cfg, HARMFUL)
    assert auto(wt, monkeypatch, "run", "-m", "learning rates x 0.01") == 0
    r = ledger(sdir)[-1]
    assert r["status"] == "discard" and r["parent"] == kept and float(r["delta"]) > 0
    assert r["commit"] != kept and not (sdir / "runs" / r["run"] / "checkpoints").exists()
    assert_at(wt, kept, "auto/s")
    assert HARMFUL not in cfg.read_text()

    # 3. a crash: raise in the forward -> crash, reason and log tail kept, branch reset
    append(wt / "llmlabs/model.py", CRASH)
    assert auto(wt, monkeypatch, "run", "-m", "new forward") == 0
    r = ledger(sdir)[-1]
    assert r["status"] == "crash" and r["reason"] == "RuntimeError: deliberate crash in forward" and r["val_bpb"] == ""
    assert "Traceback" in (sdir / "logs" / f"{r['run']}.log").read_text()
    assert_at(wt, kept, "auto/s")

    # 4. an edit to the harness (the evaluation) -> invalid without training
    append(wt / "llmlabs/evaluate.py", CHEAT)
    assert auto(wt, monkeypatch, "run", "-m", "better evaluation") == 0
    r = ledger(sdir)[-1]
    assert r["status"] == "invalid" and r["reason"].startswith("llmlabs/evaluate.py changed outside the research surface")
    assert r["run"] == "" and r["val_bpb"] == ""
    assert_at(wt, kept, "auto/s")

    # 5. a change that trains past the budget -> rejected as invalid
    append(wt / "llmlabs/model.py", SLOW)
    assert auto(wt, monkeypatch, "run", "-m", "slow forward") == 0
    r = ledger(sdir)[-1]
    assert r["status"] == "invalid" and r["reason"].startswith("over budget: trained 15."), r["reason"]
    assert float(r["wall_s"]) > 15
    assert_at(wt, kept, "auto/s")

    # nothing to run without a change; the user's branch and checkout were never touched
    assert auto(wt, monkeypatch, "run", "-m", "again") == 2
    assert "nothing to run" in capsys.readouterr().err
    assert git(lab, "rev-parse", "main") == user_head and git(lab, "status", "--porcelain") == ""
    assert [r["status"] for r in ledger(sdir)] == ["baseline"] * 3 + ["keep", "discard", "crash", "invalid", "invalid"]

    # confirmation on the held-out test split, then the report
    capsys.readouterr()
    assert auto(lab, monkeypatch, "confirm", "--seeds", "2") == 0
    conf = json.loads((sdir / "confirm.json").read_text())
    assert conf["commits"]["best"]["commit"] == kept and conf["commits"]["start"]["commit"] == start
    assert conf["diff"] < -3 * conf["se"] < 0 and conf["verdict"] == "confirmed"  # it generalises to unseen text
    assert [r["status"] for r in ledger(sdir)][-5:] == ["test"] * 4 + ["confirmed"]
    assert "difference -0." in capsys.readouterr().out
    assert auto(lab, monkeypatch, "report", "--json") == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["counts"] == {"baseline": 3, "keep": 1, "discard": 1, "crash": 1, "invalid": 2, "test": 4,
                             "confirmed": 1}
    assert [k["commit"] for k in rep["kept"]] == [kept] and rep["best"]["commit"] == kept
    assert rep["crashes"][0]["reason"].startswith("RuntimeError")
    assert "raise RuntimeError('deliberate crash in forward')" in rep["crashes"][0]["tail"]
    assert rep["confirm"]["diff"] == conf["diff"]
    assert (sdir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (sdir / "report.md").read_text()
    assert f"| {kept} |" in md and "restore the tuned learning rates" in md and "held-out test split" in md


def test_loop_with_an_openai_compatible_server(lab, data_dir, monkeypatch, capsys):
    from test_auto_parts import KEY, ChatServer, tool_call

    sdir = init(lab, monkeypatch, data_dir, "o")
    seen = []

    def script(body):
        user = body["messages"][1]["content"]
        iteration = int(user.split("# Iteration ")[1].split()[0])
        tools = [m for m in body["messages"] if m["role"] == "tool"]
        seen.append((iteration, len(tools)))
        if iteration == 1:  # read the config, take the weak block out again
            if not tools:
                return tool_call(0, "read_file", path="llmlabs/scaling.py")
            if len(tools) == 1:
                return tool_call(1, "edit_file", path="llmlabs/scaling.py", old_string=WEAK, new_string="\n")
            return {"role": "assistant", "content": "Restore the tuned learning rates"}
        if iteration == 3:  # learning rates x 0.01 on top of the kept commit
            if not tools:
                return tool_call(5, "read_file", path="llmlabs/scaling.py")
            if len(tools) == 1:
                return tool_call(6, "write_file", path="llmlabs/scaling.py", content=tools[0]["content"] + HARMFUL)
            return {"role": "assistant", "content": "Learning rates x 0.01"}
        # iteration 2: try to edit the evaluation (refused), then break the forward
        if not tools:
            return tool_call(2, "write_file", path="llmlabs/evaluate.py", content="cheat")
        if len(tools) == 1:
            return tool_call(3, "read_file", path="llmlabs/model.py")
        if len(tools) == 2:
            return tool_call(4, "write_file", path="llmlabs/model.py", content=tools[1]["content"] + CRASH)
        return {"role": "assistant", "content": "A new forward"}

    server = ChatServer(script)
    monkeypatch.setenv("LAB_KEY", KEY)
    try:
        assert auto(lab, monkeypatch, "loop", "--agent", f"openai:{server.url}", "--model", "m", "--key-env", "LAB_KEY",
                    "--iterations", "3") == 0
    finally:
        server.close()
    rows = ledger(sdir)
    assert [r["status"] for r in rows] == ["baseline"] * 3 + ["keep", "crash", "discard"]
    rows = rows[1:]  # the indices below count from the second baseline run
    assert [r["description"] for r in rows[2:]] == ["Restore the tuned learning rates", "A new forward",
                                                   "Learning rates x 0.01"]
    assert rows[3]["parent"] == rows[4]["parent"] == rows[2]["commit"]  # later iterations start from the keep
    assert seen == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (2, 3), (3, 0), (3, 1), (3, 2)]
    assert all(r["auth_ok"] for r in server.requests)
    first_user = server.requests[0]["body"]["messages"][1]["content"]
    assert "## Ledger so far" in first_user and "baseline" in first_user and "### llmlabs/config.py" in first_user
    assert "NEVER STOP" in server.requests[0]["body"]["messages"][0]["content"]  # program.md as the system prompt
    refused = [m for m in server.requests[6]["body"]["messages"] if m["role"] == "tool"][0]["content"]
    assert refused.startswith("error: llmlabs/evaluate.py is not on the research surface")
    assert_at(sdir / "main", rows[2]["commit"], "auto/o")
    # the key reached the server's header and nothing else: no file of the session, no output
    out = capsys.readouterr()
    assert KEY not in out.out + out.err
    for f in sdir.rglob("*"):
        if f.is_file() and ".git" not in f.parts:
            assert KEY.encode() not in f.read_bytes(), f


AGENT = """
import os, pathlib, sys
prompt = sys.stdin.read()
assert "## Research files" in prompt and "## Ledger so far" in prompt
worker, it = os.environ["LLMLABS_AUTO_WORKER"], int(os.environ["LLMLABS_AUTO_ITERATION"])
cfg, model = pathlib.Path("llmlabs/scaling.py"), pathlib.Path("llmlabs/model.py")
if worker == "gpu0" and it == 1:
    cfg.write_text(cfg.read_text().replace({weak!r}, ""))
    print("restore the tuned learning rates")
elif worker == "gpu0":
    cfg.write_text(cfg.read_text() + {tiny!r})
    print("learning rates x 0.01")
else:
    model.write_text(model.read_text() + {crash!r})
    print("new forward, take", it)
"""
TINY_LR = ("\n\n_before_tiny = hyperparams_for\n\n\ndef hyperparams_for(config):\n"
           "    return {k: v * 0.01 if k.endswith('_lr') else v for k, v in _before_tiny(config).items()}\n")


def test_two_workers_share_one_ledger(lab, data_dir, monkeypatch, tmp_path):
    sdir = init(lab, monkeypatch, data_dir, "w")
    agent = tmp_path / "agent" / "agent.py"  # in a folder the sandboxed agent may see (--agent-rw)
    agent.parent.mkdir()
    agent.write_text(AGENT.format(weak=WEAK, tiny=TINY_LR, crash=CRASH))
    assert auto(lab, monkeypatch, "loop", "--agent", f"{sys.executable} {agent}", "--gpus", "0,1",
                "--iterations", "2", "--baseline-repeats", "4", "--agent-rw", str(agent.parent)) == 0
    rows = ledger(sdir)
    base, exp = rows[:4], rows[4:]
    assert [r["status"] for r in base] == ["baseline"] * 4 and {r["worker"] for r in base} == {"gpu0", "gpu1"}
    by = {w: [r for r in exp if r["worker"] == w] for w in ("gpu0", "gpu1")}
    assert [r["status"] for r in by["gpu0"]] == ["keep", "discard"]
    assert [r["status"] for r in by["gpu1"]] == ["crash", "crash"]
    kept = by["gpu0"][0]["commit"]
    assert by["gpu0"][1]["parent"] == kept
    # never two experiments on one GPU: a worker's runs do not overlap in time; the two GPUs did
    spans = {w: [(float(r["started"]), float(r["started"]) + float(r["wall_s"])) for r in rows if r["worker"] == w]
             for w in ("gpu0", "gpu1")}
    for s in spans.values():
        assert all(a[1] <= b[0] + 0.2 for a, b in zip(sorted(s), sorted(s)[1:]))  # the ledger rounds to 0.1 s
    assert any(a[0] < b[1] and b[0] < a[1] for a in spans["gpu0"] for b in spans["gpu1"])
    # each worker in its own worktree on its own branch, both back at the frontier
    for w in ("gpu0", "gpu1"):
        wt = sdir / w
        assert git(wt, "rev-parse", "--abbrev-ref", "HEAD") == f"auto/w-{w}"
        assert git(wt, "status", "--porcelain") == ""
    assert git(sdir / "gpu0", "rev-parse", "--short=12", "HEAD") == kept
    prompts = sorted((sdir / "agent").glob("gpu1-*.prompt.md"))
    assert len(prompts) == 2 and "Your last run crashed" in prompts[1].read_text()
    # bench/auto_session.py's account of parallel workers, on this real two-worker ledger: 4 experiments,
    # no seed twice, every decision on the rows before it; then on a tampered copy
    bench = bench_script("auto_session")
    t0 = min(float(r["started"]) for r in exp) - 1
    loop_s = max(float(r["started"]) + float(r["wall_s"]) for r in exp) - t0
    text = bench.workers_section(rows, t0, loop_s)
    assert f"4 experiments in {loop_s:.0f} s of loop" in text and "| gpu0 | 2 |" in text and "| gpu1 | 2 |" in text
    assert "used twice on the val split: none" in text and "before them: none" in text
    bad = [dict(r) for r in rows]
    bad[5]["seed"] = bad[0]["seed"]
    keep = next(r for r in bad if r["status"] == "keep")
    keep["sigma"] = str(float(keep["sigma"]) * 1.5)
    text = bench.workers_section(bad, t0, loop_s)
    assert f"used twice on the val split: {bad[0]['seed']}" in text and f"before them: {keep['run']} (delta" in text


@pytest.mark.parametrize("gpus", ["0,1,2,3,4,5,6,7", "2,5"])
def test_the_benchmark_agent_gives_parallel_workers_different_edits(tmp_path, gpus):
    """bench/auto_session.py's scripted agent, run as the loop runs it (argv: the edits, the --gpus list;
    env: worker and iteration): at each iteration every worker makes another real edit, the workers
    spread evenly over the list whatever GPU numbers they have."""
    bench = bench_script("auto_session")
    (tmp_path / "agent.py").write_text(bench.AGENT)
    edits = [(f"f{e}.py", f"x = {e}", f"x = {e + 100}", f"edit {e}") for e in range(12)]
    (tmp_path / "edits.json").write_text(json.dumps(edits))
    ids = gpus.split(",")
    for iteration in (1, 2):
        made = []
        for g in ids:
            wt = tmp_path / f"wt{g}-{iteration}"
            wt.mkdir()
            for path, old, _, _ in edits:
                (wt / path).write_text(old + "\n")
            out = subprocess.run([sys.executable, str(tmp_path / "agent.py"), str(tmp_path / "edits.json"), gpus], cwd=wt,
                                 env={"LLMLABS_AUTO_WORKER": f"gpu{g}", "LLMLABS_AUTO_ITERATION": str(iteration)},
                                 capture_output=True, text=True, check=True).stdout.strip()
            changed = [e for e, (path, old, _, _) in enumerate(edits) if (wt / path).read_text() != old + "\n"]
            assert len(changed) == 1 and out == f"edit {changed[0]}"
            made.append(changed[0])
        # worker j of n starts j * 12 / n along the list, one further each iteration
        assert made == [(iteration - 1 + 12 * j // len(ids)) % 12 for j in range(len(ids))]
        assert len(set(made)) == len(ids)


def test_slurm_workers_run_each_experiment_as_a_submitit_job(lab, data_dir, monkeypatch, tmp_path):
    """`loop --slurm 2 --cluster local`: every run (training and the harness's evaluation) is a submitit
    job, here a process on this machine, on a cluster a SLURM job on any node; the ledger, the seeds and
    the keep rule work as with local workers."""
    sdir = init(lab, monkeypatch, data_dir, "s")
    agent = tmp_path / "agent" / "agent.py"
    agent.parent.mkdir()
    agent.write_text(AGENT.replace('"gpu0"', '"slurm0"').format(weak=WEAK, tiny=TINY_LR, crash=CRASH))
    assert auto(lab, monkeypatch, "loop", "--agent", f"{sys.executable} {agent}", "--slurm", "2", "--cluster", "local",
                "--iterations", "1", "--baseline-repeats", "3", "--agent-rw", str(agent.parent)) == 0
    rows = ledger(sdir)
    assert [r["status"] for r in rows[:3]] == ["baseline"] * 3 and {r["worker"] for r in rows} == {"slurm0", "slurm1"}
    assert sorted(r["status"] for r in rows[3:]) == ["crash", "keep"]
    assert next(r for r in rows[3:] if r["status"] == "keep")["worker"] == "slurm0"
    assert len({r["seed"] for r in rows}) == len(rows) == 5
    assert len(list((sdir / "slurm").glob("*_result.pkl"))) == 5  # one job per run, each returned its Run
