"""Downstream tasks that need no download: multiple choice on held-out Python source.

val_bpb says how well a model predicts text; these say whether it gets a discrete choice right,
which is what downstream benchmarks measure (HellaSwag, ARC: pick the right continuation). Built
from the held-out documents of the run's own data directory (the val split by default), so every
CPU-only user can track a downstream score on the built-in corpus. Deterministic: the same data
directory gives the same items, in the same order, on every machine.

- next_line: after the lines of a file up to line i, which of four lines comes next: the true line
  i+1 or one of three other lines drawn from the same file (so style and names cannot give it away).
- signature: after a file up to `def name(`, which of four parameter lists ends the line: the true
  one or those of three other functions of the same file.

Each choice is scored as lm-evaluation-harness scores multiple choice: the log-likelihood the model
gives the continuation after the context. Context and continuation are tokenized apart (lm-eval 0.3's
way; 0.4 moves the context's trailing whitespace into the continuation and cuts the whole text's tokens
where the context's end, other tokens wherever BPE merges across the cut: bench/lm_eval_local.py scores
both). `acc` picks the highest total log-likelihood, `acc_norm` the highest per UTF-8 byte (lm-eval's
acc_bytes; longer answers are not penalised); chance is 1/4 for both.
"""
import random

import torch
import torch.nn.functional as F

from llmlabs.common import LabError

CHOICES = 4
CONTEXT_TOKENS = 384  # tokens of the file before the choice the model sees (the file's tail up to it)
MIN_LINE_CHARS = 12   # shorter lines (`else:`, `)`, blank) are too easy to tell apart or to confuse
MAX_CHOICE_CHARS = 100  # longer choices are left out, so every item fits small models' contexts


def _documents(data, split):
    """The split's documents as text, in shard order."""
    bos = data.tokenizer.bos_id
    for tokens, offsets in data.shards(split):
        for a, b in zip(offsets[:-1], offsets[1:]):
            ids = [int(t) for t in tokens[a:b] if int(t) != bos]
            if ids:
                yield data.tokenizer.decode(ids)


def _next_line_items(text, rng, per_doc):
    lines = text.split("\n")
    good = [i for i, line in enumerate(lines) if MIN_LINE_CHARS <= len(line.strip()) and len(line) <= MAX_CHOICE_CHARS]
    distinct = sorted({lines[i] for i in good})
    if len(distinct) < CHOICES + 1:
        return []
    items = []
    for i in rng.sample([i for i in good if i > 0], min(per_doc, len(good) - 1)):
        others = rng.sample([line for line in distinct if line != lines[i]], CHOICES - 1)
        items.append(("\n".join(lines[:i]) + "\n", lines[i], others))
    return items


def _signature_items(text, rng, per_doc):
    defs = []  # (offset of the text after "def name(", the rest of that line)
    start = 0
    while (i := text.find("def ", start)) >= 0:
        start = i + 4
        paren, eol = text.find("(", i), text.find("\n", i)
        if (i == 0 or text[i - 1] in " \n") and 0 < paren < (eol if eol >= 0 else len(text)):
            rest = text[paren + 1:eol if eol >= 0 else len(text)]
            if rest.strip() and len(rest) <= MAX_CHOICE_CHARS:
                defs.append((paren + 1, rest))
    distinct = sorted({rest for _, rest in defs})
    if len(distinct) < CHOICES:
        return []
    items = []
    for at, rest in rng.sample(defs, min(per_doc, len(defs))):
        others = [r for r in distinct if r != rest]
        if len(others) >= CHOICES - 1:
            items.append((text[:at], rest, rng.sample(others, CHOICES - 1)))
    return items


TASKS = {"next_line": _next_line_items, "signature": _signature_items}


def build(data, task, split="val", n=200, per_doc=2, seed=0):
    """Up to n items (context, true continuation, [distractors]) of `task` from `split`'s documents,
    at most per_doc from one document, the true answer's place among the choices drawn by the seed."""
    if task not in TASKS:
        raise LabError(f"unknown task {task!r}: the offline tasks are {', '.join(TASKS)}")
    rng = random.Random(seed)
    items = []
    for text in _documents(data, split):
        for context, true, others in TASKS[task](text, rng, per_doc):
            choices = others[:]
            answer = rng.randrange(CHOICES)
            choices.insert(answer, true)
            items.append({"context": context, "choices": choices, "answer": answer})
            if len(items) == n:
                return items
    if not items:
        raise LabError(f"the {split} split of {data.path} has no document with {CHOICES} usable lines for {task}: "
                       "these tasks are made for source code (pysrc, pystdlib)")
    return items


@torch.no_grad()
def continuation_logprobs(model, tokenizer, context, continuations, device):
    """Summed log-probability of each continuation after `context` (one row per continuation, right
    padded; the last CONTEXT_TOKENS tokens of the context, at most the model's context in all)."""
    ctx = [tokenizer.bos_id] + tokenizer.encode(context)
    conts = [tokenizer.encode(c) for c in continuations]
    room = model.config.sequence_len - max(len(c) for c in conts)
    if room < 2:
        raise LabError(f"a continuation of {max(len(c) for c in conts)} tokens does not fit the model's context")
    ctx = ctx[-min(CONTEXT_TOKENS, room):]
    rows = [ctx + c for c in conts]
    T = max(map(len, rows))
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    for r, row in enumerate(rows):
        idx[r, :len(row)] = torch.tensor(row)
    logp = F.log_softmax(model(idx.to(device)).double(), dim=-1)
    out = []
    for r, c in enumerate(conts):
        targets = torch.tensor(c, device=device)
        positions = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(c), device=device)
        out.append(float(logp[r, positions, targets].sum()))
    return out


def evaluate(model, tokenizer, items, device) -> dict:
    """acc and acc_norm over the items, and chance (1 / choices)."""
    was_training = model.training
    model.eval()
    hits = hits_norm = 0
    for item in items:
        lp = continuation_logprobs(model, tokenizer, item["context"], item["choices"], device)
        per_byte = [v / max(len(c.encode("utf-8")), 1) for v, c in zip(lp, item["choices"])]
        hits += max(range(len(lp)), key=lp.__getitem__) == item["answer"]
        hits_norm += max(range(len(per_byte)), key=per_byte.__getitem__) == item["answer"]
    model.train(was_training)
    return {"acc": hits / len(items), "acc_norm": hits_norm / len(items), "chance": 1 / CHOICES, "items": len(items)}
