"""Caption sources read from files (data/captions.py): a local folder with captions.jsonl, and a hub
dataset's parquet files served from 127.0.0.1. Each stored image is compared with Pillow's resize of
its file done here by hand; bad inputs are one error line naming the file."""
import hashlib
import io
import json
import random
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import png_with_size, random_text
from test_data_hub import hub, serve  # noqa: F401 (hub: the local HTTP server fixture)
from llmlabs import cli
from llmlabs.data import captions as captions_py
from llmlabs.data.shards import SPLITS, DataDir
from llmlabs.data.sources import split_of

SIZE = 12
MODES = ("RGB", "L", "P", "RGBA", "LA")


def random_image(rng: np.random.Generator, mode: str):
    """Random pixels in `mode`, a random size (not square) from 5 to 60 px a side."""
    w, h = (int(v) for v in rng.integers(5, 60, 2))
    channels = {"RGB": 3, "RGBA": 4, "LA": 2}.get(mode)
    arr = rng.integers(0, 256, (h, w, channels) if channels else (h, w), dtype=np.uint8)
    if mode == "P":
        im = Image.fromarray(arr, "L").convert("P")
        im.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
        return im
    return Image.fromarray(arr, mode)


def expected(im) -> np.ndarray:
    """What the data directory must hold for an image: RGB, bicubic to SIZE x SIZE, no crop."""
    return np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC))


def stored(out) -> dict:
    """{caption: (split, image)} of a prepared caption directory (each test's captions are unique)."""
    data, found = DataDir.open(out), {}
    for split in SPLITS:
        images = data.images(split)
        (tokens, offsets), = data.shards(split)
        assert len(images) == len(offsets) - 1 and images.shape[1:] == (SIZE, SIZE, 3)
        for i in range(len(images)):
            assert tokens[offsets[i]] == data.tokenizer.bos_id
            found[data.tokenizer.decode(tokens[offsets[i] + 1:offsets[i + 1]])] = (split, np.array(images[i]))
    return found


def make_folder(root, n=40, seed=0):
    """n images (PNG in every mode, JPEG for RGB and L, some in a subfolder), a few with a second
    caption; returns (rows of captions.jsonl, {caption: expected image}, {caption: image path})."""
    rng, words = np.random.default_rng(seed), random.Random(seed)
    (root / "sub").mkdir(parents=True)
    rows, want, path_of = [], {}, {}
    for i in range(n):
        mode = MODES[i % len(MODES)]
        ext = ".jpg" if mode in ("RGB", "L") and i % 2 else ".png"
        rel = f"{'sub/' if i % 3 == 0 else ''}img{i}{ext}"
        random_image(rng, mode).save(root / rel)
        with Image.open(root / rel) as im:  # what is on disk (JPEG is lossy), resized by hand
            pixels = expected(im)
        for k in range(1 + (i % 7 == 0)):  # every 7th image has two captions
            caption = f"{random_text(words, words.randint(3, 12))} {i}.{k}"
            rows.append({"image": rel, "caption": caption})
            want[caption], path_of[caption] = pixels, rel
    return rows, want, path_of


def write_rows(folder, rows):
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def prepare_args(src, out):
    return ["prepare", str(src), "--out", str(out), "--vocab-size", "300", "--image-size", str(SIZE),
            "--val-frac", "0.2", "--test-frac", "0.1"]


def test_folder_images_are_resized_captioned_and_split_by_path(tmp_path):
    folder = tmp_path / "pics"
    rows, want, path_of = make_folder(folder)
    write_rows(folder, rows)
    assert cli.main(prepare_args(folder, tmp_path / "a")) == 0
    got = stored(tmp_path / "a")
    assert got.keys() == want.keys()
    for caption, (split, image) in got.items():
        assert np.array_equal(image, want[caption]), caption
        digest = hashlib.blake2b(path_of[caption].encode(), digest_size=16).digest()
        assert split == split_of(digest, 0.2, 0.1)
    assert {s for s, _ in got.values()} == set(SPLITS)
    # the split follows the image, not the line order: shuffled, every pair keeps its split
    random.Random(1).shuffle(rows)
    write_rows(folder, rows)
    assert cli.main(prepare_args(folder, tmp_path / "b")) == 0
    assert {c: s for c, (s, _) in stored(tmp_path / "b").items()} == {c: s for c, (s, _) in got.items()}
    manifest = DataDir.open(tmp_path / "b").manifest
    assert manifest["stats"]["files"] == len(rows) and f"--image-size '{SIZE}'" in manifest["command"]


def test_a_text_folder_with_a_text_captions_jsonl_stays_text(tmp_path):
    rng = random.Random(3)
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "captions.jsonl").write_text("".join(json.dumps({"text": random_text(rng, 30)}) + "\n"
                                                   for _ in range(60)))
    (folder / "a.txt").write_text(random_text(rng, 50))
    assert cli.main(prepare_args(folder, tmp_path / "t")[:-6] + ["--val-frac", "0.2"]) == 0
    d = DataDir.open(tmp_path / "t")
    assert "images" not in d.manifest["splits"]["train"] and sum(d.num_documents(s) for s in SPLITS) == 61


@pytest.mark.parametrize("case,said", [
    ("corrupt", r"captions.jsonl:2: image .*bad.png is not an image Pillow can read"),
    ("missing", r"captions.jsonl:2: image .*bad.png does not exist: check the path"),
    ("huge", r"captions.jsonl:2: image .*bad.png is 9000 x 9000 pixels, over the 64,000,000-pixel limit"),
    ("bomb", r"captions.jsonl:2: image .*bad.png is over the 64,000,000-pixel limit"),
    ("not_json", r"captions.jsonl:2: each line must be a JSON object .*JSONDecodeError"),
    ("no_caption", r"captions.jsonl:2: each line must be a JSON object .*KeyError: 'caption'"),
    ("number_caption", r"captions.jsonl:2: each line must be a JSON object .*caption a int"),
    ("empty_caption", r"captions.jsonl:2: the caption of bad.png is empty"),
])
def test_bad_folder_input_is_one_line_naming_the_file(tmp_path, capsys, case, said):
    folder = tmp_path / "pics"
    folder.mkdir()
    random_image(np.random.default_rng(0), "RGB").save(folder / "good.png")
    bad = {"image": "bad.png", "caption": "a caption"}
    line = json.dumps(bad)
    if case == "corrupt":
        (folder / "bad.png").write_bytes(np.random.default_rng(1).bytes(300))
    elif case in ("huge", "bomb"):
        png_with_size(folder / "bad.png", *(2 * [9000 if case == "huge" else 100_000]))
    elif case == "not_json":
        line = line[:-1]
    elif case == "no_caption":
        line = json.dumps({"image": "bad.png"})
    elif case == "number_caption":
        line = json.dumps({"image": "bad.png", "caption": 7})
    elif case == "empty_caption":
        line = json.dumps({"image": "bad.png", "caption": "  "})
    (folder / "captions.jsonl").write_text(json.dumps({"image": "good.png", "caption": "fine"}) + "\n" + line + "\n")
    capsys.readouterr()
    assert cli.main(prepare_args(folder, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(said, err[0]) and str(folder / "captions.jsonl") in err[0], err
    assert not (tmp_path / "out").exists()


# ---- hub:OWNER/NAME ----

def png_bytes(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def hub_parquet(tmp_path, name, images, captions, image_type="struct", paths=None, caption_type=pa.string()):
    """A parquet file as `datasets` writes an Image feature: a struct {bytes, path} column; "path": the
    struct without bytes, naming files of the repo (`paths`), as for images stored beside the parquet;
    "binary": plain bytes."""
    data = [png_bytes(im) for im in images]
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    column = (pa.array([{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(data)], struct)
              if image_type == "struct" else pa.array([{"bytes": None, "path": p} for p in paths], struct)
              if image_type == "path" else pa.array(data, pa.binary()))
    path = tmp_path / name
    pq.write_table(pa.table({"img": column, "text": pa.array(captions, caption_type), "id": list(range(len(data)))}),
                   path, row_group_size=16)
    return path.read_bytes()


def hub_args(repo, files, *more):
    return ["prepare", f"hub:{repo}", "--files", ",".join(files), "--image-column", "img", "--caption-column", "text",
            "--vocab-size", "300", "--image-size", str(SIZE), "--val-frac", "0.2", "--test-frac", "0.1", *more]


def image_key(im) -> bytes:
    """The split key of a hub image: a hash of its encoded bytes."""
    return hashlib.blake2b(png_bytes(im), digest_size=16).digest()


def error_lines(capsys) -> list[str]:
    """stderr but the download bars (and the blank line splitlines finds between two bars' "\n\r"): the error
    must be one line, the last."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: "), err
    return [line for line in err if line and not line.startswith("download ")]


def test_hub_dataset_from_a_local_server(hub, tmp_path, capsys):  # noqa: F811
    rng, words = np.random.default_rng(5), random.Random(5)
    want, files = {}, ["data/train-0.parquet", "data/train-1.parquet"]
    for f, image_type in zip(files, ("struct", "binary")):
        images = [random_image(rng, MODES[int(rng.integers(len(MODES)))]) for _ in range(30)]
        captions = [f"{random_text(words, words.randint(3, 10))} {f} {i}" for i in range(30)]
        captions[4], captions[9] = None, " "  # dropped and counted: the hub's data is not ours to fix
        want.update({c: expected(im) for c, im in zip(captions, images) if c and c.strip()})
        serve(hub, "someone/pics", f, hub_parquet(tmp_path, "x.parquet", images, captions, image_type))
    args = hub_args("someone/pics", files)
    assert cli.main(args) == 0
    out = tmp_path / "home" / "data" / "someone--pics-v300"
    got = stored(out)
    assert got.keys() == want.keys() and all(np.array_equal(got[c][1], want[c]) for c in want)
    assert {s for s, _ in got.values()} == set(SPLITS)
    assert DataDir.open(out).manifest["stats"] == {"files": 2, "documents": 56, "empty": 4}
    assert sorted(p for p, _ in hub.requests) == [f"/datasets/someone/pics/resolve/main/{f}" for f in files]
    n = len(hub.requests)
    assert cli.main(args) == 0 and len(hub.requests) == n  # prepared already: no download
    # a corrupt image is one line naming the downloaded file and the row
    images = [random_image(rng, "RGB") for _ in range(3)]
    blob = hub_parquet(tmp_path, "y.parquet", images, ["a", "b", "c"])
    good = png_bytes(images[1])
    serve(hub, "someone/broken", "d.parquet", blob.replace(good, good[:60] + bytes(len(good) - 60)))
    capsys.readouterr()
    assert cli.main(["prepare", "hub:someone/broken", "--files", "d.parquet", "--image-column", "img",
                     "--caption-column", "text"]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "someone/broken/d.parquet row 1 cannot be decoded" in err[0], err


@pytest.mark.parametrize("argv,said", [
    (["--files", "x.parquet"], r"x.parquet has no column 'image' \(columns: img, text, id\): .*--image-column"),
    (["--files", "x.parquet", "--image-column", "img"], r"has no column 'caption' .*--caption-column"),
    (["--files", "x.parquet", "--image-column", "id", "--caption-column", "text"], r"row 0: column 'id' holds no image"),
    (["--files", "x.parquet", "--image-column", "img", "--caption-column", "id"], r"row 0: column 'id' holds a int"),
    (["--files", "nope.parquet"], r"nope.parquet: HTTP 404 .*check the dataset name, --files"),
    (["--files", "../../x.parquet"], r"--files '../../x.parquet': give relative paths"),
    (["--files", "x.csv"], r"--files 'x.csv': give relative paths of .parquet files"),
    ([], r"name its parquet files with --files"),
])
def test_bad_hub_input_is_one_line(hub, tmp_path, capsys, argv, said):  # noqa: F811
    serve(hub, "o/n", "x.parquet", hub_parquet(tmp_path, "x.parquet", [random_image(np.random.default_rng(2), "RGB")],
                                               ["a cat"]))
    capsys.readouterr()
    assert cli.main(["prepare", "hub:o/n", *argv]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and re.search(said, err[0]), err


def test_hub_images_stored_by_path_in_the_repo(hub, tmp_path, monkeypatch, capsys):  # noqa: F811
    """Path-only Image cells (images beside the parquet) give what the same images inline give."""
    monkeypatch.setattr(captions_py, "HUB_BATCH", 8)  # several batches, and an image named again in a later one
    rng, words = np.random.default_rng(7), random.Random(7)
    images = [random_image(rng, MODES[i % len(MODES)]) for i in range(20)]
    names = [f"images/{'sub/' * (i % 3 == 0)}{i}.png" for i in range(20)]
    names[1], names[2] = "images/a cat.png", "images/sub/été 2.png"
    for im, name in zip(images, names):
        serve(hub, "someone/linked", name, png_bytes(im))
    # more captions of 5 and 11 (fetched in earlier batches) and of 17 (twice in its own batch); then a blank one
    rows = list(range(20)) + [5, 11, 17, 5, 0]
    texts = [f"{random_text(words, words.randint(3, 8))} {r}.{k}" for k, r in enumerate(rows)]
    texts[-1] = " "
    paths = [names[r] for r in rows[:-1]] + ["images/never served.png"]  # a row without a caption fetches nothing
    serve(hub, "someone/linked", "d/x.parquet",
          hub_parquet(tmp_path, "l.parquet", [images[r] for r in rows], texts, "path", paths))
    serve(hub, "someone/inline", "d/x.parquet", hub_parquet(tmp_path, "i.parquet", [images[r] for r in rows], texts))
    capsys.readouterr()
    assert cli.main(hub_args("someone/linked", ["d/x.parquet"])) == 0
    # one download per batch of 8 rows: the parquet file, then 8, 8 and 4 images (the rest were fetched already)
    bars = re.findall(r"download someone/linked \((\d+) files\)", capsys.readouterr().err)
    assert sorted(set(map(int, bars))) == [1, 4, 8], bars
    assert cli.main(hub_args("someone/inline", ["d/x.parquet"])) == 0
    got, inline = (stored(tmp_path / "home" / "data" / f"someone--{n}-v300") for n in ("linked", "inline"))
    assert got.keys() == inline.keys() == set(texts[:-1])
    for text, r in zip(texts[:-1], rows):
        assert got[text][0] == inline[text][0] == split_of(image_key(images[r]), 0.2, 0.1), text
        assert np.array_equal(got[text][1], inline[text][1]) and np.array_equal(got[text][1], expected(images[r]))
    assert len({s for s, _ in got.values()}) > 1
    manifest = DataDir.open(tmp_path / "home" / "data" / "someone--linked-v300").manifest
    assert manifest["stats"] == {"files": 1, "documents": 24, "empty": 1}
    fetched = [p for p, _ in hub.requests if p.startswith("/datasets/someone/linked/resolve/main/images/")]
    assert len(fetched) == len(set(fetched)) == 20  # each image once, however many rows name it
    assert {"/datasets/someone/linked/resolve/main/images/a%20cat.png",
            "/datasets/someone/linked/resolve/main/images/sub/%C3%A9t%C3%A9%202.png"} <= set(fetched)
    cache = tmp_path / "home" / "hub" / "someone" / "linked"
    assert (cache / "images/sub/été 2.png").read_bytes() == png_bytes(images[2]) and (cache / "d/x.parquet").is_file()
    n = len(hub.requests)
    assert cli.main(hub_args("someone/linked", ["d/x.parquet"], "--vocab-size", "280")) == 0
    assert len(hub.requests) == n  # a new data directory, all from the cache


@pytest.mark.parametrize("bad,said", [
    ("../up.png", r"x.parquet row 1: image path '../up.png' is not a file inside the dataset repo"),
    ("imgs/../../up.png", r"x.parquet row 1: image path 'imgs/../../up.png' is not a file inside"),
    ("/etc/hostname", r"x.parquet row 1: image path '/etc/hostname' is not a file inside the dataset repo"),
    ("imgs/", r"x.parquet row 1: image path 'imgs/' is not a file inside the dataset repo"),
    ("imgs/gone away.png", r"/datasets/o/n/resolve/main/imgs/gone away.png: HTTP 404 .*check that hub:o/n holds "
                           r"the images named in column 'img' of x.parquet .*leave x.parquet out of --files"),
])
def test_bad_hub_image_path_is_one_line(hub, tmp_path, capsys, bad, said):  # noqa: F811
    images = [random_image(np.random.default_rng(i), "RGB") for i in range(2)]
    serve(hub, "o/n", "imgs/ok.png", png_bytes(images[0]))
    serve(hub, "o/n", "x.parquet", hub_parquet(tmp_path, "x.parquet", images, ["a cat", "a dog"], "path",
                                               ["imgs/ok.png", bad]))
    capsys.readouterr()
    assert cli.main(hub_args("o/n", ["x.parquet"])) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and re.search(said, err[0]), err
    assert not (tmp_path / "home" / "up.png").exists()


def test_hub_caption_lists_are_one_pair_each(hub, tmp_path):  # noqa: F811
    """A list column (COCO-style): each non-blank caption its own pair, all in the image's split."""
    rng, words = np.random.default_rng(11), random.Random(11)
    images = [random_image(rng, MODES[i % len(MODES)]) for i in range(24)]
    lists, want, empty, uncaptioned = [], {}, 0, 0
    for i, im in enumerate(images):
        texts = [f"{random_text(words, words.randint(2, 8))} {i}.{k}" for k in range(i % 5)]
        for text in texts:
            want[text] = i
        blanks = [[], [" "], ["", None]][i % 3] if i % 2 else []
        texts += blanks
        words.shuffle(texts)
        empty, uncaptioned = empty + len(blanks), uncaptioned + (i % 5 == 0)
        lists.append(None if i == 10 else texts)  # a null cell: no caption at all
    assert lists[10] is None and uncaptioned >= 4 and empty >= 8
    serve(hub, "coco/like", "x.parquet", hub_parquet(tmp_path, "x.parquet", images, lists,
                                                     caption_type=pa.list_(pa.string())))
    assert cli.main(hub_args("coco/like", ["x.parquet"])) == 0
    out = tmp_path / "home" / "data" / "coco--like-v300"
    got = stored(out)
    assert got.keys() == want.keys()
    for text, i in want.items():
        assert got[text][0] == split_of(image_key(images[i]), 0.2, 0.1) and np.array_equal(got[text][1],
                                                                                           expected(images[i]))
    assert len({s for s, _ in got.values()}) > 1
    assert DataDir.open(out).manifest["stats"] == {"files": 1, "documents": len(want), "empty": empty,
                                                   "uncaptioned": uncaptioned}


@pytest.mark.parametrize("values,kind,said", [
    ([[1, 2], [3]], pa.list_(pa.int64()), r"x.parquet row 0: column 'text' holds a list of int, not strings"),
    ([[{"a": "x"}], []], None, r"x.parquet row 0: column 'text' holds a list of dict, not strings"),
    ([{"a": "x"}, {"a": "y"}], None, r"x.parquet row 0: column 'text' holds a dict, not a string"),
    ([None, 7], pa.int32(), r"x.parquet row 1: column 'text' holds a int, not a string"),
])
def test_hub_caption_column_of_another_type_is_one_line(hub, tmp_path, capsys, values, kind, said):  # noqa: F811
    images = [random_image(np.random.default_rng(i), "RGB") for i in range(2)]
    serve(hub, "o/n", "x.parquet", hub_parquet(tmp_path, "x.parquet", images, values, caption_type=kind))
    capsys.readouterr()
    assert cli.main(hub_args("o/n", ["x.parquet"])) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and re.search(said, err[0]) and "--caption-column" in err[0], err
