"""How even each MoE run's expert load was over training, from its metrics.jsonl: one row per run.

    python3 bench/moe_load_table.py sweeps/moe-cpu-d4-bias [RUN_DIR ...] [--out TABLE.md]

Each argument is a run directory or a sweep directory (its cells/*). Per run, over its optimizer
steps: the mean of the load's coefficient of variation (`moe_load_cv`: the mean over MoE layers of
the per-expert load's sd / mean), the mean of the least-used expert's load relative to the mean,
the share of steps in which some expert got under a tenth of the mean (starved), the bias spread
(max - min) at the last step, and from summary.json the bias rate, seed, val_bpb and tokens/s.
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
        "val_bpb": summary.get("val_bpb"), "tok_per_sec": summary.get("tok_per_sec"),
    }


def table(rows: list[dict]) -> str:
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = ["| run | bias rate | seed | steps | mean load CV | mean min / mean | steps starved | final bias spread "
             "| val_bpb | tokens/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {fmt(r['bias_rate'], 'g')} | {fmt(r['seed'], 'd')} | {r['steps']} | "
                     f"{r['mean_cv']:.3f} | {r['mean_min']:.3f} | {r['starved']:.0%} | {r['final_spread']:.3f} | "
                     f"{fmt(r['val_bpb'], '.4f')} | {fmt(r['tok_per_sec'], ',.0f')} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", help="run directories or sweep directories")
    p.add_argument("--out", help="also write the table to this file")
    args = p.parse_args(argv)
    missing = [str(d) for d in run_dirs(args.paths) if not (d / "metrics.jsonl").exists()]
    if missing:
        sys.exit(f"no metrics.jsonl in {', '.join(missing)}: give run directories of `llmlabs train` or a sweep's directory")
    rows = [r for r in map(load_row, run_dirs(args.paths)) if r]
    if not rows:
        sys.exit("none of these runs has MoE load metrics (moe_load_cv): dense runs only")
    text = table(rows)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
