"""The ReLU^2 MLP's forward + backward at a depth's real shapes, compiled: Inductor's fusion of the
composite (cuBLAS matmuls, the activation and its gradient as pointwise passes) against
triton_mlp (the activation inside two Triton matmuls' epilogues), which the model's compiled MLP runs;
then each of those two matmuls alone: cuBLAS without the epilogue, and each triton_mlp kernel.

    PYTHONPATH=. python3 bench/mlp_speed.py [--depth 8 12 20] [--out bench/results/mlp_speed-h200.jsonl]

Shapes come from the run `llmlabs train --depth D` would make on this GPU (train.resolve_config:
rows per micro-batch x seq len = M tokens), float32 weights and input under bf16 autocast, as in
training. FLOPs: 3 x (2 matmuls x 2 M C 4C); one matmul alone 2 M C 4C. Each time is the median of
--reps runs (CUDA events)."""
import argparse
import sys

import torch
import torch.nn.functional as F

from attention_speed import record, timed  # bench/ is the script's own directory, first on sys.path
from gemm_shapes import depth_run, header
from llmlabs.kernels import triton_mlp
from llmlabs.common import compute_init, peak_flops
from llmlabs.config import GPTConfig
from llmlabs.model import MLP


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, nargs="+", default=[8, 12, 20])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", help="append one JSON line per (depth, variant) to this file")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/mlp_speed.py times CUDA kernels: run it on a machine with a GPU")
    device, *_ = compute_init("cuda")
    peak = peak_flops(device)
    rows = []
    for depth in args.depth:
        cfg = depth_run(depth, device)
        C, M = depth * cfg["aspect_ratio"], cfg["device_batch_size"] * cfg["seq_len"]
        mlp = MLP(GPTConfig(n_embd=C), 0).cuda()
        torch.nn.init.normal_(mlp.c_proj.weight, std=C**-0.5)  # not the zero init: real gradients
        x = torch.randn(M, C, device="cuda").requires_grad_(True)
        dy = torch.randn(M, C, device="cuda", dtype=torch.bfloat16)
        w1, w2 = mlp.c_fc.weight, mlp.c_proj.weight
        variants = {"inductor": torch.compile(lambda x: F.linear(F.relu(F.linear(x, w1)).square(), w2), fullgraph=True),
                    "triton_mlp": torch.compile(mlp, fullgraph=True)}
        assert triton_mlp.usable(x.bfloat16(), w1), "triton_mlp does not take this shape"
        xb, w1b, w2b = x.detach().bfloat16(), w1.detach().bfloat16(), w2.detach().bfloat16()
        h = triton_mlp.KERNELS["pointer"](xb, w1b, True, triton_mlp.RELU2, None)
        alone = {"cublas": (lambda: xb @ w1b.t(), lambda: dy @ w2b)}  # the same matmuls, no epilogue
        for kernel, f in triton_mlp.KERNELS.items():
            alone[kernel] = (lambda f=f: f(xb, w1b, True, triton_mlp.RELU2, None),
                             lambda f=f: f(dy, w2b, False, triton_mlp.TIMES_2SQRT, h))
        for kernel, (fwd, bwd) in alone.items():
            for which, fn in (("forward relu2", fwd), ("backward 2sqrt(h)", bwd)):
                ms = timed(fn, args.reps)
                rows.append(dict(depth=depth, M=M, C=C, variant=f"matmul {which}: {kernel}", ms=round(ms, 3),
                                 tflops=round(8 * M * C * C / ms / 1e9, 1)))
        for name, f in variants.items():
            def step():
                with torch.autocast("cuda", torch.bfloat16):
                    y = f(x)
                y.backward(dy)
            ms = timed(step, args.reps)
            rows.append(dict(depth=depth, M=M, C=C, variant=name, ms=round(ms, 3),
                             tflops=round(48 * M * C * C / ms / 1e9, 1)))
        del x, dy, mlp, variants, xb, h
    record(args.out, header(peak), rows)
    print(f"{'depth':>5} {'M':>7} {'C':>5} {'variant':<34} {'ms':>8} {'TFLOP/s':>8}")
    for r in rows:
        print(f"{r['depth']:>5} {r['M']:>7} {r['C']:>5} {r['variant']:<34} {r['ms']:>8.3f} {r['tflops']:>8}")
    for tuner in (triton_mlp._matmul_kernel, triton_mlp._tma_kernel):  # the config each autotune kept
        for key, config in tuner.cache.items():
            print("autotuned:", tuner.fn.__name__, key[:4], config)


if __name__ == "__main__":
    main()
