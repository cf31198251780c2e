"""`llmlabs train --vision` (multimodal.py): a vision run resumes exactly and `llmlabs eval` scores it,
KV-cache captioning against the whole forward and `llmlabs sample --image`, the encoder's optimizer groups,
a frozen tower stays frozen, the caption loader's ranks and state, caption bpb against a hand count,
the shuffled-image ablation, and one-line errors for data and flags that do not go together."""
import argparse
import json
import re

import numpy as np
import pytest
from conftest import prepared_shapes, sigint_after
import torch

from llmlabs import checkpoint, cli, multimodal, train
from llmlabs.common import LabError

transformers = pytest.importorskip("transformers")
# a d1 LM of width 32 and the tiny tower; 16-px images: a 4 x 4 patch grid, 4 tokens after merging
TINY = ["--vision", "tiny", "--depth", "1", "--aspect-ratio", "32", "--head-dim", "16", "--seq-len", "96",
        "--window-pattern", "L", "--device-batch-size", "4", "--total-batch-size", "384", "--eval-tokens", "400",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    return prepared_shapes(tmp_path_factory.mktemp("mm"), val_frac=0.15)


def setup_run(data_dir, *extra, base=TINY):
    """train.setup of `base` flags (a tiny CPU vision run) on data_dir, as `llmlabs train` would."""
    p = argparse.ArgumentParser()
    train.add_args(p)
    cfg = train.resolve_config(p.parse_args([*base, "--data", str(data_dir), *extra]), torch.device("cpu"))
    return train.setup(cfg, torch.device("cpu"))


def rows(run_dir):
    return [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_vision_run_resumed_after_ctrl_c_equals_uninterrupted(shapes_dir, tmp_path, capsys):
    """Two micro-batches a step (the encoder's gradients accumulate and are cleared like the LM's); a
    SIGINT after step 4 saves the merger and the trained tower; --resume ends where the uninterrupted
    run ends, loss for loss; the summary block has the caption bpb."""
    args = [*TINY, "--data", str(shapes_dir), "--total-batch-size", str(2 * 4 * 96), "--tokens", str(8 * 2 * 4 * 96),
            "--eval-every", "4"]
    assert train.main(args + ["--run-dir", str(tmp_path / "full")]) == 0
    block = capsys.readouterr().out.split("\n---\n")[-1]
    summary = dict((k, v.strip()) for k, v in (line.split(":", 1) for line in block.strip().splitlines()))
    assert float(summary["val_caption_bpb"]) == float(summary["val_bpb"])  # caption data: all scored text follows an image
    images = checkpoint.load(checkpoint.latest(tmp_path / "full"))["state"]["loader"]["documents"]
    assert summary["num_steps"] == "8" and float(summary["data_passes"]) == round(8 * 8 / images, 2)  # 8 rows a step
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "train_step", sigint_after(4))
        assert train.main(args + ["--run-dir", str(tmp_path / "cut")]) == 130
    saved = checkpoint.load(checkpoint.latest(tmp_path / "cut"))
    assert saved["step"] == 4 and saved["state"]["loader"]["cursor"] == 4 * 8
    assert {"norm.weight", "fc1.weight", "fc2.bias"} <= set(saved["state"]["encoder"]["merger"])
    assert any("patch_embedding" in k for k in saved["state"]["encoder"]["tower"])  # tiny: the tower trains
    assert train.main(["--resume", str(tmp_path / "cut")]) == 0
    full, cut = rows(tmp_path / "full"), rows(tmp_path / "cut")
    assert [r["step"] for r in cut] == [r["step"] for r in full] and len(full) == 8 + 2  # + 2 eval rows
    assert all("val_caption_bpb" in r for r in full if "val_bpb" in r)
    for a, b in zip(full, cut):
        key = "loss" if "loss" in a else "val_caption_bpb"
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), a["step"]
    sa, sb = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("full", "cut"))
    assert sb["val_caption_bpb"] == pytest.approx(sa["val_caption_bpb"], rel=1e-6)
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "full"), "--device", "cpu"]) == 0  # caption bpb, from the checkpoint's encoder
    out = capsys.readouterr().out
    assert float(out.split("val_caption_bpb:")[1].split()[0]) == pytest.approx(sa["val_caption_bpb"], rel=1e-6)
    assert cli.main(["eval", str(tmp_path / "full"), "--tasks", "bpb,next_line"]) == 2  # the LM alone: no images
    assert "is a --vision run, scored on its captions after their images: use --tasks bpb" in capsys.readouterr().err


def test_caption_with_the_kv_cache_equals_the_whole_forward_at_every_step(shapes_dir):
    # random weights everywhere (a fresh model's output projections are zero); greedy, 3 images at once
    from llmlabs.vision import fused_forward, image_tokens, mrope_positions
    from test_model import randomized

    run = setup_run(shapes_dir)
    model, encoder, tok = randomized(run.model, seed=91).eval(), run.mm.encoder.eval(), run.data.tokenizer
    pixels = torch.from_numpy(run.data.images("val")[:3].copy())
    prompt = "two shapes:"
    got = multimodal.caption(model, encoder, tok, pixels, 12, prompt=prompt, temperature=0)
    start = [tok.bos_id, *image_tokens(tok.special_ids, encoder.merged_grid), *tok.encode(prompt)]
    patch_id = tok.special_ids["image_patch"]
    for b in range(3):
        seq = list(start)
        for _ in range(12):
            idx = torch.tensor([seq])
            batch = {"idx": idx, "positions": mrope_positions(idx, patch_id, encoder.merged_grid),
                     "patch_mask": idx == patch_id, "pixels": pixels[b:b + 1]}
            with torch.no_grad():
                seq.append(int(fused_forward(model, encoder, batch)[0, -1].argmax()))
            if seq[-1] == tok.bos_id:
                break
        assert got[b] == seq[len(start):], b
    assert got[0] != got[1] or got[1] != got[2]  # the images matter


def test_sample_captions_an_image_file(shapes_dir, tmp_path, capsys):
    from PIL import Image

    assert train.main([*TINY, "--data", str(shapes_dir), "--tokens", str(6 * 384), "--run-dir", str(tmp_path / "r")]) == 0
    from llmlabs.data.shards import DataDir

    pixels = DataDir.open(shapes_dir).images("val")[5]  # saved losslessly at its own size: read back as is
    Image.fromarray(pixels).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    argv = ["sample", str(tmp_path / "r"), "--image", str(tmp_path / "a.png"), "--temperature", "0", "--max-tokens", "10"]
    capsys.readouterr()
    assert cli.main(argv) == 0 and cli.main(argv) == 0
    first, second = capsys.readouterr().out.strip().splitlines()
    assert first == second and first.startswith(f"{tmp_path / 'a.png'}: ")
    model, info = checkpoint.load_run(tmp_path / "r", torch.device("cpu"))
    tok = DataDir.open(shapes_dir).tokenizer
    ids = multimodal.caption(model, info["encoder"], tok, torch.from_numpy(pixels[None].copy()), 10, temperature=0)[0]
    assert first.split(": ", 1)[1] == tok.decode(ids[:-1] if ids[-1] == tok.bos_id else ids)
    capsys.readouterr()
    assert cli.main(argv + ["--prompt", "two shapes:", "--num-samples", "2"]) == 0  # the caption's start, twice
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0] == lines[1] and lines[0].startswith(f"{tmp_path / 'a.png'}: two shapes:")
    for extra, said in ((["--image", str(tmp_path / "bad.png")], "bad.png is not an image Pillow can read"),
                        ([], "is a --vision run: give --image FILE")):
        assert cli.main(["sample", str(tmp_path / "r"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0], err


def test_encoder_optimizer_groups_cover_each_trained_parameter_once(shapes_dir):
    run = setup_run(shapes_dir)
    enc = run.mm.encoder
    kinds = {id(p): g["kind"] for g in run.optimizer.param_groups for p in g["params"]}
    assert len(kinds) == sum(len(g["params"]) for g in run.optimizer.param_groups)  # none twice
    for name, p in enc.named_parameters():
        want = "muon" if p.ndim == 2 and "embeddings" not in name else "adamw"
        assert kinds[id(p)] == want, name
    assert kinds[id(enc.merger.fc1.weight)] == "muon" and kinds[id(enc.merger.norm.weight)] == "adamw"
    assert kinds[id(enc.tower.model.embeddings.patch_embedding.weight)] == "adamw"  # an input layer: not Muon
    assert all(id(p) in kinds for p in run.model.parameters())  # the LM's groups are all still there
    muon = [g for g in run.optimizer.param_groups if g["kind"] == "muon"]
    assert all(len({tuple(p.shape) for p in g["params"]}) == 1 for g in muon)


def pretrained_tower(tmp_path):
    torch.manual_seed(3)
    config = transformers.Siglip2VisionConfig(num_patches=16, **multimodal.TINY_TOWER)
    transformers.Siglip2VisionModel(config).save_pretrained(tmp_path / "tower")
    return str(tmp_path / "tower")


@pytest.mark.parametrize("vision_train", [False, True], ids=["frozen", "vision-train"])
def test_a_pretrained_tower_is_frozen_unless_vision_train(shapes_dir, tmp_path, vision_train):
    tower = pretrained_tower(tmp_path)
    run = setup_run(shapes_dir, "--vision", tower, *(["--vision-train"] if vision_train else []))
    tower_params = list(run.mm.encoder.tower.parameters())
    in_optimizer = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
    assert all((id(p) in in_optimizer) == vision_train for p in tower_params)
    before = [p.detach().clone() for p in tower_params]
    merger_before = run.mm.encoder.merger.fc2.weight.detach().clone()
    train.train_step(run.mm.loss_fn(run.model), run.model, run.optimizer, run.loader, 1, torch.autocast("cpu", enabled=False))
    changed = [not torch.equal(a, p) for a, p in zip(before, tower_params)]
    assert all(changed) if vision_train else not any(changed)
    assert not torch.equal(merger_before, run.mm.encoder.merger.fc2.weight)
    assert (run.mm.state_dict()["tower"] != {}) == vision_train  # a frozen tower is reloaded from --vision


@pytest.mark.parametrize("vision_train", [False, True], ids=["frozen", "vision-train"])
def test_flops_per_token_counts_the_tower_forward_once_frozen_and_thrice_trained(shapes_dir, tmp_path, vision_train):
    """MFU and --target-flops of a vision run add the encoder to the LM's count: per caption row, the
    tower's forward (x3 when it trains) and the merger's (x3), over the micro-batch's tokens. Against
    hand counts: the merger's two Linears exactly; the tower's Linears, plus at most its attention."""
    run = setup_run(shapes_dir, "--vision", pretrained_tower(tmp_path), *(["--vision-train"] if vision_train else []))
    enc, cfg = run.mm.encoder, run.mm
    C, inner, L, p = (multimodal.TINY_TOWER[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                          "patch_size"))
    n, tokens, W = (enc.image_size // p) ** 2, enc.tokens_per_image, run.model.config.n_embd
    merger = 2 * tokens * (4 * C * 4 * C + 4 * C * W)
    linears = 2 * n * (p * p * 3 * C) + L * 2 * n * (4 * C * C + 2 * C * inner)
    tower, got_merger = enc.flops_per_image()
    assert got_merger == merger
    assert linears <= tower <= linears + L * 4 * n * n * C  # attention: QK^T and AV, counted in part on CPU
    per_image = tower * (3 if vision_train else 1) + 3 * merger
    assert run.flops_per_token - run.model.flops_per_token() == pytest.approx(
        per_image * cfg.captions.B / (cfg.B * cfg.seq_len), rel=1e-12)


def test_caption_loader_ranks_split_one_global_batch_and_state_resumes(shapes_dir):
    from llmlabs.data.shards import DataDir

    data = DataDir.open(shapes_dir)
    make = lambda B, rank, world: multimodal.CaptionLoader(data, "train", B, 96, (2, 2), seed=5, rank=rank, world=world)
    one, r0, r1 = make(6, 0, 1), make(3, 0, 2), make(3, 1, 2)
    for step in range(40):  # 173 images, 6 a step: 28 steps an epoch, the rest dropped; epoch 2 reshuffles
        x, y = next(one)
        x0, y0 = next(r0)
        x1, y1 = next(r1)
        assert torch.equal(torch.cat([x0["idx"], x1["idx"]]), x["idx"]) and torch.equal(torch.cat([y0, y1]), y)
        assert torch.equal(torch.cat([x0["pixels"], x1["pixels"]]), x["pixels"])
    assert one.epoch == 1
    one.prefetch()  # the state names the batch not yet taken, prefetched or not
    state = one.state_dict()
    again = make(6, 0, 1)
    again.load_state_dict(state)
    for _ in range(20):
        assert torch.equal(next(again)[0]["idx"], next(one)[0]["idx"])
    with pytest.raises(LabError, match="with seed 5, this data has 173 \\(seed 6\\)"):
        multimodal.CaptionLoader(data, "train", 6, 96, (2, 2), seed=6).load_state_dict(state)


def test_caption_bpb_equals_a_hand_count_and_shuffled_images_change_it(shapes_dir):
    from llmlabs.vision import caption_batch, fused_forward

    run = setup_run(shapes_dir)
    torch.manual_seed(8)
    for p in run.model.parameters():  # random weights everywhere: the zero-initialised projections too
        p.data.normal_(0, 0.3)
    data, enc, tok = run.data, run.mm.encoder, run.data.tokenizer
    res = run.mm.evaluate(run.model, "val", batch_size=4, max_tokens=200)
    (tokens, offsets), = data.shards("val")
    n = int(np.searchsorted(np.cumsum(np.diff(offsets) - 1), 200)) + 1  # whole documents up to 200 tokens
    batch = caption_batch(data, "val", list(range(n)), enc.merged_grid)
    with torch.no_grad():
        nats = fused_forward(run.model, enc, batch, loss_reduction="none")
    y = batch["targets"]
    is_caption = (y >= 0) & (y < tok.bos_id)  # the specials (BOS, image markers) follow the BPE ids
    caption = [tokens[offsets[d] + 1:offsets[d + 1]].tolist() for d in range(n)]
    nbytes = sum(len(tok.decode(c).encode()) for c in caption)
    want = nats[is_caption].double().sum().item() / (np.log(2) * nbytes)
    assert res["tokens"] == sum(map(len, caption)) >= 200 and res["bytes"] == nbytes
    assert res["caption_bpb"] == res["bpb"] == pytest.approx(want, rel=1e-5)
    shuffled = run.mm.evaluate(run.model, "val", batch_size=4, max_tokens=200, shuffle_seed=1)
    assert shuffled["tokens"] == res["tokens"] and abs(shuffled["bpb"] - res["bpb"]) > 1e-4


def test_derangement_moves_every_image():
    for n, seed in [(2, 0), (7, 1), (500, 2)]:
        d = multimodal.derangement(n, seed)
        assert sorted(d.tolist()) == list(range(n)) and (d != np.arange(n)).all()
    assert not np.array_equal(multimodal.derangement(50, 1), multimodal.derangement(50, 2))


def test_data_and_flags_that_do_not_go_together_are_one_line(shapes_dir, tmp_path, capsys):
    from conftest import prepared_stdlib

    text = prepared_stdlib(tmp_path, 20, 300, 0.2, 0.2)  # 5 left a split empty on 3.12
    base = [a for a in TINY if a not in ("--vision", "tiny")]
    cases = [([*TINY, "--data", str(text)], "holds text only: prepare them with `llmlabs prepare shapes`"),
             ([*base, "--data", str(shapes_dir)], "holds captioned images: train on it with --vision tiny"),
             ([*base, "--vision-train", "--data", str(text)], "--vision-train trains the --vision tower: give --vision"),
             ([*TINY, "--data", str(shapes_dir), "--seq-len", "16"], r"takes \d+ positions, over --seq-len 16: pass "),
             ([*TINY, "--data", str(shapes_dir), "--vision", str(tmp_path / "none")], "no loadable config")]
    for i, (argv, said) in enumerate(cases):
        capsys.readouterr()
        assert cli.main(["train", *argv, "--run-dir", str(tmp_path / f"r{i}"), "--tokens", "1000"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and re.search(said, err[0]), err
