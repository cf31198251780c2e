"""Where MoE's grouped matmuls stand, outside the training step: at the d8 MoE shape (8 experts, width
512 -> 704, 128 x 2048 tokens top-2 = 524,288 rows), one H200.

    PYTHONPATH=. python3 bench/moe_grouped_mm.py [--compile] [--skew 1,1.5,2,3]

1. torch's grouped_mm in every layout the MoE layer's forward and backward use (the forward as
   moe.py calls it, the data gradient, the weight gradient as autograd computes it and transposed),
   against one dense matmul of the same FLOPs; equal groups, CUDA events, 20 calls each.
2. The MoE layer itself (llmlabs.moe.MoE, eager, bf16 autocast, real routing of random inputs):
   forward + backward under torch.profiler, each grouped_mm and mm call by input shape; --compile
   runs the layer through torch.compile (fullgraph) as training does.
Compare (2) with the grouped_mm kernels in `bench/train_speed.py --profile` of a compiled MoE step:
there one grouped_mm kernel took twice the time of the eager calls (moe_grouped_mm-h200-a00384c.log),
and the layer compiled alone does not (moe_grouped_mm_compile-h200-fb0eb45.log: 0.60-0.72 ms each).
3. --skew: forward, data and weight gradient at uneven expert loads (the training step routes real
   text, not random inputs; its load is logged per step as moe_load_max in metrics.jsonl), and the
   weight gradient as moe.py computes it, in 2, 4 or 8 pieces per expert's share (moe.WGRAD_PIECES),
   checked against the one-group-per-expert result.
"""
import argparse

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from llmlabs.config import GPTConfig
from llmlabs.moe import MoE, weight_grad

gmm = getattr(F, "grouped_mm", None) or torch._grouped_mm
E, C, H, R = 8, 512, 704, 2 * 128 * 2048


def timed(f, n=20):
    for _ in range(3):
        f()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    s.record()
    for _ in range(n):
        f()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / n


def layouts():
    bf = torch.bfloat16
    offs = torch.cumsum(torch.full((E,), R // E), 0).to(torch.int32).cuda()
    x, dy = torch.randn(R, C, device="cuda", dtype=bf), torch.randn(R, H, device="cuda", dtype=bf)
    w = torch.randn(E, H, C, device="cuda", dtype=bf) * 0.02
    wt = w.transpose(1, 2).contiguous()
    cases = {
        "fwd x@w.T(view)": lambda: gmm(x, w.transpose(1, 2), offs=offs),
        "fwd x@wt(contig)": lambda: gmm(x, wt, offs=offs),
        "dgrad dy@w (C out)": lambda: gmm(dy, w, offs=offs),
        "wgrad x.T(view)@dy ->[E,C,H]": lambda: gmm(x.t(), dy, offs=offs),
        "wgrad dy.T(view)@x ->[E,H,C]": lambda: gmm(dy.t(), x, offs=offs),
        "wgrad x.T.contig@dy": lambda: gmm(x.t().contiguous(), dy, offs=offs),
        "wgrad dy.T.contig@x": lambda: gmm(dy.t().contiguous(), x, offs=offs),
        "transpose copy x": lambda: x.t().contiguous(),
        "dense mm x@W [C,8H/8]": lambda: x @ wt[0],
        "dense wgrad x.T@dy (one big)": lambda: x.t() @ dy,
    }
    print(f"{'case':32} {'ms':>7} {'TFLOP/s':>8}")
    for name, f in cases.items():
        ms = timed(f)
        print(f"{name:32} {ms:7.3f} {2 * R * C * H / ms / 1e9:8.1f}")


def skewed(ratios):
    """The three training layouts at uneven loads: expert 0 takes `ratio` times the mean rows, the
    others share the rest. A forward or data-gradient tile covers rows of one expert, so its work
    spreads over the SMs whatever the split; a weight-gradient tile sums over all of one expert's
    rows, so the busiest expert's tiles set that kernel's time (8 experts x 24 tiles of [512, 704]:
    1.5 waves of 132 SMs, little to hide the longest behind)."""
    bf = torch.bfloat16
    x, dy = torch.randn(R, C, device="cuda", dtype=bf), torch.randn(R, H, device="cuda", dtype=bf)
    w = torch.randn(E, H, C, device="cuda", dtype=bf) * 0.02
    pieces = [2, 4, 8]
    print(f"\n{'max/mean load':>13} {'fwd ms':>7} {'dgrad ms':>8} {'wgrad ms':>8} "
          + " ".join(f"{f'x{p} pieces':>9}" for p in pieces) + "  (moe.weight_grad: the weight gradient in pieces)")
    for r in ratios:
        big = int(R / E * r) // 16 * 16
        rest = (R - big) // (E - 1) // 16 * 16
        sizes = [big] + [rest] * (E - 2) + [R - big - rest * (E - 2)]
        offs = torch.cumsum(torch.tensor(sizes), 0).to(torch.int32).cuda()
        ms = [timed(lambda: gmm(x, w.transpose(1, 2), offs=offs)), timed(lambda: gmm(dy, w, offs=offs)),
              timed(lambda: gmm(dy.t(), x, offs=offs))]
        for p in pieces:
            chunk = -(-R // (E * p * 16)) * 16
            ref = weight_grad(dy, x, offs, 0).float()
            err = ((weight_grad(dy, x, offs, chunk) - ref).abs().max() / ref.abs().max()).item()
            assert err < 1e-2, f"pieces x{p} at load {r}: relative error {err:.2e}"
            ms.append(timed(lambda: weight_grad(dy, x, offs, chunk)))
        print(f"{max(sizes) * E / R:13.2f} {ms[0]:7.3f} {ms[1]:8.3f} {ms[2]:8.3f} " + " ".join(f"{m:9.3f}" for m in ms[3:]))


def moe_layer(compiled: bool):
    cfg = GPTConfig(sequence_len=2048, vocab_size=8192, n_layer=8, n_embd=C, n_head=4, n_kv_head=4, head_dim=128,
                    moe_experts=E, moe_top_k=2, moe_shared=1)
    m = MoE(cfg, 1).cuda()
    m.init_weights()
    with torch.no_grad():
        m.w_proj.normal_(0, 0.02)  # zero at init: its gradients would still flow, but the output would not
    x = torch.randn(128, 2048, C, device="cuda", requires_grad=True)
    layer = torch.compile(m, fullgraph=True) if compiled else m

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        y.float().square().mean().backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    for e in sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.device_time_total):
        if "grouped" in e.key or "mm" == e.key[-2:]:
            print(f"{e.key[:22]:22} {e.count:3} {e.device_time_total / e.count / 1e3:7.3f} ms {str(e.input_shapes)[:150]}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compile", action="store_true", help="profile the MoE layer compiled, as training runs it")
    p.add_argument("--skew", default="1,1.5,2,3",
                   help="comma-separated max/mean expert loads to time the grouped matmuls at ('' for none)")
    args = p.parse_args()
    torch.manual_seed(0)
    layouts()
    if args.skew:
        skewed([float(r) for r in args.skew.split(",")])
    moe_layer(args.compile)
