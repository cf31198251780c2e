"""Multi-GPU runs on one host (the multi-GPU issue): scaling efficiency, the loss trajectory across
rank counts, and a resume on fewer ranks, each through torchrun and the distributed MuonAdamW.

    PYTHONPATH=. python3 bench/multi_gpu.py --data DIR [--ranks 1,2,4,8] [--depth 20] [--rows 32]
        [--seq-len 2048] [--steps 20] [--trajectory-steps 50] [--parts scaling,trajectory,resume]
        [--out-dir bench/results/multi_gpu-h200x8-COMMIT] [TRAIN ARGS ...]

- scaling: for each N in --ranks, --steps steps at the same per-GPU batch (--rows x --seq-len tokens,
  one micro-batch a step on every rank, so a step's batch is N times that); tokens/s and MFU from
  each run's summary (the trainer's timed steps: torch.compile's warm-up is not counted), and the
  efficiency tokens/s(N) / (N x tokens/s(1)).
- trajectory: the largest N against one rank at the same total batch (the one rank accumulates N
  micro-batches): per-step losses side by side, their largest relative gap, and a plot.
- resume: the largest-N trajectory run cut at its half-way checkpoint and resumed on N/2 ranks; its
  losses after the cut against the uninterrupted run's.
Runs skip the final evaluation (--eval-split none): these are speed and agreement checks. Unknown
arguments go to every run (e.g. --device cpu: the same runs through gloo, a dry run of this script).
Writes OUT/report.md, OUT/trajectory.png and each run's directory with its torchrun log.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def torchrun(n, args, run_dir: Path) -> dict:
    """One `llmlabs train` on n ranks into run_dir; its summary.json (exits on a failed run, with its log's tail)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{run_dir.name}.log"
    launcher = Path(sys.executable).with_name("torchrun")  # the interpreter's own, else the one on PATH
    cmd = [str(launcher) if launcher.exists() else "torchrun", "--standalone", "--nproc_per_node", str(n),
           "-m", "llmlabs", "train", *args]
    t0 = time.time()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1")).returncode
    if rc:
        sys.exit(f"{run_dir.name}: torchrun exited {rc} after {time.time() - t0:.0f} s; its log ends:\n"
                 + "".join(log.read_text().splitlines(True)[-15:]))
    print(f"{run_dir.name}: {time.time() - t0:.0f} s", flush=True)
    return json.loads((run_dir / "summary.json").read_text())


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def gap(a: dict, b: dict) -> float:
    """The largest relative difference of two loss curves over their common steps."""
    return max(abs(a[s] - b[s]) / abs(a[s]) for s in a.keys() & b.keys())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a prepared data directory (preparing pysrc takes a minute)")
    p.add_argument("--ranks", default="1,2,4,8", help="comma-separated rank counts, 1 first")
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--rows", type=int, default=32, help="rows per GPU per micro-batch (the per-GPU batch)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20, help="steps of each scaling run")
    p.add_argument("--trajectory-steps", type=int, default=50)
    p.add_argument("--parts", default="scaling,trajectory,resume")
    p.add_argument("--out-dir", type=Path, default=Path("bench/results/multi_gpu"))
    a, extra = p.parse_known_args()
    ranks = [int(n) for n in a.ranks.split(",")]
    if ranks[0] != 1:
        p.error("--ranks must start at 1: efficiency and trajectory compare against one rank")
    per_gpu = a.rows * a.seq_len
    common = ["--data", a.data, "--depth", str(a.depth), "--seq-len", str(a.seq_len), "--device-batch-size", str(a.rows),
              "--eval-split", "none", *extra]
    out, report = a.out_dir, [f"# bench/multi_gpu.py, {time.strftime('%Y-%m-%d')}", "",
                              f"`PYTHONPATH=. python3 {' '.join(sys.argv)}`", ""]
    parts = a.parts.split(",")

    if "scaling" in parts:
        report += ["## scaling: the same per-GPU batch", "", "| ranks | batch tokens | tokens/s | MFU % | efficiency |",
                   "|---|---|---|---|---|"]
        base = None
        for n in ranks:
            batch = per_gpu * n
            s = torchrun(n, [*common, "--total-batch-size", str(batch), "--tokens", str(batch * a.steps),
                             "--run-dir", str(out / f"scaling-{n}")], out / f"scaling-{n}")
            base = base or s["tok_per_sec"]
            mfu = s.get("mfu_percent")
            report.append(f"| {n} | {batch:,} | {s['tok_per_sec']:,.0f} | {'n/a' if mfu is None else mfu} | "
                          f"{s['tok_per_sec'] / (n * base):.3f} |")
        report.append("")

    n = ranks[-1]
    batch, steps = per_gpu * n, a.trajectory_steps
    big, one = out / f"trajectory-{n}", out / "trajectory-1"
    if "trajectory" in parts or "resume" in parts:
        traj = ["--total-batch-size", str(batch), "--tokens", str(batch * steps)]
        torchrun(n, [*common, *traj, "--save-every", str(steps // 2), "--run-dir", str(big)], big)
    if "trajectory" in parts:
        torchrun(1, [*common, *traj, "--run-dir", str(one)], one)
        ln, l1 = losses(big), losses(one)
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(sorted(l1), [l1[s] for s in sorted(l1)], label="1 rank, accumulating")
        ax.plot(sorted(ln), [ln[s] for s in sorted(ln)], "--", label=f"{n} ranks")
        ax.set(xlabel="step", ylabel="training loss", title=f"d{a.depth}, {batch:,} tokens a step")
        ax.legend()
        fig.savefig(out / "trajectory.png", dpi=120, bbox_inches="tight")
        report += ["## trajectory: the same total batch", "",
                   f"{n} ranks against 1 rank accumulating {n} micro-batches, {batch:,} tokens a step, {steps} steps: "
                   f"largest relative loss gap {gap(ln, l1):.2e} (step 1: {abs(ln[1] - l1[1]) / l1[1]:.2e}); "
                   "trajectory.png", ""]
    if "resume" in parts and n > 1:
        cut = out / f"trajectory-{n}-cut"
        shutil.rmtree(cut, ignore_errors=True)
        shutil.copytree(big, cut)
        for ck in (cut / "checkpoints").glob("step_*"):
            if int(ck.name.split("_")[1]) > steps // 2:
                shutil.rmtree(ck)
        (cut / "checkpoints" / "LATEST").write_text(f"step_{steps // 2:06d}")
        torchrun(n // 2, ["--resume", str(cut)], cut)
        after = {s: v for s, v in losses(cut).items() if s > steps // 2}
        report += ["## resume on fewer ranks", "",
                   f"the {n}-rank run's step-{steps // 2} checkpoint finished on {n // 2} rank{'s' * (n > 2)}: largest relative loss "
                   f"gap after the cut against the uninterrupted run {gap(after, losses(big)):.2e} over {len(after)} steps", ""]
    (out / "report.md").write_text("\n".join(report) + "\n")
    print("\n".join(report))


if __name__ == "__main__":
    main()
