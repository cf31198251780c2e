import fnmatch
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from llmlabs import cli
from llmlabs.common import LabError
from llmlabs.data.prepare import default_data_dir, prepare
from llmlabs.data.shards import SPLITS, DataDir
from llmlabs.data.sources import SKIP_DIRS, split_of
from llmlabs.data.tokenizer import Tokenizer

import hashlib


def split_docs(d: DataDir, split: str) -> list[str]:
    """Decode every stored document of a split (checking each starts with BOS)."""
    out = []
    for tokens, offsets in d.shards(split):
        for a, b in zip(offsets[:-1], offsets[1:]):
            assert tokens[a] == d.tokenizer.bos_id
            out.append(d.tokenizer.decode(tokens[a + 1:b]))
    return out


def test_shards_hold_exactly_the_unique_documents_split_by_hash(data_dir, corpus):
    d = DataDir.open(data_dir)
    m = d.manifest
    unique = set(corpus[1].values())
    assert m["stats"]["duplicates"] == 2 and m["stats"]["empty"] == 1
    got = {s: split_docs(d, s) for s in SPLITS}
    sets = {s: set(v) for s, v in got.items()}
    assert all(len(got[s]) == len(sets[s]) for s in SPLITS)
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
    assert sets["train"] | sets["val"] | sets["test"] == unique
    for s in SPLITS:
        for text in sets[s]:
            digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
            assert split_of(digest, 0.15, 0.1) == s
        assert m["splits"][s]["documents"] == d.num_documents(s) == len(got[s]) > 0
        assert m["splits"][s]["bytes"] == sum(len(t.encode()) for t in got[s])
        # the stored bytes equal what token_bytes says the tokens hold (BOS counts 0)
        tb = d.tokenizer.token_bytes().numpy()
        assert sum(int(tb[t].sum()) for t, _ in d.shards(s)) == m["splits"][s]["bytes"]
        assert d.num_tokens(s) == sum(len(t) for t, _ in d.shards(s))
    assert d.shards("train")[0][0].dtype == np.uint16


def test_tokenizer_sees_only_train_documents(corpus, tmp_path, monkeypatch):
    seen = []
    real_train = Tokenizer.train.__func__

    def spy(cls, texts, vocab_size):
        texts = list(texts)
        seen.extend(texts)
        return real_train(cls, iter(texts), vocab_size)
    monkeypatch.setattr(Tokenizer, "train", classmethod(spy))
    out = prepare(str(corpus[0]), out=tmp_path / "d", vocab_size=400, val_frac=0.15, test_frac=0.1)
    d = DataDir.open(out)
    assert set(seen) == set(split_docs(d, "train"))
    assert not set(seen) & (set(split_docs(d, "val")) | set(split_docs(d, "test")))


def test_tokenizer_chars_caps_training_text(corpus, tmp_path):
    out = prepare(str(corpus[0]), out=tmp_path / "d", vocab_size=300, tokenizer_chars=2000, val_frac=0.15, test_frac=0.1)
    m = json.loads((out / "manifest.json").read_text())
    assert 2000 <= m["tokenizer_training"]["chars"] < 2000 + max(len(t) for t in corpus[1].values())
    assert "--tokenizer-chars 2000" in m["command"]


def test_cached_changed_settings_and_force(data_dir, corpus, capsys):
    before = (data_dir / "manifest.json").stat().st_mtime_ns
    again = prepare(str(corpus[0]), out=data_dir, vocab_size=600, val_frac=0.15, test_frac=0.1)
    assert again == data_dir and (data_dir / "manifest.json").stat().st_mtime_ns == before
    assert "already prepared" in capsys.readouterr().out
    with pytest.raises(LabError, match="other settings \\(vocab_size: 600 -> 512\\).*--force"):
        prepare(str(corpus[0]), out=data_dir, vocab_size=512, val_frac=0.15, test_frac=0.1)


def test_force_rebuild_is_deterministic(corpus, tmp_path):
    out = prepare(str(corpus[0]), out=tmp_path / "d", vocab_size=400, val_frac=0.15, test_frac=0.1)
    m1 = json.loads((out / "manifest.json").read_text())
    prepare(str(corpus[0]), out=out, vocab_size=400, val_frac=0.15, test_frac=0.1, force=True, workers=1)
    m2 = json.loads((out / "manifest.json").read_text())
    assert m1["files"] == m2["files"] and m1["tokenizer"]["hash"] == m2["tokenizer"]["hash"]
    assert not list(tmp_path.glob("d.*"))  # no tmp/old folders left


def test_data_id_names_the_content_not_the_place(data_dir, corpus, tmp_path):
    """data_id, which a run's summary records and `sweep table` compares: the same source prepared again
    elsewhere (other workers) has the same id; one document more gives another."""
    d = DataDir.open(data_dir)
    again = prepare(str(corpus[0]), out=tmp_path / "again", vocab_size=600, val_frac=0.15, test_frac=0.1, workers=1)
    assert DataDir.open(again).data_id == d.data_id and len(d.data_id) == 16 and int(d.data_id, 16) >= 0
    shutil.copytree(corpus[0], tmp_path / "more")
    (tmp_path / "more" / "extra.txt").write_text("one document more, of words seen nowhere else\n" * 20)
    more = prepare(str(tmp_path / "more"), out=tmp_path / "m", vocab_size=600, val_frac=0.15, test_frac=0.1)
    assert DataDir.open(more).data_id != d.data_id


def test_pystdlib_subset_end_to_end(tmp_path, capsys):
    out = prepare("pystdlib", out=tmp_path / "std", vocab_size=300, glob="*json*", val_frac=0.3, test_frac=0.3)
    text = capsys.readouterr().out
    assert "documents" in text and "bytes/token" in text and "time:" in text
    d = DataDir.open(out)
    # the files of this interpreter's stdlib the glob names, counted here: Python versions differ
    root = Path(sysconfig.get_paths()["stdlib"])
    want = [p for p in root.rglob("*.py") if fnmatch.fnmatch(p.relative_to(root).as_posix(), "*json*")
            and not set(p.relative_to(root).parts[:-1]) & set(SKIP_DIRS)]
    assert d.manifest["settings"]["glob"] == "*json*" and d.manifest["stats"]["files"] == len(want) > 0


def test_default_data_dir(monkeypatch, tmp_path, corpus):
    monkeypatch.setenv("LLMLABS_HOME", str(tmp_path))
    assert default_data_dir("pystdlib", 8192) == tmp_path / "data" / "pystdlib-v8192"
    assert default_data_dir("climbmix", 4096) == tmp_path / "data" / "climbmix-v4096"
    local = default_data_dir(str(corpus[0]), 512)
    assert local.parent == tmp_path / "data" and local.name.startswith(corpus[0].name + "-") and local.name.endswith("-v512")


# ------------------------------------------------------------------------------------------------
# bad input: one clear LabError each

@pytest.fixture
def broken(data_dir, tmp_path):
    """A private copy of the prepared directory to damage."""
    return Path(shutil.copytree(data_dir, tmp_path / "copy"))


def test_no_manifest_is_not_a_data_directory(broken):
    (broken / "manifest.json").unlink()
    with pytest.raises(LabError, match="is not a data directory: it has no manifest.json.*llmlabs prepare"):
        DataDir.open(broken)
    with pytest.raises(LabError, match="does not exist"):
        DataDir.open(broken / "nope")


def test_truncated_shard(broken):
    shard = broken / "train-0000.tokens.npy"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(LabError, match="train-0000.tokens.npy has .* bytes, the manifest says .*truncated.*--force"):
        DataDir.open(broken)


def test_corrupt_shard(broken):
    shard = broken / "val-0000.tokens.npy"
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0x5A
    shard.write_bytes(bytes(data))
    with pytest.raises(LabError, match="val-0000.tokens.npy is corrupt"):
        DataDir.open(broken)


def test_tokenizer_that_does_not_match_the_shards(broken, corpus):
    other = Tokenizer.train(iter(list(corpus[1].values())[:100]), 600)
    other.save(broken / "tokenizer.json")
    with pytest.raises(LabError, match="tokenizer.json does not match the shards"):
        DataDir.open(broken)


def test_bad_fractions_and_vocab(corpus, tmp_path):
    with pytest.raises(LabError, match="split fractions"):
        prepare(str(corpus[0]), out=tmp_path / "a", val_frac=0.7, test_frac=0.4)
    with pytest.raises(LabError, match="vocab size 100 is too small"):
        prepare(str(corpus[0]), out=tmp_path / "b", vocab_size=100)
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob("b.tmp-*"))


def test_source_with_only_empty_documents(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("\n\n")
    with pytest.raises(LabError, match="no non-empty documents"):
        prepare(str(tmp_path / "src"), out=tmp_path / "out", vocab_size=300)


def test_refuses_to_overwrite_a_non_data_directory(corpus, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(LabError, match="exists and is not a data directory"):
        prepare(str(corpus[0]), out=tmp_path / "mine", force=True)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_ctrl_c_leaves_nothing_that_looks_complete(corpus, tmp_path, monkeypatch):
    calls = []

    def interrupted(self, texts, num_threads=8):
        calls.append(1)
        raise KeyboardInterrupt
    monkeypatch.setattr(Tokenizer, "encode_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(corpus[0]), out=tmp_path / "d", vocab_size=300)
    assert calls and not (tmp_path / "d").exists() and list(tmp_path.iterdir()) == []
    # through the CLI: one error line and exit code 2
    assert cli.main(["prepare", str(corpus[0]), "--out", str(tmp_path / "d"), "--vocab-size", "300"]) == 2
    assert list(tmp_path.iterdir()) == []


def test_stale_build_of_a_killed_run_is_removed(corpus, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"d.tmp-{dead.pid}"
    stale.mkdir()
    (stale / "train-0000.tokens.npy").write_bytes(b"half")
    prepare(str(corpus[0]), out=tmp_path / "d", vocab_size=300, val_frac=0.15, test_frac=0.1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_cli_errors_are_one_line_and_exit_2(tmp_path):
    env = {**os.environ, "LLMLABS_HOME": str(tmp_path), "PYTHONPATH": str(Path(__file__).parents[1])}
    r = subprocess.run([sys.executable, "-m", "llmlabs", "prepare", str(tmp_path / "nothing-here")],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: source path ")


def test_empty_train_or_val_split(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "only.txt").write_text("a single document")
    digest = hashlib.blake2b(b"a single document", digest_size=16).digest()
    assert split_of(digest, 0.98, 0.01) == "val"  # the fixed hash puts it in val at these fractions
    with pytest.raises(LabError, match="train split of .* is empty \\(1 documents in all\\)"):
        prepare(str(tmp_path / "src"), out=tmp_path / "a", vocab_size=300, val_frac=0.98, test_frac=0.01)
    (tmp_path / "src" / "two.txt").write_text(" ".join(f"another document {i}" for i in range(300)))
    with pytest.raises(LabError, match="val split of .* is empty"):
        prepare(str(tmp_path / "src"), out=tmp_path / "b", vocab_size=280, val_frac=0.0001, test_frac=0.0)


def test_unreadable_manifest(broken):
    (broken / "manifest.json").write_text('{"format": "llmlabs-data-v1", "command": "x"}')
    with pytest.raises(LabError, match="manifest.json is unreadable \\(KeyError.*--force"):
        DataDir.open(broken)
