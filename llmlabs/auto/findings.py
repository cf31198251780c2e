"""findings.md: what a session tried and learned, one line per experiment, from the ledger alone.

Written beside report.md by `llmlabs auto report` and after every `loop` iteration. An experiment
is a commit measured against a frontier (its rows' parent is another commit; baseline rows measure
a commit against itself); its result is the mean val_bpb of its runs, t = delta / sigma_d. "The
kept chain" is the kept commits in order with the improvement from the start. Rows with status
`test` are confirmation runs on the held-out split and `confirmed` / `failed` their verdicts; any
status or column not named here is ignored, so ledgers with more columns read the same.

`priors` gives an agent the findings of earlier sessions of the repository (sibling directories
under .auto/), newest first, capped: their budget, hardware and flags may differ from this one's.
"""
import json
from pathlib import Path
from statistics import fmean

from llmlabs.auto import gitops, runner
from llmlabs.auto.session import Session
from llmlabs.common import atomic_write_bytes

EXPERIMENT_STATUSES = ("keep", "discard", "crash", "invalid")
VERDICT_STATUSES = ("confirmed", "failed")
PRIOR_SESSIONS = 3      # the newest earlier sessions shown to the agent
PRIOR_CHARS = 4000      # all of them together


def _f(x, digits=4, sign=False):
    return "-" if x is None else f"{x:{'+' if sign else ''}.{digits}f}"


def _num(text):
    return float(text) if text not in (None, "") else None


def _cell(text):
    return " ".join(str(text).split()).replace("|", "\\|")  # one line; a pipe must not split the table


def _mean(rows):
    vals = [float(r["val_bpb"]) for r in rows if r.get("val_bpb")]
    return fmean(vals) if vals else None


def _score(rows, commit):
    """Mean val_bpb of a commit's measurements that count (baseline and keep rows)."""
    vals = runner.scores(rows, commit)
    return fmean(vals) if vals else None


def _t(delta, sigma):
    return delta / sigma if delta is not None and sigma else None


def experiments(rows) -> list[dict]:
    """One dict per experiment (commit), in the order first measured: its runs, their mean val_bpb,
    and the decision (status, delta, sigma_d: the same on every row of one experiment; the reason,
    which only the last row carries)."""
    groups = {}
    for r in rows:
        if r.get("status") in EXPERIMENT_STATUSES and r.get("parent") != r["commit"]:
            groups.setdefault(r["commit"], []).append(r)
    out = []
    for commit, rs in groups.items():
        last = rs[-1]
        delta, sigma = _num(last.get("delta")), _num(last.get("sigma"))
        out.append({"commit": commit, "description": last.get("description", ""), "runs": len(rs),
                    "val_bpb": _mean(rs), "delta": delta, "sigma": sigma, "t": _t(delta, sigma),
                    "status": last["status"],
                    "reason": next((r["reason"] for r in reversed(rs) if r.get("reason")), "")})
    return out


def render(rows, *, tag, time_budget, train_args, start) -> str:
    """findings.md for ledger `rows` (dicts by column name) of session `tag` starting at commit `start`."""
    exps = experiments(rows)
    start_bpb = _score(rows, start)
    counts = {s: sum(e["status"] == s for e in exps) for s in EXPERIMENT_STATUSES}
    lines = [f"# Findings: auto/{tag}", "",
             f"budget {time_budget:g} s per run; train flags `{' '.join(train_args) or '(none)'}`; "
             "t = delta / sigma_d, the noise of the difference"]
    kept = [e for e in exps if e["status"] == "keep"]
    best = kept[-1] if kept else None
    summary = f"start {start}: val_bpb {_f(start_bpb)}"
    if best:
        best_bpb = _score(rows, best["commit"])
        summary += f" -> best {best['commit']}: val_bpb {_f(best_bpb)}"
        if best_bpb is not None and start_bpb is not None:
            summary += f" ({_f(best_bpb - start_bpb, sign=True)})"
    lines += [summary + f"; {len(exps)} experiments: " + ", ".join(f"{n} {s}" for s, n in counts.items()), "",
              "## Experiments", "", "| commit | hypothesis | val_bpb | delta | t | status |",
              "|---|---|---|---|---|---|"]
    for e in exps:
        runs = f" ({e['runs']} runs)" if e["runs"] > 1 and e["val_bpb"] is not None else ""
        status = e["status"] + (f": {e['reason']}" if e["status"] in ("crash", "invalid") and e["reason"] else "")
        lines.append(f"| {e['commit']} | {_cell(e['description'])} | {_f(e['val_bpb'])}{runs} | "
                     f"{_f(e['delta'], sign=True)} | {_f(e['t'], 1, sign=True)} | {_cell(status)} |")
    if not exps:
        lines.append("| - | no experiment yet | | | | |")

    lines += ["", "## The kept chain", "", "| commit | description | val_bpb | step | from start |",
              "|---|---|---|---|---|", f"| {start} | the starting commit | {_f(start_bpb)} | | |"]
    prev = start_bpb
    for e in kept:
        bpb = _score(rows, e["commit"])
        step = bpb - prev if bpb is not None and prev is not None else None
        total = bpb - start_bpb if bpb is not None and start_bpb is not None else None
        lines.append(f"| {e['commit']} | {_cell(e['description'])} | {_f(bpb)} | {_f(step, sign=True)} | "
                     f"{_f(total, sign=True)} |")
        prev = bpb

    tests = [r for r in rows if r.get("status") == "test"]
    verdicts = [r for r in rows if r.get("status") in VERDICT_STATUSES]
    if tests or verdicts:
        lines += ["", "## Confirmation", "", "| commit | description | test runs | bpb mean | verdict |",
                  "|---|---|---|---|---|"]
        for commit in dict.fromkeys(r["commit"] for r in tests + verdicts):
            ts = [r for r in tests if r["commit"] == commit]
            vs = [r for r in verdicts if r["commit"] == commit]
            verdict = "-"
            if vs:
                v = vs[-1]
                d, s = _num(v.get("delta")), _num(v.get("sigma"))
                verdict = v["status"]
                verdict += f" delta {_f(d, sign=True)} t {_f(_t(d, s), 1, sign=True)}" if d is not None else ""
                verdict += f" ({v['reason']})" if v.get("reason") else ""
            desc = (ts or vs)[-1].get("description", "")
            lines.append(f"| {commit} | {_cell(desc)} | {len(ts)} | {_f(_mean(ts))} | {_cell(verdict)} |")
    return "\n".join(lines) + "\n"


def write_findings(session: Session, out_dir=None) -> Path:
    path = Path(out_dir or session.dir) / "findings.md"
    text = render(session.ledger.read(), tag=session.tag, time_budget=session.time_budget,
                  train_args=session.train_args, start=gitops.short(session.repo, session.base))
    atomic_write_bytes(path, text.encode())
    return path


# ---------------------------------------------------------------------------------------------
# memory across sessions

def _sections(text) -> dict[str, list[str]]:
    """{heading: lines} of a findings.md; "" holds the lines before the first `## `."""
    out, key = {"": []}, ""
    for line in text.splitlines():
        if line.startswith("## "):
            key = line[3:].strip()
            out[key] = []
        elif line.strip():
            out[key].append(line)
    return out


def _created(sdir: Path) -> str:
    try:
        return json.loads((sdir / "session.json").read_text())["created"]
    except (OSError, ValueError, KeyError):
        return ""


def priors(session: Session, limit=PRIOR_CHARS, sessions=PRIOR_SESSIONS) -> str:
    """The findings of the sessions created before this one (newest first, at most `sessions` of
    them, `limit` characters in all: each gets an equal share of what is left, what a session does
    not use passes to the next), or "" when there are none."""
    mine = _created(session.dir)
    found = sorted(((_created(d), d.name, d) for d in session.dir.parent.iterdir()
                    if d != session.dir and (d / "findings.md").is_file()), reverse=True)
    found = [f for f in found if f[0] <= mine]
    if not found:
        return ""
    head = ("## Priors from earlier sessions of this repository (newest first)\n"
            "What earlier sessions tried, from their findings.md. Their budget, hardware and train flags may "
            "differ from this session's (each says its budget), so compare their deltas and t values, not their "
            "val_bpb with this ledger's. Use them to pick ideas: what was kept, what came close, what failed.")
    shown, dropped = found[:sessions], found[sessions:]
    tail = f"({len(dropped)} older sessions not shown: {', '.join(f[1] for f in dropped)})" if dropped else ""
    left = limit - len(head) - len(tail) - 2
    blocks = []
    for n, (created, tag, d) in enumerate(shown):
        share = left // (len(shown) - n)
        block = _prior_block(tag, created, (d / "findings.md").read_text(errors="replace"), share)
        left -= len(block) + 1
        blocks.append(block)
    return "\n".join([head, *blocks] + ([tail] if tail else []))


def _prior_block(tag, created, text, limit) -> str:
    sec = _sections(text)
    summary = [ln for ln in sec.get("", []) if not ln.startswith("# ")]
    chain = [ln for ln in sec.get("The kept chain", []) if ln != "|---|---|---|---|---|"]
    exps = [ln for ln in sec.get("Experiments", []) if ln != "|---|---|---|---|---|---|"]
    lines = [f"### Session {tag} (created {created or 'unknown'})", *summary]
    lines += (["Kept chain:", *chain] if chain else []) + (["Experiments (in the order run):", *exps] if exps else [])
    out, size = [], 0
    for i, line in enumerate(lines):
        cut = len(lines) - i
        note = f"({cut} more lines of session {tag} cut to fit the cap)"
        if size + len(line) + 1 + (len(note) + 1 if cut > 1 else 0) > limit:
            out.append(note)
            break
        out.append(line)
        size += len(line) + 1
    return "\n".join(out)
