"""GPTConfig and the one dial: `depth` sets the model (width, heads, windows) and, through
`hyperparams_for`, the batch size, learning rates and weight decay the trainer uses.

The scaling rules are nanochat's (karpathy/nanochat, scripts/base_train.py and nanochat/gpt.py,
early 2026); each rule below says where it comes from."""
import math
from dataclasses import dataclass

from llmlabs.common import LabError


@dataclass
class GPTConfig:
    sequence_len: int = 2048      # training context; RoPE tables and the KV cache stop here
    vocab_size: int = 8192
    n_layer: int = 12
    n_embd: int = 768             # residual stream width
    n_head: int = 6               # query heads
    n_kv_head: int = 6            # key/value heads (< n_head = grouped-query attention)
    head_dim: int = 128
    # Attention span per layer, tiled over the layers: L = full causal, S = sliding window of
    # `short_window` tokens back. The last layer is always L (nanochat).
    window_pattern: str = "SSSL"
    # None = nanochat's current choice: a quarter of the context rounded up to a multiple of 128
    # (the FA3 tile): 2048 -> 512. (nanochat first used a half, then a third: 2048 -> 768.)
    short_window: int | None = None
    softcap: float = 15.0         # logits = softcap * tanh(logits / softcap) (nanochat, Gemma 2)
    rope_base: float = 100_000.0  # nanochat moved from 10k to 100k

    def __post_init__(self):
        for name in ("sequence_len", "vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LabError(f"GPTConfig.{name}={value!r}: must be a positive integer")
        if self.n_head % self.n_kv_head:
            raise LabError(f"GPTConfig: n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}; "
                           "pick n_kv_head among the divisors of n_head")
        if self.head_dim % 2:
            raise LabError(f"GPTConfig.head_dim={self.head_dim}: RoPE rotates pairs of channels, use an even head_dim")
        if not self.window_pattern or any(c not in "SL" for c in self.window_pattern.upper()):
            raise LabError(f"GPTConfig.window_pattern={self.window_pattern!r}: use only the letters S and L, e.g. 'SSSL' or 'L'")
        if self.short_window is not None and self.short_window < 1:
            raise LabError(f"GPTConfig.short_window={self.short_window}: must be >= 1 (or None for a quarter of the context)")
        if self.softcap <= 0:
            raise LabError(f"GPTConfig.softcap={self.softcap}: must be > 0")

    def window_sizes(self) -> list[int | None]:
        """Per-layer attention window: None = full causal, w = a query at t sees keys t-w..t
        (w+1 keys; FA3's window_size=(w, 0) convention, so the number passes through unchanged)."""
        short = self.short_window or -(-self.sequence_len // 4 // 128) * 128
        pattern = self.window_pattern.upper()
        windows = [short if pattern[i % len(pattern)] == "S" else None for i in range(self.n_layer)]
        windows[-1] = None
        # a window that already spans the whole context is full causal attention: say so, so the
        # backends take their (faster) plain causal path
        return [None if w is not None and w >= self.sequence_len - 1 else w for w in windows]


def config_for_depth(depth, vocab_size=8192, sequence_len=2048, aspect_ratio=64, head_dim=128,
                     n_kv_head=None, window_pattern="SSSL", short_window=None) -> GPTConfig:
    """The depth dial (nanochat base_train.py): width = depth * aspect_ratio rounded up to a
    multiple of head_dim, so every head has exactly head_dim channels; heads = width / head_dim."""
    if not isinstance(depth, int) or depth < 1:
        raise LabError(f"depth={depth!r}: must be a positive integer, e.g. 12 (presets: {', '.join(PRESETS)})")
    n_embd = -(-depth * aspect_ratio // head_dim) * head_dim
    n_head = n_embd // head_dim
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_embd=n_embd,
                     n_head=n_head, n_kv_head=n_head if n_kv_head is None else n_kv_head,
                     head_dim=head_dim, window_pattern=window_pattern, short_window=short_window)


# Named depths. d8 is the autoresearch experiment, d12 nanochat's tuning reference (GPT-2 small
# width), d20 the original nanochat speedrun, d24/d26 its later GPT-2-grade runs.
PRESETS = {f"d{d}": d for d in (4, 6, 8, 10, 12, 16, 20, 24, 26)}

# Reference point the rules below extrapolate from (nanochat base_train.py): LRs and weight decay
# were tuned at d12 with a 2**19-token batch.
REFERENCE_DEPTH = 12
REFERENCE_BATCH = 2**19
TOKENS_PER_PARAM = 12  # nanochat's compute-optimal tokens : scaling-params ratio (its dev/LOG.md)


def scaling_params(config: GPTConfig) -> int:
    """Parameters that scaling laws count: block matrices + lm_head (nanochat found this gives the
    cleanest laws; embeddings and scalars are left out). Counted on the meta device: exact, no memory."""
    import torch

    from llmlabs.model import GPT  # config.py stays importable without the model
    with torch.device("meta"):
        counts = GPT(config).num_params()
    return counts["block_matrices"] + counts["lm_head"]


def hyperparams_for(config: GPTConfig) -> dict:
    """Batch size, learning rates and weight decay for a config, by nanochat's rules:

    - horizon: target_tokens = 12 * scaling_params (nanochat --target-param-data-ratio 12).
    - batch: B = B_ref * (D / D_ref) ** 0.383, rounded to a power of two, with B_ref = 2**19 tokens
      and D_ref the d12 horizon ("Power Lines", arXiv 2505.13738: B_opt grows as D^0.383).
    - every LR * sqrt(B / B_ref): the square-root rule for Adam, assumed for Muon too (nanochat).
    - weight decay = 0.28 * sqrt(B / B_ref) * (D_ref / D): keeps the AdamW timescale
      B / (lr * wd * D) fixed (arXiv 2405.13698), applied to Muon as nanochat does.
    - base LRs at d12 (nanochat base_train defaults): matrix 0.02 (Muon), embedding 0.3,
      unembedding 0.008, scalars 0.5. The embedding and unembedding LRs here are for width 768:
      GPT.setup_optimizer multiplies them by (n_embd / 768) ** -0.5 (nanochat's muP-style rule),
      so pass these numbers to it unchanged.
    """
    ref = config_for_depth(REFERENCE_DEPTH, vocab_size=config.vocab_size, sequence_len=config.sequence_len,
                           head_dim=config.head_dim, window_pattern=config.window_pattern,
                           short_window=config.short_window)
    target_tokens = TOKENS_PER_PARAM * scaling_params(config)
    ref_tokens = TOKENS_PER_PARAM * scaling_params(ref)
    batch = 2 ** round(math.log2(REFERENCE_BATCH * (target_tokens / ref_tokens) ** 0.383))
    lr_scale = (batch / REFERENCE_BATCH) ** 0.5
    return {
        "total_batch_size": batch,
        "target_tokens": target_tokens,
        "matrix_lr": 0.02 * lr_scale,
        "embedding_lr": 0.3 * lr_scale,
        "unembedding_lr": 0.008 * lr_scale,
        "scalar_lr": 0.5 * lr_scale,
        "weight_decay": 0.28 * lr_scale * ref_tokens / target_tokens,
    }
