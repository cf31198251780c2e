"""Mixture-of-Experts against dense: the whole training step's tokens/s and MFU, in one process.

    PYTHONPATH=. python3 bench/moe_speed.py [--depths 8,12] [--steps 10] [--out bench/results/moe_speed-h200.jsonl]

For each depth the GPU preset's step runs twice through bench/train_speed.py's measure (train.setup,
the compiled model, the loop's own train_step): dense, then 8 routed experts top-2 + 1 shared in
every layer but the first, at the expert width where a token's active parameters match the dense
MLP's (GPTConfig.expert_width). MFU counts active-parameter FLOPs for both. The MoE issue's target
is MoE >= 0.85x the dense tokens/s. Extra arguments go to both runs (e.g. --moe-expert-width 512).
"""
import train_speed  # bench/ is the script's own directory, first on sys.path


def main():
    args, extra = train_speed.compare_parser(__doc__.splitlines()[0], "8,12", 10, 4).parse_known_args()
    variants = {"dense": [], "moe": ["--moe-experts", "8", "--moe-top-k", "2", "--moe-shared", "1"]}
    train_speed.compare(variants, args, extra)


if __name__ == "__main__":
    main()
