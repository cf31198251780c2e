"""Every execution plan cuDNN offers for one attention layer's forward and backward, timed: is the
plan that llmlabs/kernels/cudnn_attention.py runs (heuristic A's first) the fastest one?

    PYTHONPATH=. python3 bench/cudnn_plans.py [--batch 64 --seq-len 2048 --heads 4 --head-dim 128
        --window 1024] [--out bench/results/cudnn_plans-h200.jsonl]

The defaults are one micro-batch of a d8 window layer; --window 0 times a full causal layer. Each
time is the median of 10 runs after 3 warm-up runs (CUDA events). Needs cudnn-frontend."""
import argparse
import sys
import time

import torch

from attention_speed import record, timed  # bench/ is the script's own directory, first on sys.path
from llmlabs.kernels import cudnn_attention as ca


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--window", type=int, default=1024, help="0 = full causal")
    p.add_argument("--out", help="append one JSON line per plan to this file")
    args = p.parse_args()
    if not torch.cuda.is_available() or not ca.usable(torch.bfloat16):
        sys.exit("bench/cudnn_plans.py needs a CUDA GPU and cudnn-frontend (pip install nvidia-cudnn-frontend)")
    B, T, H, D = args.batch, args.seq_len, args.heads, args.head_dim
    window, scale = args.window or None, 1.44 / D**0.5
    q, k, v, do = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    o, stats = ca._forward(q, k, v, window, scale)  # the real forward, so the backward reads real stats
    passes = {"forward": dict(q=q, k=k, v=v, o=torch.empty_like(q), stats=torch.empty_like(stats)),
              "backward": dict(q=q, k=k, v=v, o=o, do=do, stats=stats, dq=torch.empty_like(q),
                               dk=torch.empty_like(k), dv=torch.empty_like(v))}
    head = dict(date=time.strftime("%Y-%m-%d"), device=torch.cuda.get_device_name(), torch=torch.__version__,
                command="PYTHONPATH=. python3 " + " ".join(sys.argv), B=B, T=T, H=H, D=D, window=window)
    rows = []
    for name, tensors in passes.items():
        g, t = ca._graph(tensors, window, scale, backward=name == "backward")
        g.build_plans(ca.cudnn.build_plan_policy.ALL)
        pack = {t[n]: x for n, x in tensors.items()}
        for i in range(g.get_execution_plan_count()):
            try:
                ws = torch.empty(g.get_workspace_size_plan_at_index(i), device="cuda", dtype=torch.uint8)
                ms = timed(lambda: g.execute_plan_at_index(pack, ws, i, handle=ca._handle()), 10)
                rows.append(dict(pass_=name, plan=i, name=g.get_plan_name_at_index(i), ms=round(ms, 3)))
            except Exception as e:  # a plan that did not build or refuses to run: say so, go on
                rows.append(dict(pass_=name, plan=i, error=f"{type(e).__name__}: {str(e)[:100]}"))
    record(args.out, head, rows)
    print(f"{'pass':<9} {'plan':>4} {'ms':>8}  name (plan 0: heuristic A's first, which cudnn_attention.py runs)")
    for r in rows:
        print(f"{r['pass_']:<9} {r['plan']:>4} {r.get('ms', '-'):>8}  {r.get('name', r.get('error'))}")


if __name__ == "__main__":
    main()
