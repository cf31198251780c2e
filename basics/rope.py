"""RoPE and 3-D MRoPE: attention scores that depend only on relative position, checked numerically.

Shows:
1. RoPE (Su et al., arXiv 2104.09864): channel pair (j, j + D/2) of q and k is rotated by angle
   pos * base^(-2j/D). A rotation by a and one by b leave a dot product depending on a - b only, so
   q_m . k_n = f(q, k, m - n): the model sees how far apart two tokens are, not where they are. Checked
   in float64 over many (m, n) with the same m - n (max abs diff ~2e-12), and shown to break down in
   float32 at large positions (why llmlabs rotates in float32 at least, and why long contexts want care).
2. MRoPE (Qwen2-VL, arXiv 2409.12191): a position is 3-D, (t, h, w). The D/2 frequency channels are
   split into three sections; channels in the first turn by t, the second by h, the third by w. An
   image patch at row i, column j of a frame at time t gets (t, i, j) (offset so it follows the text
   before it); a text token at position t gets (t, t, t), so for text MRoPE *is* RoPE: checked
   bit-identical (torch.equal). Within an image, scores depend only on (dt, dh, dw): moving the whole
   image leaves every patch-to-patch score unchanged.
The lab's fast version of RoPE is llmlabs/kernels/ops.py (apply_rope, rope_norm; tables from
llmlabs/model.py: rope_tables) and llmlabs/kernels/triton_rope_norm.py (RoPE + QK-norm as Triton
kernels); MRoPE is llmlabs/model.py's mrope_tables (a gather from the RoPE tables) with positions
from llmlabs/vision.py's mrope_positions.

    python basics/rope.py"""
import argparse

import torch


def inv_freq(head_dim: int, base: float = 10000.0, dtype=torch.float64):
    return base ** (-torch.arange(0, head_dim, 2, dtype=dtype) / head_dim)  # [D/2]


def rope_angles(pos, head_dim, base=10000.0, dtype=torch.float64):
    """pos [T] -> angles [T, D/2]: position times each channel pair's frequency."""
    return pos.to(dtype)[:, None] * inv_freq(head_dim, base, dtype)


def mrope_angles(pos3, head_dim, sections, base=10000.0, dtype=torch.float64):
    """pos3 [3, T] (t, h, w) -> angles [T, D/2]: channel pairs in section i turn by position axis i."""
    assert sum(sections) == head_dim // 2, "the sections must cover the D/2 channel pairs"
    all_axes = pos3.to(dtype)[..., None] * inv_freq(head_dim, base, dtype)  # [3, T, D/2]
    axis = torch.repeat_interleave(torch.arange(3), torch.tensor(sections))  # [D/2]: which axis each pair uses
    return all_axes[axis, :, torch.arange(head_dim // 2)].T                  # [T, D/2]


def rotate(x, angles):
    """x [T, D]: rotate channel pairs (j, j + D/2) by angles [T, D/2] (llmlabs' half-split layout)."""
    d = x.size(-1) // 2
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def relative_spread(q, k, D, diff, starts, dtype):
    """Scores q_m . k_n over pairs (m, n) = (s + diff, s): their max - min, and their mean."""
    m = torch.tensor(starts) + diff
    n = torch.tensor(starts)
    qm = rotate(q.to(dtype).expand(len(starts), D), rope_angles(m, D, dtype=dtype))
    kn = rotate(k.to(dtype).expand(len(starts), D), rope_angles(n, D, dtype=dtype))
    s = (qm * kn).sum(-1).double()
    return (s.max() - s.min()).item(), s.mean().item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--head-dim", type=int, default=128)
    args = p.parse_args(argv)
    D = args.head_dim
    torch.manual_seed(0)
    q, k = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)

    print(f"RoPE, head dim {D}: q_m . k_n over 50 pairs (m, n) with the same m - n, starts n in 0..4900")
    starts = list(range(0, 5000, 100))
    worst = 0.0
    for diff in (0, 1, 7, 100, 1000):
        spread, mean = relative_spread(q, k, D, diff, starts, torch.float64)
        worst = max(worst, spread)
        print(f"  m - n = {diff:5d}: score {mean:+9.4f}, max - min over the pairs {spread:.1e} (float64)")
    assert worst < 1e-6, f"RoPE scores vary with absolute position by {worst:.1e}"
    scores = [relative_spread(q, k, D, diff, [0], torch.float64)[1] for diff in range(0, 20)]
    assert max(scores) - min(scores) > 1.0, "scores should depend on the distance"
    far = [100_000 + s for s in starts]
    f32, _ = relative_spread(q, k, D, 7, far, torch.float32)
    f64, _ = relative_spread(q, k, D, 7, far, torch.float64)
    print(f"  at positions ~100,000: max - min {f64:.1e} in float64, {f32:.1e} in float32 (angles lose digits)")
    assert f32 > 100 * f64

    # MRoPE: Qwen2-VL splits 64 channel pairs 16 / 24 / 24 over (t, h, w) at head dim 128
    sections = [D // 8, 3 * D // 16, 3 * D // 16]
    print(f"MRoPE, sections (t, h, w) = {tuple(sections)} channel pairs")
    text = torch.arange(300)
    plain = rope_angles(text, D)
    as_3d = mrope_angles(text.expand(3, -1), D, sections)
    assert torch.equal(plain, as_3d) and torch.equal(rotate(q.expand(300, D), plain), rotate(q.expand(300, D), as_3d))
    print("  text tokens at (t, t, t): angles and rotated q bit-identical to RoPE (torch.equal)")

    # a sequence: 4 text tokens, a 3 x 4 image (one frame), 2 text tokens (Qwen2-VL's position ids)
    t0, H, W = 4, 3, 4
    rows, cols = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    image = torch.stack([torch.full((H * W,), t0), t0 + rows.flatten(), t0 + cols.flatten()])
    after = image.max() + 1 + torch.arange(2)  # text resumes after the largest position used
    pos3 = torch.cat([torch.arange(t0).expand(3, -1), image, after.expand(3, -1)], dim=1)
    print("  positions of [4 text | 3x4 image | 2 text]:")
    for name, row in zip("thw", pos3.tolist()):
        print(f"    {name}: {row}")

    # within an image, scores depend on (dt, dh, dw) only: move the image, every score stays
    qs, ks = torch.randn(H * W, D, dtype=torch.float64), torch.randn(H * W, D, dtype=torch.float64)

    def image_scores(pos):
        angles = mrope_angles(pos, D, sections)
        return rotate(qs, angles) @ rotate(ks, angles).T  # [patches, patches]

    base = image_scores(image)
    moved = image_scores(image + torch.tensor([[50], [7], [300]]))
    diff = (base - moved).abs().max().item()
    print(f"  image moved by (t, h, w) += (50, 7, 300): patch-to-patch scores change by {diff:.1e}")
    assert diff < 1e-9
    swapped = image_scores(image[[0, 2, 1]])  # h and w exchanged: a different geometry, different scores
    assert (base - swapped).abs().max() > 1e-2
    print("OK: RoPE scores are relative (float64); MRoPE equals RoPE on text and is relative in (t, h, w)")


if __name__ == "__main__":
    main()
