"""Is the trained model causal? Checked before its val_bpb is trusted.

A model that peeks at later tokens gets a wonderful val_bpb and is useless for generation; an agent
chasing bpb finds such a leak sooner or later (a shifted index, an unmasked layer, a mixing op over
the time axis). The check: run a sequence (real validation tokens in the harness's evaluator, so the
model cannot tell the probe from the data; random ones otherwise) and copies of it in which one random position t is
changed; the logits at every position before t must not move. All copies go through one batch so
they share kernels and shapes; a causal model then gives bit-identical prefixes, and the tolerance
only absorbs bf16 rounding on GPUs. Rows are compared with each other, so a leak across the batch
shows up as well.

Run by the harness's evaluator (evaluator.py) on every experiment, in the process that scores it.
"""
from contextlib import nullcontext

import torch

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # max |logit change| before t, logits soft-capped


@torch.no_grad()
def check_causal(model, vocab_size, seq_len, device, probes=4, seed=0, dtype=torch.float32, tokens=None) -> dict:
    """tokens: the sequence to probe (default: random tokens of length seq_len)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab_size, (seq_len,), generator=g) if tokens is None else tokens.flatten().cpu()
    seq_len = len(x)
    # positions to change: random ones, plus the last, which no earlier position may see
    ts = torch.randperm(seq_len - 1, generator=g)[:probes - 1].add(1).tolist() + [seq_len - 1]
    batch = x.repeat(len(ts) + 1, 1)
    for i, t in enumerate(ts, start=1):
        batch[i, t] = (x[t] + torch.randint(1, vocab_size, (), generator=g)) % vocab_size
    model.eval()
    amp = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    with amp:
        logits = model(batch.to(device)).float().cpu()
    worst = {"max_leak": 0.0, "position": None, "changed": None}
    for i, t in enumerate(ts, start=1):
        leak = (logits[i, :t] - logits[0, :t]).abs().amax(dim=-1)  # per earlier position
        if leak.max().item() > worst["max_leak"]:
            worst = {"max_leak": leak.max().item(), "position": int(leak.argmax()), "changed": t}
    return {"causal": worst["max_leak"] <= TOLERANCE[dtype], "tolerance": TOLERANCE[dtype], "probes": ts, **worst}

