"""Token shards on disk and the data directory that holds them.

A data directory holds tokenizer.json, per split a few shard pairs (`<split>-NNNN.tokens.npy`: every
document as BOS + its tokens, concatenated, uint16 when the vocab fits; `<split>-NNNN.docs.npy`: int64
offsets where each document starts, plus the end), for a caption source `<split>.images.npy`
(captions.py), and manifest.json, written last. A caption directory prepared with --text nests a
text data directory at text/ (its own manifest, the same tokenizer). .npy is plain data with a header (dtype, shape): it
memory-maps without copying and loads without pickle.
"""
import hashlib
import itertools
import json
import time
from pathlib import Path

import numpy as np

from llmlabs.common import LabError, atomic_write_json, llmlabs_home
from llmlabs.data.tokenizer import Tokenizer

FORMAT = "llmlabs-data-v1"
SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
TEXT_DIR = "text"  # a caption directory's text-only documents (`prepare --text`): a data directory of its own
SHARD_TOKENS = 1 << 27  # 256 MB of uint16 per shard file: bounds the writer's memory on big corpora


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class ShardWriter:
    """Appends documents of one split (token lists without BOS) to shard files in `directory`."""

    def __init__(self, directory: Path, split: str, bos_id: int, dtype: np.dtype, shard_tokens: int = SHARD_TOKENS):
        self.directory, self.split, self.bos_id, self.dtype = Path(directory), split, bos_id, dtype
        self.shard_tokens = shard_tokens
        self.shards = []  # manifest entries of finished shards
        self.documents = self.tokens = self.bytes = 0
        self._chunks, self._lengths, self._pending = [], [], 0

    def add(self, docs: list[list[int]], text_bytes: int):
        """docs: token ids of each document; text_bytes: their total UTF-8 length (for bytes/token)."""
        if not docs:
            return
        lengths = np.fromiter(map(len, docs), np.int64, len(docs))
        flat = np.fromiter(itertools.chain.from_iterable(docs), self.dtype, int(lengths.sum()))
        # one BOS in front of each document
        self._chunks.append(np.insert(flat, np.cumsum(lengths) - lengths, self.bos_id))
        self._lengths.append(lengths + 1)
        self._pending += len(flat) + len(docs)
        self.documents += len(docs)
        self.tokens += len(flat) + len(docs)
        self.bytes += text_bytes
        if self._pending >= self.shard_tokens:
            self._flush()

    def _flush(self):
        if not self._chunks:
            return
        stem = f"{self.split}-{len(self.shards):04d}"
        tokens = np.concatenate(self._chunks)
        offsets = np.concatenate([[0], np.cumsum(np.concatenate(self._lengths))]).astype(np.int64)
        np.save(self.directory / f"{stem}.tokens.npy", tokens, allow_pickle=False)
        np.save(self.directory / f"{stem}.docs.npy", offsets, allow_pickle=False)
        self.shards.append({"tokens": f"{stem}.tokens.npy", "docs": f"{stem}.docs.npy",
                            "documents": len(offsets) - 1, "num_tokens": len(tokens)})
        self._chunks, self._lengths, self._pending = [], [], 0

    def close(self) -> dict:
        """Write what is buffered; returns the split's manifest entry."""
        self._flush()
        return {"documents": self.documents, "tokens": self.tokens, "bytes": self.bytes, "shards": self.shards}


def finish_data_dir(directory: Path, tokenizer: Tokenizer, splits: dict, **info) -> dict:
    """Save the tokenizer, checksum every shard and write manifest.json, last: a directory becomes a data
    directory only when the manifest lands (`info` adds command, settings, source, stats...)."""
    tokenizer.save(directory / TOKENIZER_FILE)
    names = [n for sp in splits.values() for s in sp["shards"] for n in (s["tokens"], s["docs"])]
    names += [sp["images"] for sp in splits.values() if "images" in sp]  # captions.py: the split's images
    files = {name: {"bytes": (directory / name).stat().st_size, "sha256": sha256_file(directory / name)}
             for name in names}
    manifest = {"format": FORMAT, "splits": splits, "files": files, "dtype": token_dtype(tokenizer.vocab_size).name,
                "tokenizer": {"file": TOKENIZER_FILE, "hash": tokenizer.hash, "vocab_size": tokenizer.vocab_size,
                              "bos_id": tokenizer.bos_id, "special_ids": tokenizer.special_ids},
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}
    atomic_write_json(directory / MANIFEST, manifest)
    return manifest


def locate(spec) -> Path:
    """A data directory's path from --data: a path, or the name of a prepared corpus under
    $LLMLABS_HOME/data (`pysrc`, `pysrc-v8192`, a hub corpus's name), when no such path exists."""
    path = Path(spec).expanduser()
    if not path.exists() and len(path.parts) == 1:
        for name in (path.name, f"{path.name}-v8192"):
            if (llmlabs_home() / "data" / name / MANIFEST).is_file():
                return llmlabs_home() / "data" / name
    return path


class DataDir:
    """An opened, verified data directory. `open` checks that the manifest exists, that every shard has
    its recorded size and sha256 (about 0.7 s per GB here) and that tokenizer.json is the one the shards
    were made with, so training never starts on a truncated copy or a swapped tokenizer."""

    def __init__(self, path: Path, manifest: dict, tokenizer: Tokenizer):
        self.path, self.manifest, self.tokenizer = path, manifest, tokenizer

    @classmethod
    def open(cls, path) -> "DataDir":
        path = locate(path)
        if not (path / MANIFEST).is_file():
            why = "does not exist" if not path.exists() else "has no manifest.json (an interrupted prepare leaves none)"
            raise LabError(f"{path} is not a data directory: it {why}; run `llmlabs prepare SOURCE --out {path}`")
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            if manifest.get("format") != FORMAT:
                raise ValueError(f"format {manifest.get('format')!r} is not {FORMAT!r}")
            rebuild = f"{manifest['command']} --force"
            want_hash, files = manifest["tokenizer"]["hash"], manifest["files"]
            if missing := [s for s in SPLITS if "shards" not in manifest["splits"].get(s, {})]:
                raise KeyError(f"splits {missing}")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise LabError(f"{path / MANIFEST} is unreadable ({type(e).__name__}: {e}): rebuild with "
                           f"`llmlabs prepare SOURCE --out {path} --force`") from None
        tokenizer = Tokenizer.load(path / TOKENIZER_FILE)
        if tokenizer.hash != want_hash:
            raise LabError(f"{path / TOKENIZER_FILE} does not match the shards: its hash is {tokenizer.hash[:12]}, the "
                           f"shards were made with {want_hash[:12]}; restore it or rebuild with `{rebuild}`")
        for name, want in files.items():
            f = path / name
            size = f.stat().st_size if f.exists() else None
            if size != want["bytes"]:
                state = "is missing" if size is None else \
                    f"has {size} bytes, the manifest says {want['bytes']} (truncated copy?)"
                raise LabError(f"shard {f} {state}: copy it again or rebuild with `{rebuild}`")
            if sha256_file(f) != want["sha256"]:
                raise LabError(f"shard {f} is corrupt (sha256 differs from the manifest): copy it again or rebuild "
                               f"with `{rebuild}`")
        return cls(path, manifest, tokenizer)

    @property
    def data_id(self) -> str:
        """16 hex digits naming exactly what a run reads: the tokenizer's hash and every file's sha256,
        a nested text directory's (--text) included. Two runs with one id read the same data. A run's
        summary records it and `sweep table` / `sweep fit` refuse to pool cells with different ones:
        `pysrc`, the interpreter's own sources, differs between machines with different packages
        installed, and a val split that differs makes val_bpb incomparable."""
        manifests = [self.manifest]
        if (self.path / TEXT_DIR / MANIFEST).is_file():
            manifests.append(json.loads((self.path / TEXT_DIR / MANIFEST).read_text()))
        content = [[m["tokenizer"]["hash"], sorted((n, f["sha256"]) for n, f in m["files"].items())] for m in manifests]
        return hashlib.sha256(json.dumps(content).encode()).hexdigest()[:16]

    def _split(self, split: str) -> dict:
        if split not in SPLITS:
            raise LabError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
        return self.manifest["splits"][split]

    def num_tokens(self, split: str) -> int:
        """Tokens stored for the split, one BOS per document included."""
        return self._split(split)["tokens"]

    def num_documents(self, split: str) -> int:
        return self._split(split)["documents"]

    def images(self, split: str) -> np.ndarray:
        """uint8 [documents, S, S, 3] memmap: image i belongs to the split's document i (captions.py)."""
        entry = self._split(split)
        if "images" not in entry:
            raise LabError(f"{self.path} holds text only, no images: prepare a caption source (shapes, digits, a "
                           f"folder with captions.jsonl, hub:OWNER/NAME) for the multimodal path")
        return np.load(self.path / entry["images"], mmap_mode="r", allow_pickle=False)

    def shards(self, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """(tokens memmap, document offsets) per shard of the split."""
        return [(np.load(self.path / s["tokens"], mmap_mode="r", allow_pickle=False),
                 np.load(self.path / s["docs"], allow_pickle=False)) for s in self._split(split)["shards"]]
