"""Where a short training run's start-up goes: the time before its first timed step, profiled.

    PYTHONPATH=. python3 bench/startup_profile.py --data DIR --train-args "--depth 4 --device cuda" --out DIR

Runs `llmlabs train` --runs times with one compile cache (the first fills it, as an autoresearch
session's first run does), the last under cProfile, and prints each run's wall time and the
functions with the most cumulative and own time in the profiled one. An autoresearch run pays this
start-up on every experiment, so it is what bounds a session's experiments per hour.
"""
import argparse
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="a prepared data directory")
    p.add_argument("--train-args", default="--depth 4 --device cuda")
    p.add_argument("--budget", type=float, default=6.0, help="--time-budget of each run")
    p.add_argument("--runs", type=int, default=2, help="runs with one cache; the last is profiled")
    p.add_argument("--top", type=int, default=40, help="functions to print")
    p.add_argument("--out", default=".", help="where the profile (startup.prof) goes")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llmlabs-startup-"))
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor"), "TRITON_CACHE_DIR": str(work / "triton")}
    prof = Path(a.out) / "startup.prof"
    for i in range(a.runs):
        last = i == a.runs - 1
        cmd = [sys.executable, *(["-m", "cProfile", "-o", str(prof)] if last else []), "-m", "llmlabs", "train",
               "--data", a.data, "--time-budget", str(a.budget), "--run-dir", str(work / f"run{i}"),
               "--eval-split", "none", *a.train_args.split()]
        t0 = time.monotonic()
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"startup_profile: run {i} failed (exit {r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
        print(f"run {i}{' (profiled)' if last else ''}: {time.monotonic() - t0:.1f} s wall, budget {a.budget:g} s",
              flush=True)
    stats = pstats.Stats(str(prof))
    stats.sort_stats("cumulative").print_stats(a.top)
    stats.sort_stats("tottime").print_stats(a.top // 2)


if __name__ == "__main__":
    main()
