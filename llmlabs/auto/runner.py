"""One experiment: check the commit, train and score it in processes of their own, decide, record.

Order of checks, cheapest first: the allowlist and the fingerprint (surface.py: nothing outside the
research surface changed, no added or deleted file; no training at all otherwise), then the run
(runs.py: the harness's own clock against the budget, the file guard, the separate evaluator with its
integrity, causality and re-score checks), then the keep rule (stats.py: a one-sided t-test at false-
keep rate alpha against the frontier, sigma from the harness's baseline runs, marginal keeps measured
again). Only a run that passes all of them can move the frontier. Every run leaves one ledger row,
appended by the harness only and chained with the session's key (ledger.py); every decision reads the
ledger verified, so an edited, inserted or deleted row stops the session with the row named.

The ledger's sigma column holds sigma_d and delta / sigma is the t statistic.
"""
import json
import math
import shutil
import statistics
import threading
import time

from llmlabs.auto import gitops, stats
from llmlabs.auto.ledger import COLUMNS, clean
from llmlabs.auto.runs import STOP, Run, allowances, device_lock, new_run, train
from llmlabs.auto.session import Session, Worker
from llmlabs.common import LabError, atomic_write_json

# Seeds of the held-out runs (confirm, promote's ablations), apart from those experiments use; every
# commit measured on the test split gets the same ones.
TEST_SEED0 = 10_000


class RunFailed(Exception):
    def __init__(self, run: Run):
        super().__init__(run.reason)
        self.run = run


# ---------------------------------------------------------------------------------------------
# statistics over ledger rows

def frontier(rows) -> str | None:
    """The commit to beat: the last kept one (each keep beat the one before it, under the ledger
    lock, so the last is the best), else the commit the baseline measured."""
    for status in ("keep", "baseline"):
        commits = [r["commit"] for r in rows if r["status"] == status]
        if commits:
            return commits[-1] if status == "keep" else commits[0]
    return None


def scores(rows, commit) -> list[float]:
    return [float(r["val_bpb"]) for r in rows if r["commit"] == commit and r["status"] in ("keep", "baseline")]


def noise(rows) -> tuple[float | None, int]:
    """sigma and its degrees of freedom from the baseline rows (harness-run, verified ledger)."""
    groups = {}
    for r in rows:
        if r["status"] == "baseline":
            groups.setdefault(r["commit"], []).append(float(r["val_bpb"]))
    return stats.noise_sigma(groups)


def baseline_count(rows) -> int:
    return sum(r["status"] == "baseline" for r in rows)


def allowed_overheads(session, rows) -> dict | None:
    """runs.allowances from the result files of the baseline rows (their hashes are verified)."""
    results = [json.loads((session.dir / "runs" / r["run"] / "result.json").read_text())
               for r in rows if r["status"] == "baseline" and r["run"]]
    return allowances(results)


def row(commit, run: Run | None, status, description, worker, parent="", d: stats.Decision | None = None, reason=""):
    r = run.result if run else {}
    info = run.summary if run else {}
    return {"commit": commit[:12], "val_bpb": r.get("bpb"), "memory_gb": _gb(info.get("peak_vram_mb")),
            "status": status, "description": description, "seed": run.seed if run else None,
            "tokens_M": info.get("total_tokens_M"), "mfu": info.get("mfu_percent"),
            "wall_s": round(run.wall_s, 1) if run else None, "delta": d.delta if d else None,
            "sigma": d.sigma_d if d else None, "worker": run.worker if run else worker.name,
            "parent": parent[:12], "started": round(run.started if run else time.time(), 1),
            "run": run.name if run else None, "reason": reason, "result_sha": run.result_sha if run else None}


def _gb(mb):
    return None if not mb else round(mb / 1024, 2)


def drop_checkpoints(run: Run):
    """Checkpoints are large (weights + optimizer) and only kept commits need them (to sample from
    or evaluate later); result, summary, metrics, samples and log stay for every run."""
    shutil.rmtree(run.run_dir / "checkpoints", ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# the commands' workhorses

def experiment(session: Session, worker: Worker, message: str, seed: int | None = None) -> dict:
    """`llmlabs auto run -m MESSAGE` in the worker's worktree. Returns the decision row.

    The change is committed on the worktree's HEAD and compared with the frontier as it is at
    decision time; with several workers the frontier may have moved since this worktree was last
    reset (`loop` resets every worker before each iteration), and the rule stays the same: a commit
    is kept only if it beats the current best."""
    wt = worker.path
    rows = session.ledger.read()
    if frontier(rows) is None or baseline_count(rows) < session.baselines:
        raise LabError(f"{baseline_count(rows)} of the {session.baselines} baseline runs the session needs before its "
                       f"first decision: run `llmlabs auto baseline` (it measures the unchanged code under new seeds)")
    parent = gitops.head(wt)
    if not gitops.commit_all(wt, message) and gitops.short(wt, parent) in {r["commit"] for r in rows}:
        raise LabError(f"nothing to run: {wt} has no change since commit {parent[:12]}, which is measured "
                       "already; edit a research file first")
    commit = gitops.short(wt, "HEAD")
    try:
        with device_lock(worker):
            out = _measure_and_decide(session, worker, commit, message, seed)
    except BaseException:
        # interrupted: hand the change back as an uncommitted edit, as it was before `run`
        if gitops.head(wt) != parent:
            gitops.git(wt, "reset", "-q", "--soft", parent)
        raise
    if out["status"] != "keep":
        gitops.reset_to(wt, gitops.resolve(wt, out["parent"]))
    return out


def _measure_and_decide(session, worker, commit, message, seed):
    rows = session.ledger.read()
    reason = session.check_commit(commit)
    if reason:
        out = row(commit, None, "invalid", message, worker, frontier(rows), reason=reason)
        session.ledger.append([out])
        return out
    allow = allowed_overheads(session, rows)
    sigma, dof = noise(rows)
    runs, seeds = [], iter([seed + i for i in range(1 + session.repeat_near)] if seed is not None else [])

    def measure():
        s = next(seeds, None)
        run = train(session, worker, commit, new_run(session, commit, s if s is not None else session.claim_seeds(1)[0]),
                    allow=allow)
        runs.append(run)
        if run.status:
            raise RunFailed(run)
        return run.bpb()

    try:
        stats.sequential_decide(measure, scores(rows, frontier(rows)), sigma, dof, session.alpha, session.repeat_near)
    except RunFailed:
        pass
    failed = runs[-1] if runs[-1].status else None
    with session.ledger.exclusive():  # decide against the frontier as it is now, then append
        rows = session.ledger.read()
        best = frontier(rows)
        d, status, reason = None, (failed.status if failed else None), (failed.reason if failed else "")
        if failed is None:
            d = stats.decide([r.bpb() for r in runs], scores(rows, best), *noise(rows), session.alpha)
            status = d.verdict
        new_rows = [row(commit, r, status, message, worker, best, d, reason if r is runs[-1] else "") for r in runs]
        session.ledger.append(new_rows)
    if status != "keep":
        for r in runs:
            drop_checkpoints(r)
    return new_rows[-1]


def baseline(session: Session, workers: list[Worker], repeats: int | None = None) -> list[dict]:
    """`llmlabs auto baseline`: the frontier commit (at first the starting one), unchanged, under
    `repeats` new seeds (default: what the session still needs), spread over the workers."""
    rows = session.ledger.read()
    repeats = repeats if repeats is not None else max(session.baselines - baseline_count(rows), 2)
    if repeats < 2:
        raise LabError(f"--repeats {repeats}: a spread needs at least 2 runs")
    commit = frontier(rows) or gitops.short(session.repo, session.base)
    reason = session.check_commit(commit)
    if reason:
        raise LabError(f"commit {commit} does not match the session ({reason}): it cannot be measured")
    runs = measure(session, workers, commit, session.claim_seeds(repeats))
    for r in runs:
        drop_checkpoints(r)
    new = [row(commit, r, r.status or "baseline", "baseline: unchanged code, new seed", workers[0], commit,
               reason=r.reason) for r in runs]
    sigma, _ = noise(rows + [{c: clean(n.get(c)) for c in COLUMNS} for n in new])
    for n in new:
        n["sigma"] = sigma
    session.ledger.append(new)
    bad = next((r for r in runs if r.status), None)
    if bad:
        raise LabError(f"the baseline of {commit} is not usable: run {bad.name}: {bad.reason} (log: {bad.log})")
    return new


def confirm(session: Session, workers: list[Worker], seeds: int) -> dict:
    """`llmlabs auto confirm`: the best kept commit and the starting commit on the held-out test
    split, which no decision has seen, `seeds` seeds each (the same seeds for both). Every run is a
    ledger row (status test), then the verdict: confirmed when the best is lower by a one-sided Welch
    t-test at the session's alpha, else failed."""
    import scipy.stats

    rows = session.ledger.read()
    best, start = frontier(rows), gitops.short(session.repo, session.base)
    if best is None or not any(r["status"] == "keep" for r in rows):
        raise LabError("nothing kept yet: `llmlabs auto confirm` compares the best kept commit with the start")
    if seeds < 2:
        raise LabError(f"--seeds {seeds}: an uncertainty needs at least 2 seeds per commit")
    seed_list = [TEST_SEED0 + i for i in range(seeds)]
    result = {"split": "test", "seeds": seed_list, "commits": {}}
    for name, commit in (("start", start), ("best", best)):
        runs = measure(session, workers, commit, seed_list, split="test", kind="-test",
                       allow=allowed_overheads(session, rows))
        for r in runs:
            drop_checkpoints(r)
        session.ledger.append([row(commit, r, "test" if not r.status else r.status, f"confirm: {name} on the test split",
                                   workers[0], commit, reason=r.reason) for r in runs])
        failed = [r for r in runs if r.status]
        if failed:
            raise LabError(f"confirm run {failed[0].name} of {commit} failed: {failed[0].reason} (log {failed[0].log})")
        vals = [r.bpb() for r in runs]
        result["commits"][name] = {"commit": commit, "test_bpb": vals, "mean": statistics.fmean(vals),
                                   "std": statistics.stdev(vals)}
    a, b = result["commits"]["start"], result["commits"]["best"]
    se = math.sqrt(a["std"] ** 2 / len(a["test_bpb"]) + b["std"] ** 2 / len(b["test_bpb"]))
    diff = b["mean"] - a["mean"]
    t, p = (scipy.stats.ttest_ind(b["test_bpb"], a["test_bpb"], equal_var=False, alternative="less")
            if se > 0 else (-math.inf if diff < 0 else math.inf, 0.0 if diff < 0 else 1.0))
    verdict = "confirmed" if p < session.alpha else "failed"
    result.update(diff=diff, se=se, t=float(t), p=float(p), alpha=session.alpha, verdict=verdict,
                  description=[r["description"] for r in rows if r["commit"] == best][-1])
    session.ledger.append([{"commit": best, "val_bpb": b["mean"], "status": verdict, "description": result["description"],
                            "delta": diff, "sigma": se, "parent": start, "worker": workers[0].name,
                            "started": round(time.time(), 1),
                            "reason": f"test split, {seeds} seeds each: Welch t = {float(t):.2f}, one-sided p = "
                                      f"{float(p):.3g} (alpha {session.alpha:g})"}])
    atomic_write_json(session.dir / "confirm.json", result)
    return result


def measure(session, workers, commit, seeds, split="val", kind="", allow=None) -> list[Run]:
    """Train and score `commit` once per seed, the seeds shared out over the workers, one run per
    device at a time. Runs come back in seed order. `allow`: the overhead allowances (None for
    baseline runs, which set them)."""
    jobs = list(seeds)
    lock = threading.Lock()
    runs = {}

    def work(worker):
        with device_lock(worker):
            while True:
                with lock:
                    if not jobs:
                        return
                    s = jobs.pop(0)
                    run = new_run(session, commit, s, kind)
                runs[s] = train(session, worker, commit, run, split, allow)

    in_threads(work, workers)
    return [runs[s] for s in seeds]


def in_threads(fn, workers):
    """Run fn(worker) in one thread per worker; Ctrl-C stops them all (STOP), the first error is
    raised here once every thread has ended."""
    errors = []

    def target(w):
        try:
            fn(w)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            errors.append(e)
            STOP.set()

    threads = [threading.Thread(target=target, args=(w,), name=w.name) for w in workers]
    STOP.clear()
    for t in threads:
        t.start()
    try:
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(0.2)
    except KeyboardInterrupt:
        STOP.set()
        for t in threads:
            t.join()
        raise
    finally:
        STOP.clear()
    if errors:
        raise errors[0]
