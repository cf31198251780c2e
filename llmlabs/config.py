"""GPTConfig and the one dial: `depth` sets the model (width, heads, windows); scaling.py turns a
config into the batch size, learning rates and weight decay the trainer uses.

The dial is nanochat's (karpathy/nanochat, scripts/base_train.py and nanochat/gpt.py, early 2026)."""
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
    # Mixture-of-Experts (moe.py) in the MLP slot of the layers moe_layers names; 0 experts = dense
    moe_experts: int = 0          # routed experts per MoE layer
    moe_top_k: int = 2            # routed experts per token
    moe_shared: int = 1           # shared experts, every token goes through them
    moe_layers: str = "1:"        # a Python slice or a comma list of layer indices; "1:" = all but the first
    moe_expert_width: int | None = None  # None: active MLP parameters per token match the dense MLP's
    moe_raw_gates: bool = False   # gates = the chosen sigmoid scores as they are, not normalised over the k
    moe_routed_scale: float = 1.0  # the routed experts' sum is multiplied by this (DeepSeek-V3: 2.5)
    # balancing bias step per optimizer step; 0 = off. DeepSeek-V3's gamma, 1e-3 (arXiv 2412.19437).
    # 1e-2 was the default from 62b04e7 to 2026-12-05: at the CPU preset it halved the load's CV at no
    # val_bpb cost (bench/results/moe_cpu_bias-table-cpu2-07c57e6.md), but a 5-minute d8 run on an H200
    # at 1e-2 bounced: a step's bias move flips so many tokens that one layer's expert was starved and
    # doubled on alternate steps, another's took every token on odd steps (moe_d8_load_bounce-h200-
    # bb2246d). At 1e-3 no bounce in a d8 run's first 112 steps, whose load took ~80 to even out; at
    # the CPU preset 1e-3 leaves the load uneven for all 256 steps, at no val_bpb cost either.
    moe_bias_rate: float = 1e-3
    moe_aux_loss: float = 0.0     # weight of the sequence-level balance loss (DeepSeek-V3's alpha: 1e-4)

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
        if not isinstance(self.moe_experts, int) or self.moe_experts < 0:
            raise LabError(f"GPTConfig.moe_experts={self.moe_experts!r}: must be an integer >= 0 (0 = dense MLP)")
        if self.moe_experts:
            if not 1 <= self.moe_top_k <= self.moe_experts:
                raise LabError(f"GPTConfig.moe_top_k={self.moe_top_k}: must be between 1 and moe_experts="
                               f"{self.moe_experts}")
            if self.moe_shared < 0 or (self.moe_expert_width is not None and self.moe_expert_width < 1):
                raise LabError(f"GPTConfig: moe_shared={self.moe_shared} must be >= 0 and moe_expert_width="
                               f"{self.moe_expert_width} >= 1 (or None)")
            if self.moe_routed_scale <= 0 or self.moe_bias_rate < 0 or self.moe_aux_loss < 0:
                raise LabError(f"GPTConfig: moe_routed_scale={self.moe_routed_scale} must be > 0, moe_bias_rate="
                               f"{self.moe_bias_rate} and moe_aux_loss={self.moe_aux_loss} >= 0")
            self.moe_layer_ids()  # a bad spec fails here, not when the model is built

    def moe_layer_ids(self) -> list[int]:
        """The layers whose MLP slot holds an MoE (none without experts), from moe_layers: a slice
        like "1:" or "::2", or indices like "2,5" (negative ones count from the end)."""
        if not self.moe_experts:
            return []
        spec, layers = self.moe_layers.replace(" ", ""), range(self.n_layer)
        try:
            if ":" in spec:
                ids = list(layers[slice(*(int(v) if v else None for v in spec.split(":")))])
            else:
                ids = sorted({layers[int(v)] for v in spec.split(",")})
        except (ValueError, IndexError, TypeError):
            raise LabError(f"GPTConfig.moe_layers={self.moe_layers!r}: use a slice of the {self.n_layer} layers like "
                           "'1:' (all but the first) or layer indices like '2,5'") from None
        if not ids:
            raise LabError(f"GPTConfig.moe_layers={self.moe_layers!r} names none of the {self.n_layer} layers: "
                           "name at least one, or set moe_experts=0 for a dense model")
        return ids

    def expert_width(self) -> int:
        """moe_expert_width, or the width at which a token's k routed + shared experts hold as many
        weights as the dense 4x MLP: 4 C / (k + shared), to the nearest multiple of 64 (a GEMM tile)."""
        if self.moe_expert_width:
            return self.moe_expert_width
        return max(64, round(4 * self.n_embd / (self.moe_top_k + self.moe_shared) / 64) * 64)

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
                     n_kv_head=None, window_pattern="SSSL", short_window=None, **moe) -> GPTConfig:
    """The depth dial (nanochat base_train.py): width = depth * aspect_ratio rounded up to a
    multiple of head_dim, so every head has exactly head_dim channels; heads = width / head_dim.
    `moe`: GPTConfig's moe_* fields, passed through."""
    if not isinstance(depth, int) or depth < 1:
        raise LabError(f"depth={depth!r}: must be a positive integer, e.g. 12 (presets: {', '.join(PRESETS)})")
    n_embd = -(-depth * aspect_ratio // head_dim) * head_dim
    n_head = n_embd // head_dim
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_embd=n_embd,
                     n_head=n_head, n_kv_head=n_head if n_kv_head is None else n_kv_head,
                     head_dim=head_dim, window_pattern=window_pattern, short_window=short_window, **moe)


# Named depths. d8 is the autoresearch experiment, d12 nanochat's tuning reference (GPT-2 small
# width), d20 the original nanochat speedrun, d24/d26 its later GPT-2-grade runs.
PRESETS = {f"d{d}": d for d in (4, 6, 8, 10, 12, 16, 20, 24, 26)}
