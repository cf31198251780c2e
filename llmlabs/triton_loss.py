"""The training loss on a GPU as two Triton kernels: per-token cross-entropy of soft-capped logits,
-log softmax(cap * tanh(z / cap))[target], targets -1 scoring 0 (the math of model.py's
SoftcapCrossEntropy, which compiled CPU runs and caps above 40 use).

One program per row of the [N, vocab] bf16 logits. The forward reads the row once and writes its
log-sum-exp and loss; the backward reads it once more and writes dz in z's dtype. Inductor's fused
version of the same math ran at 2x (forward) and 1.9x (backward) the time of its memory traffic on
an H200 (bench/NOTES.md round 3): it was bound by arithmetic. Here each logit costs three
special-function operations (two exp2 and one reciprocal): tanh(u) = 1 - 2 / (1 + e^(2u)), and the
log-sum-exp shifts by the cap rather than the row max (capped scores lie in (-cap, cap), so
exp(s - cap) >= exp(-2 cap) stays far from float32 underflow for cap <= 40), one pass, no max."""
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds ship without Triton
    triton = None

BLOCK = 4096  # logits per loop step of one row: 16 per thread at 8 warps
MAX_CAP = 40.0

if triton is not None:
    @triton.jit
    def _capped(z, cap, two_over_cap):
        # cap * tanh(z / cap) = cap - 2 cap / (1 + e^(2 z / cap)); e^x saturates to inf, giving cap
        return cap - 2 * cap / (1 + tl.exp2(z * (two_over_cap * 1.4426950408889634)))

    @triton.jit
    def _forward_kernel(z_ptr, z_stride, t_ptr, lse_ptr, loss_ptr, V, cap, two_over_cap,
                        BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * z_stride
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(z_row + cols, mask=cols < V, other=0.0).to(tl.float32)
            s = _capped(z, cap, two_over_cap)
            acc += tl.where(cols < V, tl.exp2((s - cap) * 1.4426950408889634), 0.0)
        lse = cap + tl.log(tl.sum(acc, axis=0))
        t = tl.load(t_ptr + row)
        picked = _capped(tl.load(z_row + tl.where(t >= 0, t, 0)).to(tl.float32), cap, two_over_cap)
        tl.store(lse_ptr + row, lse)
        tl.store(loss_ptr + row, tl.where(t >= 0, lse - picked, 0.0))

    @triton.jit
    def _backward_kernel(z_ptr, z_stride, dz_ptr, dz_stride, t_ptr, lse_ptr, g_ptr, V, cap, two_over_cap,
                         BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        t = tl.load(t_ptr + row)
        g = tl.where(t >= 0, tl.load(g_ptr + row), 0.0)
        lse = tl.load(lse_ptr + row)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(z_ptr + row * z_stride + cols, mask=cols < V, other=0.0).to(tl.float32)
            s = _capped(z, cap, two_over_cap)
            th = s * (two_over_cap * 0.5)
            p = tl.exp2((s - lse) * 1.4426950408889634)
            dz = (p - tl.where(cols == t, 1.0, 0.0)) * (1 - th * th) * g
            tl.store(dz_ptr + row * dz_stride + cols, dz.to(dz_ptr.dtype.element_ty), mask=cols < V)


def _launch_forward(logits, targets, cap):
    N, V = logits.shape
    lse = torch.empty(N, device=logits.device, dtype=torch.float32)
    loss = torch.empty_like(lse)
    _forward_kernel[(N,)](logits, logits.stride(0), targets, lse, loss, V, cap, 2 / cap, BLOCK=BLOCK, num_warps=8)
    return loss, lse


def _launch_backward(grad, logits, targets, lse, cap):
    N, V = logits.shape
    dz = torch.empty_like(logits)
    _backward_kernel[(N,)](logits, logits.stride(0), dz, dz.stride(0), targets, lse, grad, V, cap, 2 / cap,
                           BLOCK=BLOCK, num_warps=8)
    return dz


@torch.library.custom_op("llmlabs::softcap_ce", mutates_args=(), device_types="cuda")
def _forward(logits: torch.Tensor, targets: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_forward(logits, targets.contiguous(), cap)


@_forward.register_fake
def _(logits, targets, cap):
    return logits.new_empty(logits.size(0), dtype=torch.float32), logits.new_empty(logits.size(0), dtype=torch.float32)


@torch.library.custom_op("llmlabs::softcap_ce_backward", mutates_args=(), device_types="cuda")
def _backward(grad: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
              cap: float) -> torch.Tensor:
    # the gradient of a mean arrives as an expanded scalar (stride 0): the kernel reads one per row
    return _launch_backward(grad.contiguous(), logits, targets.contiguous(), lse, cap)


@_backward.register_fake
def _(grad, logits, targets, lse, cap):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, targets, cap = inputs
    ctx.save_for_backward(logits, targets, output[1])
    ctx.cap = cap


def _grads(ctx, grad, _dlse):
    logits, targets, lse = ctx.saved_tensors
    return _backward(grad, logits, targets, lse, ctx.cap), None, None


_forward.register_autograd(_grads, setup_context=_setup_context)


def usable(logits, cap: float) -> bool:
    """CUDA logits with unit stride along the vocab, Triton present, and a cap the one-pass
    log-sum-exp handles."""
    return triton is not None and logits.is_cuda and logits.stride(-1) == 1 and cap <= MAX_CAP


def softcap_cross_entropy(logits, targets, cap: float):
    """logits [N, vocab] (bf16/fp16/fp32, CUDA), targets [N] int64 (-1 = ignored) -> loss [N] float32."""
    return _forward(logits, targets, cap)[0]
