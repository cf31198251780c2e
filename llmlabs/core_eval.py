"""CORE: DCLM's 22-task in-context-learning score (Li et al., DataComp-LM, arXiv 2406.11794), computed
as nanochat reports it (its nanochat/core_eval.py and scripts/base_eval.py; this is our own code).

`llmlabs prepare core` downloads nanochat's eval bundle (BUNDLE_URL, or $LLMLABS_CORE_URL), checks its
sha256 (BUNDLE_SHA256, or $LLMLABS_CORE_SHA256 for a bundle you trust) and unpacks it atomically into
$LLMLABS_HOME/core: core.yaml (the tasks), eval_meta_data.csv (each task's random baseline, in percent)
and eval_data/<dataset_uri> (one JSON item a line). That is the one networked step: scoring reads
only that folder.

Each item follows `num_fewshot` other items of its task (drawn by random.Random(1234 + the item's
index)), each of them completed with its answer and a blank line; the prompts are tokenized whole,
after BOS:
- multiple_choice {query, choices, gold}: a prompt `query + delimiter + choice` per choice; the
  choice whose tokens after the prompts' common prefix have the lowest mean loss is the answer.
- schema {context_options, continuation, gold}: a prompt `option + delimiter + continuation` per
  context option, scored like multiple choice over the prompts' common suffix (the continuation).
- language_modeling {context, continuation}: right when greedy decoding gives every token of the
  continuation.
A prompt longer than the model's context keeps its last sequence_len tokens.

A task's accuracy is centered by its random baseline b: (acc - 0.01 b) / (1 - 0.01 b), so chance
scores 0 and a perfect model 1; CORE is the mean of the centered scores. `max_items` caps a task at
its first items after a random.Random(1337) shuffle (nanochat's --max-per-task, the same items).
"""
import csv
import hashlib
import json
import os
import random
import shutil
import tempfile
import zipfile
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from llmlabs.common import LabError, atomic_write_json, llmlabs_home, print0

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
# The sha256 that projects built on nanochat pin for that zip (several agree). It could not be checked
# from the machine this was written on (no route to the URL); a different file is refused with a line
# saying how to accept it.
BUNDLE_SHA256 = "90a7c19e28ee7a52b4f6e1f87658deb9fde7f63deba2379045bdb1fe9ea5d200"
URL_VAR, SHA_VAR = "LLMLABS_CORE_URL", "LLMLABS_CORE_SHA256"
TYPES = ("multiple_choice", "schema", "language_modeling")
TRAIN_ITEMS = 500     # items per task for `llmlabs train --eval-core-every` (nanochat's base_train scores 500)
BATCH_TOKENS = 2**14  # padded tokens per forward: several items a forward, the [rows, T, vocab] logits bounded


def bundle_dir() -> Path:
    return llmlabs_home() / "core"


# ---------------------------------------------------------------------------------------------
# the bundle: `llmlabs prepare core`

def prepare(force=False) -> Path:
    """Download, check and unpack the bundle into bundle_dir(), once (force: again)."""
    from llmlabs.data.hub import fetch

    url = os.environ.get(URL_VAR) or BUNDLE_URL
    want = (os.environ.get(SHA_VAR) or BUNDLE_SHA256).lower()
    out = bundle_dir()
    if (out / "bundle.json").is_file() and not force:
        have = json.loads((out / "bundle.json").read_text())["sha256"]
        if have != want:
            raise LabError(f"{out} holds the bundle with sha256 {have[:16]}..., not the expected {want[:16]}...: "
                           "pass --force to replace it")
        print0(f"core: {out} (already prepared; --force downloads it again)")
        return out
    archive = out.with_name("core-bundle.zip")  # kept until unpacked: an interrupted unpack needs no new download
    fetch(url, archive, (f"the URL ({URL_VAR} sets another)", f"set {URL_VAR} to another copy"))
    got = hashlib.sha256(archive.read_bytes()).hexdigest()
    if got != want:
        archive.unlink()
        raise LabError(f"{url} has sha256 {got[:16]}..., not the expected {want[:16]}... (deleted): a damaged download "
                       f"or another bundle; re-run, or set {SHA_VAR} to the sha256 of a bundle you trust")
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".core-"))
    try:
        try:
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)  # zipfile strips '/' and '..' from member names: nothing lands outside tmp
        except zipfile.BadZipFile as e:
            raise LabError(f"{url} is not a zip file ({e}): set {URL_VAR} to the eval bundle's zip") from None
        tasks = load_tasks(tmp / "eval_bundle")  # refuses a bundle without its config, baselines or data
        atomic_write_json(tmp / "eval_bundle" / "bundle.json", {"url": url, "sha256": got})
        if out.exists():  # --force: the old bundle moves out only once the new one is complete
            os.replace(out, tmp / "old")
        os.replace(tmp / "eval_bundle", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    archive.unlink()
    kinds = ", ".join(f"{sum(t['type'] == k for t in tasks)} {k}" for k in TYPES)
    print0(f"core: {len(tasks)} tasks ({kinds}) in {out}")
    return out


def load_tasks(root=None) -> list[dict]:
    """The bundle's tasks in core.yaml's order: label, type, fewshot, delimiter, baseline (%), path."""
    import yaml

    root = Path(root or bundle_dir())
    if not (root / "core.yaml").is_file():
        raise LabError(f"no CORE bundle in {root}: run `llmlabs prepare core` (it downloads the bundle once)")
    damaged = f"the CORE bundle in {root} is damaged"
    try:
        config = yaml.safe_load((root / "core.yaml").read_text(encoding="utf-8"))
        with open(root / "eval_meta_data.csv", newline="", encoding="utf-8") as f:
            baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
        tasks = [{"label": t["label"], "type": t["icl_task_type"], "fewshot": int(t["num_fewshot"][0]),
                  "delimiter": t.get("continuation_delimiter", " "), "baseline": baselines[t["label"]],
                  "path": root / "eval_data" / t["dataset_uri"]} for t in config["icl_tasks"]]
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError, ValueError) as e:
        raise LabError(f"{damaged} ({type(e).__name__}: {e}): `llmlabs prepare core --force` downloads it "
                       "again") from None
    if not tasks:
        raise LabError(f"{damaged}: core.yaml lists no task; `llmlabs prepare core --force` downloads it again")
    for t in tasks:
        if t["type"] not in TYPES:
            raise LabError(f"{damaged}: task {t['label']} is of type {t['type']!r}, CORE has {', '.join(TYPES)}; "
                           "`llmlabs prepare core --force` downloads it again")
        if not t["path"].is_file():
            raise LabError(f"{damaged}: {t['path']} is missing; `llmlabs prepare core --force` downloads it again")
    return tasks


# ---------------------------------------------------------------------------------------------
# scoring

def centered(acc: float, baseline: float) -> float:
    """Accuracy rescaled so the random baseline (in percent) is 0 and a perfect score 1."""
    return (acc - 0.01 * baseline) / (1 - 0.01 * baseline)


def evaluate_core(model, tokenizer, device, tasks=None, *, max_items=None, autocast=None, log=False) -> dict:
    """Score `tasks` (default: the prepared bundle's) and center them. Under torchrun each rank scores
    every world-th item and the counts are summed. Returns {"core", "tasks": {label: {"acc",
    "centered", "baseline", "items"}}}."""
    tasks = tasks if tasks is not None else load_tasks()
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    was_training = model.training
    model.eval()
    results = {}
    for task in tasks:
        items = _items(task, max_items)
        if task["fewshot"] >= len(items):
            raise LabError(f"CORE task {task['label']} is {task['fewshot']}-shot and has {len(items)} items here: "
                           f"score at least {task['fewshot'] + 1} (--items)")
        counts = torch.tensor(_score(model, tokenizer, task, items, device, autocast or nullcontext(), rank, world),
                              dtype=torch.float64, device=device)
        if world > 1:
            torch.distributed.all_reduce(counts)
        acc = counts[0].item() / counts[1].item()
        results[task["label"]] = {"acc": acc, "centered": centered(acc, task["baseline"]),
                                  "baseline": task["baseline"], "items": int(counts[1].item())}
        if log:
            print0(f"core {task['label']:<34} {task['fewshot']:>2}-shot  acc {acc:.4f}  centered "
                   f"{results[task['label']]['centered']:+.4f}", flush=True)
    model.train(was_training)
    return {"core": sum(r["centered"] for r in results.values()) / len(results), "tasks": results}


def _items(task, max_items):
    with open(task["path"], encoding="utf-8") as f:
        items = [json.loads(line) for line in f if line.strip()]
    random.Random(1337).shuffle(items)  # nanochat's order, so that a cap takes the same items
    return items[:max_items] if max_items else items


def _shots(items, i, k):
    if not k:
        return []
    rng = random.Random(1234 + i)
    return [items[j] for j in rng.sample([j for j in range(len(items)) if j != i], k)]


def _render(kind, item, shots, delim) -> list[str]:
    """The prompts of one item, as nanochat's templates render them. language_modeling: the prompt
    without the answer (stripped: a trailing space would be its own token) and with it."""
    if kind == "multiple_choice":
        prefix = "".join(f"{s['query']}{delim}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [f"{prefix}{item['query']}{delim}{c}" for c in item["choices"]]
    if kind == "schema":
        prefix = "".join(f"{s['context_options'][s['gold']]}{delim}{s['continuation']}\n\n" for s in shots)
        return [f"{prefix}{c}{delim}{item['continuation']}" for c in item["context_options"]]
    prefix = "".join(f"{s['context'].strip()}{delim}{s['continuation']}\n\n" for s in shots)
    without = f"{prefix}{item['context'].strip()}{delim}"
    return [without.strip(), without + item["continuation"]]


def _common_prefix(rows) -> int:
    n = 0
    for column in zip(*rows):
        if any(t != column[0] for t in column):
            break
        n += 1
    return n


def _spans(kind, rows):
    """(tokens, start, end) of each row to score: the answer is tokens[start:end]."""
    if kind == "multiple_choice":
        start = _common_prefix(rows)
        return [(r, start, len(r)) for r in rows]
    if kind == "schema":
        n = _common_prefix([r[::-1] for r in rows])
        return [(r, len(r) - n, len(r)) for r in rows]
    # the answer: what the prompt with it adds to the one without (nanochat asserts the latter is a prefix)
    return [(rows[1], _common_prefix(rows), len(rows[1]))]


@torch.no_grad()
def _score(model, tokenizer, task, items, device, autocast, rank, world):
    """(right, scored) over this rank's share of the items, several items a forward."""
    L = model.config.sequence_len
    batch, right, scored = [], 0, 0
    for i in range(rank, len(items), world):
        prompts = _render(task["type"], items[i], _shots(items, i, task["fewshot"]), task["delimiter"])
        rows = []
        for tokens, start, end in _spans(task["type"], [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]):
            cut = max(0, len(tokens) - L)  # too long: keep the last L tokens
            if start - cut < 1:
                raise LabError(f"CORE task {task['label']}: an answer of {end - start} tokens does not fit the "
                               f"model's context of {L} tokens")
            rows.append((tokens[cut:], start - cut, end - cut))
        batch.append((items[i].get("gold"), rows))
        padded = sum(len(r) for _, r in batch) * max(len(t) for _, r in batch for t, _, _ in r)
        if padded >= BATCH_TOKENS or i + world >= len(items):
            hits = _judge(model, task["type"], batch, tokenizer.bos_id, device, autocast)
            right, scored, batch = right + sum(hits), scored + len(hits), []
    return right, scored


def _judge(model, kind, batch, pad_id, device, autocast) -> list[bool]:
    """Whether the model gets each item of `batch` [(gold, rows)] right, from one forward."""
    flat = [row for _, rows in batch for row in rows]
    ids = torch.full((len(flat), max(len(t) for t, _, _ in flat)), pad_id, dtype=torch.long)
    for k, (tokens, _, _) in enumerate(flat):  # right padding: a causal model's earlier positions never see it
        ids[k, :len(tokens)] = torch.tensor(tokens)
    ids = ids.to(device)
    with autocast:
        logits = model(ids)[:, :-1]
    targets = ids[:, 1:]
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    hits, k = [], 0
    for gold, rows in batch:
        if kind == "language_modeling":
            _, s, e = flat[k]
            hits.append(bool((logits[k, s - 1:e - 1].argmax(-1) == targets[k, s - 1:e - 1]).all()))
        else:  # the lowest mean loss over the answer's tokens; ties go to the first, as list.index does
            mean = [losses[k + j, s - 1:e - 1].mean().item() for j, (_, s, e) in enumerate(rows)]
            hits.append(mean.index(min(mean)) == gold)
        k += len(rows)
    return hits
