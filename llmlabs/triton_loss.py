"""The training loss on a GPU: lm_head's matmul, then one Triton kernel that reads each row of
logits once and writes both its loss and its gradient. Per token: the cross-entropy of soft-capped
logits, -log softmax(cap * tanh(z / cap))[target], targets -1 scoring 0 (the math of model.py's
SoftcapCrossEntropy, which compiled CPU runs and caps above 40 use).

Why the gradient in the forward pass: the logits are the step's largest tensor ([N, vocab], 2.1 GB
a micro-batch at d8) and a separate backward kernel would read them a second time and recompute
every soft-capped score. Here one program per row computes the log-sum-exp and then, from the same
registers, dz = d loss / d z for an upstream gradient of 1; the backward only scales by the real
upstream gradient g, and does it on the narrow side of lm_head, where it is 16x cheaper at d8:
    dh = g * (dz @ W),   dW = dz^T @ (g * h)
(exact for any per-token g, since the scale is one number per row of dz). dz is kept for the
backward in place of the logits, which the kernel's output frees: the same memory.

The arithmetic: tanh(u) = 1 - 2 r with r = 1 / (1 + e^(2u)), so the capped score is s = cap (1 - 2r),
exp(s - cap) = e^(-2 cap r) and 1 - tanh^2 = 4 r (1 - r), with 1 - r taken as r e^(2u) where
r > 1/2 (no cancellation). Three special-function operations per logit (two exp2, one
reciprocal). The log-sum-exp shifts by the cap rather than the row max: capped scores lie in
(-cap, cap), so exp(s - cap) >= exp(-2 cap) stays far from float32 underflow for cap <= 40, and
one pass suffices. Rows up to SINGLE_MAX logits stay in registers between the log-sum-exp and the
gradient; longer rows are read twice (the second time mostly from L2) and the scores recomputed.

Measured on an H200 (bench/NOTES.md round 5): 2.05 ms per d8 micro-batch, about what the two
kernels before it took (0.99 ms forward + 1.12 ms backward), not the ~1.0 ms its traffic needs: at
89 registers a thread (16 warps) an SM holds one row at a time, and its load, reduction and store
run one after another (bench/triton_registers.py)."""
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds ship without Triton
    triton = None

MAX_CAP = 40.0
SINGLE_MAX = 16384  # a row of up to this many logits is held in registers (32 per thread at 16 warps)
BLOCK = 4096        # logits per loop step of a longer row
LOG2E = 1.4426950408889634

if triton is not None:
    @triton.jit
    def _scores(z, k_u, k_r):
        # r = (1 - tanh(z / cap)) / 2, x = e^(2 z / cap); e = exp(s - cap) with s = cap (1 - 2r)
        x = tl.exp2(z * k_u)
        r = 1 / (1 + x)
        return x, r, tl.exp2(-k_r * r)

    @triton.jit
    def _grad(x, r, e, inv_total, hit):
        # (softmax - onehot) * d s / d z; 1 - tanh^2 = 4 r (1 - r), 1 - r = r x where r > 1/2
        return (e * inv_total - tl.where(hit, 1.0, 0.0)) * (4 * r * tl.where(r < 0.5, 1 - r, r * x))

    @triton.jit
    def _softcap_ce_kernel(z_ptr, z_stride, dz_ptr, dz_stride, t_ptr, loss_ptr, V, cap, k_u, k_r,
                           BLOCK: tl.constexpr, SINGLE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        z_row, dz_row = z_ptr + row * z_stride, dz_ptr + row * dz_stride
        t = tl.load(t_ptr + row)
        counted = t >= 0
        if SINGLE:
            cols = tl.arange(0, BLOCK)
            ok = cols < V
            x, r, e = _scores(tl.load(z_row + cols, mask=ok, other=0.0).to(tl.float32), k_u, k_r)
            total = tl.sum(tl.where(ok, e, 0.0), axis=0)
            dz = _grad(x, r, e, 1 / total, cols == t)
            tl.store(dz_row + cols, tl.where(counted, dz, 0.0).to(dz_ptr.dtype.element_ty), mask=ok)
        else:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                _, _, e = _scores(tl.load(z_row + cols, mask=cols < V, other=0.0).to(tl.float32), k_u, k_r)
                acc += tl.where(cols < V, e, 0.0)
            total = tl.sum(acc, axis=0)
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                x, r, e = _scores(tl.load(z_row + cols, mask=cols < V, other=0.0).to(tl.float32), k_u, k_r)
                dz = _grad(x, r, e, 1 / total, cols == t)
                tl.store(dz_row + cols, tl.where(counted, dz, 0.0).to(dz_ptr.dtype.element_ty), mask=cols < V)
        _, r_t, _ = _scores(tl.load(z_row + tl.where(counted, t, 0)).to(tl.float32), k_u, k_r)
        tl.store(loss_ptr + row, tl.where(counted, cap + tl.log(total) - cap * (1 - 2 * r_t), 0.0))


def _launch(logits, targets, cap):
    N, V = logits.shape
    loss = torch.empty(N, device=logits.device, dtype=torch.float32)
    dz = torch.empty_like(logits)
    single = V <= SINGLE_MAX
    _softcap_ce_kernel[(N,)](logits, logits.stride(0), dz, dz.stride(0), targets, loss, V, cap,
                             2 / cap * LOG2E, 2 * cap * LOG2E, BLOCK=triton.next_power_of_2(V) if single else BLOCK,
                             SINGLE=single, num_warps=16 if single else 8)
    return loss, dz


@torch.library.custom_op("llmlabs::softcap_ce_with_grad", mutates_args=(), device_types="cuda")
def _loss_and_grad(logits: torch.Tensor, targets: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(logits, targets.contiguous(), cap)


@_loss_and_grad.register_fake
def _(logits, targets, cap):
    return logits.new_empty(logits.size(0), dtype=torch.float32), torch.empty_like(logits)


class LMHeadSoftcapCrossEntropy(torch.autograd.Function):
    """loss [N] float32 = softcap cross-entropy of h @ W^T; h [N, C] in the matmul dtype, W [vocab, C]
    (the float32 master weight: cast here, as autocast would)."""

    @staticmethod
    def forward(ctx, h, weight, targets, cap: float):
        loss, dz = _loss_and_grad(h @ weight.to(h.dtype).t(), targets, cap)
        ctx.save_for_backward(h, weight, dz)
        return loss

    @staticmethod
    def backward(ctx, g):
        h, weight, dz = ctx.saved_tensors
        g = g[:, None]  # the gradient of a mean arrives as an expanded scalar: one value per row
        dh = ((dz @ weight.to(dz.dtype)) * g).to(h.dtype)
        dw = (dz.t() @ (h * g).to(dz.dtype)).to(weight.dtype)
        return dh, dw, None, None


def usable(h, cap: float) -> bool:
    """CUDA activations, Triton present, and a cap the one-pass log-sum-exp handles."""
    return triton is not None and h.is_cuda and cap <= MAX_CAP


def lm_head_softcap_cross_entropy(h, weight, targets, cap: float):
    """h [N, C] (CUDA), weight [vocab, C], targets [N] int64 (-1 = ignored) -> loss [N] float32."""
    return LMHeadSoftcapCrossEntropy.apply(h, weight, targets, cap)
