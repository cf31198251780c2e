"""Mixture-of-Experts against dense: the whole training step's tokens/s and MFU, in one process.

    PYTHONPATH=. python3 bench/moe_speed.py [--depths 8,12] [--steps 10] [--out bench/results/moe_speed-h200.jsonl]

For each depth the GPU preset's step runs twice through bench/train_speed.py's measure (train.setup,
the compiled model, the loop's own train_step): dense, then 8 routed experts top-2 + 1 shared in
every layer but the first, at the expert width where a token's active parameters match the dense
MLP's (GPTConfig.expert_width). MFU counts active-parameter FLOPs for both. The MoE issue's target
is MoE >= 0.85x the dense tokens/s. Extra arguments go to both runs (e.g. --moe-expert-width 512).
"""
import argparse
import gc
import sys

import torch

import train_speed  # bench/ is the script's own directory, first on sys.path


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", default="8,12", help="comma-separated depths")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=4, help="untimed steps (compilation) per configuration")
    p.add_argument("--out", help="append each result as a JSON line to this file")
    args, extra = p.parse_known_args()
    if not torch.cuda.is_available():
        sys.exit("bench/moe_speed.py measures a CUDA GPU: torch sees none here")
    variants = {"dense": [], "moe": ["--moe-experts", "8", "--moe-top-k", "2", "--moe-shared", "1"]}
    rows = []
    for depth in [int(d) for d in args.depths.split(",")]:
        for name, flags in variants.items():
            argv = ["--depth", str(depth), "--steps", str(args.steps), "--warmup", str(args.warmup), *flags, *extra]
            if args.out:
                argv += ["--out", args.out]
            res = train_speed.measure(train_speed.parser().parse_args(argv),
                                      "PYTHONPATH=. python3 " + " ".join(sys.argv) + f"  # {name} d{depth}")
            rows.append((depth, name, res))
            print(f"d{depth} {name}: {res['tok_per_sec']:,} tokens/s, MFU {res['mfu_exact']}%, "
                  f"{res['median_step_ms']} ms a step, {res['peak_mem_gb']} GB, {res['moe'] or 'dense MLP'}", flush=True)
            gc.collect()  # the next configuration compiles and allocates from scratch
            torch._dynamo.reset()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    print(f"\n{'depth':>5} {'variant':>7} {'step ms':>8} {'tokens/s':>10} {'MFU %':>6} {'peak GB':>7} "
          f"{'active M':>8} {'total M':>8} {'x dense':>7}")
    dense = {d: r["tok_per_sec"] for d, n, r in rows if n == "dense"}
    for depth, name, r in rows:
        print(f"{depth:>5} {name:>7} {r['median_step_ms']:>8} {r['tok_per_sec']:>10,} {r['mfu_exact']:>6} "
              f"{r['peak_mem_gb']:>7} {r['active_params_M']:>8} {r['params_M']:>8} {r['tok_per_sec'] / dense[depth]:>7.3f}")


if __name__ == "__main__":
    main()
