"""MuonAdamW: Muon for the 2-D (and batched 3-D) matrices of the blocks, AdamW for embeddings,
lm_head and scalars, in one torch.optim.Optimizer so the trainer sees one object.

Param groups carry `kind` ("muon" | "adamw") and their own hyperparameters; the trainer may change
group["lr"], group["momentum"] and group["weight_decay"] every step (each group keeps its
`initial_lr` for schedule multipliers). On CUDA the update math runs as torch.compile'd kernels
whose hyperparameters arrive as 0-d CPU tensors: new values every step never recompile, and no
step reads a value back to the host.

MuonAdamW is the single-process version. DistMuonAdamW (below) keeps its kernels (_muon_apply,
_adamw_apply) and adds the communication: reduce-scatter the gradients, update this rank's share,
all-gather the updated weights.

Sources: Muon (Keller Jordan, kellerjordan.github.io/posts/muon; modded-nanogpt); nanochat's
nanochat/optim.py for the structure (stacked same-shape matrices, fused step, 0-d tensors)."""
import torch

from llmlabs.common import LabError

# Polar Express (Amsel, Persson, Musco, Gower; arXiv 2505.16932, Algorithm 1): one degree-5 odd
# polynomial p_t(x) = a x + b x^3 + c x^5 per iteration, each optimal for the worst case over the
# singular values left by the previous ones (designed for sigma_min/sigma_max >= 1e-3), instead of
# Newton-Schulz's one fixed polynomial. Published coefficients; the first seven are divided by a
# 1.01 safety factor (as published) so bf16 rounding cannot push a singular value past the
# polynomials' stable range. Iterations past the list reuse the last polynomial.
_POLAR_EXPRESS_PUBLISHED = [
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
]
POLAR_EXPRESS_COEFFS = [(a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in _POLAR_EXPRESS_PUBLISHED[:-1]]
POLAR_EXPRESS_COEFFS.append(_POLAR_EXPRESS_PUBLISHED[-1])


def polar_express(G, steps: int = 5):
    """Approximate the polar factor U V^T of G = U S V^T (batched over leading dims), in G's dtype.
    Works on the short side: for a tall G it iterates on G^T, so the Gram matrix is min(m, n)^2."""
    tall = G.size(-2) > G.size(-1)
    X = G.mT if tall else G
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-7)  # Frobenius >= spectral: sigma <= 1
    for t in range(steps):
        a, b, c = POLAR_EXPRESS_COEFFS[min(t, len(POLAR_EXPRESS_COEFFS) - 1)]
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if tall else X


def _muon_update(grads, params, momentum_buffer, second_moment, momentum, lr, weight_decay, beta2,
                 ns_steps: int, reduce_dim: int, bf16: bool):
    """One Muon step for a stack of same-shape matrices [N, ..., m, n], in place on `params`."""
    # Nesterov momentum: the buffer is an EMA of gradients; step along the gradient pulled toward it
    momentum_buffer.lerp_(grads, 1 - momentum)
    g = grads.lerp(momentum_buffer, momentum)
    # orthogonalise: every singular value of the step -> ~1 (bf16 on GPUs, as in the paper)
    update = polar_express(g.bfloat16() if bf16 else g, ns_steps).to(params.dtype)
    # NorMuon (arXiv 2510.05491): an Adam-like second moment per neuron (per row of a tall matrix,
    # per column of a wide one, as nanochat) evens out the update's uneven neuron scales; then the
    # whole update is rescaled to the Frobenius norm it had after orthogonalisation (nanochat).
    v = update.float().square().mean(dim=reduce_dim, keepdim=True)
    second_moment.lerp_(v, 1 - beta2)
    scale = second_moment.clamp_min(1e-10).rsqrt()
    keep_norm = (v.sum(dim=(-2, -1), keepdim=True)
                 / (v * scale.square()).sum(dim=(-2, -1), keepdim=True).clamp_min(1e-20)).sqrt()
    update = update * (scale * keep_norm).to(update.dtype)
    # cautious weight decay (arXiv 2510.12402): decay only the coordinates the update already moves
    # toward zero (update and weight of the same sign)
    decay = (update * params >= 0).to(params.dtype) * params
    params.sub_(lr * (update + weight_decay * decay))


def _adamw_update(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    """AdamW (arXiv 1711.05101) for one tensor, in place: decoupled decay, bias-corrected moments."""
    p.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2)
    denom = (exp_avg_sq / (1 - beta2**step)).sqrt() + eps
    p.sub_(lr / (1 - beta1**step) * exp_avg / denom)


_compiled = {}


def _kernel(fn, device):
    """fn compiled for CUDA (one fused graph per shape, 0-d CPU hyperparameters); plain eager on
    CPU, where a compile would cost more than the whole step."""
    if device.type != "cuda":
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _compiled[fn]


_REQUIRED = {"adamw": ("lr", "betas", "eps", "weight_decay"),
             "muon": ("lr", "momentum", "beta2", "weight_decay", "ns_steps")}


def _run_closure(closure):
    """torch.optim's step(closure) contract: re-evaluate the loss with gradients on, if asked."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class MuonAdamW(torch.optim.Optimizer):
    """param_groups: dicts with `params`, `kind` and, for "adamw": lr, betas, eps, weight_decay;
    for "muon": lr, momentum, beta2 (NorMuon), weight_decay (cautious), ns_steps. A muon group
    holds matrices of one shape (they are stacked and orthogonalised as one batch). Muon's
    effective lr is lr * sqrt(max(1, rows / cols)) (Muon's shape scale: tall matrices, whose
    orthogonalised rows are short, get a proportionally larger step)."""

    def __init__(self, param_groups):
        param_groups = [dict(g) for g in param_groups]
        for i, group in enumerate(param_groups):
            kind = group.get("kind")
            if kind not in _REQUIRED:
                raise LabError(f"param group {i}: kind={kind!r}, must be 'muon' or 'adamw'")
            missing = [key for key in _REQUIRED[kind] if key not in group]
            if missing:
                raise LabError(f"param group {i} ({kind}): missing {', '.join(missing)}")
            group["params"] = list(group["params"])
            shapes = {tuple(p.shape) for p in group["params"]}
            if kind == "muon" and (len(shapes) > 1 or any(len(s) < 2 for s in shapes)):
                raise LabError(f"param group {i} (muon): needs matrices of a single shape, got {sorted(shapes)}; "
                               "make one muon group per shape and send vectors to adamw")
        super().__init__(param_groups, defaults={})
        for group in self.param_groups:
            group.setdefault("initial_lr", group["lr"])
        # one 0-d CPU tensor per hyperparameter, refilled before each kernel call (float64: exact
        # values; a 0-d tensor never changes the dtype of the tensors it multiplies)
        self._hp = {name: torch.tensor(0.0, dtype=torch.float64) for name in
                    ("lr", "beta1", "beta2", "eps", "weight_decay", "step", "momentum")}

    def _fill(self, **values):
        for name, value in values.items():
            self._hp[name].fill_(value)
        return [self._hp[name] for name in values]

    def _adamw_step(self, group):
        for p in group["params"]:
            if p.grad is not None:
                self._adamw_apply(group, self.state[p], p, p.grad)

    def _adamw_apply(self, group, state, p, grad):
        """One AdamW step of p (a tensor, or one rank's slice of it) with its state, in place."""
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        hp = self._fill(step=state["step"], lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
                        eps=group["eps"], weight_decay=group["weight_decay"])
        _kernel(_adamw_update, p.device)(p, grad, state["exp_avg"], state["exp_avg_sq"], *hp)

    def _muon_step(self, group):
        params = group["params"]
        if all(p.grad is None for p in params):
            return
        grads = torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
        stacked = torch.stack(params)
        self._muon_apply(group, self.state[params[0]], grads, stacked)  # the group's buffers live with its first matrix
        torch._foreach_copy_(params, list(stacked.unbind(0)))

    def _muon_apply(self, group, state, grads, stacked):
        """One Muon step of a stack of same-shape matrices [n, ..., m, k] (a group, or one rank's share
        of it) with its stacked state, in place on `stacked`."""
        shape = stacked.shape[1:]
        reduce_dim = -1 if shape[-2] >= shape[-1] else -2
        if not state:
            state["momentum_buffer"] = torch.zeros_like(stacked)
            factored = list(stacked.shape)
            factored[reduce_dim] = 1
            state["second_moment"] = torch.zeros(factored, dtype=torch.float32, device=stacked.device)
        momentum, lr, weight_decay, beta2 = self._fill(
            momentum=group["momentum"], lr=group["lr"] * max(1.0, shape[-2] / shape[-1]) ** 0.5,
            weight_decay=group["weight_decay"], beta2=group["beta2"])
        device = stacked.device
        _kernel(_muon_update, device)(grads, stacked, state["momentum_buffer"], state["second_moment"], momentum, lr,
                                      weight_decay, beta2, group["ns_steps"], reduce_dim, device.type == "cuda")

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        # torch casts every floating state tensor to its parameter's dtype: NorMuon's second moment is
        # float32 whatever the weights are (_muon_update accumulates it so), so it goes back
        for group in self.param_groups:
            s = self.state[group["params"][0]] if group["kind"] == "muon" else {}
            if "second_moment" in s:
                s["second_moment"] = s["second_moment"].float()

    @torch.no_grad()
    def step(self, closure=None):
        loss = _run_closure(closure)
        for group in self.param_groups:
            if group["kind"] == "adamw":
                self._adamw_step(group)
            else:
                self._muon_step(group)
        return loss


class DistMuonAdamW(MuonAdamW):
    """MuonAdamW over the ranks of a torchrun job, with no DDP wrapper and no gradient all-reduce by
    the trainer: step() reduce-scatters the gradients (each rank receives the mean of its share),
    updates its share with its share of the optimizer state, and all-gathers the updated weights.
    The update math is MuonAdamW's own kernels, so N ranks step exactly as one process does on the
    same total batch (tests/test_optim.py checks it on gloo).

    - Muon: a shape group's matrices are split whole among the ranks (rank r owns matrices
      r*c .. r*c+c-1, the stack padded with zeros to a multiple of the world): each rank
      orthogonalises 1/N of them (nanochat's DistMuonAdamW) and keeps only their momentum.
    - AdamW: each tensor is flattened and cut into N equal slices; each rank keeps the moments of its
      slice only (ZeRO stage 2, arXiv 1910.02054).

    state_dict() gathers the shares into MuonAdamW's single-process layout (a collective: every rank
    calls it) and load_state_dict() takes that layout and keeps this rank's share, so a checkpoint
    does not depend on the number of ranks. NCCL reduce-scatters; gloo (CPU) has no reduce-scatter,
    so there it is an all-reduce of which each rank keeps its slice: the same numbers, more bytes."""

    # the process group is read when the optimizer steps, not when it is built: train.setup builds
    # one per rank, and a test (or a tool) may build it without joining a group
    @property
    def rank(self) -> int:
        return torch.distributed.get_rank()

    @property
    def world(self) -> int:
        return torch.distributed.get_world_size()

    @property
    def _nccl(self) -> bool:
        return torch.distributed.get_backend() == "nccl"

    # ---- communication: tensors whose first dimension is a multiple of the world size. Each op is
    # started (async) and finished apart, so step() can keep many in flight.
    def _reduce_scatter_start(self, full):
        dist = torch.distributed
        if self._nccl:
            mine = torch.empty_like(full[:full.size(0) // self.world])
            return dist.reduce_scatter_tensor(mine, full, op=dist.ReduceOp.SUM, async_op=True), mine
        return dist.all_reduce(full, async_op=True), full  # gloo: no reduce-scatter

    def _reduce_scatter_finish(self, work, buf):
        """The mean over the ranks of this rank's share."""
        work.wait()
        mine = buf if self._nccl else buf.chunk(self.world)[self.rank].clone()
        return mine.div_(self.world)

    def _all_gather_start(self, mine):
        full = torch.empty((self.world * mine.size(0), *mine.shape[1:]), dtype=mine.dtype, device=mine.device)
        if self._nccl:
            return torch.distributed.all_gather_into_tensor(full, mine, async_op=True), full
        return torch.distributed.all_gather(list(full.chunk(self.world)), mine, async_op=True), full

    def _all_gather(self, mine):
        work, full = self._all_gather_start(mine)
        work.wait()
        return full

    def _padded(self, x, n):
        """x [n, ...] padded with zeros to [c * world, ...], c = ceil(n / world)."""
        c = -(-n // self.world)
        return torch.cat([x, x.new_zeros(c * self.world - n, *x.shape[1:])]) if c * self.world > n else x

    def comm_bytes_per_step(self, world: int | None = None) -> int:
        """Bytes one rank sends per step at `world` ranks (default: this job's) with NCCL's ring
        algorithms: (N - 1) / N of every gradient (reduce-scatter) and of every weight (all-gather),
        as padded to a multiple of N (Muon: whole matrices per rank; AdamW: flat slices)."""
        n = world or self.world
        total = 0
        for group in self.param_groups:
            ps = group["params"]
            if group["kind"] == "muon":
                total += 2 * -(-len(ps) // n) * n * ps[0].numel() * ps[0].element_size()
            else:
                total += sum(2 * -(-p.numel() // n) * n * p.element_size() for p in ps)
        return total * (n - 1) // n

    # ---- the step: every gradient's reduce-scatter is started at once; each group is updated as soon
    # as its share arrives and its weights' all-gather started at once; the weights are copied back as
    # the gathers land. Later groups' traffic overlaps earlier groups' updates (nanochat's order), at
    # the cost of holding every group's stacked gradients at the same time.
    @torch.no_grad()
    def step(self, closure=None):
        loss = _run_closure(closure)
        reducing = []  # (group, params, started reduce-scatter)
        for group in self.param_groups:
            if group["kind"] == "muon":
                params = group["params"]
                if all(p.grad is None for p in params):
                    continue
                grads = torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
                reducing.append((group, params, self._reduce_scatter_start(self._padded(grads, len(params)))))
            else:
                for p in group["params"]:
                    if p.grad is not None:
                        flat = self._padded(p.grad.reshape(-1), p.numel())
                        reducing.append((group, [p], self._reduce_scatter_start(flat)))
        gathering = []
        for group, params, started in reducing:
            grad = self._reduce_scatter_finish(*started)
            if group["kind"] == "muon":  # [c, *shape]: this rank's matrices, updated whole
                mine = self._padded(torch.stack(params), len(params)).chunk(self.world)[self.rank].clone()
                self._muon_apply(group, self.state[params[0]], grad, mine)
            else:  # this rank's slice of the flattened tensor
                p = params[0]
                mine = self._padded(p.detach().reshape(-1), p.numel()).chunk(self.world)[self.rank].clone()
                self._adamw_apply(group, self.state[p], mine, grad)
            gathering.append((group, params, self._all_gather_start(mine)))
        for group, params, (work, full) in gathering:
            work.wait()
            if group["kind"] == "muon":
                torch._foreach_copy_(params, list(full[:len(params)].unbind(0)))
            else:
                params[0].detach().copy_(full[:params[0].numel()].view_as(params[0]))
        return loss

    # ---- checkpoints in the single-process layout
    def state_dict(self):
        full = {}
        for group in self.param_groups:
            if group["kind"] == "muon":
                first = group["params"][0]
                if self.state[first]:
                    n = len(group["params"])
                    full[first] = {k: self._all_gather(v)[:n] for k, v in self.state[first].items()}
            else:
                for p in group["params"]:
                    if self.state[p]:
                        s = self.state[p]
                        full[p] = {"step": s["step"], **{k: self._all_gather(s[k])[:p.numel()].view_as(p)
                                                         for k in ("exp_avg", "exp_avg_sq")}}
        sharded, self.state = self.state, full
        try:
            return super().state_dict()
        finally:
            self.state = sharded

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)  # the full tensors, then each rank keeps its share
        for group in self.param_groups:
            if group["kind"] == "muon":
                s, n = self.state[group["params"][0]], len(group["params"])
                for k in ("momentum_buffer", "second_moment"):
                    if k in s:
                        s[k] = self._padded(s[k], n).chunk(self.world)[self.rank].clone()
            else:
                for p in group["params"]:
                    s = self.state[p]
                    for k in ("exp_avg", "exp_avg_sq"):
                        if k in s:
                            s[k] = self._padded(s[k].reshape(-1), p.numel()).chunk(self.world)[self.rank].clone()
