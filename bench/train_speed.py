"""Training speed of the real step (loader, compiled model, optimizer, accumulation) on a GPU.

    PYTHONPATH=. python3 bench/train_speed.py --depth 8 [--device-batch-size 64] [--steps 20]
        [--profile] [--out bench/results/train_speed-h100.json]

It builds the run exactly as `llmlabs train` does (train.resolve_config + train.setup, the GPU
preset with --depth changed) and times train.train_step, the loop's own step, after warm-up steps
that hold the compilation. Reports the median step: tokens/s, MFU in two conventions (the model's
exact count, and nanochat/autoresearch's, which counts full windows and no causal halving), peak
memory, the attention backend per layer kind, and this GPU's own speed (a bf16 matmul and a copy):
machines of one kind differ by 2-3% (bench/NOTES.md rounds 9 and 10), so a step time is read
beside them. --profile prints the 40 costliest CUDA kernels of
3 profiled steps: where the time goes, before deciding what to speed up (bench/NOTES.md).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from attention_speed import timed  # bench/ is the script's own directory, first on sys.path
from llmlabs import attention, train
from llmlabs.common import compute_init, peak_flops


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    train.add_args(p)  # every `llmlabs train` flag means the same here
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--profile", action="store_true", help="print the costliest CUDA kernels of 3 steps")
    p.add_argument("--out", help="append the result as a JSON line to this file")
    return p


def main():
    res = measure(parser().parse_args(), "PYTHONPATH=. python3 " + " ".join(sys.argv))
    width = max(map(len, res))
    print("\n".join(f"{k:<{width}}  {v}" for k, v in res.items()))


def measure(args, command) -> dict:
    """One configuration's step, timed; the result dict (also appended to args.out)."""
    device, rank, _, world = compute_init(args.device)
    cfg = train.resolve_config(args, device)
    run = train.setup(cfg, device, rank, world)
    use_cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda else torch.autocast("cpu", enabled=False)
    fwd = torch.compile(run.model, fullgraph=True) if use_cuda and not args.no_compile else run.model
    sync = torch.cuda.synchronize if use_cuda else (lambda: None)

    def step():
        return train.train_step(fwd, run.model, run.optimizer, run.loader, run.accum, autocast, world)[0].item()

    t0 = time.time()
    for _ in range(args.warmup):
        step()
    warm_s = time.time() - t0
    times = []
    for _ in range(args.steps):
        sync()
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    dt = statistics.median(times)
    tok_s = cfg["total_batch_size"] / dt
    peak = peak_flops(device)
    res = {
        "date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if use_cuda else "cpu",
        "commit": _commit(), "command": command,
        "torch": torch.__version__, "depth": cfg["depth"], "width": run.mcfg.n_embd, "seq_len": cfg["seq_len"],
        "window_pattern": cfg["window_pattern"], "total_batch_size": cfg["total_batch_size"],
        "device_batch_size": cfg["device_batch_size"], "accum": run.accum,
        "params_M": round(run.counts["total"] / 1e6, 2), "active_params_M": round(run.model.active_params() / 1e6, 2),
        "median_step_ms": round(1e3 * dt, 1), "min_step_ms": round(1e3 * min(times), 1),
        "max_step_ms": round(1e3 * max(times), 1), "tok_per_sec": round(tok_s),
        "mfu_exact": round(100 * run.flops_per_token * tok_s / peak, 2) if peak else None,
        "mfu_nanochat": round(100 * run.model.flops_per_token("nanochat") * tok_s / peak, 2) if peak else None,
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if use_cuda else None,
        "warmup_s": round(warm_s, 1), "attention": attention.describe(),
        "moe": train._describe_moe(run.mcfg) if run.mcfg.moe_experts else None, "fp8": cfg.get("fp8"),
    }
    if use_cuda:
        res.update(machine_speed())
    if args.profile and use_cuda:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
        events = prof.key_averages()
        # GPU busy time: the step's wall time minus this is time the GPU waited for the host
        res["kernel_ms_per_step"] = round(sum(e.self_device_time_total for e in events) / 3e3, 1)
        print(events.table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(res) + "\n")
    return res


def compare_parser(description: str, depths: str, steps: int, warmup: int) -> argparse.ArgumentParser:
    """The flags of a script built on compare (moe_speed.py, fp8_speed.py); unknown ones go to every run."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--depths", default=depths, help="comma-separated depths")
    p.add_argument("--steps", type=int, default=steps, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed steps (compilation) per configuration")
    p.add_argument("--out", help="append each result as a JSON line to this file")
    return p


def compare(variants: dict, args, extra=()) -> list:
    """Each variant (name -> extra train flags, or (flags, a function called before the run)) at each
    of args.depths, one after another in this process, each compiled from scratch; prints a line per
    run and a table whose last column is tokens/s relative to the depth's first variant. Returns
    [(depth, name, result)]."""
    import gc

    if not torch.cuda.is_available():
        sys.exit(f"{sys.argv[0]} measures a CUDA GPU: torch sees none here")
    depths, steps, warmup, out = [int(d) for d in args.depths.split(",")], args.steps, args.warmup, args.out
    rows = []
    for depth in depths:
        for name, flags in variants.items():
            if isinstance(flags, tuple):
                flags, before = flags
                before()
            argv = ["--depth", str(depth), "--steps", str(steps), "--warmup", str(warmup), *flags, *extra]
            res = measure(parser().parse_args(argv + (["--out", out] if out else [])),
                          "PYTHONPATH=. python3 " + " ".join(sys.argv) + f"  # {name} d{depth}")
            rows.append((depth, name, res))
            print(f"d{depth} {name}: {res['tok_per_sec']:,} tokens/s, MFU {res['mfu_exact']}%, "
                  f"{res['median_step_ms']} ms a step, {res['peak_mem_gb']} GB", flush=True)
            gc.collect()  # the next configuration compiles and allocates from scratch
            torch._dynamo.reset()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    first = next(iter(variants))
    print(f"\n{'depth':>5} {'variant':>10} {'step ms':>8} {'tokens/s':>10} {'MFU %':>6} {'peak GB':>7} "
          f"{'active M':>8} {'total M':>8} {'x ' + first:>10}")
    base = {d: r["tok_per_sec"] for d, n, r in rows if n == first}
    for depth, name, r in rows:
        print(f"{depth:>5} {name:>10} {r['median_step_ms']:>8} {r['tok_per_sec']:>10,} {r['mfu_exact']:>6} "
              f"{r['peak_mem_gb']:>7} {r['active_params_M']:>8} {r['params_M']:>8} {r['tok_per_sec'] / base[depth]:>10.3f}")
    return rows


def machine_speed(reps=20):
    """The GPU's bf16 matmul rate (8192^3, TFLOP/s) and copy bandwidth (1 GiB, read + write TB/s),
    medians of `reps` CUDA-event-timed runs: the yardsticks for comparing step times across machines."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms_mm, ms_copy = timed(lambda: a @ b, reps), timed(lambda: dst.copy_(src), reps)
    return {"gpu_matmul_tflops": round(2 * 8192**3 / ms_mm / 1e9, 1), "gpu_copy_tbs": round(2 * 2**30 / ms_copy / 1e9, 2)}


def _commit():
    if os.environ.get("LLMLABS_COMMIT"):  # a copy of the tree without .git (e.g. a lent GPU machine)
        return os.environ["LLMLABS_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
