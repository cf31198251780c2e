"""Prepare throughput: `prepare` a source from scratch (into a temporary directory) and report MB/s of
source text, with the tokenizer-training and encoding phases, for each --workers value.

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
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    gpu = f"; GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"CPU {cpu}, {os.cpu_count()} cores{gpu}"


def commit() -> str:
    run = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    return run("rev-parse", "--short", "HEAD") + ("-dirty" if run("status", "--porcelain", "--untracked-files=no") else "")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="pystdlib")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--workers", default=f"1,{os.cpu_count()}", help="comma-separated worker counts to time")
    p.add_argument("--save", action="store_true", help="write bench/results/prepare_speed-<source>-<device>.json")
    args = p.parse_args()
    rows = []
    for workers in sorted({int(w) for w in args.workers.split(",")}):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            out = prepare(args.source, Path(tmp) / "d", args.vocab_size, workers=workers)
            seconds = time.time() - t0
            m = json.loads((out / "manifest.json").read_text())
        mb = sum(m["splits"][s]["bytes"] for s in SPLITS) / 1e6
        tokens = sum(m["splits"][s]["tokens"] for s in SPLITS)
        tok_s = m["tokenizer_training"]["seconds"]
        rows.append({"source": args.source, "workers": workers, "documents": sum(m["splits"][s]["documents"] for s in SPLITS),
                     "text_MB": round(mb, 2), "tokens": tokens, "tokenizer_s": tok_s,
                     "encode_s": round(seconds - tok_s, 2), "total_s": round(seconds, 2), "MB_per_s": round(mb / seconds, 2)})
    header = f"{'source':<10} {'workers':>7} {'docs':>8} {'text MB':>8} {'tokens':>11} {'BPE s':>6} {'rest s':>7} {'total s':>8} {'MB/s':>6}"
    lines = [header] + [f"{r['source']:<10} {r['workers']:>7} {r['documents']:>8,} {r['text_MB']:>8.1f} {r['tokens']:>11,} "
                        f"{r['tokenizer_s']:>6.1f} {r['encode_s']:>7.1f} {r['total_s']:>8.1f} {r['MB_per_s']:>6.1f}" for r in rows]
    meta = {"date": time.strftime("%Y-%m-%d"), "device": device_name(), "load_average": os.getloadavg()[0], "commit": commit(),
            "command": "PYTHONPATH=. python " + " ".join(sys.argv), "python": platform.python_version(),
            "torch": torch.__version__}
    print("\n" + "\n".join(f"{k}: {v}" for k, v in meta.items()))
    print("\n".join(lines))
    if args.save:
        tag = f"cpu{os.cpu_count()}"
        path = Path(__file__).parent / "results" / f"prepare_speed-{args.source}-{tag}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({**meta, "rows": rows, "table": lines}, indent=2) + "\n")
        print(f"saved {path}")


if __name__ == "__main__":
    main()
