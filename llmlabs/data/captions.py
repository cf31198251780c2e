"""Captioned images for the multimodal path: two offline sources and the data directory they become.

- `shapes`: a built-in synthetic set, learnable by construction: 1 to 4 coloured shapes (circle,
  square, triangle) in distinct cells of a 3x3 layout, and a caption that says how many there are,
  and each one's colour, shape and place, in reading order. Every word after the count is decided by
  the pixels, so a model that sees the image can drive the caption's loss far below one that cannot.
- `digits`: scikit-learn's bundled handwritten digits (1,797 8x8 images, no download), captioned
  from their labels.

A data directory of captions is a text data directory (tokenizer.json, token shards of BOS + caption,
manifest.json) plus one `<split>.images.npy` per split: uint8 [documents, S, S, 3], image i belonging
to document i, checksummed in the manifest like the token shards. Images are decoded and resized
once, here; training reads the array. Where an image goes in the token stream (`<|image_start|>`,
the patch tokens, `<|image_end|>`) is decided when batches are built, since the number of patch
tokens depends on the vision tower's patch size, not on the data."""
import hashlib
import time
from collections import Counter
from pathlib import Path

import numpy as np

from llmlabs.common import LabError
from llmlabs.data.shards import SPLITS, ShardWriter, finish_data_dir, token_dtype
from llmlabs.data.sources import split_of
from llmlabs.data.tokenizer import Tokenizer

CAPTION_SOURCES = ("shapes", "digits")
SHAPES_IMAGES = 20_000  # documents the `shapes` source draws (the split fractions divide them)

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


def caption_documents(source: str, size: int, seed: int = 0):
    """The source's (image, caption) pairs in a fixed order."""
    if source == "digits":
        yield from digit_images(size)
    elif source == "shapes":
        rng = np.random.default_rng(seed)
        for _ in range(SHAPES_IMAGES):
            yield draw_shapes(rng, size)
    else:
        raise LabError(f"unknown caption source {source!r}: use one of {', '.join(CAPTION_SOURCES)}")


def build_captions(tmp: Path, settings: dict, command: str) -> dict:
    """Write a caption data directory into `tmp` (prepare.py renames it into place); returns the
    manifest. Exact duplicates (same pixels and caption) are dropped; each pair goes to the split its
    digest picks (sources.split_of), so the split does not depend on the order of the source."""
    tmp.mkdir(parents=True)
    size, fracs = settings["image_size"], (settings["val_frac"], settings["test_frac"])
    stats, seen = Counter(), set()
    pairs = {s: [] for s in SPLITS}
    for image, caption in caption_documents(settings["source"], size):
        stats["documents"] += 1
        digest = hashlib.blake2b(image.tobytes() + caption.encode(), digest_size=16).digest()
        if digest in seen:
            stats["duplicates"] += 1
            continue
        seen.add(digest)
        pairs[split_of(digest, *fracs)].append((image, caption))
    if not pairs["train"] or (fracs[0] and not pairs["val"]):
        raise LabError(f"{settings['source']}: too few images for the splits ({sum(map(len, pairs.values()))} in "
                       f"all): lower --val-frac/--test-frac")
    t0 = time.time()
    tokenizer = Tokenizer.train((c for _, c in pairs["train"]), settings["vocab_size"])
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
                           stats=dict(stats), tokenizer_training={"chars": sum(len(c) for _, c in pairs["train"]),
                                                                  "seconds": round(tok_seconds, 2)})
