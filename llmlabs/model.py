"""GPT decoder: the lab's research surface. Small, flat, compile-friendly (no graph breaks, no
host syncs in forward). Choices follow nanochat (karpathy/nanochat, nanochat/gpt.py, early 2026):

- RoPE (arXiv 2104.09864), base 100k, or 3D MRoPE (Qwen2-VL, arXiv 2409.12191) when the forward is
  given (t, h, w) positions (multimodal: vision.py); QK-norm (arXiv 2010.04245) with q and k each scaled by 1.2
- parameter-free RMSNorm (arXiv 1910.07467) before attention, MLP and lm_head, and on the embedding
- untied token embedding and lm_head; no biases
- ReLU^2 MLP (Primer, arXiv 2109.08668) in a slot any nn.Module can fill: GPTConfig.moe_experts > 0 puts
  a Mixture-of-Experts (moe.py) in the slot of the layers GPTConfig.moe_layers names
- value embeddings on alternating layers, the last always (ResFormer, arXiv 2410.17897), mixed into V
  through an input-dependent per-head gate
- sliding-window attention from a pattern string (GPTConfig.window_sizes), last layer full
- learnable per-layer residual and x0 (initial embedding) scalars (modded-nanogpt)
- tanh logit softcap (Gemma 2, arXiv 2408.00118); grouped-query attention (arXiv 2305.13245)

What is trained is what is written: the MLP's ReLU^2, RoPE + QK-norm, and the soft-capped logits and
loss are named ops (llmlabs/kernels/ops.py: relu2_mlp, rope_norm, softcap_logits,
softcap_cross_entropy), each one plain-PyTorch definition that a compiled forward may run as a
kernel held to it by tests (Triton on a GPU). To change that math, replace the call here with your
own code: the kernel is then not used, and training, evaluation and sampling run the same model.

Speed (bench/NOTES.md), only in a compiled forward: under autocast the residual stream is kept in
the autocast dtype (bf16), not float32, which halves the bytes every norm and residual add moves;
the rest is the named ops' kernels (kernels/ops.py says which).

Built on the meta device, then materialised and initialised explicitly: `build_model`."""
import torch
import torch.nn as nn

from llmlabs.attention import attention
from llmlabs.common import LabError
from llmlabs.config import GPTConfig
from llmlabs.kernels.ops import norm, relu2_mlp, rope_norm, softcap_cross_entropy, softcap_logits
from llmlabs.moe import MoE
from llmlabs.optim import DistMuonAdamW, MuonAdamW

VE_GATE_CHANNELS = 12  # the value-embedding gate reads only the first 12 channels of x (nanochat)
QK_GAIN = 1.2          # nanochat multiplies q and k by 1.2 after QK-norm: attention logits x 1.44


def attended_pairs(T: int, window: int | None) -> int:
    """(query, key) pairs a causal layer scores over T positions: query t sees min(t, window) + 1
    keys (all t + 1 for window None)."""
    m = T if window is None else min(window + 1, T)  # keys per query once the window is full
    return m * (m + 1) // 2 + (T - m) * m


def has_value_embed(layer: int, n_layer: int) -> bool:
    """Alternating layers, always including the last (nanochat)."""
    return layer % 2 == (n_layer - 1) % 2


def rope_tables(seq_len: int, head_dim: int, base: float, device=None):
    """cos and sin [seq_len, head_dim/2] in float32: channel pair j turns by angle t * base^(-2j/D)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


def mrope_sections(head_dim: int) -> tuple[int, int, int]:
    """How many of the D/2 frequency pairs turn by t, by h and by w. Qwen2-VL splits 64 pairs (head_dim
    128) as 16, 24, 24: the highest frequencies to time, the rest shared by the two image axes."""
    hw = 3 * (head_dim // 2) // 8
    return head_dim // 2 - 2 * hw, hw, hw


def mrope_tables(cos, sin, positions):
    """3D MRoPE (Qwen2-VL, arXiv 2409.12191): positions [B, 3, T] (t, h, w) -> cos/sin [B, T, D/2].
    Frequency pair j reads the RoPE table's row at the position of its section's axis: a gather, not
    a recomputation, so text tokens at (t, t, t) get exactly plain RoPE's values, bit for bit. The
    positions must lie below sequence_len (vision.mrope_positions keeps them below the token index)."""
    half = cos.size(1)
    axis = torch.repeat_interleave(torch.arange(3, device=cos.device),
                                   torch.tensor(mrope_sections(2 * half), device=cos.device))  # [D/2]
    rows = positions.index_select(1, axis).transpose(1, 2)  # [B, T, D/2]: the row pair j reads
    cols = torch.arange(half, device=cos.device)
    return cos[rows, cols], sin[rows, cols]


class MLP(nn.Module):
    """The default occupant of a block's MLP slot: ReLU^2, 4x wide. Whatever fills the slot
    (`mlp_factory(config, layer_idx)`) provides the same three methods: forward(x) -> x-shaped,
    init_weights() (the model is built on the meta device, so every module initialises itself),
    and matmul_params_per_token() (the weights one token multiplies through, for the FLOP count;
    for a Mixture-of-Experts, only the experts it is routed to)."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return relu2_mlp(x, self.c_fc, self.c_proj)  # the layers, not their weights: see fp8.py

    @torch.no_grad()
    def init_weights(self):
        # nanochat: c_fc uniform at 0.4x the attention projections' std; c_proj zero, so every block
        # starts as the identity and the residual stream carries the embedding through
        s = 0.4 * (3 / self.c_fc.in_features) ** 0.5
        nn.init.uniform_(self.c_fc.weight, -s, s)
        nn.init.zeros_(self.c_proj.weight)

    def matmul_params_per_token(self) -> int:
        return self.c_fc.weight.numel() + self.c_proj.weight.numel()


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int, window: int | None):
        super().__init__()
        self.layer_idx, self.window = layer_idx, window
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.c_q = nn.Linear(config.n_embd, config.n_head * config.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=False)
        self.gate_channels = min(VE_GATE_CHANNELS, config.n_embd)
        self.ve_gate = (nn.Linear(self.gate_channels, config.n_kv_head, bias=False)
                        if has_value_embed(layer_idx, config.n_layer) else None)
        self.scale = QK_GAIN**2 / config.head_dim**0.5

    def forward(self, x, ve, cos, sin, kv_cache):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)  # [B, T, H, D]: FA3's layout, no copy
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            # ResFormer value residual: the gate in (0, 3) is per token and per kv head (nanochat)
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :self.gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim).to(v.dtype)
        q, k = rope_norm(q, cos, sin), rope_norm(k, cos, sin)
        if kv_cache is None:
            y = attention(q, k, v, self.window, self.scale)
        else:
            y = kv_cache.attend(self.layer_idx, q, k, v, self.window, self.scale)
        return self.c_proj(y.reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int, window: int | None, mlp: nn.Module):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx, window)
        self.mlp = mlp

    def forward(self, x, ve, cos, sin, kv_cache):
        x = x + self.attn(norm(x), ve, cos, sin, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, mlp_factory=None):
        """WARNING: runs under torch.device("meta") (see build_model): shapes only, no values.
        Everything with a value is set in init_weights()."""
        super().__init__()
        self.config = config
        self.windows = config.window_sizes()
        moe_layers = set(config.moe_layer_ids())
        make_mlp = mlp_factory or (lambda config, i: MoE(config, i) if i in moe_layers else MLP(config, i))
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i, self.windows[i], make_mlp(config, i))
                                    for i in range(config.n_layer))
        kv_dim = config.n_kv_head * config.head_dim
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, kv_dim)
                                           for i in range(config.n_layer) if has_value_embed(i, config.n_layer)})
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # x <- resid_lambdas[i] * x + x0_lambdas[i] * x0 before block i (modded-nanogpt, nanochat)
        self.resid_lambdas = nn.Parameter(torch.empty(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.empty(config.n_layer))
        # recomputed, not saved: a checkpoint holds only learned tensors
        self.register_buffer("rope_cos", torch.empty(config.sequence_len, config.head_dim // 2), persistent=False)
        self.register_buffer("rope_sin", torch.empty(config.sequence_len, config.head_dim // 2), persistent=False)

    @torch.no_grad()
    def init_weights(self):
        """nanochat's init. Matrices read by the residual stream: uniform with std 1/sqrt(n_embd)
        (uniform has no outliers); outputs written into it (attn c_proj, mlp c_proj): zero."""
        s = (3 / self.config.n_embd) ** 0.5
        nn.init.normal_(self.wte.weight, std=0.8)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.blocks:
            attn = block.attn
            for linear in (attn.c_q, attn.c_k, attn.c_v):
                nn.init.uniform_(linear.weight, -s, s)
            nn.init.zeros_(attn.c_proj.weight)
            if attn.ve_gate is not None:
                nn.init.uniform_(attn.ve_gate.weight, 0.0, 0.02)  # gates start a bit above 1.5
            block.mlp.init_weights()
        for embed in self.value_embeds.values():
            nn.init.uniform_(embed.weight, -s, s)
        # early layers keep more residual and more of the embedding: 1.15 -> 1.05 and 0.20 -> 0.05
        depth = torch.arange(self.config.n_layer, dtype=torch.float32) / max(self.config.n_layer - 1, 1)
        self.resid_lambdas.copy_(1.15 - 0.10 * depth)
        self.x0_lambdas.copy_(0.20 - 0.15 * depth)
        cos, sin = rope_tables(self.config.sequence_len, self.config.head_dim, self.config.rope_base,
                               self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(self, idx, targets=None, loss_reduction="mean", kv_cache=None, positions=None, patch_mask=None,
                patch_embeds=None):
        """idx [B, T] token ids. No targets: soft-capped logits [B, T, vocab] in float32 (float64 for
        a float64 model). With targets [B, T] (-1 = ignore): the cross-entropy, mean over the counted
        tokens or per token [B, T] with loss_reduction="none". With a KVCache: idx holds the tokens at
        cache.pos.., which the cache appends; returns their logits.

        Multimodal (vision.py): positions [B, 3, T] turns on 3D MRoPE (None: plain RoPE at index
        cache.pos + t, today's path unchanged); patch_mask [B, T] bool with patch_embeds [N, n_embd],
        N = patch_mask.sum(), puts those vectors in place of the token embeddings at the masked
        positions, in row-major order (the image's merged patch features)."""
        B, T = idx.shape
        t0 = 0 if kv_cache is None else kv_cache.pos
        if t0 + T > self.config.sequence_len:
            raise LabError(f"{t0 + T} positions exceed the model's context (sequence_len="
                           f"{self.config.sequence_len}): feed at most that many tokens")
        if positions is None and kv_cache is not None and kv_cache.static:  # positions on the device
            at = kv_cache.positions(T)
            cos, sin = self.rope_cos[at], self.rope_sin[at]
        elif positions is None:
            cos, sin = self.rope_cos[t0:t0 + T], self.rope_sin[t0:t0 + T]
        else:
            cos, sin = mrope_tables(self.rope_cos, self.rope_sin, positions)
        x = self.wte(idx)
        if (patch_mask is None) != (patch_embeds is None):
            raise LabError("patch_mask and patch_embeds go together: give both (an image's patches) or neither")
        if patch_mask is not None:
            # no host sync: masked_scatter fills the masked slots in order from patch_embeds
            x = x.masked_scatter(patch_mask.unsqueeze(-1), patch_embeds.to(x.dtype))
        x = x0 = norm(x)
        if torch.compiler.is_compiling() and torch.is_autocast_enabled(idx.device.type):
            # The residual stream stored in the matmuls' dtype (bf16): every block reads and writes
            # it several times, so float32 would double most of the step's memory traffic. Only when
            # compiled: fused kernels do the adds and norms in float32 registers and round once per
            # store, while eager would round after every op (evaluation and sampling run eager, in
            # float32 as before; measured on CPU, bench/NOTES.md round 2).
            x = x0 = x0.to(torch.get_autocast_dtype(idx.device.type))
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        h = norm(x)
        if targets is None:
            return softcap_logits(h, self.lm_head.weight, self.config.softcap)
        if loss_reduction not in ("mean", "none"):
            raise LabError(f"loss_reduction={loss_reduction!r}: use 'mean' or 'none'")
        loss = softcap_cross_entropy(h, self.lm_head.weight, targets, self.config.softcap)  # [B, T]
        if loss_reduction == "none":
            return loss
        loss = loss.sum() / (targets >= 0).sum()
        if self.training and torch.is_grad_enabled() and self.config.moe_aux_loss > 0:
            loss = loss + sum(m.aux_loss for m in self.moe_layers())  # set by this forward's MoE layers
        return loss

    def moe_layers(self) -> list[MoE]:
        return [b.mlp for b in self.blocks if isinstance(b.mlp, MoE)]

    @torch.no_grad()
    def balance_experts(self) -> dict:
        """After each optimizer step: every MoE layer moves its balancing bias by the step's load
        (MoE.balance). Returns the step's load statistics for metrics.jsonl (empty for a dense
        model): per layer the fraction of routed tokens each expert got; over the layers the mean
        coefficient of variation of the load, the largest and smallest load relative to the mean,
        the largest spread of a bias (max - min), and the (token, expert) pairs a layer computed in
        the step, over all micro-batches and ranks: tokens x k, since no token is dropped."""
        layers = self.moe_layers()
        if not layers:
            return {}
        loads = torch.stack([m.balance() for m in layers]).float()  # [layers, E]
        rel = loads / loads.mean(1, keepdim=True).clamp_min(1e-9)
        bias = torch.stack([m.expert_bias for m in layers])
        stats = torch.stack([rel.std(1, unbiased=False).mean(), rel.max(), rel.min(),
                             (bias.max(1).values - bias.min(1).values).max(), loads.sum(1).min()]).tolist()
        share = (loads / loads.sum(1, keepdim=True).clamp_min(1e-9)).tolist()
        return {"moe_load_cv": stats[0], "moe_load_max": stats[1], "moe_load_min": stats[2],
                "moe_bias_spread": stats[3], "moe_routed": int(stats[4]),
                "moe_load": [[round(v, 4) for v in row] for row in share]}

    def num_params(self) -> dict:
        """Parameter counts by group; scaling laws use block_matrices + lm_head (see scaling.py)."""
        block = list(self.blocks.parameters())
        counts = {
            "embedding": self.wte.weight.numel(),
            "value_embeds": sum(p.numel() for p in self.value_embeds.parameters()),
            "block_matrices": sum(p.numel() for p in block if p.ndim >= 2),
            "lm_head": self.lm_head.weight.numel(),
            "scalars": self.resid_lambdas.numel() + self.x0_lambdas.numel() + sum(p.numel() for p in block if p.ndim < 2),
        }
        counts["total"] = sum(counts.values())
        assert counts["total"] == sum(p.numel() for p in self.parameters()), "a parameter is in no group"
        return counts

    def active_params(self) -> int:
        """The weights one token multiplies through (lm_head and the blocks' matrices, of an MoE
        layer only its router, k routed experts and shared experts): what FLOPs and the scaling rules
        count (scaling.scaling_params), so an MoE model is compared with a dense one at equal
        active parameters. Equals block_matrices + lm_head for a dense model."""
        weights = self.lm_head.weight.numel()
        for block in self.blocks:
            attn = block.attn
            weights += sum(m.weight.numel() for m in (attn.c_q, attn.c_k, attn.c_v, attn.c_proj, attn.ve_gate)
                           if m is not None)
            weights += block.mlp.matmul_params_per_token()
        return weights

    def flops_per_token(self, convention: str = "exact") -> int:
        """Training FLOPs (forward + backward) per token at T = sequence_len, for MFU.

        Both conventions count matmuls only (softmax, norms, elementwise work and the embedding
        lookups are noise) as "model FLOPs": flash attention's recomputation in the backward pass
        is not counted. Weights: 6 per weight a token multiplies through (2 forward, 4 backward),
        lm_head included. Attention, per layer and head: QK^T and PV cost 2 * D each per (query,
        key) pair forward, twice that backward: 12 * D per pair.
        - "exact": pairs counted as each query really attends, causal and windowed: query t sees
          min(t, w) + 1 keys. The mean over the sequence is what a token costs; rounded to an int.
        - "nanochat": nanochat/autoresearch's estimate_flops, 12 * H * D * L per layer with L = T
          for full layers and the window for windowed ones (no causal halving), to compare MFU."""
        c = self.config
        weights = self.active_params()
        T, per_pair = c.sequence_len, 12 * c.n_head * c.head_dim
        if convention == "nanochat":
            return 6 * weights + sum(per_pair * (T if w is None else min(w, T)) for w in self.windows)
        if convention != "exact":
            raise LabError(f"flops convention {convention!r}: use 'exact' or 'nanochat'")
        pairs = sum(attended_pairs(T, w) for w in self.windows)  # over one sequence, all layers
        return round((6 * weights * T + per_pair * pairs) / T)

    def setup_optimizer(self, matrix_lr=0.02, embedding_lr=0.3, unembedding_lr=0.008, scalar_lr=0.5,
                        weight_decay=0.28, adam_betas=None, distributed=False, extra_groups=()) -> MuonAdamW:
        """Muon for the block matrices (one group per shape, so they stack), AdamW for the rest,
        with nanochat's per-group settings. The embedding and unembedding LRs are given for width
        768 and scaled by (n_embd / 768) ** -0.5 here (nanochat); scalar LRs are not width-scaled.
        `weight_decay` is Muon's (cautious) decay; AdamW groups keep nanochat's small fixed ones.
        adam_betas None = nanochat's tuned betas per group; a pair sets every AdamW group.
        distributed: DistMuonAdamW, which averages the gradients over the ranks itself.
        extra_groups: param groups of modules outside the GPT that train with it (a vision encoder:
        multimodal.Fusion.param_groups), stepped by the same optimizer and schedules."""
        width_scale = (self.config.n_embd / 768) ** -0.5

        def adamw(params, lr, betas, weight_decay):
            return dict(kind="adamw", params=params, lr=lr, betas=tuple(adam_betas or betas), eps=1e-10,
                        weight_decay=weight_decay)

        # an MLP slot module may send matrices to AdamW (an MoE's router)
        to_adamw = {id(p) for b in self.blocks if hasattr(b.mlp, "adamw_params") for p in b.mlp.adamw_params()}
        block = [p for p in self.blocks.parameters() if id(p) not in to_adamw]
        matrices = [p for p in block if p.ndim >= 2]  # 3-D expert weights too: Muon per expert
        vectors = [p for p in block if p.ndim < 2]  # only if an MLP slot module brings gains or biases
        routers = [p for p in self.blocks.parameters() if id(p) in to_adamw]
        groups = [
            adamw([self.lm_head.weight], unembedding_lr * width_scale, (0.8, 0.96), 0.01),
            adamw([self.wte.weight], embedding_lr * width_scale, (0.8, 0.995), 0.001),
            adamw(list(self.value_embeds.parameters()), 0.5 * embedding_lr * width_scale, (0.8, 0.995), 0.01),
            adamw([self.resid_lambdas], 0.01 * scalar_lr, (0.8, 0.95), 0.05),
            adamw([self.x0_lambdas], scalar_lr, (0.96, 0.95), 0.0),  # slower beta1 for x0 (nanochat)
        ]
        if vectors:
            groups.append(adamw(vectors, scalar_lr, (0.8, 0.95), 0.0))
        if routers:  # a router reads the normed residual stream into scores, as lm_head does: its LR
            groups.append(adamw(routers, unembedding_lr * width_scale, (0.8, 0.95), 0.0))
        for shape in sorted({tuple(p.shape) for p in matrices}):
            groups.append(dict(kind="muon", params=[p for p in matrices if tuple(p.shape) == shape], lr=matrix_lr,
                               momentum=0.95, beta2=0.9, weight_decay=weight_decay, ns_steps=5))
        return (DistMuonAdamW if distributed else MuonAdamW)(groups + list(extra_groups))


def build_model(config: GPTConfig, device, mlp_factory=None) -> GPT:
    """Shapes on the meta device (no memory, no init work), then storage on `device`, then
    init_weights(): the one way a model comes to life, so there is one init to read."""
    with torch.device("meta"):
        model = GPT(config, mlp_factory)
    model.to_empty(device=device)
    model.init_weights()
    return model
