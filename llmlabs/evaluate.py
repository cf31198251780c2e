"""val_bpb, the one definition, and the `llmlabs eval RUN` command.

bits per byte = (summed nats over target tokens) / (ln 2 x summed UTF-8 bytes of those targets).
Special tokens (BOS, image tokens) have 0 bytes and are left out of both sums, so the number does not
depend on the tokenizer's vocabulary and can be compared across vocab sizes. The harness computes the
loss from the model's logits itself: the model never sees the targets during evaluation, so an edit
to the model's loss cannot change the score.
"""
import functools
import math

import numpy as np

import torch
import torch.nn.functional as F

from llmlabs import flags
from llmlabs.common import LabError


@torch.no_grad()
def evaluate_bpb(model, data, split="val", *, batch_size, seq_len, max_tokens, device, autocast=None):
    """Score `model` on the first `max_tokens` target tokens of `split` (BOS-aligned rows, seed 0, so
    every call sees the same tokens). Under torchrun each rank scores its slice and the sums are
    reduced. Returns val_bpb plus the same tokens scored by a unigram model fit on the train split
    (the baseline a trained model must beat)."""
    token_bytes, unigram_logp = token_bytes_and_unigram(data, device)
    rank, world = _rank_world()
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for x, y in eval_batches(data, split, batch_size, seq_len, max_tokens, device, rank, world):
        with autocast or torch.autocast(device.type, enabled=False):
            logits = model(x)
        accumulate(sums, token_nats(logits, y), y, token_bytes, unigram_logp)
    if world > 1:
        torch.distributed.all_reduce(sums)
    model.train(was_training)
    return bpb_result(sums, split, data)


# The pieces of evaluate_bpb, shared with the autoresearch evaluator (llmlabs/auto/evaluator.py),
# which runs the model in a process of its own and does the accounting in the harness's process.

def eval_batches(data, split, batch_size, seq_len, max_tokens, device="cpu", rank=0, world=1):
    """(x, y) batches of the first max_tokens target tokens of `split`, rounded up to whole rows: this
    rank's rows of each global batch (the loader's), so the rows scored are the same on any rank count."""
    from llmlabs.data.loader import BestFitLoader

    loader = BestFitLoader(data, split, batch_size, seq_len, seed=0, rank=rank, world_size=world,
                           device=device, loop=False)
    rows = max(1, -(-max_tokens // seq_len))
    for k, (x, y) in enumerate(loader):
        keep = min(len(x), rows - (k * world + rank) * batch_size)  # rows before this rank's: k*world+rank batches
        if keep <= 0:
            return
        yield x[:keep], y[:keep]


def token_nats(logits, y):
    """Per-token cross-entropy in nats, float32 [B, T], of logits [B, T, vocab] against targets y."""
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view(y.shape)


def token_bytes_and_unigram(data, device):
    return data.tokenizer.token_bytes().to(device), unigram_log_probs(data).to(device)


def accumulate(sums, nats, y, token_bytes, unigram_logp):
    """Add one batch to sums = [nats, bytes, unigram nats, tokens] (float64). Targets with 0 bytes
    (special tokens) count in neither sum."""
    y = y.flatten()
    nbytes = token_bytes[y]
    counted = nbytes > 0
    sums[0] += (nats.flatten().double() * counted).sum()
    sums[1] += nbytes.sum(dtype=torch.float64)
    sums[2] += (-unigram_logp[y] * counted).sum(dtype=torch.float64)
    sums[3] += y.numel()


def bpb_result(sums, split, data) -> dict:
    nats, nbytes, uni_nats, ntok = sums.tolist()
    if nbytes == 0:
        raise LabError(f"the {split} split of {data.path} holds no scorable tokens: prepare more data "
                       "(a larger source or a larger split fraction)")
    return {"bpb": nats / (math.log(2) * nbytes), "unigram_bpb": uni_nats / (math.log(2) * nbytes),
            "tokens": int(ntok), "bytes": int(nbytes)}


@functools.lru_cache(maxsize=4)
def _train_counts(data):
    V = data.tokenizer.vocab_size
    return sum(np.bincount(tokens, minlength=V) for tokens, _ in data.shards("train"))


def unigram_log_probs(data):
    """log p(token) from train-split counts with add-one smoothing (so an unseen token costs a finite
    amount); specials are scored by no one, their value is irrelevant."""
    counts = torch.as_tensor(_train_counts(data), dtype=torch.float64)
    return torch.log((counts + 1) / (counts.sum() + counts.numel()))


def _rank_world():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# ---------------------------------------------------------------------------------------------
# `llmlabs eval RUN`

def add_args(p):
    p.add_argument("run", help="a run directory written by `llmlabs train`")
    p.add_argument("--split", choices=["val", "test"], default="val", help="which held-out split to score")
    p.add_argument("--tasks", default="bpb", type=_tasks,
                   help="comma-separated: bpb, and the offline multiple-choice tasks next_line and signature "
                        "(llmlabs/tasks.py; 'offline' = both); default bpb")
    p.add_argument("--items", type=flags.positive_int, default=200, help="items per multiple-choice task (default 200)")
    p.add_argument("--checkpoints", choices=["latest", "all"], default="latest",
                   help="score the newest checkpoint that loads, or every checkpoint the run kept (for evals.png)")
    p.add_argument("--tokens", type=flags.positive_int, help="target tokens to score (default: the run's --eval-tokens)")
    p.add_argument("--data", help="a data directory or a prepared corpus's name (default: the one the run was trained on)")
    p.add_argument("--device", help="cpu | cuda | mps (default: best available)")


def _tasks(s):
    import argparse

    from llmlabs.tasks import TASKS

    names = [t for t in s.replace(" ", "").split(",") if t]
    names = [x for t in names for x in (TASKS if t == "offline" else [t])]
    unknown = [t for t in names if t != "bpb" and t not in TASKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{s!r}: unknown task {', '.join(unknown) or '(none)'}; choose from bpb, "
                                         f"{', '.join(TASKS)}, offline")
    return list(dict.fromkeys(names))


def run(args):
    import json
    import time
    from pathlib import Path

    from llmlabs import checkpoint, plots, tasks
    from llmlabs.common import compute_init
    from llmlabs.data.shards import DataDir

    device = compute_init(args.device)[0]
    paths = [None] if args.checkpoints == "latest" else sorted(checkpoint.candidates(args.run), key=lambda p: int(p.name.split('_')[-1]))
    if not paths:
        raise LabError(f"{args.run} has no checkpoint (checkpoints/ is empty or missing): is it a run directory "
                       "of `llmlabs train`?")
    items, data, rows = {}, None, []
    for path in paths:
        model, ckpt = checkpoint.load_run(args.run, device, path)
        cfg = ckpt["run_config"]
        if data is None:
            data = DataDir.open(args.data or cfg["data"])
            if data.tokenizer.hash != ckpt["tokenizer_hash"]:
                raise LabError(f"tokenizer of {data.path} ({data.tokenizer.hash[:12]}) differs from the one {args.run} "
                               f"was trained with ({ckpt['tokenizer_hash'][:12]}): pass --data with the run's data directory")
        for task in args.tasks:
            if task == "bpb":
                autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
                res = evaluate_bpb(model, data, args.split, batch_size=cfg["device_batch_size"], seq_len=cfg["seq_len"],
                                   max_tokens=args.tokens or cfg["eval_tokens"], device=device, autocast=autocast)
                res = {"bpb": res["bpb"], "unigram_bpb": res["unigram_bpb"], "tokens": res["tokens"]}
                # the lines scripts grep, as `llmlabs train`'s summary block has them
                print(f"{args.split}_bpb: {res['bpb']:.6f}\nunigram_bpb: {res['unigram_bpb']:.6f}\n"
                      f"eval_tokens: {res['tokens']}")
            else:
                if task not in items:
                    items[task] = tasks.build(data, task, args.split, n=args.items)
                res = tasks.evaluate(model, data.tokenizer, items[task], device)
            rows.append({"step": ckpt["step"], "split": args.split, "task": task, **res})
    print(f"{'step':>7}  {'task':<10} {'split':<5} {'score':>9}  baseline")
    for r in rows:
        score, base = ((f"{r['bpb']:.6f}", f"unigram {r['unigram_bpb']:.4f} bpb ({r['tokens']:,} tokens)")
                       if r["task"] == "bpb" else
                       (f"{r['acc_norm']:.4f}", f"chance {r['chance']:.2f} (acc_norm; acc {r['acc']:.4f}, {r['items']} items)"))
        print(f"{r['step']:>7}  {r['task']:<10} {r['split']:<5} {score:>9}  {base}")
    out = Path(args.run) / "evals.jsonl"
    with open(out, "a") as f:  # every eval adds its rows: the plot shows scores over the run's checkpoints
        for r in rows:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), **r}) + "\n")
    plots.evals(out, Path(args.run) / "evals.png")
    print(f"results appended to {out}; plot {Path(args.run) / 'evals.png'}")
