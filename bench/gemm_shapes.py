"""The matmuls of one transformer block's training step, timed alone at a depth's real shapes: which
of them run far below the GPU's matmul peak, and does stacking q, k and v into one matmul help?

    PYTHONPATH=. python3 bench/gemm_shapes.py [--depth 8 12 20] [--out bench/results/gemm_shapes-h200.jsonl]

Shapes come from the run `llmlabs train --depth D` would make on this GPU (train.resolve_config:
rows per micro-batch x seq len = M tokens, width, kv width). Each weight W [N, K] gets its three
matmuls in the layouts nn.Linear's autograd uses: forward x @ W^T, input gradient dy @ W, weight
gradient dy^T @ x, all bf16 with a bf16 output, as under autocast. q, k and v are timed both as
three matmuls and as one over the stacked [3 N, K] weight: what a fused q/k/v projection would run
(tried in the training step and dropped: bench/NOTES.md round 6).
Each time is the median of --reps runs after 3 warm-up runs (CUDA events), for both of cuBLAS's
entry points (torch.backends.cuda.preferred_blas_library: cublas and cublaslt)."""
import argparse
import sys
import time

import torch

from attention_speed import record, timed  # bench/ is the script's own directory, first on sys.path
from train_speed import _commit
from llmlabs import train
from llmlabs.common import compute_init, peak_flops
from llmlabs.config import config_for_depth


def block_weights(c):
    """name -> (N, K) of every matmul weight in one block, q/k/v both apart and stacked."""
    kv = c.n_kv_head * c.head_dim
    q = c.n_head * c.head_dim
    return {"q": (q, c.n_embd), "k": (kv, c.n_embd), "v": (kv, c.n_embd), "qkv": (q + 2 * kv, c.n_embd),
            "attn_proj": (c.n_embd, q), "mlp_fc": (4 * c.n_embd, c.n_embd), "mlp_proj": (c.n_embd, 4 * c.n_embd)}


def depth_run(depth, device) -> dict:
    """The configuration `llmlabs train --depth D` resolves to on this GPU (rows, seq len, widths)."""
    parser = argparse.ArgumentParser()
    train.add_args(parser)
    return train.resolve_config(parser.parse_args(["--depth", str(depth)]), device)


def header(peak) -> dict:
    """The fields each JSON line starts with: date, device, torch, commit, the exact command, peak."""
    return dict(date=time.strftime("%Y-%m-%d"), device=torch.cuda.get_device_name(), torch=torch.__version__,
                commit=_commit(), command="PYTHONPATH=. python3 " + " ".join(sys.argv),
                peak_tflops=peak / 1e12 if peak else None)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, nargs="+", default=[8, 12, 20])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", help="append one JSON line per matmul to this file")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gemm_shapes.py times CUDA matmuls: run it on a machine with a GPU")
    device, *_ = compute_init("cuda")
    peak = peak_flops(device)
    rows = []
    for depth in args.depth:
        cfg = depth_run(depth, device)
        c = config_for_depth(depth, sequence_len=cfg["seq_len"], aspect_ratio=cfg["aspect_ratio"],
                             head_dim=cfg["head_dim"])
        M = cfg["device_batch_size"] * cfg["seq_len"]
        for name, (N, K) in block_weights(c).items():
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
            dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
            passes = {"forward": lambda: x @ w.t(), "input_grad": lambda: dy @ w, "weight_grad": lambda: dy.t() @ x}
            for blas in ("cublas", "cublaslt"):
                torch.backends.cuda.preferred_blas_library(blas)
                for kind, fn in passes.items():
                    ms = timed(fn, args.reps)
                    rows.append(dict(depth=depth, M=M, N=N, K=K, weight=name, blas=blas, matmul=kind,
                                     ms=round(ms, 4), tflops=round(2 * M * N * K / ms / 1e9, 1)))
            del x, w, dy
    torch.backends.cuda.preferred_blas_library("default")
    record(args.out, header(peak), rows)
    print(f"{'depth':>5} {'M':>7} {'weight':<10} {'N x K':>11} {'blas':<9} {'fwd TF/s':>9} {'dx TF/s':>8} {'dW TF/s':>8}"
          f" {'3 ms':>7}")
    for i in range(0, len(rows), 3):
        f, d, w = rows[i:i + 3]
        shape = f"{f['N']}x{f['K']}"
        print(f"{f['depth']:>5} {f['M']:>7} {f['weight']:<10} {shape:>11} {f['blas']:<9} "
              f"{f['tflops']:>9} {d['tflops']:>8} {w['tflops']:>8} {f['ms'] + d['ms'] + w['ms']:>7.3f}")
    for depth in args.depth:  # the block's q/k/v matmuls, three apart against one stacked, per library
        for blas in ("cublas", "cublaslt"):
            ms = lambda names: sum(r["ms"] for r in rows if r["depth"] == depth and r["blas"] == blas
                                   and r["weight"] in names)
            print(f"d{depth} {blas:<9} q,k,v apart {ms(('q', 'k', 'v')):.3f} ms, stacked {ms(('qkv',)):.3f} ms; "
                  f"whole block apart {ms(('q', 'k', 'v', 'attn_proj', 'mlp_fc', 'mlp_proj')):.3f} ms")


if __name__ == "__main__":
    main()
