"""`llmlabs auto promote`: leave-one-out attribution, the promote/TAG branch, promote.md and the draft
sweep spec.

The first tests need no training: a session whose kept chain is made of git commits of a toy
config, and runner.measure replaced by a table (test_bpb = 2.0 minus each knob's known effect plus a
per-seed offset), so every share has a hand-computed value. The last test is the real thing on CPU:
a session with two kept changes, a real improvement and a no-op, confirmed, then promoted."""
import json
import re
import statistics
from pathlib import Path

import pytest
import test_auto_sessions as sessions
from test_auto_loop import git, make_session
from test_auto_sessions import BUDGET, TINY, WEAK, append, auto, ledger

from llmlabs import sweep
from llmlabs.auto import promote as promote_mod
from llmlabs.auto import runner
from llmlabs.auto.promote import (
    Change,
    attribute,
    markdown,
    promote,
    spec_text,
    without_flags,
)
from llmlabs.auto.runs import Run
from llmlabs.common import LabError

# the toy config: three knobs far enough apart that each edit has its own diff context
START = "x = 0\n" + "#\n" * 8 + "y = 0\n" + "#\n" * 8 + "z = 0\n"
EFFECT = {("x", "1"): 0.30, ("z", "1"): 0.10, ("z", "2"): 0.18}  # y = 1 does nothing
OFFSET = {10_000: 0.01, 10_001: -0.01, 10_002: 0.0}                 # the same seed noise for every commit
BASELINES = (1.99, 2.01, 2.00, 2.02, 1.98)                           # sigma 0.0158, 4 dof


def knobs(text):
    return dict(line.split(" = ") for line in text.splitlines() if " = " in line)


def true_bpb(text, seed):
    return 2.0 - sum(EFFECT.get(kv, 0.0) for kv in knobs(text).items()) + OFFSET[seed]


def commit(repo, old, new, message):
    cfg = repo / "llmlabs" / "config.py"
    cfg.write_text(cfg.read_text().replace(old, new))
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", message)
    return git(repo, "rev-parse", "--short=12", "HEAD")


@pytest.fixture
def chain(tmp_path, monkeypatch):
    """A session at the start commit, kept changes A, B, C, S, D (C and D edit the same line; S is
    not in D's history), and the ledger rows of baselines and keeps."""
    repo = tmp_path / "lab"
    (repo / "llmlabs").mkdir(parents=True)
    (repo / "llmlabs" / "config.py").write_text(START)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "start")
    (repo / ".git" / "info" / "exclude").write_text("/.auto/\n")
    s = make_session(repo, "t")
    s.ledger.path.unlink()  # make_session's two baseline rows: ours are below
    start = git(repo, "rev-parse", "--short=12", "HEAD")
    kept = {"A": commit(repo, "x = 0", "x = 1", "x up"), "B": commit(repo, "y = 0", "y = 1", "y up"),
            "C": commit(repo, "z = 0", "z = 1", "z up")}
    # S: kept by a second worker that branched from C, then overtaken by D, which does not contain it
    git(repo, "checkout", "-qb", "side")
    kept["S"] = commit(repo, "y = 1", "y = 3", "y on the side")
    git(repo, "checkout", "-q", "main")
    kept["D"] = commit(repo, "z = 1", "z = 2", "z further")
    rows = [{"commit": start, "val_bpb": v, "status": "baseline", "seed": i, "parent": start, "worker": "main"}
            for i, v in enumerate(BASELINES)]
    prev = start
    for name, c in kept.items():
        rows.append({"commit": c, "val_bpb": 1.5, "status": "keep", "description": f"change {name}", "parent": prev,
                     "delta": -0.1, "sigma": 0.01})
        prev = c
    s.ledger.append(rows)
    monkeypatch.setattr(type(s), "check_commit", lambda self, c: None)  # the toy has no harness to fingerprint
    measured = []

    def fake_measure(session, workers, c, seeds, split="val", kind="", allow=None):
        assert split == "test" and kind == "-ablate"
        text = git(repo, "show", f"{c}:llmlabs/config.py")
        measured.append((c, list(seeds)))
        return [Run(f"{c[:8]}-s{sd}{kind}", sd, session.dir / "runs" / f"{c[:8]}-s{sd}", Path("log"),
                    worker="main", result={"bpb": true_bpb(text, sd)}) for sd in seeds]

    monkeypatch.setattr(runner, "measure", fake_measure)
    return {"s": s, "repo": repo, "start": start, "kept": kept, "measured": measured}


def confirm_rows(c, verdict="confirmed"):
    """What `auto confirm --seeds 3` appends: test runs of the start and the frontier, then the verdict."""
    s, start, best = c["s"], c["start"], c["kept"]["D"]
    text = {k: git(c["repo"], "show", f"{v}:llmlabs/config.py") for k, v in (("start", start), ("best", best))}
    run = "bestrun-test"
    (s.dir / "runs" / run).mkdir(parents=True)
    (s.dir / "runs" / run / "summary.json").write_text(json.dumps({"depth": 3}))
    s.ledger.append([{"commit": cm, "val_bpb": true_bpb(text[k], sd), "status": "test", "seed": sd, "parent": cm,
                      "run": run if k == "best" else ""}
                     for k, cm in (("start", start), ("best", best)) for sd in OFFSET]
                    + [{"commit": best, "status": verdict, "parent": start, "reason": "Welch t = -40"}])


def test_promote_refuses_an_unconfirmed_or_failed_chain(chain, tmp_path):
    s = chain["s"]
    with pytest.raises(LabError, match=r"has not been confirmed .*run `llmlabs auto confirm` first"):
        promote(s, [s.worker("main")], 3, tmp_path)
    confirm_rows(chain, "failed")
    with pytest.raises(LabError, match=r"failed its confirmation on the test split \(Welch t = -40\): nothing to promote"):
        promote(s, [s.worker("main")], 3, tmp_path)
    assert chain["measured"] == []


def test_leave_one_out_shares_entangled_branch_and_spec(chain, tmp_path):
    s, repo, k, start = chain["s"], chain["repo"], chain["kept"], chain["start"]
    confirm_rows(chain)
    res = promote(s, [s.worker("main")], 3, tmp_path)
    by = {c.description[-1]: c for c in res["changes"]}
    assert [c.commit for c in res["changes"]] == [k[n] for n in "ABCD"] and res["superseded"] == [k["S"]]
    # gain 0.30 + 0.18 = 0.48 (z = 2 replaces z = 1's 0.10); removing D leaves z = 1: 0.18 - 0.10 = 0.08
    assert res["gain"] == pytest.approx(0.48)
    assert by["A"].delta == pytest.approx(0.30) and by["A"].share == pytest.approx(0.30 / 0.48)
    assert by["B"].delta == pytest.approx(0.0, abs=1e-12) and by["B"].share == pytest.approx(0.0, abs=1e-12)
    assert by["D"].delta == pytest.approx(0.08) and by["D"].share == pytest.approx(0.08 / 0.48)
    sigma = statistics.stdev(BASELINES)
    assert res["sigma"] == pytest.approx(sigma) and by["A"].sigma_d == pytest.approx(sigma * (2 / 3) ** 0.5)
    assert by["A"].share_sd == pytest.approx(sigma * (2 / 3) ** 0.5 / 0.48)
    # threshold t_{0.99, 4} = 3.747 sigma_d = 0.0483: A and D are load-bearing, B is not; C's revert
    # conflicts with D (same line), so it is entangled and not measured
    assert [by[n].load_bearing for n in "ABCD"] == [True, False, False, True]
    assert by["C"].entangled and by["C"].delta is None and not any(k["C"] in m[0] for m in chain["measured"])
    assert len(chain["measured"]) == 3 and all(m[1] == [10_000, 10_001, 10_002] for m in chain["measured"])
    rows = s.ledger.read()
    abl = [r for r in rows if r["status"] == "ablate"]
    assert len(abl) == 9 and {r["parent"] for r in abl} == {k["D"]}
    assert {r["description"] for r in abl} == {f"ablate: without {k[n]} (change {n})" for n in "ABD"}
    # each ablated commit is the frontier with exactly that change reverted
    without_a = git(repo, "show", f"refs/promote/t/without-{k['A']}:llmlabs/config.py")
    assert knobs(without_a) == {"x": "0", "y": "1", "z": "2"}
    assert git(repo, "rev-parse", f"refs/promote/t/without-{k['A']}^") == git(repo, "rev-parse", k["D"])

    # the branch: A cherry-picked onto the start; D does not apply without C (left off): noted
    log = git(repo, "log", "--format=%H %s", f"{start}..promote/t").splitlines()
    assert len(log) == 1 and log[0].endswith(" change A") and by["A"].on_branch == log[0].split()[0][:12]
    assert knobs(git(repo, "show", "promote/t:llmlabs/config.py")) == {"x": "1", "y": "0", "z": "0"}
    body = git(repo, "log", "-1", "--format=%b", "promote/t")
    assert f"kept commit {k['A']}" in body and "+0.3000 +- 0.0129" in body and "62% +- 3%" in body
    assert by["D"].on_branch == "" and "does not apply on the start" in by["D"].note

    md = res["md"].read_text()
    assert md.startswith("# Promotion of auto/t")
    assert f"| change A | {k['A']} | +0.3000 | 0.0129 | 62% +- 3% | yes | no | {by['A'].on_branch} |" in md
    assert f"| change B | {k['B']} | +0.0000 | 0.0129 | 0% +- 3% | no | no | - |" in md
    assert f"| change C | {k['C']} | - | - | - | no | yes | - |" in md
    assert f"| change D | {k['D']} | +0.0800 | 0.0129 | 17% +- 3% | yes | no | - |" in md
    assert "t = 3.75 sigma_d" in md and "branch: promote/t" in md
    assert f"- {k['C']}: entangled: its revert does not apply" in md
    assert f"- {k['S']}: kept, but not in the frontier's code" in md

    spec = sweep.load_spec(res["spec"])  # the sweep's own parser accepts it
    assert res["spec"].name == "promote-t.toml" and spec.name == "promote-t"
    assert spec.grid == {"depth": [3, 6]} and spec.seeds == [0, 1, 2]
    assert spec.train_args == ["--data", "unused", "--param-data-ratio", "12"]  # the session's --depth is the grid's
    assert len(spec.hypotheses) == 2 and "-0.4800 bpb, confirmed" in spec.hypotheses[0]
    assert "'change A'" in spec.hypotheses[1] and "62% +- 3%" in spec.hypotheses[1]
    assert "at depth 6" in spec.success and f"start {start}" in spec.success

    # again: the branch exists -> refused before any run; deleted -> every seed re-used, no new run
    with pytest.raises(LabError, match=r"branch promote/t exists .*git branch -D promote/t"):
        promote(s, [s.worker("main")], 3, tmp_path)
    git(repo, "branch", "-D", "promote/t")
    again = promote(s, [s.worker("main")], 3, tmp_path)
    assert len(chain["measured"]) == 3 and len(s.ledger.read()) == len(rows)
    assert [c.share for c in again["changes"]] == [c.share for c in res["changes"]]


def test_attribute_arithmetic_by_hand():
    """sigma 0.02 with 10 dof, 2 seeds each: sigma_d = 0.02, t_{0.95,10} = 1.812, threshold 0.0362."""
    a, b = Change("a", "s", "a", "a1", [1.10, 1.12]), Change("b", "a", "b", "b1", [1.03, 1.05])
    gain = attribute([a, b, Change("c", "b", "c")], [1.30, 1.30], [1.00, 1.02], 0.02, 10, 0.05)
    assert gain == pytest.approx(0.29)
    assert (a.delta, a.sigma_d, a.share) == pytest.approx((0.10, 0.02, 0.10 / 0.29))
    assert (b.delta, b.share, b.share_sd) == pytest.approx((0.03, 0.03 / 0.29, 0.02 / 0.29))
    assert a.load_bearing and not b.load_bearing  # 0.03 < 0.0362


def test_without_flags_an_empty_branch_and_odd_text_in_the_spec(tmp_path):
    args = ["--depth", "8", "--tokens=3e5", "--device", "cpu", "--target-flops", "1e15", "--seq-len", "64"]
    assert without_flags(args, promote_mod.BUDGET_FLAGS) == ["--device", "cpu", "--seq-len", "64"]
    res = {"tag": "x", "seeds": [10_000], "time_budget": 5.0, "start": "s", "best": "b", "start_bpb": 2.0,
           "best_bpb": 1.9, "gain": 0.1, "sigma": 0.01, "dof": 2, "alpha": 0.01, "t_crit": 6.96,
           "changes": [Change("c", "s", "no-op", "c1", [1.9], 0.0, 0.01, 0.0, 0.1)], "superseded": [],
           "branch": None, "spec": None}
    md = markdown(res)
    assert "branch: none (no change is load-bearing)" in md and "sweep spec: none" in md
    # a description with quotes, a backslash, DEL and a character outside the BMP still makes a valid spec
    odd = 'use "beta2" = 0.95 \\ \x7f \U0001F600'
    c = Change("c", "s", odd, "c1", [1.8], 0.1, 0.01, 1.0, 0.1, True, "b1")
    path = tmp_path / "x.toml"
    path.write_text(spec_text({**res, "changes": [c], "branch": "promote/x", "depth": 2, "train_args": [],
                               "data": "d"}))
    assert f"'{odd}' (promote/x commit b1)" in sweep.load_spec(path).hypotheses[1]



data_dir, lab = sessions.data_dir, sessions.lab  # the session tests' fixtures: tiny data, a copy of the lab


def test_promote_a_real_session_on_cpu(lab, data_dir, monkeypatch, capsys):
    """Two kept changes through the real `auto run` path: a no-op (a comment) kept first, by
    construction: a loose alpha (0.45) and the seed of the best baseline run, so its one run
    scores that baseline's val_bpb below the baseline mean; then restoring the tuned learning
    rates (a real gain, ~10 sigma). Runs are capped at 30 steps, so a seed gives one val_bpb: the
    frontier without the comment trains exactly as the frontier (delta 0, share 0), the frontier
    without the restore exactly as the start (share 1)."""
    assert auto(lab, monkeypatch, "init", "--tag", "s", "--data", str(data_dir), "--time-budget", BUDGET,
                "--train-args", TINY, "--repeat-near", "0", "--baselines", "3", "--alpha", "0.45") == 0
    sdir, wt = lab / ".auto" / "s", lab / ".auto" / "s" / "main"
    # two workers on the CPU (--gpus only names device locks here: the runs train on --device cpu)
    assert auto(lab, monkeypatch, "baseline", "--gpus", "0,1") == 0
    best_seed = min(ledger(sdir), key=lambda r: float(r["val_bpb"]))["seed"]
    append(wt / "llmlabs/config.py", "\n# a comment: changes nothing the model computes\n")
    assert auto(wt, monkeypatch, "run", "-m", "a comment", "--seed", best_seed) == 0
    cfg = wt / "llmlabs/scaling.py"
    cfg.write_text(cfg.read_text().replace(WEAK, ""))
    assert auto(wt, monkeypatch, "run", "-m", "restore the tuned learning rates") == 0
    rows = ledger(sdir)
    assert [r["status"] for r in rows] == ["baseline"] * 3 + ["keep", "keep"]
    start, noop, lr = rows[0]["commit"], rows[3]["commit"], rows[4]["commit"]

    capsys.readouterr()
    assert auto(lab, monkeypatch, "promote", "--seeds", "2") == 2
    assert "run `llmlabs auto confirm` first" in capsys.readouterr().err
    assert auto(lab, monkeypatch, "confirm", "--seeds", "2", "--gpus", "0,1") == 0
    assert auto(lab, monkeypatch, "promote", "--seeds", "2", "--gpus", "0,1", "--out", str(lab / "promo")) == 0
    out = capsys.readouterr().out

    rows = ledger(sdir)
    test = {c: [float(r["val_bpb"]) for r in rows if r["status"] == "test" and r["commit"] == c] for c in (start, lr)}
    abl = [r for r in rows if r["status"] == "ablate"]
    assert len(abl) == 4 and {r["parent"] for r in abl} == {lr} and {r["seed"] for r in abl} == {"10000", "10001"}
    assert all(r["run"].endswith("-ablate") and r["result_sha"] for r in abl)
    without_noop = [float(r["val_bpb"]) for r in abl if f"without {noop}" in r["description"]]
    without_lr = [float(r["val_bpb"]) for r in abl if f"without {lr}" in r["description"]]
    assert sorted(without_noop) == sorted(test[lr]) and sorted(without_lr) == sorted(test[start])

    md = (lab / "promo" / "promote.md").read_text()
    assert md in out
    assert re.search(rf"\| a comment \| {noop} \| \+0.0000 \| [0-9.]+ \| 0% \+- [0-9]+% \| no \| no \| - \|", md), md
    assert re.search(rf"\| restore the tuned learning rates \| {lr} \| \+0.[1-9][0-9]+ \| [0-9.]+ \| 100% \+- [0-9]+% \| "
                     r"yes \| no \| [0-9a-f]{12} \|", md), md
    # the branch: the restore alone on top of the start, with its measurement in the message
    assert git(lab, "rev-list", "--count", f"{start}..promote/s") == "1"
    assert git(lab, "diff", start, "promote/s") == git(lab, "diff", noop, lr)
    assert "100% +-" in git(lab, "log", "-1", "--format=%B", "promote/s")
    spec = sweep.load_spec(lab / "promo" / "promote-s.toml")
    assert spec.grid == {"depth": [2, 4]} and spec.seeds == [0, 1]
    assert "--tokens" not in spec.train_args and "--depth" not in spec.train_args
    assert spec.train_args[-4:] == ["--data", str(data_dir.resolve()), "--param-data-ratio", "12"]
    assert "restore the tuned learning rates" in spec.hypotheses[1] and "100%" in spec.hypotheses[1]
