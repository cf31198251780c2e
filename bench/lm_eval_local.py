"""lm-evaluation-harness through the lab's adapter (llmlabs/lm_eval_adapter.py) on a trained run, offline: lm-eval
tasks written as local jsonl files from the run's held-out (val) split, cross-checked against the lab's own scoring.

    PYTHONPATH=. python3 bench/lm_eval_local.py RUN [--items 200] [--tasks-dir DIR] [--device cuda|cpu]
        [--out FILE.jsonl]

- lab_next_line, lab_signature: the offline suite's items (llmlabs.tasks.build) as lm-eval multiple_choice tasks,
  target_delimiter "" (lm-eval scores context + choice, the strings tasks.evaluate scores), each context cut at a
  line start to what the lab's window keeps (tasks.CONTEXT_TOKENS with BOS), so neither side truncates it. Scored by
  lm-eval with pairs tokenized as the lab does (context and choice apart), by lm-eval as `llmlabs eval` runs it
  (its TemplateLM split: the context's trailing whitespace moved into the continuation, the whole text tokenized
  and cut where the context's tokens end: other tokens for every next_line choice and many signatures), and by
  tasks.evaluate. The first and the last must agree on acc and on the lab's per-byte acc_norm (lm-eval's
  acc_bytes), up to items whose two best choices lie within TIE nats; else the script exits 1.
- lab_heldout_bpb: loglikelihood_rolling over the first --items val documents (each cut to DOC_CHARS): lm-eval's
  bits_per_byte and word_perplexity, beside the run's val_bpb (evaluate_bpb), which differs by design.
Both score in float32 (TF32 off, no autocast): the check is of the plumbing, not of precision.
Offline, lm-eval installs from carried wheels: python3 -m pip install --no-index --find-links .lmw lm_eval==0.4.13
"""
import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmlabs import checkpoint, flags, tasks
from llmlabs.common import LabError, compute_init
from llmlabs.data.shards import DataDir
from llmlabs.evaluate import evaluate_bpb

TIE = 1e-3  # nats: two choices this close may swap between float32 (lm-eval) and float64 (tasks.py) log-softmax
DOC_CHARS = 8000  # a held-out file's head: a few of the model's windows at most
MC = ('output_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: answer\n'
      'target_delimiter: ""\nmetric_list:\n' + "".join(f"  - {{metric: {m}, aggregation: mean, higher_is_better: true}}\n"
                                                    for m in ("acc", "acc_norm", "acc_bytes")))
ROLLING = ('output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: text\nmetric_list:\n'
           '  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}\n'
           '  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}\n')


def fitted(item, tok, seq_len):
    """The item, its context cut at a line start to the tokens the lab's scoring keeps (BOS included): then
    tasks.continuation_logprobs keeps the whole context and the adapter the whole row."""
    ctx = item["context"]
    budget = min(tasks.CONTEXT_TOKENS, seq_len - max(len(tok.encode(c)) for c in item["choices"])) - 1
    if budget < 1:
        raise LabError(f"a choice of the offline tasks does not fit the model's context of {seq_len} tokens")
    lo, hi = 0, len(ctx) - 1  # the first start that fits: token counts fall as the start moves right
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if len(tok.encode(ctx[mid:])) <= budget else (mid + 1, hi)
    if lo > 0 and ctx[lo - 1] != "\n" and 0 <= (nl := ctx.find("\n", lo, len(ctx) - 1)):
        lo = nl + 1
    while len(tok.encode(ctx[lo:])) > budget:  # where BPE made the count not quite monotone
        lo += 1
    return {**item, "context": ctx[lo:]}


def write_task(folder, name, rows, spec):
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(  # paths as JSON strings: valid YAML whatever they hold
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        f"  cache_dir: {json.dumps(str(folder / 'hf'))}\ntest_split: test\n{spec}")


def run_lm_eval(lm, name, manager):
    from lm_eval import simple_evaluate

    t0 = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=[name], task_manager=manager, log_samples=True, bootstrap_iters=0)
    return out["results"][name], out["samples"][name], time.perf_counter() - t0


def near_ties(samples):
    """Items whose two best choices lie within TIE, by total log-likelihood and per byte."""
    def tie(values):
        second, first = sorted(values)[-2:]
        return first - second < TIE

    raw = norm = 0
    for s in samples:
        lls = [r[0][0] for r in s["resps"]]
        raw += tie(lls)
        norm += tie([v / max(len(c.encode()), 1) for v, c in zip(lls, s["doc"]["choices"])])
    return raw, norm


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run directory written by `llmlabs train`")
    p.add_argument("--items", type=flags.positive_int, default=200, help="items per multiple-choice task, documents for the rolling one")
    p.add_argument("--tasks-dir", help="write the lm-eval task folder here and keep it (default: a temporary folder)")
    p.add_argument("--device", help="cpu | cuda (default: best available)")
    p.add_argument("--out", help="append each row as a JSON line to this file")
    args = p.parse_args(argv)
    try:
        return bench(args)
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def bench(args):
    device = compute_init(args.device)[0]
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model, ckpt = checkpoint.load_run(args.run, device)
    cfg = ckpt["run_config"]
    if "encoder" in ckpt:
        raise LabError(f"{args.run} is a --vision run: its captions need their images, which text tasks lack; "
                       "score it with `llmlabs eval RUN` (caption bpb)")
    data = DataDir.open(cfg["data"])
    tok = data.tokenizer
    if tok.hash != ckpt["tokenizer_hash"]:
        raise LabError(f"{data.path}'s tokenizer is not the one {args.run} was trained with: restore the run's data "
                       "directory (its run_config names it)")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local json files only: never wait on the hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LabError("lm-eval is not installed: pip install 'llmlabs[eval]' (offline: python3 -m pip install "
                       "--no-index --find-links .lmw lm_eval==0.4.13)") from None
    from llmlabs.lm_eval_adapter import LabLM

    class LabSplitLM(LabLM):
        def _encode_pair(self, context, continuation):  # as tasks.continuation_logprobs: apart, nothing moved
            return self.tok_encode(context), self.tok_encode(continuation, add_special_tokens=False)

    temp = None if args.tasks_dir else tempfile.TemporaryDirectory()
    folder = Path(args.tasks_dir or temp.name)
    folder.mkdir(parents=True, exist_ok=True)
    items, cut = {}, 0
    for task in tasks.TASKS:
        built = tasks.build(data, task, "val", n=args.items)
        items[task] = [fitted(it, tok, model.config.sequence_len) for it in built]
        cut += sum(a["context"] != b["context"] for a, b in zip(built, items[task]))
        write_task(folder, f"lab_{task}", items[task], MC)
    docs = [{"text": t[:DOC_CHARS]} for t in itertools.islice(tasks._documents(data, "val"), args.items)]
    write_task(folder, "lab_heldout_bpb", docs, ROLLING)
    manager = TaskManager(include_path=str(folder), include_defaults=False)

    commit = os.environ.get("LLMLABS_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# {time.strftime('%Y-%m-%d')} | {name} | torch {torch.__version__} | lm_eval {lm_eval.__version__} | "
          f"commit {commit} | {args.run} step {ckpt['step']}, seq_len {model.config.sequence_len}, "
          f"{sum(q.numel() for q in model.parameters()) / 1e6:.1f}M params")
    base = {"run": str(args.run), "step": ckpt["step"], "device": name, "commit": commit}
    rows, failed = [], []
    for task in tasks.TASKS:
        t0 = time.perf_counter()
        lab = tasks.evaluate(model, tok, items[task], device)
        lab_s = time.perf_counter() - t0
        for scorer, cls in (("lm-eval, lab's split", LabSplitLM), ("lm-eval, its split", LabLM)):
            res, samples, secs = run_lm_eval(cls(model, tok, cfg["device_batch_size"]), f"lab_{task}", manager)
            row = {"task": f"lab_{task}", "scorer": scorer, "acc": res["acc,none"], "acc_norm": res["acc_bytes,none"],
                   "acc_norm_chars": res["acc_norm,none"], "items": len(samples), "seconds": secs}
            row["d_acc"], row["d_norm"] = abs(row["acc"] - lab["acc"]), abs(row["acc_norm"] - lab["acc_norm"])
            if cls is LabSplitLM:
                ties, ties_norm = near_ties(samples)
                row["near_ties"] = [ties, ties_norm]
                if len(samples) != lab["items"] or row["d_acc"] * lab["items"] > ties + 1e-6 or \
                        row["d_norm"] * lab["items"] > ties_norm + 1e-6:
                    failed.append(f"lab_{task}: lm-eval acc {row['acc']:.4f} / acc_bytes {row['acc_norm']:.4f} on "
                                  f"{len(samples)} items, tasks.evaluate {lab['acc']:.4f} / {lab['acc_norm']:.4f} on "
                                  f"{lab['items']} ({ties} / {ties_norm} near ties)")
            rows.append(row)
        rows.append({"task": f"lab_{task}", "scorer": "tasks.evaluate", "acc": lab["acc"], "acc_norm": lab["acc_norm"],
                     "items": lab["items"], "seconds": lab_s})
    res, samples, secs = run_lm_eval(LabLM(model, tok, cfg["device_batch_size"]), "lab_heldout_bpb", manager)
    rows.append({"task": "lab_heldout_bpb", "scorer": "lm-eval rolling", "bits_per_byte": res["bits_per_byte,none"],
                 "word_perplexity": res["word_perplexity,none"], "items": len(samples), "seconds": secs})
    t0 = time.perf_counter()
    bpb = evaluate_bpb(model, data, "val", batch_size=cfg["device_batch_size"], seq_len=cfg["seq_len"],
                       max_tokens=cfg["eval_tokens"], device=device)
    rows.append({"task": "val_bpb", "scorer": "evaluate_bpb", "bits_per_byte": bpb["bpb"], "tokens": bpb["tokens"],
                 "seconds": time.perf_counter() - t0})

    print(f"{'task':<16} {'scorer':<21} {'acc':>7} {'acc_norm':>8} {'|d acc|':>8} {'|d norm|':>8} {'items':>6} {'seconds':>8}")
    for r in rows:
        if "acc" in r:
            d = f"{r['d_acc']:>8.4f} {r['d_norm']:>8.4f}" if "d_acc" in r else f"{'-':>8} {'-':>8}"
            print(f"{r['task']:<16} {r['scorer']:<21} {r['acc']:>7.4f} {r['acc_norm']:>8.4f} {d} {r['items']:>6} "
                  f"{r['seconds']:>8.1f}")
        elif "word_perplexity" in r:
            print(f"{r['task']:<16} {r['scorer']:<21} bits_per_byte {r['bits_per_byte']:.4f}, word_perplexity "
                  f"{r['word_perplexity']:.4g} ({r['items']} documents, each cut to {DOC_CHARS:,} chars)  {r['seconds']:.1f} s")
        else:
            print(f"{r['task']:<16} {r['scorer']:<21} bits_per_byte {r['bits_per_byte']:.4f} ({r['tokens']:,} tokens of "
                  f"the loader's packed rows)  {r['seconds']:.1f} s")
    print(f"acc_norm is per UTF-8 byte (lm-eval's acc_bytes); |d|: against tasks.evaluate; {cut} contexts cut to the "
          f"lab's window.\nthe two bits_per_byte differ by design: lm-eval scores each document alone in windows from "
          f"its start, evaluate_bpb the first eval_tokens of the loader's packed rows")
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps({**base, **r}) + "\n" for r in rows)
    if temp:
        temp.cleanup()
    if failed:
        print(f"cross-check failed: {'; '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
