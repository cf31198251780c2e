"""Does torch.compile fuse FP8's casts into the kernels that produce the operands? The FP8 issue's
check, on whatever device runs it: a small model's block matmuls converted (llmlabs/fp8.py), one
compiled training step, and the generated code's kernels that take an amax (abs + max: a dynamic
scale) listed with the ops fused beside it.

    PYTHONPATH=. python3 bench/fp8_fusion.py [--recipe tensorwise] [--depth 2] [--device cpu|cuda]

A kernel whose name also holds its operand's producer (rms_norm's mean/rsqrt, the MLP's relu, the
attention's output, a backward's sum/threshold) computes the scale and the float8 copy in the same
pass that makes the activation: the fusion FP8 needs to pay at these widths. One that holds only the
cast (abs, max, reciprocal, clamp, _to_copy) reads a tensor again just to cast it: a weight's cast is
such a kernel by nature (a parameter has no producer in the graph), an activation's should not be.
Kernel names are inductor's (its `fused_...` origins, truncated by the default name length; see
torch._inductor.config.triton.descriptive_names).
"""
import argparse
import re

import torch
from torch._inductor.utils import run_and_get_code

from llmlabs import fp8
from llmlabs.config import config_for_depth
from llmlabs.model import build_model

# rms_norm: on CUDA inductor keeps RMSNorm as one _fused_rms_norm op (fp8_fusion-h200-fb0eb45.log)
PRODUCERS = ("mean", "rsqrt", "rms_norm", "relu", "attention", "embedding", "threshold_backward", "sum", "sigmoid")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", choices=fp8.RECIPES, default="tensorwise")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch._inductor.config.triton.descriptive_names = "original_aten"
    torch._inductor.config.kernel_name_max_ops = 40
    cfg = config_for_depth(args.depth, vocab_size=256, sequence_len=256)
    model = build_model(cfg, args.device).bfloat16().train()
    layers = fp8.convert(model, args.recipe)
    idx = torch.randint(0, 256, (4, 256), device=args.device)
    step = torch.compile(model, fullgraph=True)
    _, codes = run_and_get_code(lambda: step(idx, idx).backward())
    print(f"{args.device}, torch {torch.__version__}, --fp8 {args.recipe}, d{args.depth}: {len(layers)} float8 layers")
    for graph, code in zip(("forward", "backward"), codes):
        kernels = sorted(set(re.findall(r"\b((?:cpp|triton)_\w*fused\w+)", code)))
        amax = [k for k in kernels if "abs" in k and "max" in k]
        with_producer = [k for k in amax if any(op in k for op in PRODUCERS)]
        print(f"\n{graph}: {code.count('_scaled_mm(')} float8 matmuls, {len(kernels)} generated kernels, {len(amax)} "
              f"taking an amax: {len(with_producer)} fused with their operand's producer, {len(amax) - len(with_producer)} cast only")
        for k in amax:
            print(f"  {'producer+cast' if k in with_producer else 'cast only    '}  {k[:150]}")


if __name__ == "__main__":
    main()
