"""Mixture-of-Experts against dense: the whole training step's tokens/s and MFU, in one process.

    PYTHONPATH=. python3 bench/moe_speed.py [--depths 8,12] [--steps 10] [--out bench/results/moe_speed-h200.jsonl]

For each depth the GPU preset's step runs twice through bench/train_speed.py's measure (train.setup,
the compiled model, the loop's own train_step): dense, then 8 routed experts top-2 + 1 shared in
every layer but the first, at the expert width where a token's active parameters match the dense
MLP's (GPTConfig.expert_width). MFU counts active-parameter FLOPs for both. The MoE issue's target
is MoE >= 0.85x the dense tokens/s. Extra arguments go to both runs (e.g. --moe-expert-width 512).
"""
import argparse
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
    train_speed.compare(variants, [int(d) for d in args.depths.split(",")], args.steps, args.warmup, args.out, extra)


if __name__ == "__main__":
    main()
