"""`llmlabs auto loop`: the harness owns the loop, for agents that stop after every turn.

Per worker (one per GPU, each in its own worktree), forever or --iterations times:
    reset the worktree to the frontier -> call the agent with the prompt (program.md, the ledger so
    far, the last crash's log tail, the research files) -> if it changed anything, run the
    experiment (commit, train, decide, reset) exactly as `llmlabs auto run` does.
Workers share the ledger (file lock) and the frontier: a keep by one is where every other worker
starts its next iteration. The state lives in git and the ledger only, so after a crash of the
harness itself, running `loop` again simply continues.
"""
import itertools
from statistics import fmean
from pathlib import Path

from llmlabs.auto import gitops, runner
from llmlabs.auto.agents import PROMPT_SPLIT
from llmlabs.auto.session import Session, Worker
from llmlabs.auto.surface import RESEARCH_SURFACE
from llmlabs.common import LabError

PROGRAM = Path(__file__).with_name("program.md")
LEDGER_ROWS = 60                # the newest rows shown to the agent
LEDGER_COLUMNS = ("commit", "val_bpb", "status", "delta", "sigma", "description", "reason")
MAX_AGENT_FAILURES = 3          # in a row: a broken agent command stops the loop instead of spinning


def build_prompt(session: Session, worker: Worker, rows: list[dict], iteration: int) -> str:
    wt = worker.path
    best = runner.frontier(rows)
    sigma, _ = runner.noise_sigma(rows)
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
        + f"; noise sigma {sigma:.6f} bpb between seeds; a change is kept when val_bpb drops by more than "
        f"{session.k:g} x sigma_d (sigma_d = the sigma column).",
        "## Ledger so far (newest last)",
        "\n".join(["\t".join(LEDGER_COLUMNS)] + ["\t".join(r[c] for c in LEDGER_COLUMNS)
                                                for r in rows[-LEDGER_ROWS:]]),
    ]
    mine = [r for r in rows if r["worker"] == worker.name]
    if mine and mine[-1]["status"] == "crash" and mine[-1]["run"]:
        parts += [f"## Your last run crashed ({mine[-1]['reason']}); its log ends with",
                  "```\n" + runner.tail(session.dir / "logs" / f"{mine[-1]['run']}.log") + "\n```"]
    parts.append("## Research files")
    for rel in RESEARCH_SURFACE:
        if (wt / rel).exists():
            parts.append(f"### {rel}\n```python\n{(wt / rel).read_text()}\n```")
    return PROGRAM.read_text() + PROMPT_SPLIT + "\n\n".join(parts) + "\n"


def loop(session: Session, workers: list[Worker], agent, iterations: int, baseline_repeats: int):
    if runner.noise_sigma(session.ledger.read())[0] is None:
        print(f"no noise baseline yet: measuring the starting commit with {baseline_repeats} seeds first")
        runner.baseline(session, workers, baseline_repeats)
    best = runner.frontier(session.ledger.read())
    for w in workers:
        gitops.add_worktree(session.repo, w.path, w.branch, gitops.resolve(session.repo, best))
    (session.dir / "agent").mkdir(exist_ok=True)
    runner.in_threads(lambda w: _work(session, w, agent, iterations), workers)


def _work(session: Session, worker: Worker, agent, iterations: int):
    failures = 0
    for i in itertools.count(1) if not iterations else range(1, iterations + 1):
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
