"""Captioned images for the multimodal path: two offline sources and the data directory they become.

- `shapes`: a built-in synthetic set, learnable by construction: 1 to 4 coloured shapes (circle,
  square, triangle) in distinct cells of a 3x3 layout, and a caption that says how many there are,
  and each one's colour, shape and place, in reading order. Every word after the count is decided by
  the pixels, so a model that sees the image can drive the caption's loss far below one that cannot.
- `digits`: scikit-learn's bundled handwritten digits (1,797 8x8 images, no download), captioned
  from their labels.
- a local folder holding `captions.jsonl`, one {"image": "path/relative/to/the/folder.png",
  "caption": "..."} per line; any image Pillow reads (images.py: RGB, resized without cropping).
- `hub:OWNER/NAME --files A.parquet,B.parquet`: parquet files of a Hugging Face dataset, downloaded
  as the text corpora are (hub.py: HF_ENDPOINT, resumed .tmp files), with an image column and a
  caption column. The image is the `datasets` Image feature, a struct {bytes, path}, or plain bytes;
  a struct without bytes names a file stored beside the parquet files by its path in the dataset
  repo, fetched the same way (`resolve/main/PATH`, a batch of rows at a time, in parallel) into the
  same cache, $LLMLABS_HOME/hub/OWNER/NAME. The caption is a string, or a list of strings (COCO-style,
  several captions of one image), each its own pair. The files are named rather than listed through
  the hub's API: `resolve/main/FILE` is the one endpoint every mirror serves, and the dataset's Files
  page shows the names.

A data directory of captions is a text data directory (tokenizer.json, token shards of BOS + caption,
manifest.json) plus one `<split>.images.npy` per split: uint8 [documents, S, S, 3], image i belonging
to document i, checksummed in the manifest like the token shards. Images are decoded and resized
once, here; training reads the array.
Each pair's split comes from a hash of its image (the folder's path, the hub image's bytes, inline
or fetched, the drawn pixels), so an image under several captions lands in one split and val never
shows one train saw. Where an image goes in the token stream (`<|image_start|>`, the patch tokens,
`<|image_end|>`) is decided when batches are built, since the number of patch tokens depends on the
vision tower's patch size, not on the data."""
import hashlib
import io
import itertools
import json
import posixpath
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llmlabs.common import LabError, llmlabs_home
from llmlabs.data.hub import download
from llmlabs.data.images import load_image
from llmlabs.data.shards import SPLITS, ShardWriter, finish_data_dir, token_dtype
from llmlabs.data.sources import split_of
from llmlabs.data.tokenizer import Tokenizer

CAPTION_SOURCES = ("shapes", "digits")
HUB_PREFIX = "hub:"
CAPTIONS_FILE = "captions.jsonl"  # its presence makes a folder a caption source (is_caption_folder)
HUB_ADVICE = ("the dataset name, --files (paths inside the dataset repo) and HF_ENDPOINT", "set HF_ENDPOINT to a mirror")
SHAPES_IMAGES = 20_000  # documents the `shapes` source draws (the split fractions divide them)
HUB_BATCH = 256  # parquet rows read at a time; the images they name by path are fetched together

COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40),
           "purple": (160, 60, 200), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle")
PLACES = ("at the top left", "at the top", "at the top right", "on the left", "in the center", "on the right",
          "at the bottom left", "at the bottom", "at the bottom right")  # the 3x3 cells in reading order
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def draw_shapes(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """One synthetic image uint8 [size, size, 3] and its caption, e.g. "two shapes: a red circle at
    the top left and a blue triangle in the center." Each shape fills most of its cell (with a random
    jitter and scale), so its place and kind are visible at any size from 24 px up."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(im)
    n = int(rng.integers(1, 5))
    cells = sorted(rng.choice(9, size=n, replace=False).tolist())
    cell = size / 3
    parts = []
    for c in cells:
        colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
        r = cell * rng.uniform(0.3, 0.42)  # half the shape's extent
        cx = (c % 3 + 0.5) * cell + rng.uniform(-1, 1) * (cell / 2 - r)
        cy = (c // 3 + 0.5) * cell + rng.uniform(-1, 1) * (cell / 2 - r)
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=COLOURS[colour])
        parts.append(f"a {colour} {shape} {PLACES[c]}")
    listed = parts[0] if n == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return np.asarray(im, dtype=np.uint8), f"{NUMBERS[n]} shape{'s' * (n > 1)}: {listed}."


def digit_images(size: int):
    """(image uint8 [size, size, 3], caption) for each of scikit-learn's 1,797 digits: the 8x8 grey
    levels 0..16 scaled to 0..255 and resized (bicubic) to the square, captioned from the label."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise LabError("the digits source needs scikit-learn: pip install scikit-learn") from None
    from PIL import Image

    digits = load_digits()
    for pixels, label in zip(digits.images, digits.target):
        grey = Image.fromarray(np.round(pixels * (255 / 16)).astype(np.uint8), "L")
        rgb = grey.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        yield np.asarray(rgb, dtype=np.uint8), f"a handwritten {NUMBERS[label]} ({label})."


def is_caption_folder(path: Path) -> bool:
    """A folder holding captions.jsonl is a caption source, unless that file's first row is a text
    document ({"text": ...} and no "image"), which keeps a text folder with such a file as it was."""
    listing = Path(path) / CAPTIONS_FILE
    if not listing.is_file():
        return False
    with open(listing, "rb") as f:
        first = next((raw for raw in f if raw.strip()), None)
    if first is None:
        return False  # empty: nothing says captions, and a text folder may hold an empty .jsonl
    try:
        row = json.loads(first)
    except ValueError:
        return True  # named captions.jsonl and not text: folder_images reports the line
    return not (isinstance(row, dict) and "text" in row and "image" not in row)


def in_repo(name: str) -> bool:
    """Whether `name` is a file's path inside a dataset repo: relative, no '..' part, not a directory.
    --files and the image paths of a hub dataset's rows become paths under $LLMLABS_HOME/hub/OWNER/NAME,
    so nothing may climb out of it."""
    parts = name.split("/")
    return not name.startswith("/") and ".." not in parts and parts[-1] not in ("", ".")


def caption_settings(source: str, image_size: int, files: str | None = None, image_column: str | None = None,
                     caption_column: str | None = None) -> dict | None:
    """Everything that decides a caption source's pairs (a cached data directory must match it), or
    None when `source` is text. `files`: the hub dataset's parquet paths, comma-separated."""
    hub = source.startswith(HUB_PREFIX)
    if not hub and (files, image_column, caption_column) != (None, None, None):
        raise LabError(f"--files, --image-column and --caption-column apply to {HUB_PREFIX}OWNER/NAME caption datasets, "
                       f"not to {source!r}: drop them")
    if source in CAPTION_SOURCES:
        return {"source": source, "image_size": image_size}
    if hub:
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", source[len(HUB_PREFIX):]):
            raise LabError(f"{source!r} is not a hub dataset: write {HUB_PREFIX}OWNER/NAME, e.g. {HUB_PREFIX}user/captions")
        if not files:
            raise LabError(f"{source}: name its parquet files with --files, paths inside the dataset repo separated by "
                           f"commas (e.g. --files data/train-00000-of-00002.parquet,data/train-00001-of-00002.parquet)")
        names = files.split(",")
        for name in names:
            if not name.endswith(".parquet") or not in_repo(name):
                raise LabError(f"--files {name!r}: give relative paths of .parquet files inside the dataset repo, "
                               f"without '..', separated by commas")
        return {"source": source, "files": names, "image_column": image_column or "image",
                "caption_column": caption_column or "caption", "image_size": image_size}
    path = Path(source).expanduser()
    if path.is_dir() and is_caption_folder(path):
        return {"source": str(path.resolve()), "image_size": image_size}
    return None


def folder_images(folder: Path, size: int, stats: Counter):
    """(image, caption, split key) for each line of the folder's captions.jsonl, in file order; the
    key hashes the image's path as written (normalised), so it ignores line order and captions."""
    listing = folder / CAPTIONS_FILE
    with open(listing, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
                image, caption = row["image"], row["caption"]
                if not isinstance(image, str) or not isinstance(caption, str):
                    raise TypeError(f"image is a {type(image).__name__}, caption a {type(caption).__name__}")
            except (ValueError, KeyError, TypeError) as e:  # not UTF-8 is a ValueError too
                raise LabError(f"{listing}:{lineno}: each line must be a JSON object with string `image` and "
                               f"`caption` fields ({type(e).__name__}: {e}); fix or remove that line") from None
            if not caption.strip():
                raise LabError(f"{listing}:{lineno}: the caption of {image} is empty: write one or remove that line")
            stats["files"] += 1
            try:
                pixels = load_image(folder / image, size)
            except LabError as e:
                raise LabError(f"{listing}:{lineno}: {e}") from None
            key = posixpath.normpath(image.replace("\\", "/"))
            yield pixels, caption, hashlib.blake2b(key.encode(), digest_size=16).digest()


def parquet_batches(path: Path, image_col: str, caption_col: str):
    """(image cells, caption cells, whether captions are lists) of each HUB_BATCH rows of a parquet
    file; a missing column, or a file that does not read, is one error line."""
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        for col, flag in ((image_col, "--image-column"), (caption_col, "--caption-column")):
            if col not in names:
                raise LabError(f"{path} has no column {col!r} (columns: {', '.join(names)}): name the right one "
                               f"with {flag}")
        listed = isinstance(pf.schema_arrow.field(caption_col).type,
                            (pa.ListType, pa.LargeListType, pa.FixedSizeListType))
        for batch in pf.iter_batches(batch_size=HUB_BATCH, columns=[image_col, caption_col]):
            yield batch.column(image_col).to_pylist(), batch.column(caption_col).to_pylist(), listed
    except (pa.ArrowException, OSError) as e:
        raise LabError(f"{path} is not a readable parquet file ({e}): delete it and re-run (it is downloaded "
                       f"again)") from None


def row_captions(cell, listed: bool, where: str, column: str, stats: Counter) -> list[str]:
    """A hub row's non-blank captions. Blank ones (None too) are dropped and counted as `empty`, and a
    list left with none as `uncaptioned` (a string's blank caption is its whole row: counted once)."""
    texts = (cell or []) if listed else [cell]
    bad = next((t for t in texts if t is not None and not isinstance(t, str)), None)
    if bad is not None:
        raise LabError(f"{where}: column {column!r} holds a {'list of ' * listed}{type(bad).__name__}, not "
                       f"{'strings' if listed else 'a string'}: name a text column with --caption-column")
    kept = [t for t in texts if t and t.strip()]
    if len(kept) < len(texts):  # a Counter keeps a key added with += 0: the manifest would say `empty: 0`
        stats["empty"] += len(texts) - len(kept)
    if listed and not kept:
        stats["uncaptioned"] += 1
    return kept


def image_source(cell, where: str, column: str) -> bytes | str:
    """A hub row's image: its encoded bytes, or, where an Image struct has none, its path in the
    dataset repo (images stored beside the parquet files)."""
    data = cell.get("bytes") if isinstance(cell, dict) else cell
    if isinstance(data, bytes):
        return data
    name = cell.get("path") if isinstance(cell, dict) else None
    if not isinstance(name, str):
        raise LabError(f"{where}: column {column!r} holds no image bytes or path ({str(cell)[:80]}): check "
                       f"--image-column")
    if not in_repo(name):
        raise LabError(f"{where}: image path {name!r} is not a file inside the dataset repo (absolute, with '..', "
                       f"or a folder), and only the repo's files are fetched: leave that parquet file out of --files")
    return name


def hub_images(settings: dict, size: int, stats: Counter):
    """(image, caption, split key) for each caption of each row of the hub dataset's --files, in order;
    the key hashes the image's encoded bytes (inline or fetched), so all of an image's captions share
    its split. Blank captions are dropped and counted (the user cannot fix the hub's data); an image
    that does not decode is an error naming the file and row (0-based), as is a path outside the repo;
    one the repo lacks (HTTP 404) is an error naming the dataset and the path."""
    repo = settings["source"][len(HUB_PREFIX):]
    image_col, caption_col = settings["image_column"], settings["caption_column"]
    cache = llmlabs_home() / "hub" / repo  # the repo's files at their paths in it: parquet and images
    for file, path in zip(settings["files"], download(repo, settings["files"], cache, advice=HUB_ADVICE)):
        stats["files"] += 1
        advice = (f"that hub:{repo} holds the images named in column {image_col!r} of {file} (paths inside the "
                  f"repo) and HF_ENDPOINT, or leave {file} out of --files", HUB_ADVICE[1])
        row = 0
        for images, captions, listed in parquet_batches(path, image_col, caption_col):
            rows = []  # (where, bytes or repo path, captions) of the batch's captioned rows
            for image, caption in zip(images, captions):
                where, row = f"{path} row {row}", row + 1
                if kept := row_captions(caption, listed, where, caption_col, stats):
                    rows.append((where, image_source(image, where, image_col), kept))
            # only captioned rows' images are fetched, each once however many rows name it
            named = list(dict.fromkeys(src for _, src, _ in rows if isinstance(src, str)))
            local = dict(zip(named, download(repo, named, cache, advice=advice)))
            for where, src, kept in rows:
                data = local[src].read_bytes() if isinstance(src, str) else src
                name = where if isinstance(src, bytes) else f"{where} ({src})"
                pixels = load_image(io.BytesIO(data), size, name=name)
                key = hashlib.blake2b(data, digest_size=16).digest()
                yield from ((pixels, caption, key) for caption in kept)


def caption_documents(source: str, size: int, seed: int = 0):
    """The built-in source's (image, caption) pairs in a fixed order."""
    if source == "digits":
        yield from digit_images(size)
    elif source == "shapes":
        rng = np.random.default_rng(seed)
        for _ in range(SHAPES_IMAGES):
            yield draw_shapes(rng, size)
    else:
        raise LabError(f"unknown caption source {source!r}: use one of {', '.join(CAPTION_SOURCES)}")


def caption_pairs(settings: dict, stats: Counter):
    """(image, caption, split key or None: the pair's own digest) of any caption source."""
    source, size = settings["source"], settings["image_size"]
    if source.startswith(HUB_PREFIX):
        yield from hub_images(settings, size, stats)
    elif source in CAPTION_SOURCES:
        yield from ((image, caption, None) for image, caption in caption_documents(source, size))
    else:
        yield from folder_images(Path(source), size, stats)


def build_captions(tmp: Path, settings: dict, command: str, extra_texts=()) -> dict:
    """Write a caption data directory into `tmp` (prepare.py renames it into place); returns the
    manifest. Exact duplicates (same pixels and caption) are dropped; each pair goes to the split its
    key picks (sources.split_of), so the split does not depend on the order of the source. BPE trains
    on the train captions, then on extra_texts (`prepare --text`: the text's train split)."""
    tmp.mkdir(parents=True)
    size, fracs = settings["image_size"], (settings["val_frac"], settings["test_frac"])
    stats, seen = Counter(), set()
    pairs = {s: [] for s in SPLITS}
    for image, caption, key in caption_pairs(settings, stats):
        stats["documents"] += 1
        digest = hashlib.blake2b(image.tobytes() + caption.encode(), digest_size=16).digest()
        if digest in seen:
            stats["duplicates"] += 1
            continue
        seen.add(digest)
        pairs[split_of(key or digest, *fracs)].append((image, caption))
    if not pairs["train"] or (fracs[0] and not pairs["val"]):
        raise LabError(f"{settings['source']}: too few images for the splits ({sum(map(len, pairs.values()))} in "
                       f"all): lower --val-frac/--test-frac")
    t0, chars = time.time(), 0

    def bpe_texts():
        nonlocal chars
        for text in itertools.chain((c for _, c in pairs["train"]), extra_texts):
            chars += len(text)
            yield text

    tokenizer = Tokenizer.train(bpe_texts(), settings["vocab_size"])
    tok_seconds = time.time() - t0
    splits = {}
    for split, docs in pairs.items():
        writer = ShardWriter(tmp, split, tokenizer.bos_id, token_dtype(tokenizer.vocab_size))
        captions = [c for _, c in docs]
        writer.add(tokenizer.encode_batch(captions), sum(len(c.encode()) for c in captions))
        splits[split] = writer.close()
        images = np.stack([im for im, _ in docs]) if docs else np.zeros((0, size, size, 3), np.uint8)
        np.save(tmp / f"{split}.images.npy", images, allow_pickle=False)
        splits[split]["images"] = f"{split}.images.npy"
    return finish_data_dir(tmp, tokenizer, splits, command=command, settings=settings,
                           source=f"{settings['source']} captioned images, {size} x {size} px",
                           stats=dict(stats), tokenizer_training={"chars": chars, "seconds": round(tok_seconds, 2)})
