"""Loader throughput: tokens/s of BestFitLoader from one process, at B*T = 2^16 and 2^19 (T = 2048), on
two document-length profiles, plus the cropped fraction at several T.

- web: a synthetic data directory (random token ids, log-normal lengths with a median of ~600 tokens,
  like web text); needs no rustbpe, so it runs anywhere.
- pystdlib: the real prepared pystdlib directory (long files: cropping dominates); needs rustbpe to
  prepare it once (skipped with a note where rustbpe is missing), or pass --data DIR.

    PYTHONPATH=. python bench/loader_speed.py [--device cuda] [--save]
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from prepare_speed import report  # noqa: E402

from llmlabs.data.loader import BestFitLoader  # noqa: E402
from llmlabs.data.shards import SPLITS, DataDir, ShardWriter, finish_data_dir, token_dtype  # noqa: E402
from llmlabs.data.tokenizer import SPECIAL_NAMES, Tokenizer  # noqa: E402


def synthetic_web_dir(path: Path, num_tokens: int, vocab_size: int = 8192, seed: int = 0) -> Path:
    """A valid data directory of random documents, lengths ~ LogNormal(log 600, 1), total ~num_tokens.
    Its tokenizer is the 256 bytes plus byte pairs: valid BPE, no training needed."""
    n_merges = vocab_size - len(SPECIAL_NAMES) - 256
    ranks = [bytes([b]) for b in range(256)] + [bytes([a, b]) for a in range(256) for b in range(256)][:n_merges]
    tok = Tokenizer(r"\S+|\s+", ranks, {name: len(ranks) + i for i, name in enumerate(SPECIAL_NAMES)})
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    splits = {}
    for split, share in zip(SPLITS, (0.9, 0.05, 0.05)):
        w = ShardWriter(path, split, tok.bos_id, token_dtype(tok.vocab_size))
        left = int(num_tokens * share)
        while left > 0:
            lengths = np.maximum(1, rng.lognormal(np.log(600), 1.0, 1000).astype(np.int64))
            ids = rng.integers(0, len(ranks), int(lengths.sum()))
            docs = [d.tolist() for d in np.split(ids, np.cumsum(lengths)[:-1])]
            w.add(docs, int(lengths.sum()) * 4)
            left -= int(lengths.sum())
        splits[split] = w.close()
    finish_data_dir(path, tok, splits, command="bench/loader_speed.py synthetic", settings={}, source="synthetic web-like")
    return path


def measure(data, B: int, T: int, device: str, tokens: int) -> tuple[float, float]:
    """tokens/s over the first `tokens` tokens after one warm-up batch, and the cropped fraction (a fixed
    token count, not a fixed time, so the fraction is the same on every machine: it is deterministic)."""
    loader = BestFitLoader(data, "train", B, T, device=device)
    next(loader)  # warm up: first buffer fill, page-in of the shard
    n, t0 = 0, time.perf_counter()
    while n < tokens:
        x, y = next(loader)
        n += x.numel()
    if device == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0), loader.cropped_fraction


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", help="a prepared data directory to measure instead of pystdlib")
    p.add_argument("--tokens", type=float, default=1e8, help="tokens per measurement")
    p.add_argument("--save", action="store_true", help="write bench/results/loader_speed-<device>.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run(args, Path(tmp))


def run(args, tmp: Path):
    datasets = {"web": synthetic_web_dir(tmp / "web", 40_000_000)}
    if args.data:
        datasets[Path(args.data).name] = Path(args.data)
    else:
        try:
            import rustbpe  # noqa: F401
            from llmlabs.data.prepare import prepare
            datasets["pystdlib"] = prepare("pystdlib", tmp / "pystdlib")
        except ImportError:
            print("note: rustbpe is not installed, so pystdlib cannot be prepared here: measuring `web` only")
    if args.device != "cpu":  # the pinned, double-buffered async path must give exactly the CPU batches
        cpu = BestFitLoader(datasets["web"], "train", 64, 2048)
        dev = BestFitLoader(datasets["web"], "train", 64, 2048, device=args.device)
        held = [next(dev) for _ in range(20)]  # held while later batches are written: catches buffer reuse
        same = all(torch.equal(x.cpu(), xc) and torch.equal(y.cpu(), yc)
                   for (x, y), (xc, yc) in zip(held, (next(cpu) for _ in range(20))))
        print(f"check: {args.device} batches equal cpu batches: {'ok' if same else 'MISMATCH'}")
        if not same:
            sys.exit(1)
    rows = []
    for name, path in datasets.items():
        data = DataDir.open(path)  # once: opening verifies every shard's checksum
        lengths = np.concatenate([np.diff(o) for _, o in data.shards("train")])
        for B, T in ((32, 2048), (256, 2048), (128, 512), (8, 8192)):
            tps, cropped = measure(data, B, T, args.device, int(args.tokens))
            rows.append({"data": name, "mean_doc_tokens": int(lengths.mean()), "B": B, "T": T,
                         "tokens_per_batch": B * T, "Mtokens_per_s": round(tps / 1e6, 1),
                         "cropped_fraction": round(cropped, 3)})
    tag = args.device if args.device != "cpu" else f"cpu{os.cpu_count()}"
    report(f"loader_speed-{tag}", rows,
           [("data", "data", ""), ("mean_doc_tokens", "doc mean", ","), ("B", "B", ""), ("T", "T", ""),
            ("tokens_per_batch", "B*T", ","), ("Mtokens_per_s", "Mtok/s", ".1f"), ("cropped_fraction", "cropped", ".3f")],
           args.save)


if __name__ == "__main__":
    main()
