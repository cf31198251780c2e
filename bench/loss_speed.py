"""The Triton loss kernel (llmlabs/kernels/triton_loss.py) alone on a GPU: ms a call and the bandwidth it
reaches at one micro-batch's logits, then its error against float64 on the same logits at several
scales (times the cap), bf16 logits by default (the approximate tanh), float32 with --dtype fp32.

    PYTHONPATH=. python3 bench/loss_speed.py [--rows 262144] [--vocab 8192] [--out bench/results/loss_speed-h200.jsonl]

262,144 rows = d8's micro-batch (128 x 2048). Traffic: the logits read once and dz written once.
Errors: the loss's largest deviation and its mean (a bias would shift a training curve), and dz's
largest deviation over its largest magnitude, over 4,096 rows. For an older kernel, run this from
the newer tree with PYTHONPATH pointing at the older one (its triton_loss._launch takes the same
arguments)."""
import argparse
import sys

import torch
import torch.nn.functional as F

from attention_speed import record, timed  # bench/ is the script's own directory, first on sys.path
from gemm_shapes import header
from llmlabs.kernels import triton_loss


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=262144)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--cap", type=float, default=15.0)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--out", help="append one JSON line per measurement to this file")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/loss_speed.py times a CUDA kernel: run it on a machine with a GPU")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    g = torch.Generator(device="cuda").manual_seed(0)
    targets = torch.randint(0, args.vocab, (args.rows,), device="cuda", generator=g)
    targets[::97] = -1
    z = (torch.randn(args.rows, args.vocab, device="cuda", generator=g) * 4).to(dtype)
    ms = timed(lambda: triton_loss._launch(z, targets, args.cap), args.reps)
    tbs = 2 * z.numel() * z.element_size() / ms / 1e9
    rows = [dict(kind="speed", rows=args.rows, vocab=args.vocab, dtype=args.dtype, ms=round(ms, 3), tbs=round(tbs, 2))]
    print(f"{args.rows} x {args.vocab} {args.dtype}: {ms:.3f} ms a call, {tbs:.2f} TB/s")
    del z
    n = min(4096, args.rows)
    for scale in (0.1, 0.3, 1.0, 1.3, 4.0):
        z = (torch.randn(n, args.vocab, device="cuda", generator=g, dtype=torch.float64) * scale * args.cap).to(dtype)
        loss, dz = triton_loss._launch(z, targets[:n], args.cap)
        z64 = z.double().requires_grad_(True)
        ref = F.cross_entropy(args.cap * torch.tanh(z64 / args.cap), targets[:n], ignore_index=-1, reduction="none")
        ref.sum().backward()
        err = (loss.double() - ref)
        row = dict(kind="error", scale=scale, dtype=args.dtype, loss_max=err.abs().max().item(), loss_mean=err.mean().item(),
                   dz_max_rel=((dz.double() - z64.grad).abs().max() / z64.grad.abs().max()).item())
        rows.append(row)
        print(f"logits ~ N(0, ({scale} cap)^2): loss error max {row['loss_max']:.2e}, mean {row['loss_mean']:+.2e}; "
              f"dz error max / max |dz| {row['dz_max_rel']:.2e}")
    record(args.out, header(None), rows)


if __name__ == "__main__":
    main()
