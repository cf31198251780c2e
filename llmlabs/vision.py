"""The vision side of multimodal early fusion: a SigLIP / SigLIP2 tower (through transformers), the
2x2 patch merger that turns its patch features into LM-width tokens, and the bookkeeping that puts
them into the token stream (3D MRoPE positions, loss targets).

Early fusion as in Qwen2-VL (arXiv 2409.12191): an image becomes `<|image_start|>`, h/2 x w/2
merged patch tokens, `<|image_end|>` inside the text; the patch tokens' input embeddings are the
merger's outputs (model.GPT's patch_mask/patch_embeds), they are never prediction targets
(`mask_patch_targets`), and their rotary positions are 3-D (`mrope_positions`).

The tower is SigLIP (arXiv 2303.15343) or SigLIP2 (arXiv 2502.14786): `VisionTower.from_pretrained`
takes a hub id or a local folder (the same code path either way; the tests load a tiny random config
saved with save_pretrained), frozen unless asked; `VisionTower.from_config` builds a small random tower
of the same family to train with the LM when no weights are available offline.

transformers is the optional `vision` extra: imported only here, and only when a tower is built."""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmlabs.common import LabError

# SigLIP and SigLIP2 checkpoints normalise pixels with mean = std = 0.5 per channel: [0, 1] -> [-1, 1]
# (their preprocessor_config.json; the same for every released size).
PIXEL_MEAN = PIXEL_STD = 0.5
MERGE = 2  # patches merged per side: 2x2 -> 1 token (Qwen2-VL's spatial_merge_size)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise LabError("the vision tower needs transformers: pip install 'llmlabs[vision]'") from None
    return transformers


class VisionTower(nn.Module):
    """pixels uint8 [N, S, S, 3] -> patch features [N, S/p, S/p, width] (last layer, post-LayerNorm).

    Frozen (the default for pretrained weights): no parameter takes a gradient, the forward runs
    under no_grad (no activations kept for a backward) and the tower stays in eval mode whatever
    .train() the caller sets on the parent."""

    def __init__(self, model: nn.Module, trainable: bool):
        super().__init__()
        kind = model.config.model_type
        if kind not in ("siglip_vision_model", "siglip2_vision_model"):
            raise LabError(f"vision tower of type {kind!r}: use a SigLIP or SigLIP2 vision checkpoint")
        self.model, self.trainable = model, trainable
        self.siglip2 = kind == "siglip2_vision_model"
        self.patch_size, self.width = model.config.patch_size, model.config.hidden_size
        self.model.requires_grad_(trainable)
        self.train(trainable)

    @classmethod
    def from_pretrained(cls, name_or_path: str, trainable: bool = False) -> "VisionTower":
        """A hub id (downloads: only `prepare`-time or online use) or a folder written by
        save_pretrained. A full SigLIP checkpoint (text + vision) gives its vision half."""
        tf = _transformers()
        try:
            config = tf.AutoConfig.from_pretrained(name_or_path)
        except (OSError, ValueError) as e:
            raise LabError(f"vision tower {name_or_path}: no loadable config ({str(e).splitlines()[0]}); give "
                           f"a hub id like google/siglip2-base-patch16-naflex or a save_pretrained folder") from None
        config = getattr(config, "vision_config", config)  # a full SigLIP model: its vision half
        model_cls = {"siglip_vision_model": tf.SiglipVisionModel,
                     "siglip2_vision_model": tf.Siglip2VisionModel}.get(config.model_type)
        if model_cls is None:
            raise LabError(f"vision tower {name_or_path} is a {config.model_type!r} model: use a SigLIP or "
                           f"SigLIP2 checkpoint")
        model = model_cls.from_pretrained(name_or_path, config=config)
        inner = getattr(model, "vision_model", model)  # SigLIP wraps the transformer, SigLIP2 does not
        if getattr(inner, "use_head", False):
            # the attention-pooling head makes one vector per image, which early fusion does not use
            # (dropped after loading: loading without it would list its weights as unexpected)
            del inner.head
            inner.use_head = False
        return cls(model, trainable)

    @classmethod
    def from_config(cls, siglip2: bool = True, trainable: bool = True, **config) -> "VisionTower":
        """A randomly initialised tower; `config` overrides the transformers defaults (hidden_size,
        num_hidden_layers, patch_size, ...). Trainable by default: random features are only useful
        trained with the LM."""
        tf = _transformers()
        config_cls = tf.Siglip2VisionConfig if siglip2 else tf.SiglipVisionConfig
        model_cls = tf.Siglip2VisionModel if siglip2 else tf.SiglipVisionModel
        return cls(model_cls(config_cls(vision_use_head=False, **config)), trainable)

    def train(self, mode: bool = True):
        return super().train(mode and self.trainable)

    def grid(self, image_size: int) -> tuple[int, int]:
        """The patch grid (rows, columns) of a square image of `image_size` pixels."""
        p = self.patch_size
        if image_size % p:
            raise LabError(f"image size {image_size} is not a multiple of the tower's patch size {p}: use e.g. "
                           f"{max(1, image_size // p) * p}")
        return image_size // self.patch_size, image_size // self.patch_size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        N, S, S2, C = pixels.shape
        if S != S2 or C != 3:
            raise LabError(f"pixels of shape {tuple(pixels.shape)}: expected uint8 [N, size, size, 3]")
        h, w = self.grid(S)
        p = self.patch_size
        dtype = self.model.embeddings.patch_embedding.weight.dtype
        x = (pixels.to(dtype) / 255 - PIXEL_MEAN) / PIXEL_STD
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            if self.siglip2:
                # Siglip2's processor patchifies each image into rows of (p, p, 3) pixels, row-major
                # over the grid (image_processing_siglip2.convert_image_to_patches); no padding here
                patches = x.view(N, h, p, w, p, 3).permute(0, 1, 3, 2, 4, 5).reshape(N, h * w, p * p * 3)
                mask = torch.ones(N, h * w, dtype=torch.long, device=x.device)
                shapes = torch.tensor([[h, w]] * N, device=x.device)
                out = self.model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes)
            else:
                # a size other than the checkpoint's interpolates its position embeddings
                out = self.model(pixel_values=x.permute(0, 3, 1, 2),
                                 interpolate_pos_encoding=S != self.model.config.image_size)
        return out.last_hidden_state.view(N, h, w, self.width)


class PatchMerger(nn.Module):
    """Qwen2-VL's merger (arXiv 2409.12191, Qwen2VL PatchMerger): LayerNorm each patch feature, concatenate
    each 2x2 block of neighbours (order (0,0), (0,1), (1,0), (1,1)) into one 4*width vector, then an MLP
    (Linear, GELU, Linear) to the LM's width. A quarter of the tokens, each seeing its block's detail."""

    def __init__(self, vision_width: int, model_width: int):
        super().__init__()
        hidden = MERGE * MERGE * vision_width
        self.norm = nn.LayerNorm(vision_width, eps=1e-6)
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, model_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, h, w, vision_width] -> [N, h/2, w/2, model_width]."""
        N, h, w, C = x.shape
        if h % MERGE or w % MERGE:
            raise LabError(f"patch grid {h} x {w} is odd: the 2x2 merger needs an even grid; pick an image size "
                           f"that is a multiple of 2 x the tower's patch size")
        x = self.norm(x).view(N, h // MERGE, MERGE, w // MERGE, MERGE, C).transpose(2, 3)
        return self.fc2(F.gelu(self.fc1(x.reshape(N, h // MERGE, w // MERGE, MERGE * MERGE * C))))


class VisionEncoder(nn.Module):
    """Tower + merger: uint8 images [N, S, S, 3] -> LM-width tokens [N, (S/2p)^2, model_width], in
    row-major order over the merged grid (the order mrope_positions gives them)."""

    def __init__(self, tower: VisionTower, model_width: int, image_size: int):
        super().__init__()
        h, w = tower.grid(image_size)
        if h % MERGE or w % MERGE:
            raise LabError(f"image size {image_size} gives a {h} x {w} patch grid (patch {tower.patch_size}), odd: "
                           f"use a multiple of {MERGE * tower.patch_size}, e.g. "
                           f"{max(1, image_size // (MERGE * tower.patch_size)) * MERGE * tower.patch_size}")
        self.tower, self.image_size = tower, image_size
        self.merged_grid = (h // MERGE, w // MERGE)
        self.merger = PatchMerger(tower.width, model_width)

    @property
    def tokens_per_image(self) -> int:
        return self.merged_grid[0] * self.merged_grid[1]

    @torch.no_grad()
    def flops_per_image(self) -> tuple[int, int]:
        """Forward FLOPs of one image through the tower and through the merger, as torch's
        FlopCounterMode counts them: matmuls and attention (its CPU kernel only in part),
        element-wise work not at all, as model.flops_per_token counts the LM."""
        from torch.utils.flop_counter import FlopCounterMode

        S, device = self.image_size, self.merger.fc1.weight.device
        with FlopCounterMode(display=False) as fc:
            feats = self.tower(torch.zeros(1, S, S, 3, dtype=torch.uint8, device=device))
        tower = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            self.merger(feats)
        return tower, fc.get_total_flops()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[1] != self.image_size:
            raise LabError(f"images of {pixels.shape[1]} px, the encoder was built for {self.image_size}: "
                           f"prepare the data at that size")
        return self.merger(self.tower(pixels)).flatten(1, 2)


def image_tokens(special_ids: dict, grid: tuple[int, int]) -> list[int]:
    """The ids an image occupies in the token stream: start, one patch id per merged token, end."""
    return [special_ids["image_start"], *[special_ids["image_patch"]] * (grid[0] * grid[1]), special_ids["image_end"]]


def mask_patch_targets(targets: torch.Tensor, patch_id: int) -> torch.Tensor:
    """Targets with every patch position ignored (-1): an image's tokens are inputs only, never
    predicted (the caption after it is). The start/end markers stay targets: they carry no bytes,
    so bits-per-byte does not see them, but predicting where an image ends is free."""
    return targets.masked_fill(targets == patch_id, -1)


def mrope_positions(idx: torch.Tensor, patch_id: int, grid: tuple[int, int]) -> torch.Tensor:
    """3D MRoPE positions (t, h, w) [B, 3, T] for token ids [B, T] (Qwen2-VL, arXiv 2409.12191, its
    get_rope_index). A text token at running position t gets (t, t, t); an image whose h x w merged
    patches follow at running position s gets (s, s + i, s + j) for its patch (i, j), and the text
    after it resumes at s + max(h, w). Every position stays below the token's index in the row (an
    image takes h*w >= max(h, w) slots), so the model's RoPE tables cover them.

    Each run of patch ids must be whole images (a multiple of h*w tokens): the loader never crops an
    image, and a cropped one would have no grid to place it on."""
    gh, gw = grid
    n = gh * gw
    B, T = idx.shape
    out = torch.empty(B, 3, T, dtype=torch.long)
    ii = torch.arange(gh).repeat_interleave(gw)  # row of each patch, row-major
    jj = torch.arange(gw).repeat(gh)
    for b, row in enumerate(idx.cpu()):
        is_patch = (row == patch_id).tolist()
        t = pos = 0
        while t < T:
            if not is_patch[t]:
                out[b, :, t] = pos
                pos, t = pos + 1, t + 1
                continue
            if t + n > T or not all(is_patch[t:t + n]):
                run = next((k for k in range(t, T) if not is_patch[k]), T) - t
                raise LabError(f"row {b}: a run of {run} image patch tokens at index {t} is not whole images of "
                               f"{gh} x {gw} = {n}: images must not be cropped by packing")
            out[b, 0, t:t + n] = pos
            out[b, 1, t:t + n] = pos + ii
            out[b, 2, t:t + n] = pos + jj
            pos, t = pos + max(gh, gw), t + n
    return out.to(idx.device)


def caption_batch(data, split: str, docs, grid: tuple[int, int], device="cpu", seq_len: int | None = None) -> dict:
    """A batch of captioned images from a caption data directory (data/captions.py), one document per
    row: BOS, <|image_start|>, h*w patch tokens, <|image_end|>, the caption; rows padded with BOS
    inputs and -1 targets to the longest row, or to `seq_len` positions (a fixed shape for training).
    Returns the model's keyword arguments (idx, targets with patches and padding ignored, positions,
    patch_mask) and `pixels` uint8 [B, S, S, 3] for the encoder. No packing: an image is never
    cropped, and its caption always follows it."""
    tok = data.tokenizer
    images = data.images(split)
    (tokens, offsets), = data.shards(split)  # captions are small: one shard per split
    rows = [[tok.bos_id, *image_tokens(tok.special_ids, grid), *tokens[offsets[d] + 1:offsets[d + 1]].tolist()]
            for d in docs]
    T = max(map(len, rows)) if seq_len is None else seq_len
    if max(map(len, rows)) > T + 1:  # a row's last token is a target only: T + 1 tokens fill T positions
        raise LabError(f"a caption with its image takes {max(map(len, rows)) - 1} positions, over --seq-len {T}: "
                       f"raise --seq-len")
    idx = torch.full((len(rows), T + 1), tok.bos_id, dtype=torch.long)
    targets = torch.full((len(rows), T), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        idx[b, :len(row)] = torch.tensor(row)
        targets[b, :len(row) - 1] = idx[b, 1:len(row)]
    idx = idx[:, :T]
    patch_id = tok.special_ids["image_patch"]
    return {"idx": idx.to(device), "targets": mask_patch_targets(targets, patch_id).to(device),
            "positions": mrope_positions(idx, patch_id, grid).to(device), "patch_mask": (idx == patch_id).to(device),
            "pixels": torch.from_numpy(np.stack([images[d] for d in docs])).to(device)}


def with_text_rows(batch: dict, x: torch.Tensor, y: torch.Tensor) -> dict:
    """A caption batch (with its targets) and text-only rows x [n, T] (targets y) below its rows: one
    batch, one forward. A text row's positions are (t, t, t), which MRoPE turns into plain RoPE at
    index t (model.mrope_tables), and it has no patch slots, so the encoder's tokens (its `pixels`,
    one image per caption row) fill the caption rows' slots only, in row-major order as before."""
    n, T = x.shape
    return {**batch, "idx": torch.cat([batch["idx"], x]), "targets": torch.cat([batch["targets"], y]),
            "positions": torch.cat([batch["positions"], torch.arange(T, device=x.device).expand(n, 3, T)]),
            "patch_mask": torch.cat([batch["patch_mask"], torch.zeros_like(x, dtype=torch.bool)])}


def fused_forward(model, encoder: VisionEncoder, batch: dict, **kw):
    """The LM over a caption batch with the encoder's tokens at the patch positions: logits, or the
    loss with batch["targets"] (loss_reduction etc. through kw). Each caption row holds one whole
    image (text rows, with_text_rows, none), so the encoder's [B, n, C] output flattened is the patch
    slots' row-major order."""
    feats = encoder(batch["pixels"]).flatten(0, 1)
    return model(batch["idx"], batch.get("targets"), positions=batch["positions"], patch_mask=batch["patch_mask"],
                 patch_embeds=feats, **kw)
