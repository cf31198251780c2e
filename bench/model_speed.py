"""Training-step speed of the GPT: forward + backward + MuonAdamW step, bf16 autocast and
torch.compile on CUDA, random tokens (no data loading), at the depth dial's presets.

    PYTHONPATH=. python3 bench/model_speed.py                       # d8, d12, d20 at seq 2048
    PYTHONPATH=. python3 bench/model_speed.py --out bench/results/model_speed_h100.json

tokens/s counts the tokens of the timed steps over their wall time (one sync at each end).
MFU = flops_per_token * tokens/s / peak bf16 FLOP/s (common.peak_flops), in both FLOP
conventions: "exact" (causal and windowed attention counted as attended) and "nanochat" (the
estimate nanochat and autoresearch report, so numbers compare with theirs). On CPU the model runs
eagerly in float32 (a smoke run; MFU is not defined there)."""
import argparse
import datetime
import json
import subprocess
import sys
import time

import torch
from tqdm import tqdm

from llmlabs import attention as attn
from llmlabs.common import atomic_write_json, peak_flops
from llmlabs.config import config_for_depth
from llmlabs.model import build_model

# device batch (sequences) per depth that fits an 80 GB H100 at seq 2048 with vocab 8192
DEFAULT_BATCH = {8: 32, 12: 32, 20: 16}


def measure(depth, args, device):
    config = config_for_depth(depth, vocab_size=args.vocab, sequence_len=args.seq, window_pattern=args.windows)
    batch = args.batch or DEFAULT_BATCH.get(depth, 16)
    model = build_model(config, device)
    optimizer = model.setup_optimizer()
    cuda = device.type == "cuda"
    step_model = torch.compile(model, fullgraph=True, dynamic=False) if cuda else model
    idx = torch.randint(0, config.vocab_size, (batch, config.sequence_len), device=device)
    targets = torch.roll(idx, -1, dims=1)

    def train_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = step_model(idx, targets)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        return loss

    t0 = time.time()
    for _ in range(args.warmup):  # the first steps compile the model and the optimizer kernels
        train_step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warmup_s = time.time() - t0
    t0 = time.time()
    for _ in tqdm(range(args.steps), desc=f"d{depth}", leave=False):
        loss = train_step()
    loss = loss.item()  # also the one sync before the clock stops
    elapsed = time.time() - t0
    tokens_per_s = batch * config.sequence_len * args.steps / elapsed
    peak = peak_flops(device)
    row = {"depth": depth, "n_embd": config.n_embd, "params": model.num_params()["total"], "batch": batch,
           "seq": config.sequence_len, "tokens_per_s": round(tokens_per_s), "step_ms": round(1000 * elapsed / args.steps, 1),
           "warmup_s": round(warmup_s, 1), "loss": round(loss, 4),
           "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None}
    for convention in ("exact", "nanochat"):
        flops = model.flops_per_token(convention)
        row[f"flops_per_token_{convention}"] = flops
        row[f"mfu_{convention}"] = round(100 * flops * tokens_per_s / peak, 1) if peak else None
    return row


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 12, 20])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--windows", default="SSSL", help="window pattern, e.g. SSSL or L")
    parser.add_argument("--batch", type=int, default=None, help="device batch in sequences (default: per depth)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation happens here)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--attention", default=None, help="force a backend: " + ", ".join(attn.CHOICES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if args.attention:
        attn.set_backend(args.attention)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for depth in args.depths:
        rows.append(measure(depth, args, device))
        torch._dynamo.reset()  # drop the compiled graphs (and the model they hold) before the next depth
        if device.type == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"date": datetime.date.today().isoformat(), "device": name, "torch": torch.__version__,
              "commit": git_commit(), "command": " ".join(sys.argv), "attention": attn.describe(), "rows": rows}
    if args.out:
        atomic_write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    print(f"{'depth':>5} {'width':>5} {'params':>8} {'batch':>5} {'tok/s':>10} {'step ms':>8} {'MFU %':>6} "
          f"{'MFU% nc':>7} {'mem GB':>6} {'warmup s':>8}")
    for r in rows:
        mfu = "-" if r["mfu_exact"] is None else f"{r['mfu_exact']:.1f}"
        mfu_nc = "-" if r["mfu_nanochat"] is None else f"{r['mfu_nanochat']:.1f}"
        print(f"{'d' + str(r['depth']):>5} {r['n_embd']:>5} {r['params'] / 1e6:>7.1f}M {r['batch']:>5} {r['tokens_per_s']:>10,} "
              f"{r['step_ms']:>8.1f} {mfu:>6} {mfu_nc:>7} {r['peak_mem_gb'] or '-':>6} {r['warmup_s']:>8.1f}")


if __name__ == "__main__":
    main()
