"""How often the sweep fit's 5-95% bootstrap intervals hold the truth, on synthetic sweeps.

Each draw: 30 runs on a 6 x 5 grid of N (1e7..1e9) and D (3e8..3e10) from Chinchilla's fitted law
(Hoffmann et al. eq. 10: E 1.69, A 406.4, B 410.7, alpha 0.34, beta 0.28) with lognormal noise, fitted
by llmlabs.scaling_fit.fit and bootstrapped. A 90% interval should miss ~10% of the time; the
count of draws where each parameter's interval holds its true value is printed, and written as
markdown to --out.

    python bench/sweep_fit_coverage.py --draws 40 --samples 100 --out bench/results/sweep_fit_coverage.md
"""
import argparse
import platform
import subprocess
import time

import numpy as np

from llmlabs import scaling_fit

TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
C = 1e21


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--draws", type=int, default=40)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--noise", type=float, default=0.005, help="lognormal sigma of each run's loss")
    ap.add_argument("--out")
    args = ap.parse_args()
    N, D = (x.ravel() for x in np.meshgrid(np.geomspace(1e7, 1e9, 6), np.geomspace(3e8, 3e10, 5)))
    names = list(scaling_fit.PARAMS) + [f"ratio@{C:.3g}"]
    truth = [TRUE[k] for k in scaling_fit.PARAMS] + [float(scaling_fit.compute_optimal(TRUE, C)[2])]
    held, all_held, t0 = np.zeros(len(names), int), 0, time.time()
    for seed in range(args.draws):
        L = scaling_fit.law(N, D, TRUE) * np.exp(np.random.default_rng(seed).normal(0, args.noise, N.size))
        iv = scaling_fit.bootstrap(N, D, L, samples=args.samples, budgets=[C])
        ok = np.array([iv[k][0] <= t <= iv[k][1] for k, t in zip(names, truth)])
        held += ok
        all_held += ok[:5].all()
        print(f"draw {seed}: " + " ".join(f"{k} {'ok' if o else 'MISS'}" for k, o in zip(names, ok)), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [f"# Sweep fit: bootstrap coverage on synthetic sweeps ({time.strftime('%Y-%m-%d')}, commit {commit}, "
             f"{platform.machine()} CPU)", "",
             f"`python bench/sweep_fit_coverage.py --draws {args.draws} --samples {args.samples} --noise {args.noise}` "
             f"({time.time() - t0:.0f} s): {args.draws} draws of 30 runs from Chinchilla's law, lognormal noise "
             f"sigma {args.noise}; each draw fitted and bootstrapped ({args.samples} resamples, 5-95% intervals).", "",
             "| quantity | true value | draws whose interval holds it |", "|---|---|---|"]
    lines += [f"| {k} | {t:.4g} | {h} of {args.draws} ({100 * h / args.draws:.0f}%) |" for k, t, h in zip(names, truth, held)]
    lines += ["", f"All five parameters at once: {all_held} of {args.draws} ({100 * all_held / args.draws:.0f}%). "
              "A 90% interval should hold the truth in ~90% of draws."]
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
