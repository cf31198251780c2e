"""Prepare throughput: `prepare` a source from scratch (into a temporary directory) and report MB/s of
source text, split into BPE training and the rest (reading, encoding, writing), per --workers value.

    PYTHONPATH=. python bench/prepare_speed.py                     # pystdlib, workers 1 and all cores
    PYTHONPATH=. python bench/prepare_speed.py --source pysrc --save
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmlabs.data.prepare import prepare
from llmlabs.data.shards import SPLITS


def device_name() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    gpu = f"; GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"CPU {cpu}, {os.cpu_count()} cores{gpu}"


def commit() -> str:
    def git(*a):
        return subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results")  # code, not results
    return git("rev-parse", "--short", "HEAD") + ("-dirty" if dirty else "")


def report(name: str, rows: list[dict], columns: list[tuple[str, str, str]], save: bool):
    """Print run facts and a table (columns: (key, header, format spec)); with save, write both to
    bench/results/<name>.json. The load average matters: other jobs on the machine slow the numbers."""
    meta = {"date": time.strftime("%Y-%m-%d"), "device": device_name(), "load_average": round(os.getloadavg()[0], 2),
            "commit": commit(), "command": "PYTHONPATH=. python " + " ".join(sys.argv),
            "python": platform.python_version(), "torch": torch.__version__}
    cells = [[h for _, h, _ in columns]] + [[f"{r[k]:{fmt}}" for k, _, fmt in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    print("\n" + "\n".join(f"{k}: {v}" for k, v in meta.items()) + "\n" + "\n".join(lines))
    if save:
        path = Path(__file__).parent / "results" / f"{name}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({**meta, "rows": rows, "table": lines}, indent=2) + "\n")
        print(f"saved {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="pystdlib")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--workers", default=f"1,{os.cpu_count()}", help="comma-separated worker counts to time")
    p.add_argument("--save", action="store_true", help="write bench/results/prepare_speed-<source>-cpu<N>.json")
    args = p.parse_args()
    rows = []
    for workers in sorted({int(w) for w in args.workers.split(",")}):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            out = prepare(args.source, Path(tmp) / "d", args.vocab_size, workers=workers)
            seconds = time.time() - t0
            m = json.loads((out / "manifest.json").read_text())
        mb = sum(m["splits"][s]["bytes"] for s in SPLITS) / 1e6
        bpe = m["tokenizer_training"]["seconds"]
        rows.append({"source": args.source, "workers": workers, "documents": sum(m["splits"][s]["documents"] for s in SPLITS),
                     "text_MB": round(mb, 1), "tokens": sum(m["splits"][s]["tokens"] for s in SPLITS),
                     "bpe_s": bpe, "rest_s": round(seconds - bpe, 2), "total_s": round(seconds, 2),
                     "MB_per_s": round(mb / seconds, 2)})
    report(f"prepare_speed-{args.source}-cpu{os.cpu_count()}", rows,
           [("source", "source", ""), ("workers", "workers", ""), ("documents", "docs", ","), ("text_MB", "text MB", ".1f"),
            ("tokens", "tokens", ","), ("bpe_s", "BPE s", ".1f"), ("rest_s", "rest s", ".1f"),
            ("total_s", "total s", ".1f"), ("MB_per_s", "MB/s", ".1f")], args.save)


if __name__ == "__main__":
    main()
