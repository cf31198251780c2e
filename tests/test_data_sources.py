import json
import random
import sysconfig
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmlabs.common import LabError
from llmlabs.data.sources import _separated_reader, resolve_source, split_of, unique_documents


def test_pystdlib_is_every_stdlib_py_file_sorted():
    src = resolve_source("pystdlib")
    files = src.files()
    root = Path(sysconfig.get_paths()["stdlib"])
    assert files == sorted(files) and len(files) > 500
    assert all(f.suffix == ".py" and root in f.parents for f in files)
    assert not any({"site-packages", "dist-packages"} & set(f.parts) for f in files)
    assert root / "json" / "decoder.py" in files
    if (root / "test").is_dir():  # some distributions ship the stdlib's tests separately
        assert any(root / "test" in f.parents for f in files)
    assert src.settings["python"].count(".") == 2


def test_local_folder_all_formats_and_glob(tmp_path):
    (tmp_path / "a.txt").write_text("plain text doc")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("# markdown doc")
    (tmp_path / "sub" / "c.py").write_text("print('python doc')")
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "json one"}) + "\n\n" + json.dumps({"text": "json 二", "id": 2}) + "\n")
    pq.write_table(pa.table({"text": ["parquet one", None, "parquet 🚀"], "n": [1, 2, 3]}), tmp_path / "e.parquet")
    (tmp_path / "ignored.csv").write_text("x,y")
    docs = list(resolve_source(str(tmp_path)).documents(Counter()))
    assert docs == ["plain text doc", "json one", "json 二", "parquet one", "parquet 🚀", "# markdown doc", "print('python doc')"]
    assert list(resolve_source(str(tmp_path), glob="sub/*").documents(Counter())) == ["# markdown doc", "print('python doc')"]
    assert list(resolve_source(str(tmp_path), glob="*.md").documents(Counter())) == ["# markdown doc"]
    assert list(resolve_source(str(tmp_path / "d.jsonl")).documents(Counter())) == ["json one", "json 二"]


def test_undecodable_files_are_skipped_and_counted(tmp_path):
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 latin-1")
    stats = Counter()
    assert list(resolve_source(str(tmp_path)).documents(stats)) == ["fine"]
    assert stats["undecodable"] == 1 and stats["files"] == 2


def test_unique_documents_drops_duplicates_and_empties(tmp_path):
    for name, text in [("1.txt", "same"), ("2.txt", "other"), ("3.txt", "same"), ("4.txt", " \n\t"), ("5.txt", "same ")]:
        (tmp_path / name).write_text(text)
    stats = Counter()
    texts = [t for t, _, _ in unique_documents(resolve_source(str(tmp_path)), stats)]
    assert texts == ["same", "other", "same "]
    assert stats["duplicates"] == 1 and stats["empty"] == 1


def test_split_is_deterministic_and_near_its_fractions():
    rng = random.Random(0)
    digests = [rng.randbytes(16) for _ in range(20000)]
    splits = [split_of(d, 0.1, 0.05) for d in digests]
    assert splits == [split_of(d, 0.1, 0.05) for d in digests]
    c = Counter(splits)
    assert abs(c["val"] / 20000 - 0.1) < 0.01 and abs(c["test"] / 20000 - 0.05) < 0.008
    # growing val only moves documents out of train, never between val and test
    wider = [split_of(d, 0.2, 0.05) for d in digests]
    assert all(w == s or (s == "train" and w == "val") for s, w in zip(splits, wider))


def test_separated_reader_across_piece_boundaries(tmp_path):
    rng = random.Random(3)
    stories = [" ".join(rng.choice(["once", "upon", "a", "time", "🐉", "ließ"]) for _ in range(rng.randint(1, 30)))
               for _ in range(50)]
    p = tmp_path / "stories.txt"
    p.write_text("<|endoftext|>\n".join(stories) + "<|endoftext|>\n", encoding="utf-8")
    for piece in (3, 7, 64, 1 << 20):
        assert list(_separated_reader("<|endoftext|>", piece)(p, Counter())) == stories


@pytest.mark.parametrize("make, kwargs, match", [
    (None, {}, "unknown source 'climbmx'.*pystdlib, pysrc, climbmix"),
    ("missing", {}, "source path .*missing does not exist"),
    ("emptydir", {}, "is empty: no .*files"),
    ("globmiss", {"glob": "*.rst"}, "matching --glob '\\*.rst'"),
    ("csv", {}, "unsupported type"),
    ("badjson", {}, "bad.jsonl:2: each line must be a JSON object with a string `text`"),
    # line 2 starts at byte 15; its byte 13 is the Latin-1 e-acute
    ("latin1", {}, "latin1.jsonl:2: not UTF-8 at byte 28 of the file .*re-encode it as UTF-8"),
    ("notext", {}, "no `text` column \\(columns: body\\)"),
    (None, {"shards": 2}, "--shards applies to hub corpora"),
])
def test_bad_sources(tmp_path, make, kwargs, match):
    spec = "climbmx"
    if make:
        spec = str(tmp_path / make)
    if make == "emptydir":
        (tmp_path / make).mkdir()
    elif make == "globmiss":
        (tmp_path / make).mkdir()
        (tmp_path / make / "a.txt").write_text("x")
    elif make == "csv":
        spec += ".csv"
        Path(spec).write_text("a,b")
    elif make == "badjson":
        spec = str(tmp_path / "bad.jsonl")
        Path(spec).write_text('{"text": "ok"}\n{"txt": "no"}\n')
    elif make == "latin1":
        spec = str(tmp_path / "latin1.jsonl")
        Path(spec).write_bytes('{"text": "ok"}\n{"text": "caf\u00e9"}\n'.encode("latin-1"))
    elif make == "notext":
        spec = str(tmp_path / "t.parquet")
        pq.write_table(pa.table({"body": ["x"]}), spec)
    if kwargs.get("shards"):
        spec = "pystdlib"
    with pytest.raises(LabError, match=match):
        list(resolve_source(spec, **kwargs).documents(Counter()))


def test_pysrc_adds_each_site_packages_once():
    files = resolve_source("pysrc").files()
    assert len(files) == len(set(files))
    assert set(resolve_source("pystdlib").files()) < set(files)
    site = Path(sysconfig.get_paths()["purelib"])
    assert any(site in f.parents for f in files)
