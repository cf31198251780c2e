"""Caption sources (data/captions.py) and their data directories: the synthetic shapes say what the
pixels show, the digits' captions come from their labels, and `llmlabs prepare shapes` stores
checksummed images beside the caption tokens."""
import numpy as np
import pytest

from llmlabs import cli
from llmlabs.common import LabError
from llmlabs.data import captions
from llmlabs.data.captions import COLOURS, NUMBERS, PLACES, draw_shapes
from llmlabs.data.shards import DataDir

pytest.importorskip("PIL")


def parse(caption):
    """"two shapes: a red circle at the top left and a blue square in the center." -> (2, [(colour,
    shape, cell)])."""
    count, listed = caption.rstrip(".").split(": ")
    items = listed.replace(" and ", ", ").split(", ")
    out = []
    for item in items:
        _, colour, shape, place = item.split(" ", 3)
        out.append((colour, shape, PLACES.index(place)))
    return NUMBERS.index(count.split()[0]), out


def test_shapes_captions_describe_the_pixels():
    """Each cell's pixels hold the colour the caption names for it, and only the named cells hold
    colour: an independent reading of the image against the caption, over many random images."""
    rng = np.random.default_rng(0)
    size, cell = 48, 16
    for _ in range(200):
        image, caption = draw_shapes(rng, size)
        n, items = parse(caption)
        assert n == len(items) and 1 <= n <= 4
        named = {c: colour for colour, _, c in items}
        for c in range(9):
            block = image[c // 3 * cell:(c // 3 + 1) * cell, c % 3 * cell:(c % 3 + 1) * cell].reshape(-1, 3)
            lit = block[block.max(1) > 0]
            if c not in named:
                assert len(lit) == 0, (caption, c)
                continue
            # the block's most common non-black colour is the named one
            values, counts = np.unique(lit, axis=0, return_counts=True)
            assert tuple(values[counts.argmax()]) == COLOURS[named[c]], (caption, c)
    # the shape's kind shows in how much of its box it fills: square > circle > triangle
    fills = {"square": [], "circle": [], "triangle": []}
    for _ in range(300):
        image, caption = draw_shapes(rng, 96)
        _, items = parse(caption)
        if len(items) == 1:
            lit = image.max(2) > 0
            ys, xs = np.nonzero(lit)
            fills[items[0][1]].append(lit.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1)))
    assert min(fills["square"]) > max(fills["circle"]) > 0.7 and min(fills["circle"]) > max(fills["triangle"])


def test_shapes_are_deterministic_for_a_seed():
    a = list(zip(range(5), captions.caption_documents("shapes", 32, seed=3)))
    b = list(zip(range(5), captions.caption_documents("shapes", 32, seed=3)))
    c = list(zip(range(5), captions.caption_documents("shapes", 32, seed=4)))
    assert all(np.array_equal(x[1][0], y[1][0]) and x[1][1] == y[1][1] for x, y in zip(a, b))
    assert [x[1][1] for x in a] != [x[1][1] for x in c]


def test_digits_are_captioned_from_their_labels():
    from sklearn.datasets import load_digits

    digits = load_digits()
    docs = list(captions.digit_images(16))
    assert len(docs) == len(digits.target) == 1797
    for (image, caption), label, raw in zip(docs[:50], digits.target, digits.images):
        assert caption == f"a handwritten {NUMBERS[label]} ({label})."
        assert image.shape == (16, 16, 3) and (image[..., 0] == image[..., 1]).all()
        # downscaled back to 8x8 the image is the digit's own grey levels (0..16 -> 0..255)
        small = image[..., 0].reshape(8, 2, 8, 2).mean((1, 3))
        assert np.corrcoef(small.ravel(), raw.ravel())[0, 1] > 0.9


def test_prepare_shapes_stores_checksummed_images_beside_the_captions(tmp_path, monkeypatch):
    monkeypatch.setattr(captions, "SHAPES_IMAGES", 400)
    out = tmp_path / "shapes"
    assert cli.main(["prepare", "shapes", "--out", str(out), "--vocab-size", "300", "--image-size", "24",
                     "--val-frac", "0.1", "--test-frac", "0.05"]) == 0
    data = DataDir.open(out)
    tok = data.tokenizer
    assert {"image_start", "image_end", "image_patch"} <= set(tok.special_ids)
    drawn = {}
    for im, c in captions.caption_documents("shapes", 24):
        drawn.setdefault(c, []).append(im)
    total = 0
    for split in ("train", "val", "test"):
        images = data.images(split)
        (tokens, offsets), = data.shards(split)
        assert images.shape == (data.num_documents(split), 24, 24, 3) and images.dtype == np.uint8
        total += len(images)
        # document i's caption describes image i: re-draw the stream and look each one up
        for i in range(0, len(images), 7):
            caption = tok.decode(tokens[offsets[i] + 1:offsets[i + 1]])
            assert tokens[offsets[i]] == tok.bos_id
            assert any(np.array_equal(images[i], im) for im in drawn[caption])
    assert total == 400 - data.manifest["stats"].get("duplicates", 0)
    # the images are checksummed like the token shards: a changed byte is caught when the directory opens
    path = out / "val.images.npy"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(LabError, match="val.images.npy is corrupt"):
        DataDir.open(out)


def test_caption_source_refuses_text_flags_and_a_text_dir_has_no_images(tmp_path):
    with pytest.raises(LabError, match="--glob and --shards apply to text sources"):
        from llmlabs.data.prepare import prepare
        prepare("digits", tmp_path / "d", 300, glob="*.py")
    with pytest.raises(LabError, match="unknown caption source"):
        list(captions.caption_documents("cats", 16))
