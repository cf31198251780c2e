"""`llmlabs prepare`: source -> tokenizer + token shards + manifest, once; training never re-tokenizes.

Two passes over the source: the first trains the BPE tokenizer on (a capped prefix of) the train split,
the second encodes every document on all cores and appends it to its split's shards. Everything is
built in `<out>.tmp-<pid>` and renamed into place after manifest.json is written, so Ctrl-C or a crash
never leaves a directory that looks complete. This is the only command that may use the network (hub
corpora); downloads go to $LLMLABS_HOME/hub and resume across runs.
"""
import itertools
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from llmlabs import flags
from llmlabs.common import LabError, llmlabs_home, make_dir, print0
from llmlabs.data.captions import CAPTION_SOURCES, HUB_PREFIX, build_captions, caption_settings
from llmlabs.data.shards import MANIFEST, SPLITS, TEXT_DIR, TOKENIZER_FILE, ShardWriter, finish_data_dir, token_dtype
from llmlabs.data.sources import HUB_CORPORA, resolve_source, split_of, unique_documents
from llmlabs.data.tokenizer import Tokenizer

IMAGE_SIZE = 32  # caption sources: pixels per side, stored (a 2x2-merged patch-4 tower: 16 tokens)
VAL_FRAC = 0.05  # pystdlib: ~300K val tokens, ~140K test tokens
TEST_FRAC = 0.02
# BPE trains on at most this many characters of the train split (the first documents in source order).
# It covers all of pystdlib (~30M) and autoresearch's 1B-character budget for hub corpora.
TOKENIZER_CHARS = 1_000_000_000
BATCH_CHARS = 8 << 20  # documents per encode_batch call: enough work for every thread, bounded memory
# what a caption directory's nested text/ shares with it (its manifest's settings: the text source's + these)
TOKENIZER_SETTINGS = ("vocab_size", "val_frac", "test_frac", "tokenizer_chars")


def default_data_dir(source: str, vocab_size: int, text: str | None = None) -> Path:
    """$LLMLABS_HOME/data/<source>-v<vocab> (<source>+<text>-v<vocab> with --text); a local path is
    named by its base name plus a path hash."""
    def name(source):
        if source.startswith(HUB_PREFIX):  # a hub caption dataset: OWNER--NAME, as the hub's own cache names it
            return source[len(HUB_PREFIX):].replace("/", "--")
        named = source in ("pystdlib", "pysrc", *HUB_CORPORA, *CAPTION_SOURCES)
        return source if named else resolve_source(source).name
    return llmlabs_home() / "data" / f"{name(source)}{'+' + name(text) if text else ''}-v{vocab_size}"


def prepare(source: str = "pystdlib", out=None, vocab_size: int = 8192, *, glob: str | None = None,
            shards: int | None = None, workers: int | None = None, val_frac: float = VAL_FRAC,
            test_frac: float = TEST_FRAC, tokenizer_chars: int = TOKENIZER_CHARS, image_size: int | None = None,
            files: str | None = None, image_column: str | None = None, caption_column: str | None = None,
            text: str | None = None, force: bool = False) -> Path:
    """Build (or find, when already built with the same settings) a data directory; returns its path.
    Caption sources (shapes, digits, a folder with captions.jsonl, hub:OWNER/NAME with `files`:
    captions.py) store images at image_size px beside the tokens. `text`, a text source for a caption
    source: its documents become a text data directory nested at <out>/text (manifest, shards and
    splits of its own) with the captions' tokenizer, which BPE trains on both train splits, so
    `train --vision` can mix text-only rows into the caption rows (multimodal.py)."""
    t0 = time.time()
    source_settings = caption_settings(source, image_size or IMAGE_SIZE, files, image_column, caption_column)
    if source_settings is not None:
        if glob is not None or shards is not None:
            raise LabError(f"--glob and --shards apply to text sources, not to caption source {source!r}: drop them")
        src = None
        text_src = None if text is None else resolve_source(text)
        if text_src:  # the text's settings are part of the directory's: a cached one must match them too
            source_settings = {**source_settings, "text": text_src.settings}
    else:
        text_src = None
        if text is not None:
            raise LabError(f"--text mixes text documents into a caption source, and {source!r} is text: drop --text")
        if image_size is not None:
            raise LabError(f"--image-size applies to caption sources ({', '.join(CAPTION_SOURCES)}, a folder with "
                           f"captions.jsonl, {HUB_PREFIX}OWNER/NAME), not to {source!r}: drop it")
        src = resolve_source(source, glob=glob, shards=shards)
        source_settings = src.settings
    if not (0 < val_frac and 0 <= test_frac and val_frac + test_frac < 1):
        raise LabError(f"split fractions val {val_frac} / test {test_frac} must satisfy 0 < val, 0 <= test, "
                       f"val + test < 1")
    if tokenizer_chars < 1:
        raise LabError(f"--tokenizer-chars {tokenizer_chars} must be positive")
    out = Path(out).expanduser().resolve() if out else default_data_dir(source, vocab_size, text)
    settings = {**source_settings, "vocab_size": vocab_size, "val_frac": val_frac, "test_frac": test_frac,
                "tokenizer_chars": tokenizer_chars}
    if (out / MANIFEST).is_file() and not force:
        try:
            old = json.loads((out / MANIFEST).read_text())["settings"]
        except (ValueError, KeyError, TypeError):
            old = {}
        if old == settings:
            print0(f"data: {out} (already prepared; --force rebuilds)")
            return out
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in {**settings, **old}  # --text gone too
                         if old.get(k) != settings.get(k))
        raise LabError(f"{out} was prepared with other settings ({diff}): pass --force to rebuild it, "
                       f"or --out elsewhere")
    make_dir(out.parent, "--out")
    if out.exists() and not out.is_dir():
        raise LabError(f"--out {out} is a file: give a directory for the data")
    if out.exists() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise LabError(f"{out} exists and is not a data directory: choose another --out or remove it")
    _remove_stale_builds(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        command = _command(source, out, settings)
        workers = workers or os.cpu_count() or 1
        if src is not None:
            summary = _build(src, tmp, settings, workers, command)
        elif text_src is None:
            summary = build_captions(tmp, settings, command)
        else:  # one tokenizer for both: BPE reads the train captions, then the text's train split
            text_settings = {**settings["text"], **{k: settings[k] for k in TOKENIZER_SETTINGS}}
            summary = build_captions(tmp, settings, command,
                                     extra_texts=_tokenizer_texts(text_src, text_settings, Counter()))
            text_summary = _build(text_src, tmp / TEXT_DIR, text_settings, workers, command,
                                  tokenizer=(Tokenizer.load(tmp / TOKENIZER_FILE), summary["tokenizer_training"]))
        if out.exists():  # --force: swap the old directory out only once the new one is complete
            retired = out.with_name(f"{out.name}.old-{os.getpid()}")
            os.replace(out, retired)
            os.replace(tmp, out)
            shutil.rmtree(retired)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _print_summary(out, summary, time.time() - t0)
    if text_src is not None:
        _print_summary(out / TEXT_DIR, text_summary, time.time() - t0)
    return out


def _tokenizer_texts(src, settings: dict, counts: Counter):
    """Pass 1: the train split's documents in source order, until tokenizer_chars characters (counts
    ["chars"]). The first is read here, so a source with none is one error line before BPE starts."""
    fracs = settings["val_frac"], settings["test_frac"]

    def texts():
        for text, _, digest in unique_documents(src, Counter()):
            if counts["chars"] >= settings["tokenizer_chars"]:
                return
            counts["seen"] += 1
            if split_of(digest, *fracs) == "train":
                counts["chars"] += len(text)
                yield text

    it = texts()
    first = next(it, None)
    if first is None:
        seen = counts["seen"]
        raise LabError(f"source {settings['source']} has no non-empty documents: point it at text" if not seen else
                       f"the train split of {settings['source']} is empty ({seen} documents in all): add documents")
    return itertools.chain([first], it)


def _build(src, tmp: Path, settings: dict, workers: int, command: str, tokenizer=None) -> dict:
    """Write a text data directory into `tmp`; returns the manifest. tokenizer: (Tokenizer, its
    training record) to encode with instead of training one (a caption directory's nested text/)."""
    tmp.mkdir(parents=True)
    fracs = settings["val_frac"], settings["test_frac"]
    if tokenizer is None:
        t0, counts = time.time(), Counter()
        # bars in `with`: an error mid-way (a bad .jsonl line) closes the bar before its one line is printed
        with tqdm(_tokenizer_texts(src, settings, counts), desc="tokenizer text", unit="doc") as docs_bar:
            trained = Tokenizer.train(docs_bar, settings["vocab_size"])
        tokenizer = trained, {"chars": counts["chars"], "seconds": round(time.time() - t0, 2)}
    tokenizer, training = tokenizer

    # pass 2: encode everything, batch by batch, into per-split shards
    stats = Counter()
    writers = {s: ShardWriter(tmp, s, tokenizer.bos_id, token_dtype(tokenizer.vocab_size)) for s in SPLITS}
    batch, batch_chars = [], 0

    def flush():
        encoded = tokenizer.encode_batch([text for text, _, _ in batch], num_threads=workers)
        for split in SPLITS:
            writers[split].add([ids for (_, _, s), ids in zip(batch, encoded) if s == split],
                               sum(n for _, n, s in batch if s == split))
        bar.update(stats["documents"] - bar.n)
        batch.clear()

    with tqdm(desc="tokenize", unit="doc", total=src.count_hint()) as bar:
        for text, data, digest in unique_documents(src, stats):
            batch.append((text, len(data), split_of(digest, *fracs)))
            batch_chars += len(text)
            if batch_chars >= BATCH_CHARS:
                flush()
                batch_chars = 0
        if batch:
            flush()

    splits = {s: w.close() for s, w in writers.items()}
    for split, frac in (("val", fracs[0]), ("test", fracs[1])):
        if frac and not splits[split]["documents"]:
            total = sum(s["documents"] for s in splits.values())
            raise LabError(f"the {split} split of {settings['source']} is empty ({total} documents in all): add "
                           f"documents or raise its fraction")
    return finish_data_dir(tmp, tokenizer, splits, command=command, settings=settings, source=src.description,
                           stats=dict(stats), tokenizer_training=training)


def _command(source: str, out: Path, settings: dict) -> str:
    """The `llmlabs prepare` line that rebuilds this directory (quoted in error messages)."""
    parts = ["llmlabs prepare", source, f"--vocab-size {settings['vocab_size']}", f"--out {out}"]
    for key in ("glob", "shards", "image_size", "files", "image_column", "caption_column"):
        if settings.get(key) is not None:
            value = ",".join(settings[key]) if key == "files" else settings[key]
            parts.append(f"--{key.replace('_', '-')} '{value}'")
    if "text" in settings:
        parts.append(f"--text '{settings['text']['source']}'")
    for key, default in (("val_frac", VAL_FRAC), ("test_frac", TEST_FRAC), ("tokenizer_chars", TOKENIZER_CHARS)):
        if settings[key] != default:
            parts.append(f"--{key.replace('_', '-')} {settings[key]}")
    return " ".join(parts)


def _remove_stale_builds(out: Path):
    """Delete `<out>.tmp-<pid>` folders whose process is gone (killed with no chance to clean up)."""
    for d in out.parent.glob(f"{out.name}.tmp-*") if out.parent.exists() else ():
        pid = d.name.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


def _print_summary(out: Path, m: dict, seconds: float):
    st, tk, tt = m["stats"], m["tokenizer"], m["tokenizer_training"]
    dropped = ", ".join(f"{v:,} {k}" for k, v in sorted(st.items()) if k not in ("files", "documents") and v)
    files = f"{st['files']:,} files, " if "files" in st else ""  # a caption source reads no files
    lines = [f"data: {out}", f"source: {m['source']}",
             f"  {files}{st.get('documents', 0):,} documents read; dropped: {dropped or 'none'}",
             f"tokenizer: {tk['vocab_size']:,} ids ({len(tk['special_ids'])} special), BPE trained on "
             f"{tt['chars'] / 1e6:.1f}M chars of train in {tt['seconds']:.1f} s",
             f"{'split':<6} {'documents':>10} {'tokens':>13} {'bytes/token':>12}"]
    for split in SPLITS:
        s = m["splits"][split]
        text_tokens = s["tokens"] - s["documents"]  # BOS carries no bytes
        lines.append(f"{split:<6} {s['documents']:>10,} {s['tokens']:>13,} {s['bytes'] / max(text_tokens, 1):>12.2f}")
    total_bytes = sum(m["splits"][s]["bytes"] for s in SPLITS)
    lines.append(f"time: {seconds:.1f} s ({total_bytes / 1e6 / seconds:.1f} MB/s of text)")
    print0("\n".join(lines))


def add_args(parser):
    parser.add_argument("source", nargs="?", default="pystdlib",
                        help="pystdlib (default) | pysrc | a file or folder of .txt/.md/.py/.jsonl/.parquet | "
                             + " | ".join(HUB_CORPORA) + " | captioned images: " + " | ".join(CAPTION_SOURCES)
                             + f" | a folder with captions.jsonl | {HUB_PREFIX}OWNER/NAME (a hub dataset's parquet --files)"
                             + " | core (not a corpus: the CORE eval bundle, for `llmlabs eval --tasks core`; takes "
                             "only --force)")
    parser.add_argument("--out", help="data directory (default $LLMLABS_HOME/data/<source>-v<vocab>)")
    parser.add_argument("--vocab-size", type=flags.positive_int, default=8192, help="total ids, special tokens included (8192)")
    parser.add_argument("--glob", help="fnmatch pattern on paths relative to the folder, e.g. '*.md' or 'json/*'")
    parser.add_argument("--shards", type=flags.positive_int, help="hub corpora: how many of the corpus files to use (default: " +
                        ", ".join(f"{k} {c.default_shards}" for k, c in HUB_CORPORA.items()) + ")")
    parser.add_argument("--workers", type=flags.positive_int, help="encoding threads (default: all cores)")
    parser.add_argument("--val-frac", type=flags.fraction, default=VAL_FRAC, help=f"share of documents in val ({VAL_FRAC})")
    parser.add_argument("--test-frac", type=flags.fraction, default=TEST_FRAC, help=f"share of documents in test ({TEST_FRAC})")
    parser.add_argument("--tokenizer-chars", type=flags.positive_int, default=TOKENIZER_CHARS,
                        help=f"train BPE on at most this many characters of the train split ({TOKENIZER_CHARS:.0e})")
    parser.add_argument("--image-size", type=flags.positive_int,
                        help=f"caption sources: image side in pixels, stored resized ({IMAGE_SIZE})")
    parser.add_argument("--files", help=f"{HUB_PREFIX}OWNER/NAME: its parquet files, paths in the repo joined by commas")
    parser.add_argument("--image-column", help=f"{HUB_PREFIX}OWNER/NAME: the image column (image)")
    parser.add_argument("--caption-column", help=f"{HUB_PREFIX}OWNER/NAME: the caption column (caption)")
    parser.add_argument("--text", metavar="SOURCE", help="caption sources: also a text source (any of the above), "
                        "nested at OUT/text with the same tokenizer, for `train --vision` to mix text-only rows in")
    parser.add_argument("--force", action="store_true", help="rebuild even if the directory is already prepared")


def run(args):
    if args.source == "core":  # the one eval download, under the one command that may use the network
        from llmlabs import core_eval

        core_eval.prepare(force=args.force)
        return
    try:
        prepare(args.source, args.out, args.vocab_size, glob=args.glob, shards=args.shards, workers=args.workers,
                val_frac=args.val_frac, test_frac=args.test_frac, tokenizer_chars=args.tokenizer_chars,
                image_size=args.image_size, files=args.files, image_column=args.image_column,
                caption_column=args.caption_column, text=args.text, force=args.force)
    except KeyboardInterrupt:
        raise LabError("interrupted: no data directory was written (downloads so far are kept and resume)") from None
