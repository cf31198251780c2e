"""`llmlabs auto promote`: a confirmed autoresearch chain becomes a branch for review and a draft sweep
(the Tier 1 -> Tier 2 step), carrying only the changes that measurably carry the gain.

Knob attribution is leave-one-out: for each kept change, the frontier with that one change reverted
(`git revert` in a scratch worktree) is trained and scored on the held-out test split with the seeds
`auto confirm` used, through the same harness, budget and evaluation (runner.measure). Then

    delta_i = mean(test_bpb without change i) - mean(test_bpb of the frontier)
    share_i = delta_i / (mean(test_bpb of the start) - mean(test_bpb of the frontier))

with sigma_d = sigma * sqrt(1/n + 1/m), sigma the seed noise of the session's baselines (stats.py),
and change i is load-bearing when the keep rule would keep the frontier over the frontier without it:
delta_i / sigma_d > t_{1-alpha, dof}. Shares need not add up to 1: changes interact. A change whose
revert does not apply cleanly to the frontier (a later change edits the same lines) is reported
entangled and not measured: its share is not guessed. The share's +- is sigma_d / gain; it leaves
out the gain's own uncertainty, which `confirm` has shown small against the gain.

Outputs: branch promote/TAG (the load-bearing changes cherry-picked onto the start commit, one
commit each, their messages carrying the measurement), promote.md (the table) and promote-TAG.toml
(a spec `llmlabs sweep` reads). Every ablation run is a ledger row with status `ablate`. The
ablated commits stay reachable under refs/promote/TAG/, so a promote that was interrupted (or run
again after its branch was deleted) re-uses the commits and every seed it has measured already.
"""
import json
import shutil
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from llmlabs.auto import gitops, runner, stats
from llmlabs.auto.session import Session, Worker
from llmlabs.common import LabError, atomic_write_bytes

# The draft sweep's budget: the lab's compute-optimal ratio, 12 tokens per scaling parameter (nanochat's
# measurement, llmlabs/scaling.py's TOKENS_PER_PARAM; Chinchilla's arXiv 2203.15556 is ~20), so each
# depth gets the budget its size calls for, not the session's seconds
TOKENS_PER_PARAM = 12
BUDGET_FLAGS = ("--depth", "--tokens", "--target-flops", "--param-data-ratio")  # the sweep sets these


@dataclass
class Change:
    commit: str              # the kept commit (12 hex digits)
    prev: str                # the kept commit (or the start) before it on the frontier's history
    description: str
    ablated: str = ""        # the frontier with this change reverted; "" when entangled
    values: list = field(default_factory=list)  # test_bpb of `ablated`, one per seed
    delta: float | None = None     # mean without it - mean of the frontier (> 0: removing it hurts)
    sigma_d: float | None = None
    share: float | None = None
    share_sd: float | None = None
    load_bearing: bool = False
    on_branch: str = ""      # its commit on promote/TAG
    note: str = ""

    @property
    def entangled(self):
        return not self.ablated


# ---------------------------------------------------------------------------------------------
# the chain and its confirmation

def kept_chain(session: Session, rows, best: str) -> tuple[list[Change], list[str]]:
    """The kept changes the frontier's code is made of, in order, and the kept commits it is not.
    With several workers a kept commit may not be an ancestor of the frontier (two workers branched
    from one commit, both kept), so the chain is read from git, the frontier's history back to the
    start, and each kept commit on it is one change: its diff from the kept commit (or start) before it."""
    kept = {r["commit"]: r["description"] for r in rows if r["status"] == "keep"}
    history = gitops.git(session.repo, "rev-list", "--reverse", "--first-parent", f"{session.base}..{best}").split()
    changes, prev = [], gitops.short(session.repo, session.base)
    for c in history:
        c = gitops.short(session.repo, c)
        if c in kept:
            changes.append(Change(c, prev, kept[c]))
            prev = c
    return changes, [c for c in kept if c not in {ch.commit for ch in changes}]


def require_confirmed(rows, best: str):
    verdicts = [r for r in rows if r["status"] in ("confirmed", "failed") and r["commit"] == best]
    if not verdicts:
        raise LabError(f"the best kept commit {best} has not been confirmed on the held-out test split: "
                       "run `llmlabs auto confirm` first")
    if verdicts[-1]["status"] == "failed":
        raise LabError(f"the best kept commit {best} failed its confirmation on the test split "
                       f"({verdicts[-1]['reason']}): nothing to promote; keep experimenting, or confirm with more --seeds")


def held_out_values(rows, commit, status="test") -> dict[int, float]:
    """seed -> test_bpb of a commit's held-out runs (confirm's `test` rows, or promote's `ablate`)."""
    return {int(r["seed"]): float(r["val_bpb"]) for r in rows
            if r["status"] == status and r["commit"] == commit and r["val_bpb"]}


# ---------------------------------------------------------------------------------------------
# git: the ablated commits and the branch

def _scratch(session, name) -> Path:
    """A fresh path for a scratch worktree under the session (one left by a crash is removed)."""
    path = session.dir / name
    gitops.remove_worktree(session.repo, path)
    shutil.rmtree(path, ignore_errors=True)
    return path


def _applies(wt, *args) -> bool:
    """Run a git revert / cherry-pick; False when it stops on a conflict (its edits are thrown away)."""
    if subprocess.run(["git", *args], cwd=wt, capture_output=True, check=False).returncode == 0:
        return True
    gitops.reset_to(wt, "HEAD")
    return False


def ablate_commit(session: Session, best: str, change: Change) -> str:
    """The frontier with `change` reverted, committed (and kept under refs/promote/TAG/), or "" when
    the revert does not apply cleanly: a later change touches the same lines (entangled)."""
    repo = session.repo
    ref = f"refs/promote/{session.tag}/without-{change.commit}"
    old = gitops.git(repo, "rev-parse", "--verify", "-q", f"{ref}^{{commit}}", check=False)
    if old and gitops.resolve(repo, f"{old}^") == gitops.resolve(repo, best):
        return gitops.short(repo, old)  # made by an earlier promote against this same frontier
    wt = _scratch(session, "promote-ablate")
    gitops.add_detached(repo, wt, best)
    try:
        if not _applies(wt, "revert", "--no-commit", f"{change.prev}..{change.commit}"):
            change.note = ("entangled: its revert does not apply to the frontier (a later change edits the same "
                           "lines), so it was not measured and is not on the branch; untangle it by hand to measure it")
            return ""
        if not gitops.commit_all(wt, f"ablate: the frontier {best} without {change.commit} ({change.description})"):
            change.note = "reverting it leaves the frontier unchanged (a later change undid it)"
            return ""
        gitops.git(repo, "update-ref", ref, gitops.head(wt))
        return gitops.short(wt, "HEAD")
    finally:
        gitops.remove_worktree(repo, wt)


def write_branch(session: Session, start: str, changes: list[Change], gain: float, seeds: int) -> str | None:
    """Branch promote/TAG: the load-bearing changes cherry-picked onto the start, one commit each,
    the message saying what was measured. A change that does not apply without a change left off
    before it is left off too, with a note. None when nothing was load-bearing."""
    picked = [c for c in changes if c.load_bearing]
    if not picked:
        return None
    branch = f"promote/{session.tag}"
    wt = _scratch(session, "promote-branch")
    gitops.git(session.repo, "worktree", "add", "-q", "-b", branch, str(wt), start)
    try:
        for c in picked:
            if not _applies(wt, "cherry-pick", "--no-commit", f"{c.prev}..{c.commit}"):
                c.note = "does not apply on the start without a change left off before it: not on the branch"
                continue
            gitops.commit_all(wt, commit_message(session.tag, c, gain, seeds))
            c.on_branch = gitops.short(wt, "HEAD")
    finally:
        gitops.remove_worktree(session.repo, wt)
    if not any(c.on_branch for c in picked):
        gitops.git(session.repo, "branch", "-D", branch)
        return None
    return branch


def commit_message(tag, c: Change, gain, seeds) -> str:
    return (f"{c.description}\n\nFrom auto/{tag}, kept commit {c.commit}. Leave-one-out on the held-out test split "
            f"({seeds} seeds): without it test_bpb is {c.delta:+.4f} +- {c.sigma_d:.4f} higher than the full chain's, "
            f"{c.share:.0%} +- {c.share_sd:.0%} of the chain's gain of {gain:.4f} bpb (+- is sigma_d, the seed noise "
            "of the session's baselines).\n")


# ---------------------------------------------------------------------------------------------
# the numbers

def attribute(changes: list[Change], start: list[float], full: list[float], sigma: float, dof: int, alpha: float):
    """Fill delta, sigma_d, share and load_bearing of the measured changes from test_bpb values:
    `start` and `full` of the start and the frontier, each change's own `values`. Returns the gain."""
    gain = statistics.fmean(start) - statistics.fmean(full)
    for c in changes:
        if c.entangled:
            continue
        # the keep rule, asked whether the frontier beats the frontier without this change
        d = stats.decide(full, c.values, sigma, dof, alpha)
        c.delta, c.sigma_d, c.load_bearing = -d.delta, d.sigma_d, d.verdict == "keep"
        c.share, c.share_sd = c.delta / gain, d.sigma_d / gain
    return gain


def measure_ablations(session: Session, workers: list[Worker], best: str, changes: list[Change], seeds: list[int]):
    """Each measurable change's ablated commit on the test split, one run per seed not yet in the
    ledger; every run is an `ablate` row."""
    for c in changes:
        if c.entangled:
            continue
        reason = session.check_commit(c.ablated)
        if reason:
            raise LabError(f"the frontier without {c.commit} ({c.ablated}) does not match the session ({reason}): "
                           "it cannot be measured")
        rows = session.ledger.read()
        have = held_out_values(rows, c.ablated, "ablate")
        todo = [s for s in seeds if s not in have]
        if todo:
            runs = runner.measure(session, workers, c.ablated, todo, split="test", kind="-ablate",
                                  allow=runner.allowed_overheads(session, rows))
            for r in runs:
                runner.drop_checkpoints(r)
            session.ledger.append([runner.row(c.ablated, r, r.status or "ablate", f"ablate: without {c.commit} "
                                              f"({c.description})", workers[0], best, reason=r.reason) for r in runs])
            failed = next((r for r in runs if r.status), None)
            if failed:
                raise LabError(f"ablation run {failed.name} of {c.ablated} failed: {failed.reason} (log {failed.log})")
            have = held_out_values(session.ledger.read(), c.ablated, "ablate")  # as recorded: 6 decimals, as confirm's
        c.values = [have[s] for s in seeds]


def run_depth(session: Session, rows, best: str) -> int:
    """The depth the session's runs trained at (from a test run's summary: a session without --depth
    trains the hardware preset's)."""
    run = next(r["run"] for r in rows if r["status"] == "test" and r["commit"] == best and r["run"])
    return json.loads((session.dir / "runs" / run / "summary.json").read_text())["depth"]


# ---------------------------------------------------------------------------------------------
# the outputs

def _f(x, digits=4, sign=False):
    # rounded, + 0.0: a no-op's delta of -1e-17 (two means summed in another order) prints as +0.0000
    return "-" if x is None else f"{round(x, digits) + 0.0:{'+' if sign else ''}.{digits}f}"


def _pct(x):
    return "-" if x is None else f"{round(x, 2) + 0.0:.0%}"


def markdown(res: dict) -> str:
    r = res
    lines = [f"# Promotion of auto/{r['tag']}", "",
             f"Leave-one-out on the held-out test split, {len(r['seeds'])} seeds per commit (seeds {r['seeds'][0]}.."
             f"{r['seeds'][-1]}), the session's budget ({r['time_budget']:g} s) and evaluation.",
             f"start {r['start']}: test_bpb {_f(r['start_bpb'])}; frontier {r['best']}: {_f(r['best_bpb'])}; "
             f"gain {_f(r['gain'])} bpb.",
             f"noise: sigma = {_f(r['sigma'], 5)} bpb between seeds ({r['dof']} dof, from the baselines); a change is "
             f"load-bearing when removing it raises test_bpb by more than t = {r['t_crit']:.2f} sigma_d "
             f"(the keep rule at alpha {r['alpha']:g}). Shares need not add up to 1: changes interact.", "",
             "| change | kept commit | delta without it | sigma_d | share of the gain | load-bearing | entangled | "
             "on the branch |", "|---|---|---|---|---|---|---|---|"]
    for c in r["changes"]:
        share = "-" if c.share is None else f"{_pct(c.share)} +- {_pct(c.share_sd)}"
        lines.append(f"| {_cell(c.description)} | {c.commit} | {_f(c.delta, sign=True)} | {_f(c.sigma_d)} | {share} | "
                     f"{'yes' if c.load_bearing else 'no'} | {'yes' if c.entangled else 'no'} | "
                     f"{c.on_branch or '-'} |")
    notes = [f"- {c.commit}: {c.note}" for c in r["changes"] if c.note]
    notes += [f"- {c}: kept, but not in the frontier's code (another worker's line, overtaken): not measured"
              for c in r["superseded"]]
    lines += ["", *notes] if notes else []
    lines += ["", f"branch: {r['branch']}" if r["branch"] else "branch: none (no change is load-bearing)",
              f"sweep spec: {r['spec']}" if r["spec"] else "sweep spec: none"]
    return "\n".join(lines) + "\n"


def _cell(text):
    return " ".join(str(text).split()).replace("|", "\\|")


def _toml(v) -> str:
    """JSON strings, numbers and lists of them are TOML values as they are, with non-ASCII text left
    raw (TOML refuses the surrogate pairs JSON would write for it) and DEL escaped (JSON leaves it)."""
    return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")


def spec_text(res: dict) -> str:
    """The draft sweep spec: the promoted branch (and, for the comparison, the start) at the session's
    depth and twice it, compute-optimal budgets, the ablation's seed count; hypotheses and success
    criteria written from the measured numbers."""
    r, d = res, res["depth"]
    on = [c for c in r["changes"] if c.on_branch]
    name = spec_name(r["tag"])
    args = [*without_flags(r["train_args"], BUDGET_FLAGS), "--data", r["data"],
            "--param-data-ratio", str(TOKENS_PER_PARAM)]
    hyp = [f"The {len(on)} change(s) on {r['branch']} lower val_bpb against the start {r['start']} at depth {d} and "
           f"at depth {2 * d}, each at {TOKENS_PER_PARAM} tokens per parameter (tier 1, depth {d}, "
           f"{r['time_budget']:g} s: test_bpb {_f(-r['gain'], sign=True)} bpb, confirmed)."]
    hyp += [f"'{c.description}' ({r['branch']} commit {c.on_branch}) carried {_pct(c.share)} +- {_pct(c.share_sd)} of "
            f"the tier-1 gain (without it: {_f(c.delta, sign=True)} +- {_f(c.sigma_d)} bpb); it is expected to "
            f"help at depth {2 * d} too." for c in on]
    success = (f"At each depth, the mean val_bpb over the {len(r['seeds'])} seeds of this spec run from a checkout of "
               f"{r['branch']} is below that of the same spec run from a checkout of the start {r['start']} (with "
               f"--dir sweeps/{name}-start) by more than 2 standard errors of the difference; a gain at depth {2 * d} "
               f"under half the one at depth {d} counts as not transferring.")
    hyp_lines = "".join(f"    {_toml(h)},\n" for h in hyp)
    return "\n".join([
        f"# Draft from `llmlabs auto promote` for auto/{r['tag']}: edit it before its first run (a spec is frozen",
        "# once it runs). Cells run the llmlabs of the checkout `llmlabs sweep run` starts from: run it once from",
        f"# {r['branch']} and once from the start {r['start']} (--dir sweeps/{name}-start) to compare.",
        "[sweep]",
        f"name = {_toml(name)}",
        f"hypotheses = [\n{hyp_lines}]",
        f"success = {_toml(success)}",
        f"seeds = {_toml(list(range(len(r['seeds']))))}",
        f"train_args = {_toml(args)}",
        "[grid]",
        f"depth = {_toml([d, 2 * d])}",
    ]) + "\n"


def spec_name(tag) -> str:
    return "promote-" + "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in tag)  # [sweep] name's alphabet


def without_flags(args: list[str], names) -> list[str]:
    """`args` less the given flags (each with its one value, as `--x v` or `--x=v`)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in names:
            skip = True
        elif a.split("=")[0] not in names:
            out.append(a)
    return out


# ---------------------------------------------------------------------------------------------
# the command

def promote(session: Session, workers: list[Worker], seeds: int, out: Path) -> dict:
    """`llmlabs auto promote`: attribution, then branch promote/TAG, promote.md and promote-TAG.toml in `out`."""
    repo, tag = session.repo, session.tag
    rows = session.ledger.read()
    best, start = runner.frontier(rows), gitops.short(repo, session.base)
    if best is None or not any(r["status"] == "keep" for r in rows):
        raise LabError("nothing kept yet: `llmlabs auto promote` promotes the kept, confirmed chain")
    require_confirmed(rows, best)
    if gitops.git(repo, "branch", "--list", f"promote/{tag}"):
        raise LabError(f"branch promote/{tag} exists (an earlier promote): delete it with "
                       f"`git branch -D promote/{tag}` to write it again (measured seeds are re-used)")
    changes, superseded = kept_chain(session, rows, best)
    for c in changes:
        c.ablated = ablate_commit(session, best, c)
    seed_list = [runner.TEST_SEED0 + i for i in range(seeds)]
    measure_ablations(session, workers, best, changes, seed_list)
    rows = session.ledger.read()
    sigma, dof = runner.noise(rows)
    start_vals, full_vals = list(held_out_values(rows, start).values()), list(held_out_values(rows, best).values())
    gain = attribute(changes, start_vals, full_vals, sigma, dof, session.alpha)
    branch = write_branch(session, start, changes, gain, seeds)
    res = {"tag": tag, "start": start, "best": best, "start_bpb": statistics.fmean(start_vals),
           "best_bpb": statistics.fmean(full_vals), "gain": gain, "sigma": sigma, "dof": dof,
           "alpha": session.alpha, "t_crit": stats.threshold(dof, session.alpha), "seeds": seed_list,
           "time_budget": session.time_budget, "train_args": session.train_args, "data": session.data,
           "depth": run_depth(session, rows, best), "changes": changes, "superseded": superseded,
           "branch": branch, "spec": None}
    if branch:
        res["spec"] = out / f"{spec_name(tag)}.toml"
        atomic_write_bytes(res["spec"], spec_text(res).encode())
    res["md"] = out / "promote.md"
    atomic_write_bytes(res["md"], markdown(res).encode())
    return res
