"""Mixture-of-Experts against dense: the whole training step's tokens/s and MFU, in one process.

    PYTHONPATH=. python3 bench/moe_speed.py [--depths 8,12] [--steps 10] [--pieces 4]
        [--out bench/results/moe_speed-h200.jsonl]

For each depth the GPU preset's step runs twice through bench/train_speed.py's measure (train.setup,
the compiled model, the loop's own train_step): dense, then 8 routed experts top-2 + 1 shared in
every layer but the first, at the expert width where a token's active parameters match the dense
MLP's (GPTConfig.expert_width). MFU counts active-parameter FLOPs for both. The MoE issue's target
is MoE >= 0.85x the dense tokens/s. Extra arguments go to both runs (e.g. --moe-expert-width 512).
--pieces 0,4: the MoE step once per value of moe.WGRAD_PIECES (the weight gradients' grouped matmul
in pieces per expert; 0: one group per expert), all against the one dense run. --torch-topk adds the
first of those routed by torch.topk (the routing before moe.top_k_indices), to time that change in
the same process.
"""
import torch

from llmlabs import moe

import train_speed  # bench/ is the script's own directory, first on sys.path


def main():
    p = train_speed.compare_parser(__doc__.splitlines()[0], "8,12", 10, 4)
    p.add_argument("--pieces", default=str(moe.WGRAD_PIECES), help="comma-separated moe.WGRAD_PIECES values")
    p.add_argument("--torch-topk", action="store_true", help="also the MoE step routed by torch.topk")
    args, extra = p.parse_known_args()
    flags = ["--moe-experts", "8", "--moe-top-k", "2", "--moe-shared", "1"]
    pieces = [int(v) for v in args.pieces.split(",")]
    top_k = moe.top_k_indices

    def setup(n, route):
        moe.WGRAD_PIECES, moe.top_k_indices = n, route

    variants = {"dense": []}
    for n in pieces:
        variants["moe" if len(pieces) == 1 else f"moe-p{n}"] = (flags, lambda n=n: setup(n, top_k))
    if args.torch_topk:
        variants[f"moe-p{pieces[0]}-topk"] = (flags, lambda: setup(pieces[0], lambda x, k: torch.topk(x, k, dim=-1).indices))
    train_speed.compare(variants, args, extra)


if __name__ == "__main__":
    main()
