"""Multi-GPU runs on one host (the multi-GPU issue): scaling efficiency, the loss trajectory across
rank counts, and a resume on fewer ranks, each through torchrun and the distributed MuonAdamW.

    PYTHONPATH=. python3 bench/multi_gpu.py --data DIR [--ranks 1,2,4,8] [--depth 20] [--rows 32]
        [--seq-len 2048] [--steps 20] [--trajectory-steps 50] [--parts scaling,trajectory,floor,resume]
        [--out-dir bench/results/multi_gpu-h200x8-COMMIT] [TRAIN ARGS ...]

- scaling: for each N in --ranks, --steps steps at the same per-GPU batch (--rows x --seq-len tokens,
  one micro-batch a step on every rank, so a step's batch is N times that); tokens/s and MFU from
  each run's summary (the trainer's timed steps: torch.compile's warm-up is not counted), and the
  efficiency tokens/s(N) / (N x tokens/s(1)).
- trajectory: the largest N against one rank at the same total batch (the one rank accumulates N
  micro-batches): per-step losses side by side, their largest relative gap, and a plot.
- floor: what "the same within bf16 noise" means, measured rather than assumed. The one-rank run
  again with each micro-batch cut in two (--rows / 2 rows, 2N accumulation steps) sees the same rows
  each step and differs only in the order its sums run; its gap to the one-rank run is the noise
  floor the N-vs-1 gap is read against. Both gaps grow from rounding-sized differences at step 1
  as training amplifies them, so compare them step by step (the plot's right panel), by order of
  magnitude. A real fault (a rank's rows lost, a gradient scaled wrong) changes the update itself,
  not its rounding, so its gap starts at the size of that change. (The CPU dry run, d2 in float32:
  8 ranks vs 1 at 9.0e-4 by step 10, the floor 4.3e-4 there; 8 ranks with halved micro-batches
  against 8 ranks moved less, 9.4e-5, so that would be a floor too low.) Needs --rows >= 2.
- resume: the largest-N trajectory run cut at its half-way checkpoint and resumed on N/2 ranks; its
  losses after the cut against the uninterrupted run's.
After the N-rank trajectory run, the one-rank run, the floor's and the resume run side by side on
disjoint GPUs when the host has 2 + N/2 of them (their losses are compared, not their speed), so at
d20 on 8 GPUs the last three parts take about the one-rank run's time after the N-rank run's.
Runs skip the final evaluation (--eval-split none): these are speed and agreement checks. Unknown
arguments go to every run (e.g. --device cpu: the same runs through gloo, a dry run of this script).
Writes OUT/report.md (date, device, commit, torch), OUT/trajectory.png and each run's directory with its
torchrun log.
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


def launch(n, args, run_dir: Path, gpus: str | None = None):
    """Start one `llmlabs train` on n ranks into run_dir (on CUDA_VISIBLE_DEVICES=gpus when given)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{run_dir.name}.log"
    launcher = Path(sys.executable).with_name("torchrun")  # the interpreter's own, else the one on PATH
    cmd = [str(launcher) if launcher.exists() else "torchrun", "--standalone", "--nproc_per_node", str(n),
           "-m", "llmlabs", "train", *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **({"CUDA_VISIBLE_DEVICES": gpus} if gpus else {}))
    with open(log, "w") as f:
        f.write(" ".join(cmd) + (f"  # CUDA_VISIBLE_DEVICES={gpus}" if gpus else "") + "\n")
        f.flush()
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env), run_dir, log, time.time()


def finish(jobs) -> list[dict]:
    """Wait for launched runs; their summary.json files. A failed run stops the script with its log's
    tail, and the runs still going are stopped with it (a half-finished comparison is worth nothing)."""
    summaries = []
    try:
        for proc, run_dir, log, t0 in jobs:
            if rc := proc.wait():
                sys.exit(f"{run_dir.name}: torchrun exited {rc} after {time.time() - t0:.0f} s; its log ends:\n"
                         + "".join(log.read_text().splitlines(True)[-15:]))
            print(f"{run_dir.name}: {time.time() - t0:.0f} s", flush=True)
            summaries.append(json.loads((run_dir / "summary.json").read_text()))
    finally:
        for proc, *_ in jobs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
    return summaries


def torchrun(n, args, run_dir: Path) -> dict:
    """One run on n ranks, alone; its summary.json."""
    return finish([launch(n, args, run_dir)])[0]


def gpu_sets(sizes: list[int]) -> list[str | None] | None:
    """Disjoint CUDA_VISIBLE_DEVICES for runs of these rank counts to go side by side, or None if this
    host has too few GPUs (then they go one after another). Without CUDA they go side by side on the
    CPU (a dry run: their losses, not their speed, are what is compared)."""
    import torch

    if not torch.cuda.is_available():
        return [None] * len(sizes)
    if sum(sizes) > torch.cuda.device_count():
        return None
    first = [sum(sizes[:i]) for i in range(len(sizes))]
    return [",".join(str(g) for g in range(f, f + k)) for f, k in zip(first, sizes)]


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def rel(a: dict, b: dict, step: int) -> float:
    """Loss curve a's relative difference from curve b at one step."""
    return abs(a[step] - b[step]) / abs(b[step])


def gap(a: dict, b: dict) -> float:
    """The largest relative difference of two loss curves over their common steps."""
    return max(rel(a, b, s) for s in a.keys() & b.keys())


def plot_trajectory(path: Path, ln: dict, l1: dict, floor: dict | None, n: int, title: str):
    """Left: the N-rank and 1-rank losses. Right: each step's relative gap, N ranks against 1 and, where
    measured, the noise floor (1 rank against itself with each micro-batch cut in two)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    steps = sorted(ln.keys() & l1.keys())
    left.plot(steps, [l1[s] for s in steps], label="1 rank, accumulating")
    left.plot(steps, [ln[s] for s in steps], "--", label=f"{n} ranks")
    left.set(xlabel="step", ylabel="training loss", title=title)
    left.legend()
    right.semilogy(steps, [max(rel(ln, l1, s), 1e-12) for s in steps], label=f"{n} ranks vs 1 rank")
    if floor:
        right.semilogy(steps, [max(rel(floor, l1, s), 1e-12) for s in steps], ":", label="noise floor: 1 rank, sums reordered")
    right.set(xlabel="step", ylabel="relative loss gap", title="gap per step (1e-12 = identical)")
    right.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def machine(run_dirs: list[Path]) -> list[str]:
    """The report's provenance lines: the device the runs trained on (their summaries say; not this
    process's, since `--device cpu` makes a dry run on a GPU host too), commit (train_speed's: LLMLABS_COMMIT
    first, since a lent machine's copy of the tree has no .git or a stale one), torch."""
    import torch

    devices = sorted({json.loads((d / "summary.json").read_text())["device"] for d in run_dirs})
    device = ", ".join(devices) + (f" ({os.cpu_count()} cores, gloo): a dry run, not a GPU figure" if "cpu" in devices else "")
    from train_speed import _commit  # bench/ is the script's own directory, first on sys.path

    return [f"- device: {device}", f"- commit: {_commit()}", f"- torch: {torch.__version__}"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a prepared data directory (preparing pysrc takes a minute)")
    p.add_argument("--ranks", default="1,2,4,8", help="comma-separated rank counts, 1 first")
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--rows", type=int, default=32, help="rows per GPU per micro-batch (the per-GPU batch)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20, help="steps of each scaling run")
    p.add_argument("--trajectory-steps", type=int, default=50)
    p.add_argument("--parts", default="scaling,trajectory,floor,resume")
    p.add_argument("--out-dir", type=Path, default=Path("bench/results/multi_gpu"))
    a, extra = p.parse_known_args()
    # flags this script sets for every run: given again, the last would win (or a budget cut runs short)
    if owned := sorted({x.split("=")[0] for x in extra} & {
            "--tokens", "--time-budget", "--target-flops", "--param-data-ratio", "--total-batch-size",
            "--device-batch-size", "--run-dir", "--eval-split", "--save-every", "--resume"}):
        p.error(f"{', '.join(owned)}: set by this script for every run (the batch from --rows and --ranks, the length "
                "from --steps and --trajectory-steps); drop them")
    ranks = [int(n) for n in a.ranks.split(",")]
    if ranks[0] != 1:
        p.error("--ranks must start at 1: efficiency and trajectory compare against one rank")
    per_gpu = a.rows * a.seq_len
    def common(rows):  # every run's flags, at `rows` rows per micro-batch
        return ["--data", a.data, "--depth", str(a.depth), "--seq-len", str(a.seq_len), "--device-batch-size", str(rows),
                "--eval-split", "none", *extra]
    parts = a.parts.split(",")
    if unknown := set(parts) - {"scaling", "trajectory", "floor", "resume"}:
        p.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose from scaling,trajectory,floor,resume")
    if "floor" in parts and a.rows < 2:
        p.error("--parts floor runs --rows cut in two: give --rows >= 2, or drop floor from --parts")
    out, report = a.out_dir, [f"# bench/multi_gpu.py, {time.strftime('%Y-%m-%d')}", "",
                              f"`PYTHONPATH=. python3 {' '.join(sys.argv)}`", ""]

    if "scaling" in parts:
        report += ["## scaling: the same per-GPU batch", "", "| ranks | batch tokens | tokens/s | MFU % | efficiency |",
                   "|---|---|---|---|---|"]
        base = None
        for n in ranks:
            batch = per_gpu * n
            s = torchrun(n, [*common(a.rows), "--total-batch-size", str(batch), "--tokens", str(batch * a.steps),
                             "--run-dir", str(out / f"scaling-{n}")], out / f"scaling-{n}")
            base = base or s["tok_per_sec"]
            mfu = s.get("mfu_percent")
            report.append(f"| {n} | {batch:,} | {s['tok_per_sec']:,.0f} | {'n/a' if mfu is None else mfu} | "
                          f"{s['tok_per_sec'] / (n * base):.3f} |")
        report.append("")

    n = ranks[-1]
    batch, steps = per_gpu * n, a.trajectory_steps
    traj = ["--total-batch-size", str(batch), "--tokens", str(batch * steps)]
    big, one, halves, cut = (out / f"trajectory-{n}", out / "trajectory-1", out / "trajectory-1-halves",
                             out / f"trajectory-{n}-cut")
    if "trajectory" in parts or "resume" in parts:
        torchrun(n, [*common(a.rows), *traj, "--save-every", str(steps // 2), "--run-dir", str(big)], big)
    # then the runs that only need their own GPUs go side by side: the one-rank run, the floor's, the resume
    side = []
    if "trajectory" in parts or "floor" in parts:
        side.append((1, [*common(a.rows), *traj, "--run-dir", str(one)], one))
    if "floor" in parts:  # the same rows a step, only the order of the sums changed
        side.append((1, [*common(a.rows // 2), *traj, "--run-dir", str(halves)], halves))
    if "resume" in parts and n > 1:
        shutil.rmtree(cut, ignore_errors=True)
        shutil.copytree(big, cut)
        for ck in (cut / "checkpoints").glob("step_*"):
            if int(ck.name.split("_")[1]) > steps // 2:
                shutil.rmtree(ck)
        (cut / "checkpoints" / "LATEST").write_text(f"step_{steps // 2:06d}")
        side.append((n // 2, ["--resume", str(cut)], cut))
    sets = gpu_sets([k for k, *_ in side])
    if sets is None:
        for k, args, run_dir in side:
            torchrun(k, args, run_dir)
    else:
        finish([launch(k, args, run_dir, gpus) for (k, args, run_dir), gpus in zip(side, sets)])

    ln = losses(big) if "trajectory" in parts else None
    l1 = losses(one) if "trajectory" in parts or "floor" in parts else None
    floor = losses(halves) if "floor" in parts else None
    if ln:
        report += ["## trajectory: the same total batch", "",
                   f"{n} ranks against 1 rank accumulating {n} micro-batches, {batch:,} tokens a step, {steps} steps: "
                   f"largest relative loss gap {gap(ln, l1):.2e} (step 1: {rel(ln, l1, 1):.2e}, "
                   f"step {steps}: {rel(ln, l1, steps):.2e}).", ""]
    if floor:
        report += [f"The noise floor, 1 rank with each micro-batch cut in two ({a.rows // 2} row{'s' * (a.rows > 3)} x "
                   f"{2 * n} accumulation steps) against 1 rank: largest relative gap {gap(floor, l1):.2e} (step 1: "
                   f"{rel(floor, l1, 1):.2e}, step {steps}: {rel(floor, l1, steps):.2e}).", ""]
    if ln:
        plot_trajectory(out / "trajectory.png", ln, l1, floor, n, f"d{a.depth}, {batch:,} tokens a step")
        report += ["trajectory.png: the losses, and each step's relative gap", ""]
    if "resume" in parts and n > 1:
        after = {s: v for s, v in losses(cut).items() if s > steps // 2}
        report += ["## resume on fewer ranks", "",
                   f"the {n}-rank run's step-{steps // 2} checkpoint finished on {n // 2} rank{'s' * (n > 2)}: largest relative loss "
                   f"gap after the cut against the uninterrupted run {gap(after, losses(big)):.2e} over {len(after)} steps", ""]
    ran = [*(out / f"scaling-{k}" for k in ranks if "scaling" in parts),
           *([big] if "trajectory" in parts or "resume" in parts else []), *(d for *_, d in side)]
    report[4:4] = [*machine(ran), ""]
    (out / "report.md").write_text("\n".join(report) + "\n")
    print("\n".join(report))


if __name__ == "__main__":
    main()
