"""`llmlabs auto report`: where the session stands, from the ledger alone.

report.png: every run's val_bpb in ledger order (coloured by status, crashes marked at the top),
the kept frontier as a step line, and the noise band (frontier +- one seed's sigma) that a change
has to clear. report.md: the numbers, the kept changes with delta and sigma_d, crashes, time, and
the test-split confirmation when `llmlabs auto confirm` has run. findings.md (findings.py): one
line per experiment and the kept chain. --json: the summary for agents.
"""
import json
import os
from collections import Counter
from pathlib import Path

from llmlabs.auto import gitops, runner, sandbox, stats
from llmlabs.auto.findings import write_findings
from llmlabs.auto.runs import tail
from llmlabs.auto.session import Session
from llmlabs.common import atomic_write_bytes, make_dir

COLORS = {"baseline": "C0", "keep": "C2", "discard": "0.6", "invalid": "C1", "crash": "C3"}


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def summarize(session: Session) -> dict:
    rows = session.ledger.read()
    sigma, dof = runner.noise(rows)
    start = gitops.short(session.repo, session.base)
    best = runner.frontier(rows)
    kept, seen = [], set()
    for r in rows:
        if r["status"] == "keep" and r["commit"] not in seen:
            seen.add(r["commit"])
            delta, sd = float(r["delta"]), float(r["sigma"])
            kept.append({"commit": r["commit"], "val_bpb": _mean(runner.scores(rows, r["commit"])), "delta": delta,
                         "sigma": sd, "t": delta / sd if sd else None, "description": r["description"]})
    crashes = [{"commit": r["commit"], "run": r["run"], "reason": r["reason"], "description": r["description"],
                "tail": tail(session.dir / "logs" / f"{r['run']}.log", 15) if r["run"] else ""}
               for r in rows if r["status"] == "crash"]
    walls = [float(r["wall_s"]) for r in rows if r["wall_s"]]
    ends = [float(r["started"]) + float(r["wall_s"] or 0) for r in rows if r["started"]]
    confirm = session.dir / "confirm.json"
    return {
        "tag": session.tag, "branch": f"auto/{session.tag}", "time_budget_s": session.time_budget,
        "alpha": session.alpha, "t_crit": stats.threshold(dof, session.alpha) if dof else None,
        "sandbox": sandbox.available(),
        "sigma": sigma, "sigma_dof": dof, "runs": len(rows), "counts": dict(Counter(r["status"] for r in rows)),
        "start": {"commit": start, "val_bpb": _mean(runner.scores(rows, start))},
        "best": {"commit": best, "val_bpb": _mean(runner.scores(rows, best)) if best else None},
        "kept": kept, "crashes": crashes,
        "run_hours": sum(walls) / 3600,
        "span_hours": (max(ends) - min(float(r["started"]) for r in rows if r["started"])) / 3600 if ends else 0.0,
        "confirm": json.loads(confirm.read_text()) if confirm.exists() else None,
    }


def plot(session: Session, summary: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = session.ledger.read()
    bpbs = [float(r["val_bpb"]) for r in rows if r["val_bpb"]]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    top = max(bpbs) if bpbs else 1.0
    for status, color in COLORS.items():
        pts = [(i, float(r["val_bpb"]) if r["val_bpb"] else top) for i, r in enumerate(rows) if r["status"] == status]
        if pts:
            marker = {"crash": "v", "invalid": "x"}.get(status, "o")
            ax.scatter(*zip(*pts), c=color, marker=marker, s=40 if status == "keep" else 18, zorder=3,
                       label=f"{status} ({len(pts)})" + (" at top: no bpb" if status == "crash" else ""))
    # the frontier after each row: mean bpb of the commit to beat at that point
    xs, ys = [], []
    for i in range(len(rows)):
        best = runner.frontier(rows[:i + 1])
        if best:
            xs.append(i)
            ys.append(_mean(runner.scores(rows[:i + 1], best)))
    if xs:
        ax.step(xs, ys, where="post", c="C2", lw=1.5, label="kept frontier")
        if summary["sigma"]:
            s = summary["sigma"]
            ax.fill_between(xs, [y - s for y in ys], [y + s for y in ys], step="post", color="C2", alpha=0.15,
                            label=f"noise band: frontier +- sigma ({s:.4f})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("run (ledger order)")
    ax.set_ylabel("val_bpb")
    b, st = summary["best"]["val_bpb"], summary["start"]["val_bpb"]
    ax.set_title(f"auto/{session.tag}: {summary['runs']} runs, {summary['counts'].get('keep', 0)} kept"
                 + (f"; val_bpb {st:.4f} -> {b:.4f}" if b is not None and st is not None else ""))
    for i, r in enumerate(rows):
        if r["status"] == "keep" and (i + 1 == len(rows) or rows[i + 1]["commit"] != r["commit"]):
            ax.annotate(r["description"][:40], (i, float(r["val_bpb"])), fontsize=7, rotation=20,
                        xytext=(4, 6), textcoords="offset points")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _fmt(x, digits=4):
    return "-" if x is None else f"{x:.{digits}f}"


def _cell(text):
    return str(text).replace("|", "\\|")  # a description may hold a pipe; it must not split the table


def markdown(summary: dict) -> str:
    f = _fmt
    st, b = summary["start"], summary["best"]
    lines = [f"# autoresearch report: auto/{summary['tag']}", "",
             f"- budget per run: {summary['time_budget_s']:g} s; keep rule: one-sided t-test, false-keep rate "
             f"alpha = {summary['alpha']:g}" + (f" (keep when t < -{summary['t_crit']:.2f})" if summary["t_crit"] else ""),
             "- sandbox: " + ("bubblewrap (agent: its worktree only; training and evaluation: no network, no held-out "
                              "data mounted)" if summary["sandbox"] else
                              "none: agent unsandboxed; training and evaluation guarded by the harness's file guard only"),
             f"- noise: sigma = {f(summary['sigma'], 5)} bpb between seeds ({summary['sigma_dof']} degrees of freedom)",
             f"- start {st['commit']}: val_bpb {f(st['val_bpb'])}; best {b['commit']}: val_bpb {f(b['val_bpb'])}",
             f"- runs: {summary['runs']} (" + ", ".join(f"{k} {v}" for k, v in sorted(summary["counts"].items()))
             + f"); training wall time {summary['run_hours']:.2f} h over {summary['span_hours']:.2f} h",
             "", "## Kept changes", "", "| commit | val_bpb | delta | sigma_d | t | description |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {k['commit']} | {f(k['val_bpb'])} | {f(k['delta'])} | {f(k['sigma'])} | {f(k['t'], 1)} | "
              f"{_cell(k['description'])} |" for k in summary["kept"]] or ["| - | | | | | nothing kept yet |"]
    if summary["crashes"]:
        lines += ["", f"## Crashes ({len(summary['crashes'])})", "", "| commit | reason | description |", "|---|---|---|"]
        lines += [f"| {c['commit']} | {_cell(c['reason'])} | {_cell(c['description'])} |" for c in summary["crashes"]]
    c = summary["confirm"]
    if c:
        a, bb = c["commits"]["start"], c["commits"]["best"]
        lines += ["", f"## Confirmation on the held-out {c['split']} split ({len(c['seeds'])} seeds each)", "",
                  "| commit | test_bpb mean | std |", "|---|---|---|",
                  f"| start {a['commit']} | {f(a['mean'])} | {f(a['std'], 5)} |",
                  f"| best {bb['commit']} | {f(bb['mean'])} | {f(bb['std'], 5)} |", "",
                  f"difference {f(c['diff'])} +- {f(c['se'])} (standard error; Welch t = {f(c['t'], 2)}, "
                  f"one-sided p = {c['p']:.3g}: {c['verdict']} at alpha {c['alpha']:g})"]
    return "\n".join(lines) + "\n"


def write_report(session: Session, out_dir=None) -> tuple[dict, Path, Path, Path]:
    """(summary, report.png, report.md, findings.md), written to out_dir (default: the session's)."""
    out = make_dir(out_dir or session.dir, "--out")
    summary = summarize(session)
    png, md = out / "report.png", out / "report.md"
    plot(session, summary, png)
    atomic_write_bytes(md, markdown(summary).encode())
    return summary, png, md, write_findings(session, out)
