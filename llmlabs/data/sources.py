"""Where documents come from, and which split each one belongs to.

A source yields document texts in a fixed order: `pystdlib` (the running Python's standard library,
one document per .py file, tests included), `pysrc` (that plus site-packages), a local file or folder
(.txt/.md/.py one document per file, .jsonl one per line's `text`, .parquet one per row's `text`), or a
hub corpus (see hub.py). Files are read in sorted order; exact duplicates and empty documents are
dropped in `unique_documents`, and `split_of` assigns each document to train/val/test by a hash of its
bytes, so the split is the same on every machine and independent of file order.
"""
import fnmatch
import hashlib
import json
import os
import sys
import sysconfig
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from llmlabs.common import LabError, llmlabs_home
from llmlabs.data.hub import HUB_CORPORA, download

TEXT_SUFFIXES = (".txt", ".md", ".py")
LOCAL_SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git"}
NAMED_SOURCES = ("pystdlib", "pysrc") + tuple(HUB_CORPORA)


@dataclass
class Source:
    name: str                 # short name, used in the default data directory
    description: str          # one line for the summary
    settings: dict            # everything that decides the documents (a cached data dir must match it)
    list_files: Callable[[], list[Path]]
    read: Callable[[Path, Counter], Iterator[str]]
    _files: list[Path] | None = field(default=None, repr=False)

    def files(self) -> list[Path]:
        if self._files is None:
            self._files = self.list_files()
        return self._files

    def documents(self, stats: Counter) -> Iterator[str]:
        for path in self.files():
            stats["files"] += 1
            for text in self.read(path, stats):
                stats["documents"] += 1
                yield text

    def count_hint(self) -> int | None:
        """Expected number of documents (before dedup) for a progress bar, where cheap to know."""
        files = self.files()
        if all(p.suffix in TEXT_SUFFIXES for p in files) and self.read is read_local:
            return len(files)
        if all(p.suffix == ".parquet" for p in files):
            return sum(pq.read_metadata(p).num_rows for p in files)
        return None


def resolve_source(spec: str, *, glob: str | None = None, shards: int | None = None) -> Source:
    """Turn the SOURCE argument into a Source; raises LabError for unknown names and missing paths."""
    python = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    if shards is not None and spec not in HUB_CORPORA:
        raise LabError(f"--shards applies to hub corpora ({', '.join(HUB_CORPORA)}), not to {spec!r}: drop it")
    if spec in ("pystdlib", "pysrc"):
        paths = sysconfig.get_paths()
        keys = ("stdlib", "purelib", "platlib") if spec == "pysrc" else ("stdlib",)
        roots = [r for r in dict.fromkeys(Path(paths[k]) for k in keys) if r.is_dir()]  # purelib is often platlib
        what = "standard library" if spec == "pystdlib" else "standard library and site-packages"
        return Source(spec, f"Python {python} {what} ({', '.join(map(str, roots))})",
                      {"source": spec, "python": python, "glob": glob},
                      lambda: _tree_files(roots, (".py",), glob, spec), read_local)
    if spec in HUB_CORPORA:
        if glob is not None:
            raise LabError(f"--glob applies to local folders and pystdlib/pysrc, not to hub corpus {spec!r}: drop it")
        corpus = HUB_CORPORA[spec]
        n = corpus.default_shards if shards is None else shards
        if not 1 <= n <= len(corpus.files):
            raise LabError(f"--shards {n} is out of range for {spec}: it has {len(corpus.files)} files; "
                           f"pick 1..{len(corpus.files)}")
        files = corpus.files[:n]
        dest = llmlabs_home() / "hub" / corpus.repo
        read = read_local if corpus.doc_separator is None else _separated_reader(corpus.doc_separator)
        return Source(spec, f"{corpus.repo} ({n} of {len(corpus.files)} files, cached in {dest})",
                      {"source": spec, "shards": n}, lambda: download(corpus.repo, files, dest), read)
    path = Path(spec).expanduser()
    if not path.exists():
        if os.sep in spec or spec.startswith((".", "~")):
            raise LabError(f"source path {path} does not exist: check the path")
        raise LabError(f"unknown source {spec!r}: not a file or folder, and not one of {', '.join(NAMED_SOURCES)}")
    path = path.resolve()
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise LabError(f"source file {path} has an unsupported type: use {'/'.join(LOCAL_SUFFIXES)}")
        if glob is not None:
            raise LabError(f"--glob filters a folder, but {path} is a file: drop --glob")
        list_files = lambda: [path]  # noqa: E731
    else:
        list_files = lambda: _tree_files([path], LOCAL_SUFFIXES, glob, str(path))  # noqa: E731
    name = path.stem if path.is_file() else path.name
    short = f"{name}-{hashlib.blake2b(str(path).encode(), digest_size=4).hexdigest()}"
    return Source(short, f"{path}" + (f" (--glob {glob})" if glob else ""),
                  {"source": str(path), "glob": glob}, list_files, read_local)


def _tree_files(roots: list[Path], suffixes, glob: str | None, what: str) -> list[Path]:
    """Files under roots with one of the suffixes (and matching glob, an fnmatch pattern on the path
    relative to its root), sorted; skips site-packages below a root, caches and .git."""
    found = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
            for f in filenames:
                p = Path(dirpath, f)
                if p.suffix in suffixes and (glob is None or fnmatch.fnmatch(p.relative_to(root).as_posix(), glob)):
                    found.append(p)
    if not found:
        filt = f" matching --glob {glob!r}" if glob else ""
        raise LabError(f"source {what} is empty: no {'/'.join(suffixes)} files{filt}; point it at a folder with text")
    return sorted(found)


def read_local(path: Path, stats: Counter) -> Iterator[str]:
    """Documents of one local file, by its type. Undecodable or unreadable text files are skipped and
    counted; malformed .jsonl/.parquet is an error (it means the file is not what the user thinks)."""
    if path.suffix in TEXT_SUFFIXES:
        try:
            yield path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            stats["undecodable"] += 1
        except OSError:
            stats["unreadable"] += 1
    elif path.suffix == ".jsonl":
        with open(path, "rb") as f:
            offset = 0
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise LabError(f"{path}:{lineno}: not UTF-8 at byte {offset + e.start} of the file ({e.reason}): "
                                   "re-encode it as UTF-8 (e.g. iconv -t UTF-8) or remove that line") from None
                offset += len(raw)
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                    if not isinstance(text, str):
                        raise TypeError(f"`text` is a {type(text).__name__}")
                except (ValueError, KeyError, TypeError) as e:
                    raise LabError(f"{path}:{lineno}: each line must be a JSON object with a string `text` field "
                                   f"({type(e).__name__}: {e}); fix or remove that line") from None
                yield text
    elif path.suffix == ".parquet":
        try:
            pf = pq.ParquetFile(path)
            if "text" not in pf.schema_arrow.names:
                raise LabError(f"{path} has no `text` column (columns: {', '.join(pf.schema_arrow.names)}): "
                               f"rename the text column to `text`")
            for batch in pf.iter_batches(batch_size=1024, columns=["text"]):
                yield from (t for t in batch.column(0).to_pylist() if t is not None)
        except (pa.ArrowException, OSError) as e:
            raise LabError(f"{path} is not a readable parquet file ({e}): delete it and re-run (a hub file is "
                           f"downloaded again)") from None


def _separated_reader(separator: str, piece_chars: int = 1 << 24):
    """Reader for big text files holding many documents between separators, streamed in pieces."""
    def read(path: Path, stats: Counter) -> Iterator[str]:
        rest = ""
        with open(path, encoding="utf-8", errors="replace") as f:
            while piece := f.read(piece_chars):
                parts = (rest + piece).split(separator)
                rest = parts.pop()
                yield from (doc for doc in map(str.strip, parts) if doc)
        if rest.strip():
            yield rest.strip()
    return read


def unique_documents(source: Source, stats: Counter) -> Iterator[tuple[str, bytes, bytes]]:
    """(text, utf8, digest) for each document, dropping empty ones and exact duplicates (by digest)."""
    seen = set()
    for text in source.documents(stats):
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from JSON escapes: not valid text, replace them
            text = text.encode("utf-8", "replace").decode("utf-8")
            data = text.encode("utf-8")
        if not data.strip():
            stats["empty"] += 1
            continue
        digest = hashlib.blake2b(data, digest_size=16).digest()
        if digest in seen:
            stats["duplicates"] += 1
            continue
        seen.add(digest)
        yield text, data, digest


def split_of(digest: bytes, val_frac: float, test_frac: float) -> str:
    """test if the digest, read as a number in [0, 1), is below test_frac; val if below
    test_frac + val_frac; else train. Depends only on the document's bytes."""
    u = int.from_bytes(digest[:8], "big") / 2.0 ** 64
    return "test" if u < test_frac else "val" if u < test_frac + val_frac else "train"
