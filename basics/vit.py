"""A tiny Vision Transformer with 2x2 patch merging, trained on scikit-learn's handwritten digits.

Shows: an image becomes a sequence of tokens. Each 8x8 digit (sklearn.datasets.load_digits: 1,797
images, 17 grey levels, shipped inside scikit-learn, no download) is cut into 2x2-pixel patches,
a 4x4 grid of 16 tokens, each linearly embedded plus a learned 2-D position embedding
(ViT, arXiv 2010.11929). Two transformer blocks run on the 16 tokens; then 2x2 patch merging
concatenates each 2x2 group of neighbouring tokens (4 x C channels) and projects it to one token, so
the grid becomes 2x2 = 4 tokens (Swin, arXiv 2103.14030; Qwen2-VL's merger does the same to a
vision encoder's output before the language model, arXiv 2409.12191); two more blocks, a mean over
tokens, a linear classifier. A check shows each merged token holds exactly its four neighbours.
Needs scikit-learn (the `test` extra installs it). The lab has no vision path yet: its tokenizer
reserves the image tokens (llmlabs/data/tokenizer.py: image_start, image_end, image_patch), and its
transformer block is llmlabs/model.py's (causal there, RMSNorm, ReLU^2, no biases).

    python basics/vit.py              # 60 epochs

Measured 2026-12-03, 2-core CPU, torch 2.13.0, scikit-learn 1.9.1: test accuracy 0.975 (351 of 360
held-out digits) after 60 epochs, 14.6 s of training; 0.906 after the 15 epochs tests/test_basics.py runs."""
import argparse
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def load_digits():
    """(images [N, 1, 8, 8] in [0, 1], labels [N]) from scikit-learn."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        sys.exit("vit.py needs scikit-learn's digits: pip install scikit-learn")
    d = sk_load_digits()
    return torch.tensor(d.images, dtype=torch.float32)[:, None] / 16, torch.tensor(d.target)


def patchify(img, p):
    """[B, C, H, W] -> [B, (H/p) * (W/p), C * p * p]: row-major grid of flattened p x p patches."""
    B, C, H, W = img.shape
    x = img.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def merge_2x2(x, grid: int):
    """[B, grid*grid, C] -> [B, (grid/2)^2, 4C]: the four tokens of each 2x2 block side by side."""
    B, _, C = x.shape
    x = x.view(B, grid // 2, 2, grid // 2, 2, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (grid // 2) ** 2, 4 * C)


class Block(nn.Module):
    """Pre-norm transformer block, no causal mask: every patch sees every patch."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.fc_out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.n1(x)).view(B, T, 3, self.heads, C // self.heads).transpose(1, 3).unbind(2)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C))
        return x + self.fc_out(F.gelu(self.fc(self.n2(x))))


class TinyViT(nn.Module):
    def __init__(self, patch=2, image=8, dim=32, heads=4, classes=10):
        super().__init__()
        self.patch, self.grid = patch, image // patch
        self.embed = nn.Linear(patch * patch, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(self.grid**2, dim))  # one per grid cell (2-D, flattened)
        self.stage1 = nn.Sequential(Block(dim, heads), Block(dim, heads))
        self.merge_norm, self.merge = nn.LayerNorm(4 * dim), nn.Linear(4 * dim, 2 * dim)
        self.stage2 = nn.Sequential(Block(2 * dim, heads), Block(2 * dim, heads))
        self.head = nn.Sequential(nn.LayerNorm(2 * dim), nn.Linear(2 * dim, classes))

    def forward(self, img):
        x = self.embed(patchify(img, self.patch)) + self.pos          # [B, 16, C]
        x = self.stage1(x)
        x = self.merge(self.merge_norm(merge_2x2(x, self.grid)))      # [B, 4, 2C]: 4x fewer tokens
        x = self.stage2(x)
        return self.head(x.mean(1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--min-accuracy", type=float, default=0.95)
    args = p.parse_args(argv)
    images, labels = load_digits()
    torch.manual_seed(0)
    perm = torch.randperm(len(labels))
    test_idx, train_idx = perm[:360], perm[360:]  # ~20% held out
    print(f"digits: {len(train_idx)} train / {len(test_idx)} test images of 8x8")

    # the merge is pure bookkeeping: tag each patch with its (row, col) and look at what lands together
    grid = 4
    tags = torch.tensor([[r * 10 + c for r in range(grid) for c in range(grid)]], dtype=torch.float32)[..., None]
    merged = merge_2x2(tags, grid)[0].int().tolist()
    print(f"patch (row*10 + col) per merged token: {merged}")
    assert merged == [[0, 1, 10, 11], [2, 3, 12, 13], [20, 21, 30, 31], [22, 23, 32, 33]]

    model = TinyViT()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    steps_per_epoch = (len(train_idx) + 63) // 64
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=args.epochs * steps_per_epoch)
    print(f"TinyViT: {sum(p.numel() for p in model.parameters()):,} parameters; tokens 16 -> 4 after the merge")
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = train_idx[torch.randperm(len(train_idx))]
        for i in range(0, len(order), 64):
            b = order[i:i + 64]
            x = images[b]
            x = torch.roll(x, shifts=tuple(torch.randint(-1, 2, (2,)).tolist()), dims=(2, 3))  # 1-pixel shifts
            loss = F.cross_entropy(model(x), labels[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if epoch % 10 == 9 or epoch == args.epochs - 1:
            model.eval()
            with torch.no_grad():
                acc = (model(images[test_idx]).argmax(-1) == labels[test_idx]).float().mean().item()
            print(f"epoch {epoch + 1:3d}  train loss {loss.item():.3f}  test accuracy {acc:.3f}  {time.time() - t0:.1f}s")
    assert acc >= args.min_accuracy, f"test accuracy {acc:.3f} below {args.min_accuracy}"
    print(f"OK: test accuracy {acc:.3f} (chance 0.100)")
    return acc


if __name__ == "__main__":
    main()
