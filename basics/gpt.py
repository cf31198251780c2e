"""A complete GPT, byte-level, trained on this Python's standard library in about a minute on a CPU.

Shows: the whole path from raw text to a trained language model in one file: bytes as tokens
(vocab 256, so no tokenizer), a decoder of pre-norm blocks (RMSNorm, causal attention with RoPE
and QK-norm, a ReLU^2 MLP), AdamW with warmup and linear decay, a held-out loss against the
unigram baseline, and a sample. The lab's fast version of the same job is llmlabs/model.py (the
model), llmlabs/train.py (the loop), llmlabs/optim.py (Muon + AdamW) and llmlabs/evaluate.py (bpb).

    python basics/gpt.py              # 500 steps of 16 x 64 bytes, ~1 minute on 2 CPU cores
    python basics/gpt.py --steps 40   # what tests/test_basics.py runs (one thread: 2.45 nats/byte)

Measured 2026-12-03 on the 2-core CPU machine (other jobs running, load ~2), Python 3.11.7's
standard library, torch 2.13.0: validation loss 1.678 nats/byte (2.421 bits/byte; the unigram
baseline is 3.129, an untrained model ~5.5) after 49 s of training, 55 s in all; with
OMP_NUM_THREADS=1 the same loss in 55 s of training (a model this small gains little from a second
thread). The two-thread run took 303 s of training once when the machine was busier: torch's threads
stall when other processes share the cores, one thread does not.

Data: the .py files at the top of the running interpreter's standard library, read directly (no
download); every tenth file is held out for validation, so validation text is unseen text."""
import argparse
import math
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    seq_len: int = 64
    vocab_size: int = 256  # bytes


def load_corpus():
    """(train bytes, val bytes) as int64 tensors; every tenth file (sorted by name) is validation."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    train = b"".join(f.read_bytes() for i, f in enumerate(files) if i % 10)
    val = b"".join(f.read_bytes() for i, f in enumerate(files) if i % 10 == 0)
    return (torch.frombuffer(bytearray(train), dtype=torch.uint8).long(),
            torch.frombuffer(bytearray(val), dtype=torch.uint8).long())


def rope(x, cos, sin):
    """RoPE (arXiv 2104.09864): rotate channel pairs (j, j + D/2) by angle t * base^(-2j/D)."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def norm(x):
    return F.rms_norm(x, (x.size(-1),))  # parameter-free RMSNorm (arXiv 1910.07467)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C = cfg.n_embd
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(C, 3 * C, bias=False)
        self.proj = nn.Linear(C, C, bias=False)
        self.fc = nn.Linear(C, 4 * C, bias=False)
        self.fc_out = nn.Linear(4 * C, C, bias=False)
        # zero output projections: every block starts as the identity (as llmlabs/model.py)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.fc_out.weight)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = self.qkv(norm(x)).view(B, T, 3, self.n_head, C // self.n_head).transpose(1, 3).unbind(2)
        q, k = norm(rope(q, cos, sin)), norm(rope(k, cos, sin))  # QK-norm (arXiv 2010.04245)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.fc_out(F.relu(self.fc(norm(x))).square())  # ReLU^2 (Primer, arXiv 2109.08668)


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)  # untied from wte
        hd = cfg.n_embd // cfg.n_head
        angles = torch.outer(torch.arange(cfg.seq_len).float(), 10000.0 ** (-torch.arange(0, hd, 2).float() / hd))
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, idx, targets=None):
        T = idx.size(1)
        x = norm(self.wte(idx))
        for block in self.blocks:
            x = block(x, self.cos[:T], self.sin[:T])
        logits = self.lm_head(norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    @torch.no_grad()
    def generate(self, prompt: bytes, n: int, temperature: float = 0.8, seed: int = 0) -> bytes:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.tensor([list(prompt)])
        for _ in range(n):
            logits = self(idx[:, -self.cfg.seq_len:])[:, -1] / temperature
            idx = torch.cat([idx, torch.multinomial(F.softmax(logits, -1), 1, generator=gen)], dim=1)
        return bytes(idx[0].tolist())


def batch(data, batch_size, seq_len, gen):
    """Random windows of seq_len + 1 bytes: inputs and the next byte of each."""
    i = torch.randint(len(data) - seq_len - 1, (batch_size,), generator=gen)
    rows = torch.stack([data[j:j + seq_len + 1] for j in i.tolist()])
    return rows[:, :-1], rows[:, 1:]


@torch.no_grad()
def evaluate(model, val, seq_len, n_tokens=2**16):
    """Mean loss in nats per byte over the first n_tokens of validation text, in full windows."""
    model.eval()
    rows = val[:n_tokens + 1]
    n = (len(rows) - 1) // seq_len
    x = rows[:n * seq_len].view(n, seq_len)
    y = rows[1:n * seq_len + 1].view(n, seq_len)
    loss = sum(model(x[i:i + 64], y[i:i + 64]).item() * len(x[i:i + 64]) for i in range(0, n, 64)) / n
    model.train()
    return loss


def unigram_loss(train, val):
    """The baseline any model must beat: each byte's frequency in train, scored on val (add-one)."""
    counts = torch.bincount(train, minlength=256).double() + 1
    return -(counts / counts.sum()).log()[val].mean().item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-loss", type=float, default=None,
                   help="fail unless the final val loss (nats/byte) is below this (default: 1.8 from 500 steps on)")
    args = p.parse_args(argv)
    max_loss = args.max_loss if args.max_loss is not None else (1.8 if args.steps >= 500 else None)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    cfg = Config()
    train, val = load_corpus()
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    n_params = sum(w.numel() for w in model.parameters())
    print(f"corpus: {len(train):,} train bytes, {len(val):,} val bytes; model: {n_params:,} parameters")
    base = unigram_loss(train, val)
    print(f"a byte is one of 256: an untrained model's loss is about ln 256 = {math.log(256):.3f} nats; "
          f"the unigram baseline {base:.3f}")

    warmup = max(1, args.steps // 20)
    t0 = time.time()
    for step in range(args.steps):
        # linear warmup over 5% of the steps, then linear decay to zero
        lr = args.lr * min((step + 1) / warmup, (args.steps - step) / (args.steps - warmup + 1))
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = batch(train, args.batch_size, cfg.seq_len, gen)
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  train loss {loss.item():.3f}  lr {lr:.2e}  {time.time() - t0:.1f}s")
    seconds = time.time() - t0

    val_loss = evaluate(model, val, cfg.seq_len)
    print("sample:", repr(model.generate(b"def ", 120).decode("utf-8", errors="replace")))
    print("---")
    print(f"val_loss:         {val_loss:.4f} nats/byte")
    print(f"val_bpb:          {val_loss / math.log(2):.4f}")
    print(f"unigram_loss:     {base:.4f} nats/byte")
    print(f"training_seconds: {seconds:.1f}")
    assert val_loss < base, f"the model ({val_loss:.3f}) does not beat the unigram baseline ({base:.3f})"
    if max_loss is not None:
        assert val_loss < max_loss, f"val loss {val_loss:.3f} is not below {max_loss}"
    return val_loss


if __name__ == "__main__":
    main()
