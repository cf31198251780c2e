"""Is the trained model causal? Checked before its val_bpb is trusted.

A model that peeks at later tokens gets a wonderful val_bpb and is useless for generation; an agent
chasing bpb finds such a leak sooner or later (a shifted index, an unmasked layer, a mixing op over
the time axis). The check: run a random sequence and copies of it in which one random position t is
changed; the logits at every position before t must not move. All copies go through one batch so
they share kernels and shapes; a causal model then gives bit-identical prefixes, and the tolerance
only absorbs bf16 rounding on GPUs. Rows are compared with each other, so a leak across the batch
shows up as well.

Run by the harness in a subprocess on the finished run: `python -m llmlabs.auto.causal RUN_DIR`
prints one JSON line {"causal": bool, "max_leak": float, "position": t, ...}.
"""
import argparse
import json
from contextlib import nullcontext

import torch

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # max |logit change| before t, logits soft-capped


@torch.no_grad()
def check_causal(model, vocab_size, seq_len, device, probes=4, seed=0, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab_size, (seq_len,), generator=g)
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


def main(argv=None):
    from llmlabs.checkpoint import load_run
    from llmlabs.common import compute_init

    p = argparse.ArgumentParser(prog="python -m llmlabs.auto.causal", description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--device", help="cpu | cuda | mps (default: best available)")
    p.add_argument("--probes", type=int, default=4, help="positions changed, one copy of the sequence each")
    args = p.parse_args(argv)
    device = compute_init(args.device)[0]
    model, ck = load_run(args.run_dir, device)
    cfg = ck["run_config"]
    # the dtype the run was evaluated in: bf16 autocast on CUDA, fp32 elsewhere (as llmlabs.train)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    res = check_causal(model, model.config.vocab_size, cfg["seq_len"], device, probes=args.probes, dtype=dtype)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
