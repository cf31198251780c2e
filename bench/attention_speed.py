"""Attention kernels alone, at the shapes of a training step: forward and forward + backward time of
each CUDA backend for full causal layers and for sliding-window layers.

    PYTHONPATH=. python3 bench/attention_speed.py [--batch 64 --seq-len 2048 --heads 4 --head-dim 128
        --window 1024] [--out bench/results/attention_speed-h200.jsonl]

The defaults are one micro-batch of the d8 experiment. TFLOP/s counts model FLOPs as the model's
exact count does (model.py, flops_per_token): 4 * D per (query, key) pair forward, twice that
backward, over the pairs each query really attends (causal, windowed); the backward's recomputation
is not counted. Each time is the median of --reps runs after 3 warm-up runs, timed with CUDA events.
Each backend's call is compiled (fullgraph) as the training step compiles it: FlexAttention called
eagerly, with its block mask rebuilt per call, ran ~2.4x slower than inside the compiled step.
"""
import argparse
import json
import statistics
import sys
import time

import torch

from llmlabs import attention as attn
from llmlabs.model import attended_pairs

BACKENDS = {"full": ["sdpa-cudnn", "sdpa-flash", "cudnn", "flash", "flex"], "window": ["cudnn", "flash", "flex"]}


def timed(fn, reps):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def record(path, head, rows):
    """Append each row, with the run's header fields, as a JSON line to `path` (if given); print the header."""
    if path:
        with open(path, "a") as f:
            for row in rows:
                f.write(json.dumps({**head, **row}) + "\n")
    print(json.dumps(head))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, help="default: = heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", help="append one JSON line per measurement to this file")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/attention_speed.py times CUDA kernels: run it on a machine with a GPU")
    B, T, H, D = args.batch, args.seq_len, args.heads, args.head_dim
    Hkv = args.kv_heads or H
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, T, h, D, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_(True)
               for h in (H, Hkv, Hkv))
    dout = torch.randn(B, T, H, D, device="cuda", generator=g, dtype=torch.bfloat16)
    scale = 1.44 / D**0.5
    rows = []
    for kind, window in (("full", None), ("window", args.window)):
        fwd_flop = 4 * D * H * B * attended_pairs(T, window)
        for backend in BACKENDS[kind]:
            attn.set_backend(backend)
            torch._dynamo.reset()  # the plan is a trace-time constant: no cached graph may outlive it
            call = torch.compile(lambda q, k, v, w=window: attn.attention(q, k, v, w, scale), fullgraph=True)
            try:
                with torch.no_grad():
                    fwd_ms = timed(lambda: call(q, k, v), args.reps)
                both_ms = timed(lambda: call(q, k, v).backward(dout), args.reps)
            except Exception as e:  # a backend this torch or GPU lacks: say so and go on
                rows.append(dict(kind=kind, backend=backend, error=f"{type(e).__name__}: {str(e)[:120]}"))
                continue
            rows.append(dict(kind=kind, backend=backend, used=attn.describe()[kind], fwd_ms=round(fwd_ms, 3),
                             fwd_bwd_ms=round(both_ms, 3), fwd_tflops=round(fwd_flop / fwd_ms / 1e9, 1),
                             fwd_bwd_tflops=round(3 * fwd_flop / both_ms / 1e9, 1)))
    attn.set_backend("auto")
    head = dict(date=time.strftime("%Y-%m-%d"), device=torch.cuda.get_device_name(), torch=torch.__version__,
                command="PYTHONPATH=. python3 " + " ".join(sys.argv), B=B, T=T, H=H, Hkv=Hkv, D=D, window=args.window)
    record(args.out, head, rows)
    print(f"{'kind':<7} {'backend':<11} {'fwd ms':>8} {'fwd TF/s':>9} {'f+b ms':>8} {'f+b TF/s':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['kind']:<7} {r['backend']:<11} {r['error']}")
        else:
            print(f"{r['kind']:<7} {r['backend']:<11} {r['fwd_ms']:>8} {r['fwd_tflops']:>9} {r['fwd_bwd_ms']:>8} "
                  f"{r['fwd_bwd_tflops']:>9}")


if __name__ == "__main__":
    main()
