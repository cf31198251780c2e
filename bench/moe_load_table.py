"""How even each MoE run's expert load was over training, from its metrics.jsonl: one row per run.

    python3 bench/moe_load_table.py sweeps/moe-cpu-d4-bias [RUN_DIR ...] [--per-layer N] [--out TABLE.md]

Each argument is a run directory or a sweep directory (its cells/*). Per run, over its optimizer
steps: the mean of the load's coefficient of variation (`moe_load_cv`: the mean over MoE layers of
the per-expert load's sd / mean), the mean of the least-used expert's load relative to the mean,
the share of steps in which some expert got under a tenth of the mean (starved), the bias spread
(max - min) at the last step, and from summary.json the bias rate, seed, val_bpb and tokens/s.

Two columns say whether the load holds still or swings: how much of it moves from one step to the
next and to the step after next, in units of one expert's mean load (E/2 x sum over experts of
|share_t - share_t-d|, averaged over layers and steps; 0 = the same shares, E = every assignment
moved). A balancing bias that bounces between two states (an expert alternately starved and
flooded) moves much load over one step and little over two. Measured on an H200, d8 at bias rate
1e-2 (moe_d8_time-h200-bb2246d): one layer's expert took every token's assignment on odd steps.
--per-layer N adds, for each run, the same per MoE layer over its last N steps, with the least and
the most any expert got (a run's mean hides the one layer that bounces).
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

STARVED = 0.1  # an expert under this fraction of the mean load is as good as unused that step


def run_dirs(paths) -> list[Path]:
    out = []
    for p in map(Path, paths):
        cells = p / "cells"
        out += sorted(d for d in cells.iterdir() if d.is_dir()) if cells.is_dir() else [p]
    return out


def shift(shares: list, d: int) -> float | None:
    """The load moved between steps d apart, in expert-mean units, averaged over layers and step pairs
    (shares: per step, per layer, each expert's share of the layer's load)."""
    pairs = list(zip(shares[d:], shares))
    if not pairs:
        return None
    per_pair = [statistics.fmean(len(a) / 2 * sum(abs(x - y) for x, y in zip(a, b)) for a, b in zip(now, then))
                for now, then in pairs]
    return statistics.fmean(per_pair)


def per_layer(run: Path, last: int) -> str:
    """One row per MoE layer over the run's last `last` steps: load moved over one and two steps, the
    least and the most any expert got (relative to the mean)."""
    shares = [json.loads(line)["moe_load"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if '"moe_load"' in line][-last:]
    lines = [f"{run.name}, its last {len(shares)} steps:", "",
             "| MoE layer | load moved / step | over 2 steps | least-used expert (min) | busiest expert (max) |",
             "|---|---|---|---|---|"]
    for i in range(len(shares[0])):
        layer = [[s[i]] for s in shares]  # shift() averages over layers: one layer at a time here
        E = len(shares[0][i])
        lo, hi = min(min(s[i]) for s in shares) * E, max(max(s[i]) for s in shares) * E
        m1, m2 = (shift(layer, d) for d in (1, 2))
        lines.append(f"| {i + 1} | {m1:.2f} | {'-' if m2 is None else format(m2, '.2f')} | {lo:.2f} | {hi:.2f} |")
    return "\n".join(lines) + "\n"


def load_row(run: Path) -> dict | None:
    """The run's load statistics, or None for a run without MoE metrics (a dense run)."""
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"moe_load_cv"' in line]
    if not steps:
        return None
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else {}
    return {
        "run": run.name, "bias_rate": config.get("moe_bias_rate"), "seed": summary.get("seed", config.get("seed")),
        "steps": len(steps),
        "mean_cv": statistics.fmean(s["moe_load_cv"] for s in steps),
        "mean_min": statistics.fmean(s["moe_load_min"] for s in steps),
        "starved": sum(s["moe_load_min"] < STARVED for s in steps) / len(steps),
        "final_spread": steps[-1]["moe_bias_spread"],
        **{f"moved_{d}": shift([s["moe_load"] for s in steps if "moe_load" in s], d) for d in (1, 2)},
        "val_bpb": summary.get("val_bpb"), "tok_per_sec": summary.get("tok_per_sec"),
    }


def table(rows: list[dict]) -> str:
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = ["| run | bias rate | seed | steps | mean load CV | mean min / mean | steps starved | final bias spread "
             "| load moved / step | over 2 steps | val_bpb | tokens/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {fmt(r['bias_rate'], 'g')} | {fmt(r['seed'], 'd')} | {r['steps']} | "
                     f"{r['mean_cv']:.3f} | {r['mean_min']:.3f} | {r['starved']:.0%} | {r['final_spread']:.3f} | "
                     f"{fmt(r['moved_1'], '.2f')} | {fmt(r['moved_2'], '.2f')} | "
                     f"{fmt(r['val_bpb'], '.4f')} | {fmt(r['tok_per_sec'], ',.0f')} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", help="run directories or sweep directories")
    p.add_argument("--per-layer", type=int, metavar="N", help="also each run's MoE layers over its last N steps (N >= 2)")
    p.add_argument("--out", help="also write the table to this file")
    args = p.parse_args(argv)
    missing = [str(d) for d in run_dirs(args.paths) if not (d / "metrics.jsonl").exists()]
    if missing:
        sys.exit(f"no metrics.jsonl in {', '.join(missing)}: give run directories of `llmlabs train` or a sweep's directory")
    runs = [(d, row) for d in run_dirs(args.paths) if (row := load_row(d))]
    rows = [row for _, row in runs]
    if not rows:
        sys.exit("none of these runs has MoE load metrics (moe_load_cv): dense runs only")
    if args.per_layer is not None and args.per_layer < 2:
        sys.exit(f"--per-layer {args.per_layer}: the load moved needs 2 steps or more; give N >= 2")
    text = table(rows)
    if args.per_layer:
        text += "".join("\n" + per_layer(d, args.per_layer) for d, _ in runs)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
