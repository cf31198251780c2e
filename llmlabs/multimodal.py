"""`llmlabs train --vision TOWER`: the training path of multimodal early fusion (vision.py holds the
tower, the merger and the token stream). train.py calls `setup`, which gives None for a text run and,
for a caption data directory (`llmlabs prepare shapes|digits`), a `Fusion`: the vision encoder, its
optimizer groups, the caption loader (with text rows where the data has text/), the fused loss, its
checkpoint state and per-modality bpb.

- Rows: one captioned image per row (vision.caption_batch): BOS, <|image_start|>, the merged patch
  tokens, <|image_end|>, the caption, padded to --seq-len (one shape every step). A step's tokens are
  counted as rows x seq_len, the positions computed, so --tokens and --total-batch-size keep their
  meaning (rows per step = total batch / seq len); padding and patches are never targets.
- Tower: `tiny` is a small random SigLIP2 tower (TINY_TOWER) trained with the LM, since no pretrained
  weights are offline; a hub id or a save_pretrained folder is loaded frozen unless --vision-train.
- Optimizer: the encoder's groups join the LM's optimizer (GPT.setup_optimizer's extra_groups), so
  the LR schedule, Muon's momentum ramp and weight decay reach them. Muon takes the 2-D matrices
  of the merger (fc1, fc2) and of a trained tower's transformer layers, at the LM's matrix LR:
  they are hidden layers, what Muon orthogonalises (Keller Jordan's Muon post). AdamW takes the
  rest: LayerNorm gains, biases, the patch embedding (a SigLIP tower's input layer; in SigLIP a
  4-D conv) and the position embedding, at VISION_ADAMW_LR.
- Text mixing: a caption directory prepared with `--text SOURCE` nests a text data directory at
  text/ (same tokenizer). Then each micro-batch holds round(--text-frac x rows) packed text rows
  (BestFitLoader, as a text run's) below its caption rows (MixedLoader, vision.with_text_rows): a
  fixed count, so every step has one shape. The fraction counts rows, not targets: a text row's
  every position is a target, a caption row's only its caption, so text weighs more in the loss.
- Per-modality bpb: caption_bpb, caption text after its image (evaluate_captions), and, with text/,
  text_bpb, evaluate.evaluate_bpb on the text directory (the LM alone: no image in those rows).
  val_bpb stays the caption bpb: comparable with a captions-only run on the same data, where a
  bytes-weighted mix of the two would weigh them by how many tokens --eval-tokens gives each.
- After training: `load_encoder` rebuilds a checkpoint's encoder, for `llmlabs eval` (caption bpb,
  `evaluate_captions`) and `llmlabs sample --image` (`caption`: KV-cache generation after the image)."""
import numpy as np
import torch

from llmlabs import flags
from llmlabs.common import LabError, print0
from llmlabs.data.loader import BestFitLoader
from llmlabs.data.shards import MANIFEST, SPLITS, TEXT_DIR, DataDir
from llmlabs.vision import (VisionEncoder, VisionTower, caption_batch, fused_forward, image_tokens, mrope_positions,
                            with_text_rows)

# `--vision tiny`: 2 layers of width 64 over 4-px patches. 32-px images (prepare's default) give an
# 8 x 8 patch grid, 16 tokens after the 2x2 merge.
TINY_TOWER = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, patch_size=4)
# AdamW for the encoder's vectors and embeddings (betas and eps as the LM's AdamW groups, no decay):
# the common ViT-from-scratch AdamW rate at small batch; not tuned here.
VISION_ADAMW_LR = 3e-3


def add_args(g):
    """train's multimodal flags, in its data group."""
    g.add_argument("--vision", metavar="TOWER", help="train on captioned images (--data from `llmlabs prepare shapes`) "
                   "through this SigLIP/SigLIP2 tower: a hub id, a save_pretrained folder, or tiny (random, trained)")
    g.add_argument("--vision-train", action="store_true", help="train the pretrained --vision tower too (default: frozen)")
    g.add_argument("--text-frac", type=flags.fraction, help="--vision on captions prepared with --text: the share of "
                   "each micro-batch's rows that are text-only documents (default 0.5)")


def setup(cfg, data, model, B, device, rank=0, world=1) -> "Fusion | None":
    """None for a text run. --vision needs caption data, and caption data needs --vision."""
    captions = "images" in data.manifest["splits"]["train"]
    if not cfg.get("vision"):
        if cfg.get("vision_train"):
            raise LabError("--vision-train trains the --vision tower: give --vision TOWER too")
        if cfg.get("text_frac") is not None:
            raise LabError("--text-frac mixes text rows into a --vision run's caption rows: drop it for a text run")
        if captions:
            raise LabError(f"{data.path} holds captioned images: train on it with --vision tiny (or --vision a SigLIP "
                           f"checkpoint)")
        return None
    if not captions:
        raise LabError(f"--vision trains on captioned images, and {data.path} holds text only: prepare them with "
                       f"`llmlabs prepare shapes` (or digits) and pass that directory as --data")
    return Fusion(cfg, data, model.config.n_embd, B, device, rank, world)


def build_tower(name: str, train: bool, image_size: int) -> VisionTower:
    if name == "tiny":  # position embeddings sized to the grid: SigLIP2 interpolates nothing
        return VisionTower.from_config(num_patches=(image_size // TINY_TOWER["patch_size"]) ** 2, **TINY_TOWER)
    return VisionTower.from_pretrained(name, trainable=train)


def encoder_param_groups(encoder, matrix_lr: float, weight_decay: float) -> list[dict]:
    """The encoder's optimizer groups: Muon for the merger's and a trained tower's hidden matrices,
    one group per shape; AdamW for the rest (the module docstring says why)."""
    named = [(n, p) for n, p in encoder.named_parameters() if p.requires_grad]
    matrices = [p for n, p in named if p.ndim == 2 and "embeddings" not in n]
    rest = [p for n, p in named if not (p.ndim == 2 and "embeddings" not in n)]
    groups = [dict(kind="adamw", params=rest, lr=VISION_ADAMW_LR, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0)]
    for shape in sorted({tuple(p.shape) for p in matrices}):
        groups.append(dict(kind="muon", params=[p for p in matrices if tuple(p.shape) == shape], lr=matrix_lr,
                           momentum=0.95, beta2=0.9, weight_decay=weight_decay, ns_steps=5))
    return groups


def derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation of range(n) (n >= 2) that moves every element: one random cycle through
    all n, so document p[k] gets the image of p[k - 1] and no caption keeps its own image."""
    p = np.random.default_rng(seed).permutation(n)
    out = np.empty(n, np.int64)
    out[p] = np.roll(p, 1)
    return out


class CaptionLoader:
    """(batch, targets) pairs as train_step takes them: the batch holds caption_batch's idx, positions,
    patch_mask and pixels. Each epoch visits the split's documents in a permutation seeded by (seed,
    epoch), B x world at a time (the last partial batch is dropped), rank r keeping rows [rB, (r+1)B):
    the same global batch on any rank count, as BestFitLoader. State: epoch and cursor."""

    def __init__(self, data, split, B, T, grid, *, seed, rank=0, world=1, device="cpu"):
        self.data, self.split, self.B, self.T, self.grid = data, split, B, T, grid
        self.seed, self.rank, self.world, self.device = seed, rank, world, device
        self.n = data.num_documents(split)
        if self.n < B * world:
            raise LabError(f"split {split!r} of {data.path} has {self.n} images, fewer than one batch of {B * world} "
                           f"rows: lower --total-batch-size or prepare more")
        self.epoch = self.cursor = 0
        self._order = self._ahead = None

    def _next_docs(self):
        if self.cursor + self.B * self.world > self.n:
            self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        start = self.cursor + self.rank * self.B
        self.cursor += self.B * self.world
        return self._order[start:start + self.B]

    def prefetch(self):
        """Build the next batch now (train_step calls this once the step is queued: on a GPU the row
        building and the pixel gather overlap it); state_dict still names the state before it."""
        if self._ahead is None:
            before = (self.epoch, self.cursor)
            self._ahead = before, caption_batch(self.data, self.split, self._next_docs(), self.grid, self.device, self.T)

    def __iter__(self):
        return self

    def __next__(self):
        self.prefetch()
        (_, batch), self._ahead = self._ahead, None
        return batch, batch.pop("targets")

    def state_dict(self) -> dict:
        epoch, cursor = self._ahead[0] if self._ahead else (self.epoch, self.cursor)
        return {"epoch": epoch, "cursor": cursor, "documents": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict):
        if (state["documents"], state["seed"]) != (self.n, self.seed):
            raise LabError(f"the checkpoint's caption loader read {state['documents']} documents with seed "
                           f"{state['seed']}, this data has {self.n} (seed {self.seed}): resume with the run's data")
        self.epoch, self.cursor, self._order, self._ahead = state["epoch"], state["cursor"], None, None


def text_data(data) -> DataDir | None:
    """A caption directory's nested text directory (`prepare --text`), or None."""
    return DataDir.open(data.path / TEXT_DIR) if (data.path / TEXT_DIR / MANIFEST).is_file() else None


class MixedLoader:
    """A caption loader's rows with a text loader's rows below them (vision.with_text_rows), as
    train_step takes them. Each loader keeps its own order, rank slicing and prefetch; the state is
    both states."""

    def __init__(self, captions: CaptionLoader, text: BestFitLoader):
        self.captions, self.text = captions, text

    def prefetch(self):
        self.captions.prefetch()
        self.text.prefetch()

    def __iter__(self):
        return self

    def __next__(self):
        batch, targets = next(self.captions)
        x, y = next(self.text)
        mixed = with_text_rows(dict(batch, targets=targets), x, y)
        return mixed, mixed.pop("targets")

    def state_dict(self) -> dict:
        return {"captions": self.captions.state_dict(), "text": self.text.state_dict()}

    def load_state_dict(self, state: dict):
        self.captions.load_state_dict(state["captions"])
        self.text.load_state_dict(state["text"])


class Fusion:
    def __init__(self, cfg, data, width, B, device, rank=0, world=1):
        image_size = data.images("train").shape[1]
        tower = build_tower(cfg["vision"], cfg.get("vision_train", False), image_size)
        self.encoder = VisionEncoder(tower, width, image_size).to(device)
        self.data, self.device, self.grid = data, device, self.encoder.merged_grid
        longest = max(int(np.diff(o).max()) for s in SPLITS for _, o in data.shards(s) if len(o) > 1)
        need = longest + 1 + self.encoder.tokens_per_image  # BOS + caption, 2 markers, patches; last: target only
        if need > cfg["seq_len"]:
            raise LabError(f"the longest caption of {data.path} with its image takes {need} positions, over "
                           f"--seq-len {cfg['seq_len']}: pass --seq-len {need} or more")
        self.text, self.B, self.seq_len = text_data(data), B, cfg["seq_len"]
        n_text = 0
        if self.text is None and cfg.get("text_frac") is not None:
            raise LabError(f"--text-frac mixes in text-only documents, and {data.path} holds captions only: prepare it "
                           f"with `llmlabs prepare SOURCE --text TEXT_SOURCE`, or drop --text-frac")
        if self.text is not None:
            frac = cfg.setdefault("text_frac", 0.5)  # into config.json: --resume mixes as the run did
            n_text = round(frac * B)
            if not 0 < n_text < B:
                raise LabError(f"--text-frac {frac:g} of {B} rows per micro-batch is {n_text} text rows: each "
                               f"micro-batch needs text rows and caption rows; pick a fraction between them (or "
                               f"change --device-batch-size)")
        self.captions = CaptionLoader(data, "train", B - n_text, cfg["seq_len"], self.grid, seed=cfg["seed"],
                                      rank=rank, world=world, device=device)
        self.loader = self.captions if self.text is None else MixedLoader(self.captions, BestFitLoader(
            self.text, "train", n_text, cfg["seq_len"], seed=cfg["seed"], rank=rank, world_size=world, device=device))
        count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
        print0(f"vision: {cfg['vision']} tower, {count(tower):.2f}M params ({'trained' if tower.trainable else 'frozen'}), "
               f"merger {count(self.encoder.merger):.2f}M; {self.encoder.tokens_per_image} tokens per "
               f"{image_size}-px image" + (f"; {n_text} of {B} rows a micro-batch are text" if n_text else ""))

    def flops_per_token(self) -> float:
        """The encoder's training FLOPs per token of a step, for MFU and --target-flops: each caption
        row's image through the tower (forward only when frozen, x3 with a backward when it trains)
        and the merger (x3: it always trains), spread over the micro-batch's B x seq_len tokens."""
        tower, merger = self.encoder.flops_per_image()
        per_image = tower * (3 if self.encoder.tower.trainable else 1) + 3 * merger
        return per_image * self.captions.B / (self.B * self.seq_len)

    def param_groups(self, cfg) -> list[dict]:
        return encoder_param_groups(self.encoder, cfg["matrix_lr"], cfg["weight_decay"])

    def loss_fn(self, model):
        """fwd(batch, targets) for train_step: the LM's loss with the encoder's tokens at the patches."""
        return lambda batch, targets: fused_forward(model, self.encoder, dict(batch, targets=targets))

    def state_dict(self) -> dict:
        """What a checkpoint needs: the merger, and the tower only if it trains (a frozen one is
        reloaded from --vision)."""
        tower = self.encoder.tower
        return {"merger": self.encoder.merger.state_dict(), "tower": tower.state_dict() if tower.trainable else {},
                "image_size": self.encoder.image_size}

    def load_state_dict(self, state: dict):
        self.encoder.merger.load_state_dict(state["merger"])
        if self.encoder.tower.trainable:
            self.encoder.tower.load_state_dict(state["tower"])

    def passes(self, tokens_done: int, seq_len: int) -> float:
        """Epochs over the training images: a step's tokens are rows x seq_len, self.captions.B of
        every self.B rows captions."""
        return tokens_done / seq_len * self.captions.B / self.B / self.captions.n

    def evaluate(self, model, split, *, batch_size, max_tokens, autocast=None, shuffle_seed=None) -> dict:
        return evaluate(model, self.encoder, self.data, self.text, split, self.device, batch_size=batch_size,
                        seq_len=self.seq_len, max_tokens=max_tokens, autocast=autocast, shuffle_seed=shuffle_seed)


def evaluate(model, encoder, data, text, split, device, *, batch_size, seq_len, max_tokens, autocast=None,
             shuffle_seed=None) -> dict:
    """evaluate_captions' result (bpb = caption_bpb; the module docstring says why) plus, with a text
    directory `text` (text_data), text_bpb: evaluate_bpb on its split, the same model, no images."""
    from llmlabs.evaluate import evaluate_bpb

    res = evaluate_captions(model, encoder, data, split, device, batch_size=batch_size, max_tokens=max_tokens,
                            autocast=autocast, shuffle_seed=shuffle_seed)
    if text is not None:
        res["text_bpb"] = evaluate_bpb(model, text, split, batch_size=batch_size, seq_len=seq_len,
                                       max_tokens=max_tokens, device=device, autocast=autocast)["bpb"]
    return res


@torch.no_grad()
def evaluate_captions(model, encoder, data, split, device, *, batch_size, max_tokens, autocast=None,
                      shuffle_seed=None) -> dict:
    """bpb of the captions of `split`'s first documents (in order, whole documents, until max_tokens
    caption tokens), each after its own image, or, with shuffle_seed, after another document's image
    (a seeded derangement: no caption keeps its image): the ablation that shows the model reads the
    image (bench/vision_ablation.py). Under torchrun each rank scores every world-th document and the
    sums are reduced. Returns evaluate.bpb_result's keys plus caption_bpb (the same number: the bpb
    of caption text after its image; text_bpb is `evaluate`'s)."""
    from llmlabs.evaluate import _rank_world, bpb_result, token_bytes_and_unigram, token_nats

    token_bytes, unigram_logp = token_bytes_and_unigram(data, device)
    lengths = np.diff(data.shards(split)[0][1]) - 1  # caption tokens a document is scored on
    n = min(len(lengths), int(np.searchsorted(np.cumsum(lengths), max_tokens)) + 1)
    source = np.arange(n) if shuffle_seed is None else derangement(n, shuffle_seed)
    images = data.images(split)
    rank, world = _rank_world()
    mine = np.arange(rank, n, world)
    was_training = model.training, encoder.training
    model.eval()
    encoder.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for k in range(0, len(mine), batch_size):
        docs = mine[k:k + batch_size]
        batch = caption_batch(data, split, docs, encoder.merged_grid, device)
        batch["pixels"] = torch.from_numpy(np.stack([images[source[d]] for d in docs])).to(device)
        y = batch.pop("targets")
        with autocast or torch.autocast(device.type, enabled=False):
            logits = fused_forward(model, encoder, batch)
        counted = (y >= 0) & (token_bytes[y.clamp_min(0)] > 0)  # caption tokens: not patches, markers, padding
        y = y.clamp_min(0)
        sums += torch.stack([(token_nats(logits, y).double() * counted).sum(),
                             (token_bytes[y] * counted).sum(dtype=torch.float64),
                             (-unigram_logp[y] * counted).sum(dtype=torch.float64), counted.sum(dtype=torch.float64)])
    if world > 1:
        torch.distributed.all_reduce(sums)
    model.train(was_training[0])
    encoder.train(was_training[1])
    res = bpb_result(sums, split, data)
    return {**res, "caption_bpb": res["bpb"]}


def load_encoder(model, cfg: dict, state: dict, device) -> VisionEncoder:
    """A --vision run's encoder from its checkpoint state (Fusion.state_dict), in eval mode: `tiny`
    and trained towers from the checkpoint, a frozen pretrained one from its hub id or folder again.
    Checkpoints before image_size was saved take it from the run's data directory."""
    size = state.get("image_size") or DataDir.open(cfg["data"]).images("train").shape[1]
    tower = build_tower(cfg["vision"], cfg.get("vision_train", False), size)
    encoder = VisionEncoder(tower, model.config.n_embd, size).to(device)
    encoder.merger.load_state_dict(state["merger"])
    if tower.trainable:
        tower.load_state_dict(state["tower"])
    return encoder.eval()


@torch.no_grad()
def caption(model, encoder, tokenizer, pixels, max_new_tokens, *, prompt="", temperature=0.8, top_k=None,
            top_p=None, seed=0) -> list[list[int]]:
    """Continue BOS, the image and `prompt` (text the caption starts with) for each image of pixels
    uint8 [B, S, S, 3]: each row's new token ids, stopping after the next document's BOS. The prefill
    is the fused forward into a KV cache; each new token then takes the text position after the last
    one (MRoPE's (p, p, p), as in training: an image advances the text position by max(h, w), not by
    its token count). Sampling as engine.stream's (_pick, one generator)."""
    from llmlabs.attention import KVCache
    from llmlabs.engine import _pick

    patch_id = tokenizer.special_ids["image_patch"]
    row = [tokenizer.bos_id, *image_tokens(tokenizer.special_ids, encoder.merged_grid), *tokenizer.encode(prompt)]
    B, device = pixels.shape[0], pixels.device
    steps = min(max_new_tokens, model.config.sequence_len - len(row))
    if steps < 1:
        raise LabError(f"the image and the prompt take {len(row)} positions, the model's whole context "
                       f"({model.config.sequence_len}): shorten the prompt")
    idx = torch.tensor([row] * B, device=device)
    positions = mrope_positions(idx, patch_id, encoder.merged_grid)
    cache = KVCache(B, len(row) + steps, model.config, device, next(model.parameters()).dtype)
    logits = model(idx, kv_cache=cache, positions=positions, patch_mask=idx == patch_id,
                   patch_embeds=encoder(pixels).flatten(0, 1))[:, -1]
    pos = positions[:, 0, -1] + 1  # [B]: the next text position
    gen = torch.Generator(device=device).manual_seed(seed)
    out, stopped = [[] for _ in range(B)], [False] * B
    for step in range(steps):
        nxt = _pick(logits.float(), temperature, top_k, top_p, gen)
        for i, t in enumerate(nxt.tolist()):
            if not stopped[i]:
                out[i].append(t)
                stopped[i] = t == tokenizer.bos_id
        if all(stopped) or step + 1 == steps:
            break
        logits = model(nxt.view(B, 1), kv_cache=cache, positions=pos.view(B, 1, 1).expand(B, 3, 1))[:, -1]
        pos = pos + 1
    return out
