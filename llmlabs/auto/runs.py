"""One measured run of an experiment: train the commit's code in one process, score it in another,
both started and timed by the harness.

    1. export the commit's llmlabs/ from git into code/<worker> (nothing untracked rides along)
    2. training: `python -I` (no PYTHONPATH, user site or current directory at start-up), the file
       guard installed before any lab code (guard.py: the original data directory and the session's
       files are out of reach), the session's training split only (data-train/), no network, and in
       bubblewrap where installed (sandbox.py). It reports "timed" and "step N" on a pipe; this
       process timestamps them with its own monotonic clock: the phases warm-up (start to the first
       timed step), training (to the last step) and tail (to the exit) are measured here, never read
       from the child.
    3. evaluation: the evaluator (evaluator.py) in a fresh export, isolated and guarded the same way,
       read-only, on the run's checkpoint; the harness keeps the data and does the accounting.
    4. result.json: written here, hashed into the ledger row (ledger.py).

Budget rule (check_budget): training may last budget x (1 + 5%) + 0.5 s + one median step (at most
10% of the budget) by this clock: a run stops after the step that crosses its budget, so one step past
it is honest on any device, and a model of a few huge steps gains nothing from it. The warm-up, the tail and the evaluation may each last at most 1.5 x the longest seen in the
session's baseline runs + 10 s, so work cannot hide in the untimed parts either.
"""
import fcntl
import json
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

from llmlabs.auto import evaluator, gitops, sandbox
from llmlabs.auto.ledger import file_sha256
from llmlabs.common import atomic_write_json, llmlabs_home

BUDGET_SLACK = (0.05, 0.5, 0.1)  # fraction of the budget, seconds; plus one median step, at most this fraction
OVERHEAD_SLACK = (1.5, 10.0)     # x the baselines' longest warm-up / tail / evaluation, + seconds
PHASES = ("warm_s", "train_s", "tail_s", "eval_s")
TAIL_LINES = 40
# Training runs get no credentials: the agent's key (and any other) cannot end up in a run's log.
SECRET_SUFFIXES = ("_KEY", "_TOKEN", "_SECRET", "_PASSWORD")
# Set by `loop` on Ctrl-C: worker threads do not receive KeyboardInterrupt, so their waits poll this.
STOP = threading.Event()
EVENTS_FD_VAR = "LLMLABS_EVENTS_FD"  # = llmlabs.train.EVENTS_FD_VAR (not imported: it would pull in torch)

# The first code a run's interpreter executes (python -I -c BOOT CODE_DIR ...): the exported code
# first on sys.path, death with the harness, the file guard, and only then the lab.
TRAIN_BOOT = ("import sys,json; sys.path.insert(0, sys.argv.pop(1)); from llmlabs.auto import guard; "
              "guard.die_with_parent(); a = sys.argv; guard.guard_files(json.loads(a.pop(1)), json.loads(a.pop(1)), "
              "report_fd=int(a.pop(1))); from llmlabs.cli import main; sys.exit(main(a[1:]))")
EVAL_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); from llmlabs.auto.evaluator import child_main; "
             "child_main(sys.argv[2:])")


@dataclass
class Run:
    name: str
    seed: int
    run_dir: Path
    log: Path
    worker: str = ""
    started: float = 0.0
    wall_s: float = 0.0
    phases: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)   # the training process's own summary.json (informational)
    result: dict = field(default_factory=dict)    # the harness's result.json
    status: str | None = None  # crash / invalid when the run itself failed a check, else None
    reason: str = ""
    result_path: Path | None = None
    result_sha: str = ""

    def bpb(self):
        return self.result.get("bpb")


def new_run(session, commit: str, seed: int, kind="") -> Run:
    (session.dir / "logs").mkdir(parents=True, exist_ok=True)
    name, i = f"{commit[:8]}-s{seed}{kind}", 1
    # the same commit and seed measured again (--seed): a new name, never an overwritten log
    while (session.dir / "runs" / name).exists() or (session.dir / "logs" / f"{name}.log").exists():
        i += 1
        name = f"{commit[:8]}-s{seed}{kind}-{i}"
    run = Run(name, seed, session.dir / "runs" / name, session.dir / "logs" / f"{name}.log")
    run.run_dir.mkdir(parents=True)  # claims the name before another thread can
    return run


@contextmanager
def device_lock(worker):
    """Never two experiments on one GPU: an flock per device under $LLMLABS_HOME/locks, shared by
    every session and process on the machine (released by the kernel if the holder dies). A SLURM
    worker's runs get their GPUs from SLURM."""
    if worker.executor is not None:
        yield
        return
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


def compile_cache(session, run) -> Path:
    """The session's compile cache, shared by its runs (a graph or kernel compiled once is reused),
    or with --no-compile-cache one of the run's own, started empty and removed after the run."""
    return session.cache if session.compile_cache else run.run_dir / "compile-cache"


def child_env(session, code, worker, cache=None) -> dict:
    """The environment of a run's processes: no secrets, the exported code for torch.compile's
    worker processes, and `cache` (a directory) for the compile caches, or none (the evaluator)."""
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith(SECRET_SUFFIXES)}
    # the run's own interpreter ignores PYTHONPATH (-I); torch.compile's worker processes read it
    env["PYTHONPATH"] = str(code)
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        env.pop(var, None)
    if cache is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(cache) / "inductor")
        env["TRITON_CACHE_DIR"] = str(Path(cache) / "triton")
    if worker.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(worker.gpu)
    return env


def train_job(session_dir, worker_name, commit, run: Run, split, allow) -> Run:
    """What a SLURM worker's job runs: the run, on the node's GPU (SLURM sets CUDA_VISIBLE_DEVICES)."""
    from llmlabs.auto.session import Session

    session = Session(session_dir)
    return train(session, session.worker(worker_name), commit, run, split, allow)


def _sandboxed(session, argv, rw, ro):
    """argv inside bubblewrap where it works (hiding the data directory and the session's files,
    no network), else unchanged: the file guard still stands."""
    if not sandbox.available():
        return argv
    ro = [*ro, *{Path(p) for p in (sys.prefix, sys.base_prefix) if Path(p).exists()}]
    return sandbox.wrap(argv, rw=rw, ro=ro, hide=[session.data, session.dir], net=False,
                        gpu=session.eval["device"] == "cuda")


def train(session, worker, commit, run: Run, split="val", allow=None) -> Run:
    """Train `commit` for run `run` and score it on `split`; fills run.phases, run.result and, on
    failure, run.status / run.reason, then writes run_dir/result.json. `allow`: the baselines'
    allowances for the untimed phases (None for the baseline runs themselves). A SLURM worker's run
    is this same function in a job (train_job): the session directory must be on a filesystem the
    nodes share, as it is on a cluster's home or project space."""
    if worker.executor is not None:
        job = worker.executor.submit(train_job, str(session.dir), worker.name, commit, run, split, allow)
        print(f"[{worker.name}] {run.name}: SLURM job {job.job_id}", flush=True)
        try:
            return job.result()
        except BaseException:
            job.cancel(check=False)  # Ctrl-C, or the job failed: never leave it holding a GPU
            raise
    code = gitops.export(session.repo, commit, session.code_dir / worker.name)
    cache = compile_cache(session, run)
    for d in ("inductor", "triton"):
        (cache / d).mkdir(parents=True, exist_ok=True)
    env = child_env(session, code, worker, cache)
    r, w = os.pipe()
    forbidden, allowed = [session.data, str(session.dir)], [str(code), str(session.train_data), str(run.run_dir),
                                                            str(cache)]
    cmd = [sys.executable, "-I", "-B", "-u", "-c", TRAIN_BOOT, str(code), json.dumps(forbidden), json.dumps(allowed), str(w),
           "train", "--data", str(session.train_data), "--time-budget", str(session.time_budget),
           "--seed", str(run.seed), "--run-dir", str(run.run_dir), "--eval-split", "none", *session.train_args]
    argv = _sandboxed(session, cmd, rw=[run.run_dir, cache], ro=[code, session.train_data])
    env[EVENTS_FD_VAR] = str(w)
    events = []
    run.started, run.worker = time.time(), worker.name
    start = time.monotonic()
    with open(run.log, "w") as log:
        log.write(f"$ {' '.join(cmd)}\n# code {code} (commit {commit})\n")
        log.flush()
        proc = subprocess.Popen(argv, cwd=run.run_dir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, pass_fds=(w,), start_new_session=True)
    os.close(w)
    reader = threading.Thread(target=_read_events, args=(r, events), daemon=True)
    reader.start()
    timed_out = _wait(proc, start, session.timeout, f"[{worker.name}] {run.name}", session.time_budget)
    end = time.monotonic()
    reader.join(5)
    if not session.compile_cache:
        shutil.rmtree(cache, ignore_errors=True)
    run.wall_s = time.time() - run.started
    run.phases = _phases(events, start, end)
    text = run.log.read_text(errors="replace")
    violation = next((e[1][len("violation "):] for e in events if e[1].startswith("violation ")), None)
    if violation:
        run.status, run.reason = "invalid", violation
    elif timed_out:
        run.status, run.reason = "crash", f"timeout: killed after {end - start:.0f} s (limit {session.timeout:.0f} s)"
    elif proc.returncode != 0:
        run.status, run.reason = "crash", crash_reason(text, proc.returncode)
    else:
        run.reason = check_budget(run.phases, session.time_budget, allow)
        run.status = "invalid" if run.reason else None
    summary = run.run_dir / "summary.json"
    run.summary = json.loads(summary.read_text()) if run.status is None and summary.exists() else {}
    if run.status is None:
        evaluate(session, worker, commit, run, split, allow)
    run.wall_s = time.time() - run.started  # training and evaluation
    write_result(run, commit, split)
    return run


def evaluate(session, worker, commit, run: Run, split, allow):
    code = gitops.export(session.repo, commit, session.code_dir / f"{worker.name}-eval")  # untouched by training
    e = session.eval
    cmd = [sys.executable, "-I", "-B", "-u", "-c", EVAL_BOOT, str(code), str(run.run_dir), e["device"],
           json.dumps([session.data, str(session.dir)]), json.dumps([str(code)]), "1" if sandbox.available() else "0"]
    argv = _sandboxed(session, cmd, rw=[], ro=[code, run.run_dir])
    res = evaluator.evaluate_run(argv, child_env(session, code, worker), data=session.data_dir(), split=split,
                                 rows=e["rows"], seq_len=e["seq_len"], max_tokens=e["tokens"],
                                 timeout=session.timeout, log_path=run.log)
    run.phases["eval_s"] = round(res.pop("eval_s"), 2)
    run.result = res
    if not res["ok"]:
        run.status, run.reason = ("crash" if res.get("crashed") else "invalid"), res["reason"]
    elif allow and run.phases["eval_s"] > allow["eval_s"]:
        run.status = "invalid"
        run.reason = (f"evaluation took {run.phases['eval_s']:.1f} s, more than the {allow['eval_s']:.1f} s the "
                      "baselines allow: extra work at evaluation is compute outside the budget")


def _read_events(fd, events):
    with os.fdopen(fd, "r", errors="replace") as f:
        for line in f:
            events.append((time.monotonic(), line.strip()))


def _wait(proc, start, timeout, desc, budget) -> bool:
    """Wait for the training process with a progress bar; kill its group at the timeout (True) or
    on Ctrl-C / STOP (re-raised)."""
    bar = tqdm(total=round(budget), desc=desc, unit="s", leave=False, disable=None)
    try:
        while proc.poll() is None:
            if STOP.is_set():
                raise KeyboardInterrupt
            elapsed = time.monotonic() - start
            if elapsed > timeout:
                kill_group(proc)
                return True
            bar.n = min(round(elapsed), bar.total)
            bar.refresh()
            time.sleep(0.2)
    except BaseException:  # Ctrl-C or an error in this process: never leave a run behind
        kill_group(proc)
        raise
    finally:
        bar.close()
    return False


def _phases(events, start, end) -> dict:
    timed = next((t for t, e in events if e == "timed"), None)
    steps = [t for t, e in events if e.startswith("step ")]
    if timed is None or not steps:
        return {"warm_s": round(end - start, 2), "train_s": 0.0, "tail_s": 0.0, "steps": len(steps), "step_s": 0.0}
    after = [t for t in steps if t >= timed]
    last = after[-1] if after else timed
    gaps = [b - a for a, b in zip([timed, *after], after)]
    return {"warm_s": round(timed - start, 2), "train_s": round(last - timed, 2), "tail_s": round(end - last, 2),
            "steps": len(steps), "step_s": round(statistics.median(gaps), 4) if gaps else 0.0}


def check_budget(phases, budget, allow) -> str:
    """'' when the phases measured by the harness fit the budget rule (module docstring); else why."""
    if phases["steps"] == 0:
        return "the training process reported no step to the harness (it must run llmlabs.train's loop)"
    limit = budget * (1 + BUDGET_SLACK[0]) + BUDGET_SLACK[1] + min(phases["step_s"], BUDGET_SLACK[2] * budget)
    if phases["train_s"] > limit:
        return (f"over budget: trained {phases['train_s']:.1f} s by the harness's clock (budget {budget:g} s, "
                f"allowed {limit:.1f} s with one step's slack)")
    for phase, what in (("warm_s", "warm-up (start-up, compilation, untimed steps)"), ("tail_s", "time after the last step")):
        if allow and phases[phase] > allow[phase]:
            return (f"{what} took {phases[phase]:.1f} s, more than the {allow[phase]:.1f} s the baselines allow: "
                    "training work outside the timed steps would escape the budget")
    return ""


def allowances(baseline_results: list[dict]) -> dict | None:
    """The longest warm-up, tail and evaluation of the baseline runs, x 1.5 + 10 s; None without any."""
    phases = [r["phases"] for r in baseline_results if r.get("phases", {}).get("eval_s")]
    if not phases:
        return None
    return {k: round(max(p[k] for p in phases) * OVERHEAD_SLACK[0] + OVERHEAD_SLACK[1], 1)
            for k in ("warm_s", "tail_s", "eval_s")}


def write_result(run: Run, commit, split):
    """The harness's record of the run (its sha256 goes into the ledger row)."""
    s = run.summary
    run.result_path = run.run_dir / "result.json"
    atomic_write_json(run.result_path, {
        "commit": commit, "seed": run.seed, "split": split, "status": run.status, "reason": run.reason,
        "bpb": run.result.get("bpb"), "unigram_bpb": run.result.get("unigram_bpb"),
        "eval_tokens": run.result.get("tokens"), "causal": run.result.get("causal"), "phases": run.phases,
        "wall_s": round(run.wall_s, 1), "reported_by_training": {k: s.get(k) for k in (
            "training_seconds", "total_tokens_M", "num_steps", "mfu_percent", "peak_vram_mb", "tok_per_sec", "device")},
    })
    run.result_sha = file_sha256(run.result_path)


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


def crash_reason(text: str, returncode) -> str:
    """One line: the harness's `error: ...` if there is one, else the exception at the end of a
    traceback, else the exit code."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error: "):
            return ln
    if any(ln.startswith("Traceback") for ln in lines):
        return lines[-1]
    return f"exit code {returncode}"


def tail(path, n=TAIL_LINES) -> str:
    path = Path(path)
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""
