"""Text-only documents mixed into `llmlabs train --vision` (issue 22, per-modality loss): `prepare
--text` nests a text directory with the captions' tokenizer, a micro-batch holds a fixed number of
text rows with plain positions and no patches (their loss is the LM's alone), val_text_bpb is
evaluate_bpb on the nested directory, a mixed run resumes exactly, and bad combinations are one line."""
import json
import re
import shutil

import pytest
from conftest import prepared_shapes, sigint_after, stdlib_folder
import torch

from llmlabs import checkpoint, cli, train
from llmlabs.common import LabError
from llmlabs.data.prepare import default_data_dir
from llmlabs.data.shards import DataDir
from llmlabs.data.tokenizer import Tokenizer
from test_data_prepare import split_docs

pytest.importorskip("transformers")
import test_multimodal  # noqa: E402 (its setup_run, with this module's flags)
# as test_multimodal's TINY, with room for the captions: a tokenizer shared with code spends fewer ids on them
T = 192
TINY = ["--vision", "tiny", "--depth", "1", "--aspect-ratio", "32", "--head-dim", "16", "--seq-len", str(T),
        "--window-pattern", "L", "--device-batch-size", "4", "--total-batch-size", str(4 * T), "--eval-tokens", "300",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """(caption directory with text/, the text folder): 200 shapes and 30 standard-library files."""
    tmp = tmp_path_factory.mktemp("mix")
    src = stdlib_folder(tmp, 30)  # 6 left val empty on Python 3.12
    return prepared_shapes(tmp, val_frac=0.15, text=str(src)), src


def setup_run(data, *extra):
    return test_multimodal.setup_run(data, *extra, base=TINY)


def summary_block(out):
    block = out.split("\n---\n")[-1]
    return dict((k, v.strip()) for k, v in (line.split(":", 1) for line in block.strip().splitlines()))


def test_prepare_text_nests_a_text_directory_with_the_captions_tokenizer(mixed, tmp_path, monkeypatch, capsys):
    data_path, src = mixed
    captions, text = DataDir.open(data_path), DataDir.open(data_path / "text")
    assert text.tokenizer.hash == captions.tokenizer.hash
    docs = sorted(d for s in ("train", "val", "test") for d in split_docs(text, s))
    # each distinct file once: prepare drops exact copies, and Debian's Python 3.12 ships two
    # _sysconfigdata files of one content among the first 30 (one links the other)
    assert docs == sorted({f.read_text() for f in src.glob("*.py")})
    assert all(not name.startswith("text/") for name in captions.manifest["files"])  # checksums: each its own
    assert set(text.manifest["files"]) == {s[k] for sp in text.manifest["splits"].values() for s in sp["shards"]
                                           for k in ("tokens", "docs")}
    assert captions.manifest["settings"]["text"] == {"source": str(src.resolve()), "glob": None}
    assert "--text" in text.manifest["command"] and text.manifest["command"] == captions.manifest["command"]
    assert default_data_dir("shapes", 300, "pystdlib").name == "shapes+pystdlib-v300"  # not shapes-v300's place
    # BPE reads the train captions and then the text's train split
    seen = []
    real = Tokenizer.train.__func__
    monkeypatch.setattr(Tokenizer, "train", classmethod(lambda cls, texts, v: real(cls, seen.extend(texts) or seen, v)))
    out = prepared_shapes(tmp_path, val_frac=0.15, text=str(src))
    train_texts = split_docs(DataDir.open(out / "text"), "train")
    assert set(train_texts) <= set(seen) and not set(split_docs(DataDir.open(out / "text"), "val")) & set(seen)
    assert sum(t.endswith(".") and "shape" in t for t in seen) == DataDir.open(out).num_documents("train")
    monkeypatch.undo()
    capsys.readouterr()
    assert prepared_shapes(tmp_path, val_frac=0.15, text=str(src)) == out  # cached: the same text source
    assert "already prepared" in capsys.readouterr().out
    with pytest.raises(LabError, match=r"prepared with other settings \(text: .* -> None\)"):
        prepared_shapes(tmp_path, val_frac=0.15)
    # the nested text directory is part of what a run reads, so part of its data_id
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "text" / "manifest.json").read_text())
    name = sorted(manifest["files"])[0]
    manifest["files"][name]["sha256"] = "0" * 64
    (copy / "text" / "manifest.json").write_text(json.dumps(manifest))
    assert DataDir.open(copy).data_id != DataDir.open(out).data_id
    assert DataDir.open(out).data_id == DataDir.open(data_path).data_id  # the same sources, built twice


def test_a_mixed_batch_has_fixed_text_rows_with_plain_positions_and_the_plain_models_loss(mixed):
    from llmlabs.vision import fused_forward
    from test_model import randomized

    for frac, n_text in ((0.5, 2), (0.75, 3)):
        run = setup_run(mixed[0], "--text-frac", str(frac))
        for _ in range(3):  # the same count every step
            batch, y = next(run.loader)
            assert batch["idx"].shape == y.shape == (4, T) and len(batch["pixels"]) == 4 - n_text
            assert not batch["patch_mask"][4 - n_text:].any()
            assert torch.equal(batch["positions"][4 - n_text:], torch.arange(T).expand(n_text, 3, T))
            assert (batch["patch_mask"][:4 - n_text].sum(1) == run.mm.encoder.tokens_per_image).all()
            assert (y[4 - n_text:] >= 0).all()  # packed text: every position is a target
    model, enc = randomized(run.model, seed=5).eval(), run.mm.encoder.eval()
    text = slice(4 - n_text, None)
    with torch.no_grad():
        fused = fused_forward(model, enc, dict(batch, targets=y), loss_reduction="none")
        alone = model(batch["idx"][text], y[text], loss_reduction="none")
        other = fused_forward(model, enc, dict(batch, targets=y, pixels=255 - batch["pixels"]), loss_reduction="none")
    torch.testing.assert_close(fused[text], alone, rtol=1e-5, atol=1e-5)  # no image reaches a text row
    torch.testing.assert_close(other[text], fused[text], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(other[:text.start], fused[:text.start])  # the caption rows do read their images


def test_val_text_bpb_is_evaluate_bpb_on_the_text_directory(mixed):
    from llmlabs.evaluate import evaluate_bpb
    from test_model import randomized

    run = setup_run(mixed[0])
    model = randomized(run.model, seed=6)
    res = run.mm.evaluate(model, "val", batch_size=4, max_tokens=300)
    want = evaluate_bpb(model, DataDir.open(mixed[0] / "text"), "val", batch_size=4, seq_len=T, max_tokens=300,
                        device=torch.device("cpu"))
    assert res["text_bpb"] == want["bpb"] and res["bpb"] == res["caption_bpb"] != res["text_bpb"]


def test_mixed_run_resumed_after_ctrl_c_equals_uninterrupted(mixed, tmp_path, capsys):
    """Two micro-batches of 2 caption + 2 text rows a step; a SIGINT after step 3 saves both loaders'
    state; --resume ends where the uninterrupted run ends; metrics, the summary block and `llmlabs
    eval` carry val_caption_bpb and val_text_bpb."""
    args = [*TINY, "--data", str(mixed[0]), "--total-batch-size", str(2 * 4 * T), "--tokens", str(6 * 2 * 4 * T),
            "--eval-every", "3"]
    assert train.main(args + ["--run-dir", str(tmp_path / "full")]) == 0
    summary = summary_block(capsys.readouterr().out)
    assert float(summary["val_bpb"]) == float(summary["val_caption_bpb"]) != float(summary["val_text_bpb"])
    assert json.loads((tmp_path / "full" / "config.json").read_text())["text_frac"] == 0.5
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "train_step", sigint_after(3))
        assert train.main(args + ["--run-dir", str(tmp_path / "cut")]) == 130
    saved = checkpoint.load(checkpoint.latest(tmp_path / "cut"))["state"]["loader"]
    assert saved["captions"]["cursor"] == 3 * 2 * 2 and saved["text"]["read"] > 0
    assert train.main(["--resume", str(tmp_path / "cut")]) == 0
    full, cut = ([json.loads(r) for r in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
                 for d in ("full", "cut"))
    assert [r["step"] for r in cut] == [r["step"] for r in full] and len(full) == 6 + 2
    for a, b in zip(full, cut):
        for key in ("loss", "val_caption_bpb", "val_text_bpb"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (a["step"], key)
    assert sum("val_text_bpb" in r for r in full) == 2
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "full"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for key in ("val_caption_bpb", "val_text_bpb"):
        assert float(out.split(f"{key}:")[1].split()[0]) == pytest.approx(float(summary[key]), rel=1e-6)


def test_text_mixing_errors_are_one_line(mixed, tmp_path, capsys):
    from conftest import prepared_stdlib

    captions_only = prepared_shapes(tmp_path / "c", val_frac=0.15)
    text = prepared_stdlib(tmp_path / "t", 20, 300, 0.2, 0.2)
    base = [a for a in TINY if a not in ("--vision", "tiny")]
    cases = [(["prepare", str(mixed[1]), "--text", "pystdlib", "--out", str(tmp_path / "p")],
              "--text mixes text documents into a caption source, and .* is text: drop --text"),
             (["train", *TINY, "--data", str(captions_only), "--text-frac", "0.5"],
              "--text-frac mixes in text-only documents, and .* holds captions only"),
             (["train", *base, "--data", str(text), "--text-frac", "0.5"], "--text-frac mixes text rows into a --vision"),
             (["train", *TINY, "--data", str(mixed[0]), "--text-frac", "0.1"], r"--text-frac 0.1 of 4 rows .* is 0 text"),
             (["train", *TINY, "--data", str(mixed[0]), "--text-frac", "1"], r"--text-frac 1 of 4 rows .* is 4 text")]
    for i, (argv, said) in enumerate(cases):
        capsys.readouterr()
        extra = ["--run-dir", str(tmp_path / f"r{i}"), "--tokens", "1000"] if argv[0] == "train" else []
        assert cli.main([*argv, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and re.search(said, err[0]), err
