"""Mixture-of-Experts for a block's MLP slot: the research surface, plain PyTorch.

DeepSeek-V3's design (arXiv 2412.19437, section 2.1):
- the router is a linear map computed in float32; sigmoid scores s (not a softmax over experts)
- each token goes to the k experts of highest s + b, where b is a per-expert balancing bias that
  only chooses: the gate weights are the chosen scores s themselves, normalised over the k
  (GPTConfig.moe_raw_gates keeps them raw, as an ablation), times a routed scaling factor
- shared experts see every token
- aux-loss-free balancing: after each optimizer step, b += rate * sign(mean load - load), with the
  load counted over the whole step (every micro-batch, every rank). Evaluation and generation
  route with b but never count or move it. An optional sequence-level balance loss (eq. 17-20),
  off by default.
- dropless: every token reaches its k experts, however uneven the load (no capacity factor)

Experts are 3-D weights, w_fc [E, h, C] and w_proj [E, C, h] (Linear's [out, in] per expert), so
Muon orthogonalises each expert's matrix (optim.py stacks the leading dims) and the experts run as
one grouped matmul. Two paths compute the same thing: `loop` (one expert at a time, the readable
reference and the CPU path) and `grouped` (tokens sorted by expert into one buffer, two
torch grouped_mm calls; static shapes, so torch.compile takes it whole, the GPU path)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmlabs.kernels.ops import relu2_mlp

# F.grouped_mm is the public name of torch._grouped_mm in recent torch; older ones have only the latter
grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm
# grouped_mm reads each expert's rows as one block; each block starts on a multiple of this many
# rows (padding rows are zero and never read back), the alignment GPU grouped GEMMs want for bf16
ALIGN_ROWS = 16
# The weight gradients' grouped matmul sums each expert's rows in pieces of at most R / (E * this)
# rows. A tile of its output ([h, C] per expert) sums over all rows it is given, so with one group
# per expert the busiest expert's tiles set the kernel's time: on an H200 at the d8 shape 0.68 ms
# balanced, 1.37 ms at twice the mean load, 2.03 ms at three times (moe_grouped_mm_skew-h200-81130ab),
# and a d8 run's busiest expert holds 2-3.8x the mean in its first 100 steps (moe_d8_40s-h200-81130ab).
# Pieces spread a busy expert over more tiles, split-K style: 4 pieces take 0.82-0.86 ms at any skew
# there, but 0.85 against 0.63 ms at even load (moe_grouped_mm_skew-h200-eea7591). The whole d8 step
# at steps 41-50, load as even as a run's early steps get: 352.0 ms with 4 pieces against 365.0 with
# none, 1.489M against 1.437M tokens/s (moe_speed_balanced-h200-96a6456). 0: one group per expert.
WGRAD_PIECES = 4


def one_hot(index, n: int):
    """index [...] -> [..., n] bool (a byte an entry where eager mode materialises it; its sum counts
    in int64). Counting experts by its sum is a reduction that torch.compile fuses; scatter_add into a
    handful of counters serialises on atomics instead (the kernel holding the router's took 0.29 ms
    a call, 4 ms of a d8 step: moe_profile_d8-h200-a00384c)."""
    return index.unsqueeze(-1) == torch.arange(n, device=index.device)


def top_k_indices(x, k: int):
    """Indices of the k largest entries along the last dimension, in descending order, by k argmax
    passes (ties to the lower index). For the few experts a router picks from, each pass is one
    reduction that torch.compile fuses with the scores' own math, where torch.topk stays a library
    call: 0.42 ms each at d8's 262,144 x 8 scores on an H200, 6 ms a step (moe_profile_d8-h200-a00384c)."""
    picked, column = [], torch.arange(x.shape[-1], device=x.device)
    for _ in range(k):
        i = x.argmax(-1, keepdim=True)
        picked.append(i)
        x = x.masked_fill(column == i, float("-inf"))  # pointwise: fuses into the next pass's reduction
    return torch.cat(picked, -1)


class MoE(nn.Module):
    """Fills the MLP slot (model.MLP's three methods, plus balance() and adamw_params())."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        C, E, h = config.n_embd, config.moe_experts, config.expert_width()
        self.n_experts, self.top_k, self.width = E, config.moe_top_k, h
        self.raw_gates, self.routed_scale = config.moe_raw_gates, config.moe_routed_scale
        self.bias_rate, self.aux_weight = config.moe_bias_rate, config.moe_aux_loss
        self.router = nn.Linear(C, E, bias=False)
        self.w_fc = nn.Parameter(torch.empty(E, h, C))
        self.w_proj = nn.Parameter(torch.empty(E, C, h))
        S = config.moe_shared
        self.shared_fc = nn.Linear(C, S * h, bias=False) if S else None
        self.shared_proj = nn.Linear(S * h, C, bias=False) if S else None
        # the balancing bias: model state (saved in checkpoints), moved by balance(), never by a gradient
        self.register_buffer("expert_bias", torch.empty(E))
        # tokens routed to each expert since the last balance(): one optimizer step's worth
        self.register_buffer("expert_load", torch.empty(E), persistent=False)
        self.path = "auto"  # "loop" | "grouped" | "auto": grouped on CUDA, loop elsewhere
        self.aux_loss = None  # the last training forward's balance loss, when moe_aux_loss > 0

    @torch.no_grad()
    def init_weights(self):
        # as model.MLP: the input side uniform at 0.4x the attention projections' std, the output
        # side zero (each block starts as the identity); the router reads the residual stream like
        # the attention projections, std 1/sqrt(C), so the first routing is already spread out
        C = self.router.in_features
        nn.init.uniform_(self.router.weight, -(3 / C) ** 0.5, (3 / C) ** 0.5)
        s = 0.4 * (3 / C) ** 0.5
        for w in (self.w_fc, self.shared_fc.weight if self.shared_fc is not None else None):
            if w is not None:
                nn.init.uniform_(w, -s, s)
        nn.init.zeros_(self.w_proj)
        if self.shared_proj is not None:
            nn.init.zeros_(self.shared_proj.weight)
        self.expert_bias.zero_()
        self.expert_load.zero_()

    def matmul_params_per_token(self) -> int:
        """What one token multiplies through: the router, its k experts and the shared ones."""
        shared = 0 if self.shared_fc is None else self.shared_fc.weight.numel() + self.shared_proj.weight.numel()
        return self.router.weight.numel() + self.top_k * 2 * self.width * self.router.in_features + shared

    def adamw_params(self) -> list:
        """The router goes to AdamW, not Muon: its rows are per-expert score directions, not a map
        whose singular values should be equalised."""
        return [self.router.weight]

    def route(self, x):
        """x [N, C] -> (chosen experts [N, k], gate weights [N, k], scores [N, E]), all float32."""
        with torch.autocast(x.device.type, enabled=False):
            scores = torch.sigmoid(F.linear(x.float(), self.router.weight.float()))
        chosen = top_k_indices(scores + self.expert_bias, self.top_k)
        gates = scores.gather(-1, chosen)
        if not self.raw_gates:
            gates = gates / gates.sum(-1, keepdim=True)
        return chosen, gates * self.routed_scale, scores

    def forward(self, x):
        B, T, C = x.shape
        flat = x.reshape(-1, C)
        chosen, gates, scores = self.route(flat)
        load = one_hot(chosen.flatten(), self.n_experts).sum(0)  # assignments per expert
        if self.training and torch.is_grad_enabled():  # training forwards count; eval and generate never do
            self.expert_load += load
            if self.aux_weight > 0:
                self.aux_loss = self.aux_weight * self._sequence_balance_loss(chosen.view(B, T, -1), scores.view(B, T, -1))
        grouped = self.path == "grouped" or (self.path == "auto" and x.is_cuda)
        y = self._experts_grouped(flat, chosen, gates, load) if grouped else self._experts_loop(flat, chosen, gates)
        if self.shared_fc is not None:
            y = y + relu2_mlp(flat, self.shared_fc, self.shared_proj)
        return y.view(B, T, C)

    def _experts_loop(self, x, chosen, gates):
        """One expert at a time over the tokens routed to it: the reference."""
        out = torch.zeros_like(x)
        for e in range(self.n_experts):
            token, slot = torch.where(chosen == e)
            y = relu2_mlp(x[token], self.w_fc[e], self.w_proj[e])
            out = out.index_add(0, token, (y * gates[token, slot, None]).to(out.dtype))
        return out

    def _experts_grouped(self, x, chosen, gates, load):
        """All experts in two grouped matmuls. Every (token, slot) assignment gets a row of one
        buffer, the rows of expert e together in a block that starts on a multiple of ALIGN_ROWS;
        the buffer's size is fixed (N*k + E*(ALIGN_ROWS-1)), so nothing here depends on the routing's
        values and no step syncs with the host. Rows move by gathers only, forward and backward
        (_Dispatch, _Combine): no scatter-add, no atomics. (A running one-hot count could replace the
        sort, but aten's CUDA cumsum down N*k rows walks them with one thread per expert column.)"""
        N, k, E = chosen.shape[0], self.top_k, self.n_experts
        expert = chosen.flatten()                                      # [N*k] expert of assignment token*k + slot
        order = torch.argsort(expert, stable=True)                     # assignments grouped by expert
        padded = (load + ALIGN_ROWS - 1) // ALIGN_ROWS * ALIGN_ROWS
        ends = padded.cumsum(0)
        e_sorted = expert[order]
        rank_in_expert = torch.arange(N * k, device=x.device) - (load.cumsum(0) - load)[e_sorted]
        row = torch.empty_like(order).scatter_(0, order, (ends - padded)[e_sorted] + rank_in_expert)  # per assignment
        R = N * k + E * (ALIGN_ROWS - 1)
        assignment = torch.zeros(R, dtype=torch.long, device=x.device).scatter_(0, row, torch.arange(N * k, device=x.device))
        real = torch.zeros(R, dtype=torch.bool, device=x.device).scatter_(0, row, True)  # not a padding row
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        buf = _Dispatch.apply(x.to(dtype), assignment // k, row, k)  # padding rows copy token 0
        # the last expert's block runs to the buffer's end: grouped_mm leaves rows outside every
        # block uninitialised, and they would reach the weights' gradients
        offs = torch.cat([ends[:-1], ends.new_full((1,), R)]).to(torch.int32)
        if WGRAD_PIECES:  # the weight gradients in pieces (_ExpertMM); else autograd's own grouped_mm backward
            chunk = -(-R // (E * WGRAD_PIECES * ALIGN_ROWS)) * ALIGN_ROWS
            mm = lambda a, w: _ExpertMM.apply(a, w, offs, chunk)  # noqa: E731
        else:
            mm = lambda a, w: grouped_mm(a, w.to(dtype).transpose(1, 2), offs=offs)  # noqa: E731
        h = mm(buf, self.w_fc)
        # CUDA autocast runs square (as pow) in float32, and grouped_mm, not an autocast op, refuses a
        # float32 operand beside a bfloat16 one (H200, torch 2.11): the activation goes back to `dtype`
        y = mm(F.relu(h).square().to(dtype), self.w_proj)
        rows = _Combine.apply(y, row, assignment, real)              # [N*k, C] in assignment order
        return (rows.view(N, k, -1) * gates.to(dtype).unsqueeze(-1)).sum(1)

    def _sequence_balance_loss(self, chosen, scores):
        """DeepSeek-V3's complementary sequence-wise balance loss (eq. 17-20), without its alpha:
        sum_i f_i P_i per sequence, f_i = E / (k T) * tokens choosing i, P_i = the mean over the
        sequence of i's score normalised over all experts; mean over sequences. 1 when balanced."""
        B, T, k = chosen.shape
        E = self.n_experts
        counts = one_hot(chosen.reshape(B, -1), E).sum(1)
        f = counts * E / (k * T)
        P = (scores / scores.sum(-1, keepdim=True)).mean(1)
        return (f * P).sum(-1).mean()

    @torch.no_grad()
    def balance(self) -> torch.Tensor:
        """Once per optimizer step: load summed over the step (and over ranks), bias moved toward
        the under-loaded experts, counters zeroed. Returns the step's load per expert."""
        load = self.expert_load.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)
        self.expert_bias.add_(self.bias_rate * torch.sign(load.mean() - load))
        self.expert_load.zero_()
        return load


class _Dispatch(torch.autograd.Function):
    """buf = x[src]: each buffer row a copy of its token. Backward gathers too: token t's gradient
    is the sum of its k assignments' rows, read at row[t*k + j] (padding rows are never read)."""

    @staticmethod
    def forward(ctx, x, src, row, k):
        ctx.save_for_backward(row)
        ctx.k = k
        return x[src]

    @staticmethod
    def backward(ctx, grad):
        (row,) = ctx.saved_tensors
        return grad[row].view(-1, ctx.k, grad.shape[1]).sum(1), None, None, None


class _Combine(torch.autograd.Function):
    """rows = y[row]: each assignment's expert output, in assignment order. Backward gathers too:
    buffer row r's gradient is its assignment's, zero for padding rows (so they add nothing to the
    weights' gradients or, through _Dispatch, to token 0's)."""

    @staticmethod
    def forward(ctx, y, row, assignment, real):
        ctx.save_for_backward(assignment, real)
        return y[row]

    @staticmethod
    def backward(ctx, grad):
        assignment, real = ctx.saved_tensors
        return torch.where(real.unsqueeze(-1), grad[assignment], 0), None, None, None


class _ExpertMM(torch.autograd.Function):
    """y = x @ w[e].T for the rows of each expert e (offs: the ends of the experts' blocks of rows),
    w cast to x's dtype. Backward: dx as grouped_mm gives it, dw by weight_grad in pieces of at
    most `chunk` rows (0: whole blocks), returned in w's own dtype (the float32 master weights)."""

    @staticmethod
    def forward(ctx, x, w, offs, chunk):
        ctx.save_for_backward(x, w, offs)
        ctx.chunk = chunk
        return grouped_mm(x, w.to(x.dtype).transpose(1, 2), offs=offs)

    @staticmethod
    def backward(ctx, dy):
        x, w, offs = ctx.saved_tensors
        return grouped_mm(dy, w.to(dy.dtype), offs=offs), weight_grad(dy, x, offs, ctx.chunk).to(w.dtype), None, None


def weight_grad(dy, x, offs, chunk):
    """dw[e] = dy_e.T @ x_e over each expert's rows. With chunk, the rows are also cut at every
    multiple of chunk: at most R/chunk + E pieces, each a group of one grouped matmul, then summed
    per expert in (at least) float32 by a one-hot matmul: deterministic, where index_add's atomics
    are not. A piece of no rows is zeroed: grouped_mm need not write an empty group's output."""
    if not chunk:
        return grouped_mm(dy.t(), x, offs=offs)
    grid = torch.arange(chunk, max(chunk, x.shape[0]), chunk, device=offs.device, dtype=offs.dtype)
    cuts = torch.cat([offs, grid]).sort().values
    part = grouped_mm(dy.t(), x, offs=cuts)                               # [pieces, out, in]
    size = torch.diff(cuts, prepend=cuts.new_zeros(1))
    owner = torch.searchsorted(offs, cuts)                                # the block each piece ends in
    acc = torch.promote_types(part.dtype, torch.float32)
    part = torch.where((size > 0)[:, None, None], part, 0).to(acc)
    onehot = (owner == torch.arange(len(offs), device=offs.device)[:, None]).to(acc)  # [E, pieces]
    with torch.autocast(dy.device.type, enabled=False):
        return (onehot @ part.flatten(1)).view(len(offs), *part.shape[1:])
