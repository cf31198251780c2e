"""`llmlabs auto loop`: the harness owns the loop, for agents that stop after every turn.

Per worker (one per GPU, each in its own worktree), forever or --iterations times:
    reset the worktree to the frontier -> call the agent with the prompt (program.md, the ledger so
    far, the last crash's log tail, the research files) -> if it changed anything, run the
    experiment (commit, train, decide, reset) exactly as `llmlabs auto run` does.
Workers share the ledger (file lock) and the frontier: a keep by one is where every other worker
starts its next iteration. The state lives in git and the ledger only, so after a crash of the
harness itself, running `loop` again simply continues.

Each iteration leaves its agent's transcript as agent/<worker>-<NNNN>.* (the agent picks the
suffixes), numbered per worker across every `loop` call of the session: a call goes on after the
highest number there, so nothing is overwritten. findings.md is rewritten after every experiment.

The loop stops starting iterations after --iterations per worker, after --hours of wall time, or
after --plateau experiments in a row (over all workers) without a keep; an iteration under way, the
agent's turn and its experiment, always finishes.
"""
import itertools
import threading
import time
from statistics import fmean
from pathlib import Path

from llmlabs.auto import gitops, runner, stats
from llmlabs.auto.agents import PROMPT_SPLIT
from llmlabs.auto.findings import priors, write_findings
from llmlabs.auto.runs import tail
from llmlabs.auto.session import Session, Worker
from llmlabs.auto.surface import RESEARCH_SURFACE
from llmlabs.common import LabError

PROGRAM = Path(__file__).with_name("program.md")
LEDGER_ROWS = 60                # the newest rows shown to the agent
LEDGER_COLUMNS = ("commit", "val_bpb", "status", "delta", "sigma", "description", "reason")
MAX_AGENT_FAILURES = 3          # in a row: a broken agent command stops the loop instead of spinning
clock = time.monotonic          # the wall clock of --hours (a test replaces it)


def build_prompt(session: Session, worker: Worker, rows: list[dict], iteration: int) -> str:
    wt = worker.path
    best = runner.frontier(rows)
    sigma, dof = runner.noise(rows)
    score = runner.scores(rows, best)
    start = runner.scores(rows, gitops.short(session.repo, session.base))
    parts = [
        f"# Iteration {iteration} of `llmlabs auto loop` (worker {worker.name})",
        "You are called once per experiment. Your working directory is a git worktree of the lab at the best "
        f"commit so far ({best}). Make ONE focused change to the research files, then stop and answer with a "
        "single line describing it (it becomes the commit message and the ledger's description). Do not train, "
        "commit or edit anything outside the research surface: the harness commits your change, trains it for "
        f"{session.time_budget:g} s, keeps or discards it, and resets the worktree.",
        f"Frontier: {best} val_bpb {fmean(score):.6f}" + (f" (start {fmean(start):.6f})" if start else "")
        + f"; noise sigma {sigma:.6f} bpb between seeds ({dof} degrees of freedom); a change is kept when "
        f"t = delta / sigma_d < -{stats.threshold(dof, session.alpha):.2f} (a one-sided t-test at false-keep rate "
        f"{session.alpha:g}; sigma_d = the sigma column, delta / sigma the t of each row).",
    ]
    prior = priors(session)
    if prior:
        parts.append(prior)
    parts += [
        "## Ledger so far (newest last)",
        "\n".join(["\t".join(LEDGER_COLUMNS)] + ["\t".join(r[c] for c in LEDGER_COLUMNS)
                                                for r in rows[-LEDGER_ROWS:]]),
    ]
    mine = [r for r in rows if r["worker"] == worker.name]
    if mine and mine[-1]["status"] == "crash" and mine[-1]["run"]:
        parts += [f"## Your last run crashed ({mine[-1]['reason']}); its log ends with",
                  "```\n" + tail(session.dir / "logs" / f"{mine[-1]['run']}.log") + "\n```"]
    parts.append("## Research files")
    for rel in RESEARCH_SURFACE:
        if (wt / rel).exists():
            parts.append(f"### {rel}\n```python\n{(wt / rel).read_text()}\n```")
    return PROGRAM.read_text() + PROMPT_SPLIT + "\n\n".join(parts) + "\n"


class Stop:
    """Whether to start another iteration, shared by the worker threads: --hours of wall time since
    the loop began, --plateau experiments in a row without a keep (crash, invalid and discard alike,
    in the order they finish on any worker)."""

    def __init__(self, hours: float | None, plateau: int | None):
        if (hours is not None and hours <= 0) or (plateau is not None and plateau < 1):
            raise LabError(f"--hours {hours} / --plateau {plateau}: give a positive number of hours / experiments")
        self.hours, self.plateau = hours, plateau
        self.start, self.streak, self.reason = clock(), 0, None
        self._lock = threading.Lock()

    def reached(self) -> bool:
        with self._lock:
            hours = (clock() - self.start) / 3600
            if self.reason is None and self.hours is not None and hours >= self.hours:
                self.reason = f"--hours {self.hours:g}: {hours:.2f} h of wall time have passed"
            return self.reason is not None

    def record(self, status: str):
        with self._lock:
            self.streak = 0 if status == "keep" else self.streak + 1
            if self.reason is None and self.plateau and self.streak >= self.plateau:
                self.reason = f"--plateau {self.plateau}: {self.streak} experiments in a row without a keep"


def next_number(agent_dir: Path, worker: str) -> int:
    """1 + the highest transcript number of `worker` in agent_dir (agent/<worker>-<NNNN>.*)."""
    numbers = [0]
    for p in agent_dir.glob(f"{worker}-*"):
        n = p.name.split(".")[0][len(worker) + 1:]
        if n.isdigit():
            numbers.append(int(n))
    return max(numbers) + 1


def loop(session: Session, workers: list[Worker], agent, iterations: int, baseline_repeats: int,
         hours: float | None = None, plateau: int | None = None):
    stop = Stop(hours, plateau)
    missing = session.baselines - runner.baseline_count(session.ledger.read())
    if missing > 0:
        repeats = max(missing, baseline_repeats or 0, 2)
        print(f"the session needs {session.baselines} baseline runs before its first decision: measuring the "
              f"starting commit with {repeats} seeds first")
        runner.baseline(session, workers, repeats)
    best = runner.frontier(session.ledger.read())
    for w in workers:
        gitops.add_worktree(session.repo, w.path, w.branch, gitops.resolve(session.repo, best))
    (session.dir / "agent").mkdir(exist_ok=True)
    runner.in_threads(lambda w: _work(session, w, agent, iterations, stop), workers)
    write_findings(session)
    print(f"loop stopped: {stop.reason or f'--iterations {iterations} done on every worker'}", flush=True)


def _work(session: Session, worker: Worker, agent, iterations: int, stop: Stop):
    failures = 0
    for _ in itertools.count() if not iterations else range(iterations):
        if stop.reached():
            return
        i = next_number(session.dir / "agent", worker.name)
        rows = session.ledger.read()
        best = runner.frontier(rows)
        gitops.reset_to(worker.path, gitops.resolve(worker.path, best))
        transcript = session.dir / "agent" / f"{worker.name}-{i:04d}"  # the agent adds a suffix
        env = {"LLMLABS_AUTO_SESSION": str(session.dir), "LLMLABS_AUTO_WORKER": worker.name,
               "LLMLABS_AUTO_ITERATION": str(i)}
        try:
            description = agent.step(build_prompt(session, worker, rows, i), worker.path, transcript, env)
        except LabError as e:
            failures += 1
            print(f"[{worker.name}] iteration {i}: agent failed ({e})", flush=True)
            if failures >= MAX_AGENT_FAILURES:
                raise LabError(f"the agent failed {failures} times in a row on worker {worker.name}; last: {e}") from None
            continue
        failures = 0
        # a change is an edit, or a commit the agent made itself (some CLIs commit on their own)
        if not gitops.is_dirty(worker.path) and gitops.short(worker.path, "HEAD") == best:
            print(f"[{worker.name}] iteration {i}: the agent changed nothing ({description})", flush=True)
            continue
        out = runner.experiment(session, worker, description)
        bpb = "-" if out["val_bpb"] is None else f"{out['val_bpb']:.6f}"
        delta = "" if out["delta"] is None else f" delta {out['delta']:+.6f} (sigma_d {out['sigma']:.6f})"
        print(f"[{worker.name}] {out['status']:<8} {out['commit']} val_bpb {bpb}{delta}  {description}"
              + (f"  ({out['reason']})" if out["reason"] else ""), flush=True)
        stop.record(out["status"])
        write_findings(session)
