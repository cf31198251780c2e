"""Multimodal early fusion (vision.py, data/images.py, MRoPE in model.py): MRoPE is RoPE on text,
the 2x2 merger against a naive loop, patch embeddings and loss masks, the tower through
save_pretrained/from_pretrained, and bad images as one line naming the file."""

import numpy as np
import pytest
from conftest import png_with_size, prepared_shapes
import torch
import torch.nn.functional as F

from llmlabs.attention import KVCache
from llmlabs.common import LabError
from llmlabs.data.images import load_image
from llmlabs.model import build_model, mrope_sections
from llmlabs.vision import PatchMerger, VisionEncoder, VisionTower, mask_patch_targets, mrope_positions
from test_model import randomized, tiny_config, tokens

transformers = pytest.importorskip("transformers")
PATCH = 99  # a patch id for the position tests: above the tiny vocab (61), so no random token is one


def with_images(config, B, T, seed, grid, n_images):
    """Random token rows with `n_images` whole images (start, h*w patches, end) at random places."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, config.vocab_size - 3, (B, T), generator=g)
    start, patch, end = config.vocab_size - 3, config.vocab_size - 2, config.vocab_size - 1
    n = grid[0] * grid[1] + 2
    for b in range(B):
        slots = sorted(torch.randperm(T // n - 1, generator=g)[:n_images].tolist())
        for s in slots:
            at = 1 + s * n + int(torch.randint(0, 2, (1,), generator=g))
            idx[b, at:at + n] = torch.tensor([start] + [patch] * (n - 2) + [end])
    return idx, patch


def test_mrope_on_text_only_is_rope_bit_for_bit():
    config = tiny_config()
    model = randomized(build_model(config, "cpu"))  # float32: equality is exact, not close
    idx = tokens(config, 3, 32, seed=4)
    text_positions = torch.arange(32).expand(3, 3, 32)  # (t, t, t)
    with torch.no_grad():
        assert torch.equal(model(idx, positions=text_positions), model(idx))
        assert torch.equal(model(idx, idx, positions=text_positions), model(idx, idx))
    # and the position builder gives exactly (t, t, t) when there is no image
    assert torch.equal(mrope_positions(idx, PATCH, (2, 3)), text_positions)


def test_mrope_positions_follow_qwen2_vl():
    # text, text, [image 2 x 3], text: the image starts at t = 2, the text after it at 2 + max(2, 3) = 5
    idx = torch.tensor([[7, 7, PATCH, PATCH, PATCH, PATCH, PATCH, PATCH, 7, 7]])
    want = torch.tensor([[0, 1, 2, 2, 2, 2, 2, 2, 5, 6],
                         [0, 1, 2, 2, 2, 3, 3, 3, 5, 6],
                         [0, 1, 2, 3, 4, 2, 3, 4, 5, 6]])
    assert torch.equal(mrope_positions(idx, PATCH, (2, 3))[0], want)
    cropped = torch.tensor([[PATCH, PATCH, PATCH, 7, 7]])  # half an image at the row start
    with pytest.raises(LabError, match="index 0 is not whole images of 2 x 3"):
        mrope_positions(cropped, PATCH, (2, 3))


def test_mrope_image_scores_depend_only_on_relative_3d_position():
    """Within an image, q.k depends on (dt, dh, dw) only: moving the whole image later in the text
    leaves every patch-to-patch attention score unchanged; h and w really do rotate (swapping a
    patch's row and column changes its score)."""
    from llmlabs.kernels.ops import apply_rope
    from llmlabs.model import mrope_tables, rope_tables

    D, T = 16, 64
    cos, sin = rope_tables(T, D, 100_000.0)
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 1, 1, D, generator=g), torch.randn(1, 1, 1, D, generator=g)
    grid = (4, 4)

    def scores(offset, transpose=False):
        idx = torch.tensor([[7] * offset + [PATCH] * 16])
        pos = mrope_positions(idx, PATCH, grid)[:, :, offset:]
        if transpose:
            pos = pos[:, [0, 2, 1]]
        c, s = mrope_tables(cos, sin, pos)
        qr = apply_rope(q.expand(1, 16, 1, D), c, s)[0, :, 0]
        kr = apply_rope(k.expand(1, 16, 1, D), c, s)[0, :, 0]
        return qr @ kr.T

    torch.testing.assert_close(scores(3), scores(17), atol=1e-5, rtol=0)
    assert (scores(3) - scores(3, transpose=True)).abs().max() > 1e-2
    assert sum(mrope_sections(128)) == 64 and mrope_sections(128) == (16, 24, 24)  # Qwen2-VL's split


def test_mrope_with_kv_cache_equals_full_forward():
    config = tiny_config()
    model = randomized(build_model(config, "cpu")).double()
    idx, patch = with_images(config, 2, 32, seed=6, grid=(2, 2), n_images=2)
    pos = mrope_positions(idx, patch, (2, 2))
    g = torch.Generator().manual_seed(7)
    mask = idx == patch
    feats = torch.randn(int(mask.sum()), config.n_embd, generator=g, dtype=torch.float64)
    with torch.no_grad():
        full = model(idx, positions=pos, patch_mask=mask, patch_embeds=feats)
        # two calls, split at index 20 (which may cut an image): each row's features, split at the cut
        cache = KVCache(2, 32, config, "cpu", torch.float64)
        per_row = feats.split(mask.sum(1).tolist())
        before = mask[:, :20].sum(1).tolist()
        outs = []
        for part, cols in ((0, slice(0, 20)), (1, slice(20, 32))):
            chunk = [r[:n] if part == 0 else r[n:] for r, n in zip(per_row, before)]
            outs.append(model(idx[:, cols], kv_cache=cache, positions=pos[:, :, cols], patch_mask=mask[:, cols],
                              patch_embeds=torch.cat(chunk)))
    assert 0 < sum(before) < int(mask.sum())
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-10, rtol=0)


def test_patch_embeds_replace_the_token_embeddings_in_order():
    config = tiny_config()
    model = randomized(build_model(config, "cpu")).double()
    idx, patch = with_images(config, 2, 32, seed=8, grid=(2, 2), n_images=2)
    mask = idx == patch
    with torch.no_grad():
        # the patch id's own embedding, scattered in: the same as no scatter at all
        same = model.wte.weight[patch].expand(int(mask.sum()), -1)
        torch.testing.assert_close(model(idx, patch_mask=mask, patch_embeds=same), model(idx), atol=1e-12, rtol=0)
        # reference: an embedding table with a fresh row per patch slot, slots numbered row-major
        feats = torch.randn(int(mask.sum()), config.n_embd, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(9))
        out = model(idx, patch_mask=mask, patch_embeds=feats)
        ref = model.wte.weight[idx].clone()
        ref[mask] = feats
        calls = []
        hook = model.wte.register_forward_hook(lambda m, i, o: calls.append(1) or ref)
        try:
            torch.testing.assert_close(out, model(idx), atol=1e-12, rtol=0)
        finally:
            hook.remove()
        assert calls and (out - model(idx)).abs().max() > 1e-3  # the features did change the output
    with pytest.raises(LabError, match="go together"):
        model(idx, patch_mask=mask)


def test_loss_mask_excludes_image_positions():
    config = tiny_config()
    model = randomized(build_model(config, "cpu")).double()
    idx, patch = with_images(config, 2, 33, seed=10, grid=(2, 2), n_images=2)
    inputs, targets = idx[:, :-1], mask_patch_targets(idx[:, 1:], patch)
    assert ((targets == -1) == (idx[:, 1:] == patch)).all() and (targets == -1).sum() == 16
    with torch.no_grad():
        mask = inputs == patch
        feats = torch.randn(int(mask.sum()), config.n_embd, dtype=torch.float64)
        kw = dict(positions=mrope_positions(inputs, patch, (2, 2)), patch_mask=mask, patch_embeds=feats)
        loss = model(inputs, targets, **kw)
        logits = model(inputs, **kw)
    keep = targets != -1
    want = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, want, atol=1e-12, rtol=0)
    # the loss at every patch position is zero and a wrong "target" there changes nothing
    per_token = model(inputs, targets, loss_reduction="none", **kw)
    assert (per_token[~keep] == 0).all() and (per_token[keep] > 0).all()


def test_merger_matches_a_naive_loop():
    torch.manual_seed(11)
    merger = PatchMerger(vision_width=5, model_width=7).double()
    for p in merger.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(3, 4, 6, 5, dtype=torch.float64)
    out = merger(x)
    assert out.shape == (3, 2, 3, 7)
    normed = F.layer_norm(x, (5,), merger.norm.weight, merger.norm.bias, eps=1e-6)
    for n in range(3):
        for i in range(2):
            for j in range(3):
                block = torch.cat([normed[n, 2 * i, 2 * j], normed[n, 2 * i, 2 * j + 1],
                                   normed[n, 2 * i + 1, 2 * j], normed[n, 2 * i + 1, 2 * j + 1]])
                want = merger.fc2(F.gelu(merger.fc1(block)))
                torch.testing.assert_close(out[n, i, j], want, atol=1e-12, rtol=0)
    with pytest.raises(LabError, match="patch grid 3 x 6 is odd"):
        merger(torch.randn(1, 3, 6, 5, dtype=torch.float64))


TINY = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=4)


@pytest.mark.parametrize("siglip2", [True, False], ids=["siglip2", "siglip"])
def test_tower_loads_from_a_save_pretrained_folder(tmp_path, siglip2):
    torch.manual_seed(12)
    if siglip2:
        hf = transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(num_patches=16, **TINY))
    else:
        hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(image_size=16, **TINY))
    hf.eval().save_pretrained(tmp_path / "tower")
    tower = VisionTower.from_pretrained(str(tmp_path / "tower"))
    assert not any(p.requires_grad for p in tower.parameters())
    tower.train()
    assert not tower.training and not tower.model.training  # frozen stays in eval mode
    pixels = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    feats = tower(pixels)
    assert feats.shape == (2, 4, 4, 16) and not feats.requires_grad
    # reference: the checkpoint run as transformers' own processor would feed it
    x = (pixels.float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        if siglip2:
            patches = torch.stack([convert_image_to_patches(im.permute(2, 0, 1), 4) for im in x])
            ref = hf(pixel_values=patches, pixel_attention_mask=torch.ones(2, 16, dtype=torch.long),
                     spatial_shapes=torch.tensor([[4, 4], [4, 4]])).last_hidden_state
        else:
            ref = hf(pixel_values=x.permute(0, 3, 1, 2)).last_hidden_state
    torch.testing.assert_close(feats.flatten(1, 2), ref, atol=1e-5, rtol=1e-5)
    trainable = VisionTower.from_pretrained(str(tmp_path / "tower"), trainable=True)
    assert all(p.requires_grad for p in trainable.parameters()) and trainable(pixels).requires_grad


def test_encoder_refuses_odd_grids_and_tokens_take_the_lm_width():
    tower = VisionTower.from_config(**TINY)
    assert all(p.requires_grad for p in tower.parameters())  # a random tower trains with the LM
    with pytest.raises(LabError, match="12 gives a 3 x 3 patch grid.*multiple of 8, e.g. 8"):
        VisionEncoder(tower, 48, image_size=12)
    with pytest.raises(LabError, match="not a multiple of the tower's patch size 4: use e.g. 16"):
        VisionEncoder(tower, 48, image_size=18)
    enc = VisionEncoder(tower, 48, image_size=16)
    out = enc(torch.randint(0, 256, (3, 16, 16, 3), dtype=torch.uint8))
    assert out.shape == (3, 4, 48) and enc.tokens_per_image == 4
    out.square().sum().backward()
    assert tower.model.embeddings.patch_embedding.weight.grad.abs().sum() > 0


def test_missing_or_wrong_tower_is_one_line(tmp_path):
    with pytest.raises(LabError, match=f"vision tower {tmp_path / 'nope'}: no loadable config"):
        VisionTower.from_pretrained(str(tmp_path / "nope"))
    transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=8).save_pretrained(tmp_path / "bert")
    with pytest.raises(LabError, match="is a 'bert' model: use a SigLIP"):
        VisionTower.from_pretrained(str(tmp_path / "bert"))


def convert_image_to_patches(image, patch_size):
    """transformers' Siglip2 processor's patchify (image_processing_siglip2.py, v5.25), copied: the
    module imports torchvision, which the lab does not need. (C, H, W) -> (patches, p * p * C)."""
    num_channels, image_height, image_width = image.shape
    num_patches_height = image_height // patch_size
    num_patches_width = image_width // patch_size
    patched_image = image.reshape(num_channels, num_patches_height, patch_size, num_patches_width, patch_size)
    patched_image = patched_image.permute(1, 3, 2, 4, 0)
    return patched_image.reshape(num_patches_height * num_patches_width, -1)


# ---- bad images ----

def test_good_image_loads_resized_rgb(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(13)
    arr = rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png", 8)
    want = np.asarray(Image.fromarray(arr[..., :3], "RGB").resize((8, 8), Image.Resampling.BICUBIC))
    assert out.dtype == np.uint8 and out.shape == (8, 8, 3) and np.array_equal(out, want)


@pytest.mark.parametrize("case,said", [
    ("corrupt", "is not an image Pillow can read"),
    ("truncated", "cannot be decoded"),
    ("float_mode", "has mode F"),
    ("huge", "is 9000 x 9000 pixels, over the 64,000,000-pixel limit"),
    ("bomb", "is over the 64,000,000-pixel limit"),  # so large that Pillow refuses it at open
    ("missing", "does not exist"),
])
def test_bad_image_is_one_line_naming_the_file(tmp_path, case, said):
    from PIL import Image
    path = tmp_path / f"{case}.png"
    if case == "corrupt":
        path.write_bytes(b"this is not a png at all" * 10)
    elif case == "truncated":
        Image.fromarray(np.random.default_rng(14).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:400])
    elif case == "float_mode":
        Image.fromarray(np.random.default_rng(15).random((8, 8), dtype=np.float32), "F").save(tmp_path / "f.tiff")
        path = tmp_path / "f.tiff"
    elif case in ("huge", "bomb"):
        png_with_size(path, *(2 * [9000 if case == "huge" else 100_000]))
    with pytest.raises(LabError) as e:
        load_image(path, 16)
    msg = str(e.value)
    assert said in msg and str(path) in msg and "\n" not in msg


# ---- caption batches through the encoder and the LM ----

@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    from llmlabs.data.shards import DataDir

    return DataDir.open(prepared_shapes(tmp_path_factory.mktemp("mm"), val_frac=0.1))


def test_caption_batch_rows_hold_a_whole_image_then_its_caption(shapes_dir):
    from llmlabs.vision import caption_batch

    tok, docs = shapes_dir.tokenizer, [0, 3, 5]
    batch = caption_batch(shapes_dir, "train", docs, grid=(2, 2))
    sp = tok.special_ids
    (tokens, offsets), = shapes_dir.shards("train")
    for b, d in enumerate(docs):
        caption = tokens[offsets[d] + 1:offsets[d + 1]].tolist()
        row = [tok.bos_id, sp["image_start"], *[sp["image_patch"]] * 4, sp["image_end"], *caption]
        n = len(row)
        assert batch["idx"][b, :n].tolist() == row and (batch["idx"][b, n:] == tok.bos_id).all()
        # targets: the next token, except at patches and after the row's end
        want = [t if t != sp["image_patch"] else -1 for t in row[1:]] + [-1] * (batch["idx"].size(1) - n + 1)
        assert batch["targets"][b].tolist() == want
        assert torch.equal(batch["positions"][b], mrope_positions(batch["idx"][b:b + 1], sp["image_patch"], (2, 2))[0])
        assert np.array_equal(batch["pixels"][b].numpy(), shapes_dir.images("train")[d])
    assert batch["patch_mask"].sum() == 3 * 4


def test_fused_forward_puts_each_image_before_its_own_caption(shapes_dir):
    from llmlabs.vision import caption_batch, fused_forward

    torch.manual_seed(16)
    config = tiny_config(vocab_size=shapes_dir.tokenizer.vocab_size, sequence_len=128)
    model = randomized(build_model(config, "cpu"))
    enc = VisionEncoder(VisionTower.from_config(**TINY), config.n_embd, image_size=16)
    batch = caption_batch(shapes_dir, "train", [1, 2, 4, 7], grid=enc.merged_grid)
    loss = fused_forward(model, enc, batch)
    # reference: the same forward with the features computed and placed by hand, image by image
    feats = torch.cat([enc(batch["pixels"][b:b + 1])[0] for b in range(4)])
    ref = model(batch["idx"], batch["targets"], positions=batch["positions"], patch_mask=batch["patch_mask"],
                patch_embeds=feats)
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    # the images matter: the same captions after other images score differently
    shuffled = dict(batch, pixels=batch["pixels"][[1, 2, 3, 0]])
    assert abs(fused_forward(model, enc, shuffled).item() - loss.item()) > 1e-4
    loss.backward()
    assert enc.merger.fc2.weight.grad.abs().sum() > 0
    assert enc.tower.model.embeddings.patch_embedding.weight.grad.abs().sum() > 0  # a random tower trains
