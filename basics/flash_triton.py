"""FlashAttention forward and backward as Triton kernels, checked against SDPA on a CUDA GPU.

Shows: basics/attention.py's tiled loop as GPU kernels (FlashAttention, arXiv 2205.14135; the
loop order and the single final division of FlashAttention-2, arXiv 2307.08691), causal only.
- forward: one program per (block of BLOCK_M queries, batch x head). q stays in registers; key and
  value blocks stream past it with an online softmax (running max m, running sum l, output
  accumulator rescaled when the max grows), in exp2 with log2(e) folded into the scale. Key blocks
  past the query block's diagonal are never loaded. It stores O and one number per query, the
  logsumexp L, instead of the T x T probabilities.
- backward: P = exp(S - L) is recomputed tile by tile from q, k and L (no T x T matrix in memory,
  as in the forward). With dO the output's gradient and D_i = sum_d dO_id O_id (= sum_j P_ij dP_ij):
      dV = P^T dO,   dP = dO V^T,   dS = P * (dP - D),   dQ = scale dS K,   dK = scale dS^T Q.
  Two kernels, so no two programs add into the same memory: one per key block (loops over the
  query blocks that see it, accumulates dK and dV), one per query block (loops over its key
  blocks, accumulates dQ).
Checked against F.scaled_dot_product_attention: outputs and the gradients of q, k and v, in fp16
and bf16, against SDPA in float64 on the same inputs, next to SDPA's own error in the same dtype. The lab's fast
version is llmlabs/attention.py (FA3 / cuDNN / FlashAttention-2 / FlexAttention behind one call);
the lab's own Triton kernels are in llmlabs/kernels/.

    python basics/flash_triton.py     # needs a CUDA GPU and Triton (CUDA builds of PyTorch ship it)"""
import math
import sys

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    sys.exit("flash_triton.py needs a CUDA GPU and Triton (which comes with CUDA builds of PyTorch)")


@triton.jit
def _forward(Q, K, V, O, L, scale, T, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, bh = tl.program_id(0) * BLOCK_M, tl.program_id(1).to(tl.int64)
    base = bh * T * HEAD_DIM  # q, k, v, o are contiguous [B*H, T, D]
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + base + rows[:, None] * HEAD_DIM + dims[None, :], mask=rows[:, None] < T, other=0.0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (log2 units)
    l = tl.zeros([BLOCK_M], tl.float32)                 # running row sum
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    qk_scale = scale * 1.4426950408889634  # exp(x) = exp2(x log2 e): exp2 is the GPU's native instruction
    for start_n in range(0, tl.minimum(start_m + BLOCK_M, T), BLOCK_N):  # causal: stop at the diagonal
        cols = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(K + base + cols[:, None] * HEAD_DIM + dims[None, :], mask=cols[:, None] < T, other=0.0)
        v = tl.load(V + base + cols[:, None] * HEAD_DIM + dims[None, :], mask=cols[:, None] < T, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where((rows[:, None] >= cols[None, :]) & (cols[None, :] < T), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))  # finite: every row sees key 0 in the first block
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m - m_new)      # rescales the old sums to the new max (0 the first time)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    acc = acc / l[:, None]
    tl.store(O + base + rows[:, None] * HEAD_DIM + dims[None, :], acc.to(O.dtype.element_ty), mask=rows[:, None] < T)
    tl.store(L + bh * T + rows, m + tl.math.log2(l), mask=rows < T)  # logsumexp, log2 units


@triton.jit
def _backward_dkdv(Q, K, V, dO, L, Delta, dK, dV, scale, T,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n, bh = tl.program_id(0) * BLOCK_N, tl.program_id(1).to(tl.int64)
    base = bh * T * HEAD_DIM
    cols = start_n + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    k = tl.load(K + base + cols[:, None] * HEAD_DIM + dims[None, :], mask=cols[:, None] < T, other=0.0)
    v = tl.load(V + base + cols[:, None] * HEAD_DIM + dims[None, :], mask=cols[:, None] < T, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    qk_scale = scale * 1.4426950408889634
    # causal: only queries at or after this key block see it; start at the query block holding start_n
    for start_m in range((start_n // BLOCK_M) * BLOCK_M, T, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q = tl.load(Q + base + rows[:, None] * HEAD_DIM + dims[None, :], mask=rows[:, None] < T, other=0.0)
        do = tl.load(dO + base + rows[:, None] * HEAD_DIM + dims[None, :], mask=rows[:, None] < T, other=0.0)
        lse = tl.load(L + bh * T + rows, mask=rows < T, other=0.0)
        delta = tl.load(Delta + bh * T + rows, mask=rows < T, other=0.0)
        p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])       # [BLOCK_M, BLOCK_N]
        p = tl.where((rows[:, None] >= cols[None, :]) & (rows[:, None] < T), p, 0.0)  # padding rows too
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    tl.store(dK + base + cols[:, None] * HEAD_DIM + dims[None, :], (dk * scale).to(dK.dtype.element_ty), mask=cols[:, None] < T)
    tl.store(dV + base + cols[:, None] * HEAD_DIM + dims[None, :], dv.to(dV.dtype.element_ty), mask=cols[:, None] < T)


@triton.jit
def _backward_dq(Q, K, V, dO, L, Delta, dQ, scale, T,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, bh = tl.program_id(0) * BLOCK_M, tl.program_id(1).to(tl.int64)
    base = bh * T * HEAD_DIM
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + base + rows[:, None] * HEAD_DIM + dims[None, :], mask=rows[:, None] < T, other=0.0)
    do = tl.load(dO + base + rows[:, None] * HEAD_DIM + dims[None, :], mask=rows[:, None] < T, other=0.0)
    lse = tl.load(L + bh * T + rows, mask=rows < T, other=0.0)
    delta = tl.load(Delta + bh * T + rows, mask=rows < T, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    qk_scale = scale * 1.4426950408889634
    for start_n in range(0, tl.minimum(start_m + BLOCK_M, T), BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(K + base + cols[:, None] * HEAD_DIM + dims[None, :], mask=cols[:, None] < T, other=0.0)
        v = tl.load(V + base + cols[:, None] * HEAD_DIM + dims[None, :], mask=cols[:, None] < T, other=0.0)
        p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
        p = tl.where((rows[:, None] >= cols[None, :]) & (cols[None, :] < T), p, 0.0)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    tl.store(dQ + base + rows[:, None] * HEAD_DIM + dims[None, :], (dq * scale).to(dQ.dtype.element_ty), mask=rows[:, None] < T)


class FlashAttention(torch.autograd.Function):
    """Causal attention of q, k, v [B, H, T, D] (D a power of two, 16..128), softmax scale 1/sqrt(D)."""
    BLOCK_M, BLOCK_N = 64, 64

    @staticmethod
    def forward(ctx, q, k, v):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, H, T, D = q.shape
        scale = 1 / math.sqrt(D)
        o = torch.empty_like(q)
        lse = torch.empty(B * H, T, device=q.device, dtype=torch.float32)
        grid = (triton.cdiv(T, FlashAttention.BLOCK_M), B * H)
        _forward[grid](q, k, v, o, lse, scale, T, HEAD_DIM=D, BLOCK_M=FlashAttention.BLOCK_M,
                       BLOCK_N=FlashAttention.BLOCK_N, num_warps=4, num_stages=2)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        do = do.contiguous()
        B, H, T, D = q.shape
        delta = (do.float() * o.float()).sum(-1).view(B * H, T)  # D_i = rowsum(dO * O), one per query
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        bm, bn = FlashAttention.BLOCK_M, FlashAttention.BLOCK_N
        _backward_dkdv[(triton.cdiv(T, bn), B * H)](q, k, v, do, lse, delta, dk, dv, ctx.scale, T,
                                                     HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, num_warps=8, num_stages=1)
        _backward_dq[(triton.cdiv(T, bm), B * H)](q, k, v, do, lse, delta, dq, ctx.scale, T,
                                                   HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, num_warps=8, num_stages=1)
        return dq, dk, dv


flash_attention = FlashAttention.apply


def max_errors(fn, q, k, v, do, ref):
    """Max abs error of fn's output and of its q, k, v gradients against ref (float64 tensors)."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    o = fn(q, k, v)
    o.backward(do)
    return [(a.double() - r).abs().max().item() for a, r in zip((o, q.grad, k.grad, v.grad), ref)]


def check(B, H, T, D, dtype, device="cuda"):
    """Ours and SDPA in `dtype` against SDPA in float64 on the same inputs; asserts ours is about as close."""
    gen = torch.Generator(device).manual_seed(0)
    q, k, v, do = (torch.randn(B, H, T, D, device=device, dtype=dtype, generator=gen) for _ in range(4))
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    o64 = F.scaled_dot_product_attention(q64, k64, v64, is_causal=True)  # float64: the exact answer
    o64.backward(do.double())
    ref = [o64.detach(), q64.grad, k64.grad, v64.grad]
    ours = max_errors(flash_attention, q, k, v, do, ref)
    sdpa = max_errors(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True), q, k, v, do, ref)
    slack = 2e-3 if dtype == torch.float16 else 1.6e-2  # a few units in the last place of O's dtype
    name = str(dtype).replace("torch.", "")
    print(f"  [{B},{H},{T},{D}] {name:<8} max |error| vs float64:  " +
          "  ".join(f"{what} {a:.1e} (sdpa {b:.1e})" for what, a, b in zip(("o", "dq", "dk", "dv"), ours, sdpa)))
    for what, a, b in zip(("o", "dq", "dk", "dv"), ours, sdpa):
        assert a <= 4 * b + slack, f"{what}: {a:.2e} vs SDPA's {b:.2e} at {name} [{B},{H},{T},{D}]"


def main():
    if not torch.cuda.is_available():
        sys.exit("flash_triton.py needs a CUDA GPU")
    print(f"device: {torch.cuda.get_device_name()}, triton {triton.__version__}, torch {torch.__version__}")
    for shape in [(2, 4, 1000, 64), (1, 3, 257, 128), (2, 2, 64, 32), (1, 1, 1, 16)]:
        for dtype in (torch.float16, torch.bfloat16):
            check(*shape, dtype)
    # speed, for scale only (not a claim: this kernel has no autotuning, no TMA, no warp specialisation)
    B, H, T, D = 4, 16, 4096, 128
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    for name, fn in [("triton", flash_attention), ("sdpa", lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True))]:
        fwd = triton.testing.do_bench(lambda: fn(q, k, v))
        o = fn(q, k, v)
        bwd = triton.testing.do_bench(lambda: o.backward(torch.ones_like(o), retain_graph=True), grad_to_none=[q, k, v])
        flops = 4 * B * H * T * T * D / 2  # causal: half of the two T x T x D matmuls
        print(f"  {name:<6} [{B},{H},{T},{D}] bf16: forward {fwd:.2f} ms ({flops / fwd / 1e9:.0f} TFLOP/s), "
              f"backward {bwd:.2f} ms ({2.5 * flops / bwd / 1e9:.0f} TFLOP/s)")
    print("OK: Triton FlashAttention forward and backward agree with SDPA")


if __name__ == "__main__":
    main()
