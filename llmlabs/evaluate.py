"""val_bpb, the one definition, and the `llmlabs eval RUN` command (bpb, the offline tasks, CORE and
lm-eval tasks, routed by name).

bits per byte = (summed nats over target tokens) / (ln 2 x summed UTF-8 bytes of those targets).
Special tokens (BOS, image tokens) have 0 bytes and are left out of both sums, so the number does not
depend on the tokenizer's vocabulary and can be compared across vocab sizes. The harness computes the
loss from the model's logits itself: the model never sees the targets during evaluation, so an edit
to the model's loss cannot change the score.
"""
import functools
import math
import os

import numpy as np

import torch
import torch.nn.functional as F

from llmlabs import flags
from llmlabs.common import LabError
from llmlabs.tasks import TASKS


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

OWN_TASKS = ("bpb", *TASKS, "offline", "core")  # every other name is an lm-eval task
OFFLINE_ITEMS = 200


def add_args(p):
    p.add_argument("run", help="a run directory written by `llmlabs train`")
    p.add_argument("--split", choices=["val", "test"], default="val", help="which held-out split bpb and the offline "
                                                                         "tasks score")
    p.add_argument("--tasks", default="bpb", type=_tasks,
                   help="comma-separated: bpb; the offline multiple-choice tasks next_line and signature "
                        "(llmlabs/tasks.py; 'offline' = both); core (DCLM's CORE, after `llmlabs prepare core`); any "
                        "other name is an lm-evaluation-harness task, e.g. hellaswag,arc_easy (pip install "
                        "'llmlabs[eval]'); default bpb")
    p.add_argument("--items", type=flags.positive_int,
                   help=f"items per task (default: {OFFLINE_ITEMS} for the offline tasks, all for CORE and lm-eval, "
                        "where it is lm-eval's --limit)")
    p.add_argument("--include-path", help="a folder of extra lm-eval task YAML files (lm-eval's --include_path), e.g. "
                                          "a task on local jsonl files")
    p.add_argument("--checkpoints", choices=["latest", "all"], default="latest",
                   help="score the newest checkpoint that loads, or every checkpoint the run kept (for evals.png)")
    p.add_argument("--tokens", type=flags.positive_int, help="target tokens to score (default: the run's --eval-tokens)")
    p.add_argument("--data", help="a data directory or a prepared corpus's name (default: the one the run was trained on)")
    p.add_argument("--device", help="cpu | cuda | mps (default: best available)")


def _tasks(s):
    import argparse

    names = [t for t in s.replace(" ", "").split(",") if t]
    if not names:
        raise argparse.ArgumentTypeError(f"{s!r} names no task: give e.g. bpb,offline,core or lm-eval task names")
    return list(dict.fromkeys(x for t in names for x in (TASKS if t == "offline" else [t])))


def _lm_eval(names, include_path):
    """The adapter module and an lm-eval TaskManager that knows every name, or one line saying what is wrong."""
    if include_path and not os.path.isdir(include_path):
        raise LabError(f"--include-path {include_path} is not a folder: give the folder of your task YAML files")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise LabError(f"{', '.join(names)}: not one of {', '.join(OWN_TASKS)}, so lm-eval tasks, and lm-eval is not "
                       "installed: pip install 'llmlabs[eval]'") from None
    from lm_eval.tasks import TaskManager

    from llmlabs import lm_eval_adapter

    # indexing lm-eval's own ~15k task files takes ~10 s: tasks that are all under --include-path skip it
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or set(names) - set(manager.all_tasks):
        manager = TaskManager(include_path=include_path)
    if unknown := [n for n in names if n not in manager.all_tasks]:
        raise LabError(f"unknown task {', '.join(map(repr, unknown))}: not one of {', '.join(OWN_TASKS)}, nor an lm-eval "
                       "task (`lm-eval ls tasks` lists them; --include-path adds your own)")
    return lm_eval_adapter, manager


def _lm_eval_rows(out) -> list[dict]:
    """One row per task lm-eval reports (a group's subtasks too), headed by acc_norm, acc or exact_match."""
    rows = []
    for name, metrics in out["results"].items():
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        scores = [k for k in numbers if "_stderr" not in k]
        if scores:
            head = next((m for m in ("acc_norm,none", "acc,none", "exact_match,none") if m in numbers), scores[0])
            rows.append({"task": name, "split": "-", "score": numbers[head], "metric": head, "metrics": numbers,
                         "items": out["n-samples"].get(name, {}).get("effective")})
    return rows


def run(args):
    import json
    import time
    from pathlib import Path

    from llmlabs import checkpoint, core_eval, plots, tasks
    from llmlabs.common import compute_init
    from llmlabs.data.shards import DataDir
    from llmlabs.data.tokenizer import Tokenizer

    # what can fail without a model does so first: unknown names, no lm-eval, no CORE bundle
    lm_names = [t for t in args.tasks if t not in OWN_TASKS]
    if args.include_path and not lm_names:
        raise LabError(f"--include-path adds lm-eval tasks, and --tasks {','.join(args.tasks)} names none: name "
                       "them, or drop --include-path")
    adapter, manager = _lm_eval(lm_names, args.include_path) if lm_names else (None, None)
    core_tasks = core_eval.load_tasks() if "core" in args.tasks else None
    device = compute_init(args.device)[0]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    paths = [None] if args.checkpoints == "latest" else sorted(checkpoint.candidates(args.run), key=lambda p: int(p.name.split('_')[-1]))
    if not paths:
        raise LabError(f"{args.run} has no checkpoint (checkpoints/ is empty or missing): is it a run directory "
                       "of `llmlabs train`?")
    items, data, rows = {}, None, []
    for path in paths:
        model, ckpt = checkpoint.load_run(args.run, device, path)
        cfg = ckpt["run_config"]
        if data is None and {"bpb", *TASKS} & set(args.tasks):
            data = DataDir.open(args.data or cfg["data"])
        tokenizer = data.tokenizer if data else Tokenizer.load(Path(args.run) / "tokenizer.json")
        if tokenizer.hash != ckpt["tokenizer_hash"]:
            raise LabError(f"tokenizer of {data.path if data else args.run} ({tokenizer.hash[:12]}) differs from the one "
                           f"{args.run} was trained with ({ckpt['tokenizer_hash'][:12]}): pass --data with the run's data "
                           "directory")
        encoder = ckpt.get("encoder")
        if encoder is not None and set(args.tasks) - {"bpb"}:  # its LM alone would read captions without images
            raise LabError(f"{args.run} is a --vision run, scored on its captions after their images: use --tasks bpb")
        for task in (t for t in args.tasks if t not in lm_names):
            if task == "bpb" and encoder is not None:  # caption bpb, and text bpb where the data has text/
                from llmlabs import multimodal

                res = multimodal.evaluate(model, encoder, data, multimodal.text_data(data), args.split, device,
                                          batch_size=cfg["device_batch_size"], seq_len=cfg["seq_len"],
                                          max_tokens=args.tokens or cfg["eval_tokens"], autocast=autocast)
                res = {"split": args.split, **{k: res[k] for k in ("bpb", "unigram_bpb", "tokens", "caption_bpb",
                                                                   "text_bpb") if k in res}}
                print("\n".join([f"{args.split}_bpb: {res['bpb']:.6f}", *(f"{args.split}_{k}: {res[k]:.6f}" for k in (
                    "caption_bpb", "text_bpb") if k in res), f"unigram_bpb: {res['unigram_bpb']:.6f}",
                    f"eval_tokens: {res['tokens']}"]))
            elif task == "bpb":
                res = evaluate_bpb(model, data, args.split, batch_size=cfg["device_batch_size"], seq_len=cfg["seq_len"],
                                   max_tokens=args.tokens or cfg["eval_tokens"], device=device, autocast=autocast)
                res = {"split": args.split, "bpb": res["bpb"], "unigram_bpb": res["unigram_bpb"], "tokens": res["tokens"]}
                # the lines scripts grep, as `llmlabs train`'s summary block has them
                print(f"{args.split}_bpb: {res['bpb']:.6f}\nunigram_bpb: {res['unigram_bpb']:.6f}\n"
                      f"eval_tokens: {res['tokens']}")
            elif task == "core":
                res = core_eval.evaluate_core(model, tokenizer, device, core_tasks, max_items=args.items,
                                              autocast=autocast, log=True)
                res = {"split": "-", "score": res["core"], "metric": "core", **res,
                       "items": sum(t["items"] for t in res["tasks"].values())}
                print(f"core: {res['core']:.6f}")
            else:
                if task not in items:
                    items[task] = tasks.build(data, task, args.split, n=args.items or OFFLINE_ITEMS)
                res = tasks.evaluate(model, tokenizer, items[task], device)
                res = {"split": args.split, "score": res["acc_norm"], "metric": "acc_norm", **res}
            rows.append({"step": ckpt["step"], "task": task, **res})
        if lm_names:
            from lm_eval import simple_evaluate

            lm = adapter.LabLM(model, tokenizer, cfg["device_batch_size"], autocast)
            out = simple_evaluate(model=lm, tasks=lm_names, task_manager=manager, limit=args.items, log_samples=False)
            rows += [{"step": ckpt["step"], **r} for r in _lm_eval_rows(out)]
    print(f"{'step':>7}  {'task':<12} {'split':<5} {'score':>9}  baseline")
    for r in rows:
        if r["task"] == "bpb":
            score, base = f"{r['bpb']:.6f}", f"unigram {r['unigram_bpb']:.4f} bpb ({r['tokens']:,} tokens)"
        elif r["task"] == "core":
            score, base = f"{r['core']:.4f}", f"chance 0 (centered; {len(r['tasks'])} tasks, {r['items']:,} items)"
        elif r["task"] in TASKS:
            score, base = f"{r['score']:.4f}", f"chance {r['chance']:.2f} (acc_norm; acc {r['acc']:.4f}, {r['items']} items)"
        else:
            score, base = f"{r['score']:.4f}", f"lm-eval {r['metric']} ({r['items']} items)"
        print(f"{r['step']:>7}  {r['task']:<12} {r['split']:<5} {score:>9}  {base}")
    out = Path(args.run) / "evals.jsonl"
    with open(out, "a") as f:  # every eval adds its rows: the plot shows scores over the run's checkpoints
        for r in rows:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), **r}) + "\n")
    plots.evals(out, Path(args.run) / "evals.png")
    print(f"results appended to {out}; plot {Path(args.run) / 'evals.png'}")
