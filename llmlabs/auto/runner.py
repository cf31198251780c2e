"""One experiment: commit the change, train it under the fixed budget in a subprocess, check it, decide.

Order of checks, cheapest first: the harness fingerprint (no training at all if it differs), then
the run itself (exit code, summary block, the wall clock measured here, training seconds against the
budget), then the keep rule, and for a run that would be kept, the causality check. Only a run that
passes all of them can move the frontier; every run leaves one ledger row.

The keep rule (noise-aware). sigma is the spread of val_bpb between seeds of unchanged code, from
`llmlabs auto baseline` (pooled within-commit standard deviation). A commit measured n times is
compared with the frontier commit measured m times; the difference of the two means has standard
deviation sigma_d = sigma * sqrt(1/n + 1/m), and the change is kept when
    mean(new) - mean(best) < -k * sigma_d
(a one-sided z-test; k = 2 keeps a no-op change ~2% of the time). A result within one sigma_d of
the threshold is measured again with another seed (up to `repeat_near` times) before the decision.
The ledger's sigma column holds sigma_d, so delta / sigma reads directly as the z-score.
"""
import fcntl
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from llmlabs.auto import gitops
from llmlabs.auto.ledger import COLUMNS, clean
from llmlabs.auto.session import Session, Worker
from llmlabs.common import LabError, atomic_write_json, llmlabs_home

# A run may end up to one step past its budget; beyond 5% + 1 s it used more compute than the
# others (e.g. a sleep or heavy work hidden in the forward), so its bpb is not comparable.
BUDGET_SLACK = (0.05, 1.0)
TAIL_LINES = 40
# Training runs get no credentials: the agent's key (and any other) cannot end up in a run's log.
SECRET_SUFFIXES = ("_KEY", "_TOKEN", "_SECRET", "_PASSWORD")
# Set by `loop` on Ctrl-C: worker threads do not receive KeyboardInterrupt, so their waits poll this.
STOP = threading.Event()


@dataclass
class Run:
    name: str
    seed: int
    run_dir: Path
    log: Path
    worker: str = ""
    started: float = 0.0
    wall_s: float = 0.0
    summary: dict = field(default_factory=dict)
    status: str | None = None  # crash / invalid when the run itself failed a check, else None
    reason: str = ""

    def bpb(self, split="val"):
        return self.summary.get(f"{split}_bpb")


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


def noise_sigma(rows) -> tuple[float | None, int]:
    """Pooled within-commit std of val_bpb over baseline rows, and its degrees of freedom."""
    groups = {}
    for r in rows:
        if r["status"] == "baseline":
            groups.setdefault(r["commit"], []).append(float(r["val_bpb"]))
    dof = sum(len(g) - 1 for g in groups.values())
    if dof < 1:
        return None, 0
    ss = sum((x - sum(g) / len(g)) ** 2 for g in groups.values() for x in g)
    return math.sqrt(ss / dof), dof


def decide(new: list[float], ref: list[float], sigma: float, k: float) -> tuple[str, float, float, bool]:
    """(keep | discard, delta, sigma_d, near_threshold) for the means of `new` against `ref`."""
    delta = sum(new) / len(new) - sum(ref) / len(ref)
    sigma_d = sigma * math.sqrt(1 / len(new) + 1 / len(ref))
    verdict = "keep" if delta < -k * sigma_d else "discard"
    return verdict, delta, sigma_d, abs(delta + k * sigma_d) < sigma_d


def next_seed(rows) -> int:
    return max((int(r["seed"]) for r in rows if r["seed"]), default=-1) + 1


# ---------------------------------------------------------------------------------------------
# one training run

@contextmanager
def device_lock(worker: Worker):
    """Never two experiments on one GPU: an flock per device under $LLMLABS_HOME/locks, shared by
    every session and process on the machine (released by the kernel if the holder dies)."""
    dev = worker.gpu if worker.gpu is not None else (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
    path = llmlabs_home() / "locks" / f"gpu{dev}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[{worker.name}] waiting for GPU {dev}: another experiment holds {path}", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def child_env(wt, worker: Worker) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith(SECRET_SUFFIXES)}
    env["PYTHONPATH"] = os.pathsep.join([str(wt)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    if worker.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(worker.gpu)
    return env


def new_run(session: Session, commit: str, seed: int, kind="") -> Run:
    (session.dir / "logs").mkdir(parents=True, exist_ok=True)
    name, i = f"{commit[:8]}-s{seed}{kind}", 1
    # the same commit and seed measured again (--seed): a new name, never an overwritten log
    while (session.dir / "runs" / name).exists() or (session.dir / "logs" / f"{name}.log").exists():
        i += 1
        name = f"{commit[:8]}-s{seed}{kind}-{i}"
    return Run(name, seed, session.dir / "runs" / name, session.dir / "logs" / f"{name}.log")


def train(session: Session, worker: Worker, wt, run: Run, split="val") -> Run:
    """`llmlabs train` of the code in worktree `wt` under the session's budget and hard timeout;
    fills run.summary, run.wall_s and, on failure, run.status / run.reason."""
    cmd = [sys.executable, "-m", "llmlabs", "train", "--data", session.data, "--time-budget", str(session.time_budget),
           "--seed", str(run.seed), "--run-dir", str(run.run_dir), "--eval-split", split, *session.train_args]
    run.started, run.worker = time.time(), worker.name
    timed_out = False
    with open(run.log, "w") as log:
        log.write(f"$ {' '.join(cmd)}\n# cwd {wt}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=wt, env=child_env(wt, worker), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # own process group: a timeout kills it whole
        bar = tqdm(total=round(session.time_budget), desc=f"[{worker.name}] {run.name}", unit="s", leave=False,
                   disable=None)
        try:
            while proc.poll() is None:
                if STOP.is_set():
                    raise KeyboardInterrupt
                elapsed = time.time() - run.started
                if elapsed > session.timeout:
                    timed_out = True
                    kill_group(proc)
                    break
                bar.n = min(round(elapsed), bar.total)
                bar.refresh()
                time.sleep(0.2)
        except BaseException:  # Ctrl-C or an error in this process: never leave a run behind
            kill_group(proc)
            raise
        finally:
            bar.close()
    run.wall_s = time.time() - run.started
    text = run.log.read_text(errors="replace")
    run.summary = parse_summary(text)
    budget = session.time_budget
    if timed_out:
        run.status, run.reason = "crash", f"timeout: killed after {run.wall_s:.0f} s (limit {session.timeout:.0f} s)"
    elif proc.returncode != 0 or run.bpb(split) is None:
        run.status, run.reason = "crash", crash_reason(text, proc.returncode)
    elif not math.isfinite(run.bpb(split)):
        run.status, run.reason = "crash", f"{split}_bpb is {run.bpb(split)}"
    elif run.summary.get("training_seconds", 0) > budget * (1 + BUDGET_SLACK[0]) + BUDGET_SLACK[1]:
        run.status = "invalid"
        run.reason = f"over budget: trained {run.summary['training_seconds']} s, budget {budget:g} s"
    return run


def kill_group(proc):
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def parse_summary(text: str) -> dict:
    """The `key: value` block after the last `---` line of `llmlabs train`'s output."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "---"]
    out = {}
    for line in lines[starts[-1] + 1:] if starts else []:
        key, sep, value = line.partition(":")
        if sep and key.strip() and " " not in key.strip():
            try:
                out[key.strip()] = float(value)
            except ValueError:
                out[key.strip()] = value.strip()
    return out


def crash_reason(text: str, returncode) -> str:
    """One line: the harness's `error: ...` if there is one, else the exception at the end of a
    traceback, else the exit code."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error: "):
            return ln
    if any(ln.startswith("Traceback") for ln in lines):
        return lines[-1]
    return f"exit code {returncode} without a summary block"


def tail(path, n=TAIL_LINES) -> str:
    path = Path(path)
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def check_causal(session: Session, worker: Worker, wt, run: Run) -> str | None:
    """None if the trained model is causal, else the reason (one line). Runs the harness's own
    checker (fingerprinted) in a subprocess on the run's checkpoint, on the run's device."""
    cmd = [sys.executable, "-m", "llmlabs.auto.causal", str(run.run_dir)]
    args = session.train_args
    for i, a in enumerate(args):  # the run's device, as `--device X` or `--device=X`
        if a == "--device" and i + 1 < len(args):
            cmd += ["--device", args[i + 1]]
        elif a.startswith("--device="):
            cmd += ["--device", a.split("=", 1)[1]]
    try:
        r = subprocess.run(cmd, cwd=wt, env=child_env(wt, worker), capture_output=True, text=True,
                           timeout=session.timeout)
    except subprocess.TimeoutExpired:
        return f"causality check ran past the timeout ({session.timeout:g} s)"
    with open(run.log, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n{r.stdout}{r.stderr}")
    if r.returncode:
        return f"causality check failed to run: {crash_reason(r.stdout + r.stderr, r.returncode)}"
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if res["causal"]:
        return None
    return (f"non-causal: changing token {res['changed']} moved the logits at position {res['position']} "
            f"by {res['max_leak']:.3g} (tolerance {res['tolerance']:g})")


def row(commit, run: Run | None, status, description, worker, parent="", delta=None, sigma=None, reason=""):
    s = run.summary if run else {}
    return {"commit": commit[:12], "val_bpb": s.get("val_bpb"), "memory_gb": _gb(s.get("peak_vram_mb")),
            "status": status, "description": description, "seed": run.seed if run else None,
            "tokens_M": s.get("total_tokens_M"), "mfu": s.get("mfu_percent"),
            "wall_s": round(run.wall_s, 1) if run else None, "delta": delta, "sigma": sigma,
            "worker": run.worker if run else worker.name,
            "parent": parent[:12], "started": round(run.started, 1) if run else round(time.time(), 1),
            "run": run.name if run else None, "reason": reason}


def _gb(mb):
    return None if mb is None else round(mb / 1024, 2)


def _drop_checkpoints(run: Run):
    """Checkpoints are large (weights + optimizer) and only kept commits need them (to sample from
    or evaluate later); summary, metrics, samples and log stay for every run."""
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
    best = frontier(rows)
    sigma, _ = noise_sigma(rows)
    if best is None or sigma is None:
        raise LabError("no noise baseline yet: run `llmlabs auto baseline --repeats 3` first (it measures the "
                       "unchanged code under several seeds)")
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
    wt = worker.path
    rows = session.ledger.read()
    reason = session.check_fingerprint(wt, commit)
    if reason:
        out = row(commit, None, "invalid", message, worker, frontier(rows), reason=reason)
        session.ledger.append([out])
        return out
    gitops.clean_ignored(wt)
    seed = next_seed(rows) if seed is None else seed
    runs, verdict = [], None
    while True:
        run = train(session, worker, wt, new_run(session, commit, seed + len(runs)))
        runs.append(run)
        if run.status:
            break
        rows = session.ledger.read()
        verdict, _, _, near = decide([r.bpb() for r in runs], scores(rows, frontier(rows)),
                                     noise_sigma(rows)[0], session.k)
        if not (near and len(runs) <= session.repeat_near):
            break
    # a run about to be kept must be causal; checked outside the ledger lock (it loads the model)
    leak = check_causal(session, worker, wt, runs[0]) if verdict == "keep" and not run.status else None
    with session.ledger.exclusive():  # decide against the frontier as it is now, then append
        rows = session.ledger.read()
        best = frontier(rows)
        delta = sigma_d = None
        status, reason = run.status, run.reason
        if status is None:
            status, delta, sigma_d, _ = decide([r.bpb() for r in runs], scores(rows, best), noise_sigma(rows)[0],
                                               session.k)
            if status == "keep" and verdict != "keep":  # another worker moved the frontier meanwhile
                leak = check_causal(session, worker, wt, runs[0])
            if status == "keep" and leak:
                status, reason = "invalid", leak
        new_rows = [row(commit, r, status, message, worker, best, delta, sigma_d, reason if r is run else "")
                    for r in runs]
        session.ledger.append(new_rows)
    if status != "keep":
        for r in runs:
            _drop_checkpoints(r)
    return new_rows[-1]


def baseline(session: Session, workers: list[Worker], repeats: int) -> list[dict]:
    """`llmlabs auto baseline`: the frontier commit (at first the starting one), unchanged, under
    `repeats` new seeds, spread over the workers; appends the rows and returns them."""
    if repeats < 2:
        raise LabError(f"--repeats {repeats}: a spread needs at least 2 runs (3 or more is better)")
    rows = session.ledger.read()
    commit = frontier(rows) or gitops.short(session.repo, session.base)
    seed = next_seed(rows)
    with checkout(session, commit) as wt:
        runs = measure(session, workers, wt, commit, [seed + i for i in range(repeats)])
        ok = [r for r in runs if not r.status]
        leak = check_causal(session, workers[0], wt, ok[0]) if ok else None
    for r in runs:
        _drop_checkpoints(r)
    new = [row(commit, r, r.status or ("invalid" if leak else "baseline"), "baseline: unchanged code, new seed",
               workers[0], commit, reason=r.reason or leak or "") for r in runs]
    sigma, _ = noise_sigma(rows + [{c: clean(n.get(c)) for c in COLUMNS} for n in new])
    for n in new:
        n["sigma"] = sigma
    session.ledger.append(new)
    if leak or len(ok) < 2:
        first = next((r for r in runs if r.status), None)
        raise LabError(f"the baseline of {commit} is not usable: {leak or first.reason} (log: {first.log if first else ''})")
    return new


def confirm(session: Session, workers: list[Worker], seeds: int) -> dict:
    """`llmlabs auto confirm`: the best kept commit and the starting commit on the held-out test
    split, which no decision has seen, `seeds` seeds each (the same seeds for both)."""
    rows = session.ledger.read()
    best, start = frontier(rows), gitops.short(session.repo, session.base)
    if best is None or not any(r["status"] == "keep" for r in rows):
        raise LabError("nothing kept yet: `llmlabs auto confirm` compares the best kept commit with the start")
    if seeds < 2:
        raise LabError(f"--seeds {seeds}: an uncertainty needs at least 2 seeds per commit")
    seed_list = [10_000 + i for i in range(seeds)]  # apart from the seeds experiments used
    result = {"split": "test", "seeds": seed_list, "commits": {}}
    for name, commit in (("start", start), ("best", best)):
        with checkout(session, commit) as wt:
            runs = measure(session, workers, wt, commit, seed_list, split="test", kind="-test")
        for r in runs:
            _drop_checkpoints(r)
        failed = [r for r in runs if r.status]
        if failed:
            raise LabError(f"confirm run {failed[0].name} of {commit} failed: {failed[0].reason} (log {failed[0].log})")
        vals = [r.bpb("test") for r in runs]
        result["commits"][name] = {"commit": commit, "test_bpb": vals, "mean": statistics.fmean(vals),
                                   "std": statistics.stdev(vals)}
    a, b = result["commits"]["start"], result["commits"]["best"]
    # Welch: the two groups' variances need not be equal
    se = math.sqrt(a["std"] ** 2 / len(a["test_bpb"]) + b["std"] ** 2 / len(b["test_bpb"]))
    diff = b["mean"] - a["mean"]
    result.update(diff=diff, se=se, z=diff / se if se > 0 else None,
                  description=[r["description"] for r in rows if r["commit"] == best][-1])
    atomic_write_json(session.dir / "confirm.json", result)
    return result


@contextmanager
def checkout(session: Session, commit: str):
    """A detached worktree of `commit` for measuring it unchanged (baseline, confirm), shared by
    the workers and removed afterwards."""
    path = session.dir / f"at-{commit[:12]}"
    if not path.exists():
        gitops.add_detached(session.repo, path, commit)
    reason = session.check_fingerprint(path, commit)
    if reason:
        raise LabError(f"commit {commit} does not match the session's fingerprint ({reason}): it cannot be measured")
    gitops.clean_ignored(path)
    try:
        yield path
    finally:
        gitops.remove_worktree(session.repo, path)


def measure(session, workers, wt, commit, seeds, split="val", kind="") -> list[Run]:
    """Train `commit` (checked out at `wt`) once per seed, the seeds shared out over the workers,
    one run per device at a time. Runs come back in seed order."""
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
                    run.run_dir.mkdir(parents=True)  # claims the name before another thread can
                runs[s] = train(session, worker, wt, run, split)

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
