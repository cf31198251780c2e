"""Generation speed of the engine (llmlabs/engine.py): new tokens per second with the KV cache, greedy,
at several batch sizes, for a model of the GPU preset's shape at --depth (random weights: speed does
not depend on what the weights say; greedy decoding of random weights never stops early).

    PYTHONPATH=. python3 bench/engine_speed.py [--depth 12] [--batches 1,32] [--prompt 128] [--new 256]
        [--device cuda] [--graph] [--profile] [--out bench/results/engine_speed-h200.jsonl]

Per batch size: prefill (all prompts in one forward) and decode (one token per row per forward, one
host sync per step to hand the ids out) timed apart, after one untimed warm-up generation. bf16
weights on CUDA (as `llmlabs sample` runs a checkpoint there), float32 on CPU. Eager, no compile.
--graph: the decode step replayed as one CUDA graph over a static cache (engine.stream(graph=True));
its prefill figure includes the graph's warm-up step and capture.
--profile: per batch size, 16 decode steps under torch.profiler: the costliest ops by host time,
the kernels' busy time and the launches per step (a decode step that is mostly host time is
launch-bound: the lever is fewer, larger kernels or CUDA graphs, not faster kernels).
"""
import argparse
import json
import os
import subprocess
import time

import torch

from llmlabs import engine
from llmlabs.config import config_for_depth
from llmlabs.model import build_model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(model, batch, prompt, new, device, graph=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=g).tolist()
    sync(device)
    t0 = time.perf_counter()
    steps = engine.stream(model, prompts, new, temperature=0, graph=graph)
    next(steps)  # prefill (and the capture, with graph), then the first token picked
    sync(device)
    t1 = time.perf_counter()
    n = 1 + sum(1 for _ in steps)
    sync(device)
    t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "new_tokens": n,
            "decode_tok_per_sec": round(batch * (n - 1) / (t2 - t1)), "total_tok_per_sec": round(batch * n / (t2 - t0))}


def profile_decode(model, batch, prompt, device, graph=False, steps=16):
    """Profile `steps` decode steps (after prefill and one step untimed); returns per-step figures."""
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=g).tolist()
    it = engine.stream(model, prompts, steps + 2, temperature=0, graph=graph)
    next(it), next(it)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            next(it)
        sync(device)
    wall = (time.perf_counter() - t0) / steps
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.self_device_time_total for e in events) / steps / 1e3
    return {"profiled_ms_per_step": round(1000 * wall, 2), "kernel_ms_per_step": round(busy, 2),
            "kernel_launches_per_step": round(len(kernels) / steps, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens per row")
    p.add_argument("--new", type=int, default=256, help="new tokens per row")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size (8192: the lab's prepared corpora)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--graph", action="store_true", help="decode through a captured CUDA graph (engine.stream(graph=True))")
    p.add_argument("--profile", action="store_true", help="profile 16 decode steps per batch size (host ops, kernels)")
    p.add_argument("--out", help="append each result as a JSON line to this file")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.graph and device.type != "cuda":
        p.error("--graph captures CUDA graphs: run it with --device cuda")
    cfg = config_for_depth(args.depth, vocab_size=args.vocab, sequence_len=max(2048, args.prompt + args.new + 1))
    torch.manual_seed(0)
    model = build_model(cfg, device).eval()
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    commit = os.environ.get("LLMLABS_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# {time.strftime('%Y-%m-%d')} | {name} | torch {torch.__version__} | commit {commit} | d{args.depth}, "
          f"{sum(q.numel() for q in model.parameters()) / 1e6:.0f}M params, prompt {args.prompt}, new {args.new}")
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        measure(model, b, args.prompt, min(args.new, 8), device, args.graph)  # warm-up: kernels, allocator
        res = {"depth": args.depth, "batch": b, "prompt": args.prompt, "device": name, "commit": commit,
               "graph": args.graph, **measure(model, b, args.prompt, args.new, device, args.graph)}
        if args.profile:
            res.update(profile_decode(model, b, args.prompt, device, args.graph))
        rows.append(res)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(res) + "\n")
    print(f"{'batch':>5} {'prefill ms':>10} {'decode tok/s':>13} {'total tok/s':>12} {'ms/step':>8}")
    for r in rows:
        print(f"{r['batch']:>5} {1000 * r['prefill_s']:>10.1f} {r['decode_tok_per_sec']:>13,} {r['total_tok_per_sec']:>12,} "
              f"{1000 * r['decode_s'] / max(r['new_tokens'] - 1, 1):>8.2f}")
    for r in rows:
        if "kernel_ms_per_step" in r:
            print(f"batch {r['batch']} profiled: {r['profiled_ms_per_step']} ms a step, kernels busy {r['kernel_ms_per_step']} ms, "
                  f"{r['kernel_launches_per_step']} kernel launches a step")


if __name__ == "__main__":
    main()
