"""Causal attention three ways, agreeing: naive, tiled with an online softmax, and SDPA.

Shows:
1. naive: scores = Q K^T / sqrt(D) as a full T x T matrix, causal mask, softmax, times V.
2. tiled: FlashAttention's loop (arXiv 2205.14135, Algorithm 1; the causal block skip and the
   single final division as FlashAttention-2, arXiv 2307.08691) in plain torch. Queries in
   blocks of Bq, keys in blocks of Bk; only a Bq x Bk tile of scores exists at a time. A running
   row max m and row sum l make the softmax "online": when a new tile raises the max, what was
   accumulated so far is rescaled by exp(m_old - m_new). Key blocks wholly above the diagonal are
   skipped, so a causal layer does about half the work. It also returns the row logsumexp, the one
   number per query a FlashAttention backward keeps instead of the T x T probabilities.
3. F.scaled_dot_product_attention(is_causal=True): PyTorch's fused kernels (FlashAttention,
   cuDNN, memory-efficient, or a C++ math path on the CPU).
All three agree to ~1e-15 in float64. The lab's fast version is llmlabs/attention.py (one call over
FA3 / cuDNN / FlashAttention-2 / FlexAttention); basics/flash_triton.py is step 2 as a GPU kernel.

    python basics/attention.py"""
import argparse
import math

import torch
import torch.nn.functional as F


def naive_attention(q, k, v):
    """q, k, v [B, H, T, D] -> [B, H, T, D], materialising the T x T probabilities."""
    T, D = q.shape[-2:]
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))  # query t sees keys 0..t
    return torch.softmax(scores, dim=-1) @ v


def tiled_attention(q, k, v, block_q: int = 16, block_k: int = 16):
    """The same output, one Bq x Bk tile of scores at a time. Returns (out, logsumexp [B, H, T])."""
    T, D = q.shape[-2:]
    scale = 1 / math.sqrt(D)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], dtype=q.dtype, device=q.device)
    for qs in range(0, T, block_q):
        qe = min(qs + block_q, T)
        qi = q[..., qs:qe, :] * scale
        m = torch.full(qi.shape[:-1], float("-inf"), dtype=q.dtype, device=q.device)  # running row max
        l = torch.zeros_like(m)                                                          # running row sum
        acc = torch.zeros_like(qi)                                                       # unnormalised output
        for ks in range(0, qe, block_k):  # causal: key blocks past this query block's last row are skipped
            ke = min(ks + block_k, T)
            s = qi @ k[..., ks:ke, :].transpose(-2, -1)                                  # [.., Bq, Bk]
            if ke > qs:  # the tile crosses the diagonal: mask keys after each query
                rows = torch.arange(qs, qe, device=q.device)[:, None]
                cols = torch.arange(ks, ke, device=q.device)[None, :]
                s = s.masked_fill(cols > rows, float("-inf"))
            m_new = torch.maximum(m, s.amax(-1))
            p = torch.exp(s - m_new[..., None])
            alpha = torch.exp(m - m_new)  # rescales what was summed under the old max (0 on the first tile)
            l = alpha * l + p.sum(-1)
            acc = alpha[..., None] * acc + p @ v[..., ks:ke, :]
            m = m_new
        out[..., qs:qe, :] = acc / l[..., None]  # one division at the end (FlashAttention-2)
        lse[..., qs:qe] = m + l.log()
    return out, lse


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=200, help="not a multiple of the blocks, on purpose")
    p.add_argument("--block", type=int, default=32)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    B, H, T, D = 2, 3, args.seq_len, 64
    q, k, v = (torch.randn(B, H, T, D, dtype=torch.float64) for _ in range(3))

    ref = naive_attention(q, k, v)
    tiled, lse = tiled_attention(q, k, v, args.block, args.block)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    scores = (q @ k.transpose(-2, -1) / math.sqrt(D)).masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
    lse_ref = torch.logsumexp(scores, dim=-1)

    print(f"B={B} H={H} T={T} D={D}, float64, blocks {args.block} x {args.block}")
    diffs = {"tiled vs naive": (tiled - ref).abs().max().item(),
             "sdpa vs naive": (sdpa - ref).abs().max().item(),
             "tiled logsumexp vs naive": (lse - lse_ref).abs().max().item()}
    for name, d in diffs.items():
        print(f"  max |{name}| = {d:.2e}")
        assert d < 1e-12, f"{name} differ by {d:.2e}"

    # causality: changing the last key/value changes only the last query's output
    k2, v2 = k.clone(), v.clone()
    k2[..., -1, :] += 1
    v2[..., -1, :] += 1
    moved = (tiled_attention(q, k2, v2, args.block, args.block)[0] - tiled).abs().amax(dim=(0, 1, 3))
    assert moved[:-1].max() == 0 and moved[-1] > 0, "a query saw a later key"
    print("  causal: perturbing the last key/value moves only the last query's output")

    # what each one holds at once: the T x T scores versus one tile
    nb = math.ceil(T / args.block)
    print(f"  scores held at once per (batch, head): naive {T * T:,}, tiled {args.block**2:,}")
    print(f"  tiles computed: {nb * (nb + 1) // 2} of {nb * nb} (the causal skip)")
    print("OK: naive, tiled (online softmax) and SDPA agree")


if __name__ == "__main__":
    main()
