"""The training loss on a GPU: lm_head's matmul, then one Triton kernel that reads each row of
logits once and writes both its loss and its gradient. Per token: the cross-entropy of soft-capped
logits, -log softmax(cap * tanh(z / cap))[target], targets -1 scoring 0 (ops.softcap_cross_entropy
in a compiled GPU forward; compiled CPU and caps above 40 take ops.SoftcapCrossEntropy).

Why the gradient in the forward pass: the logits are the step's largest tensor ([N, vocab], 2.1 GB
a micro-batch at d8) and a separate backward kernel would read them a second time and recompute
every soft-capped score. Here one program per row computes the log-sum-exp and then, from the same
registers, dz = d loss / d z for an upstream gradient of 1; the backward only scales by the real
upstream gradient g, and does it on the narrow side of lm_head, where it is 16x cheaper at d8:
    dh = g * (dz @ W),   dW = dz^T @ (g * h)
(exact for any per-token g, since the scale is one number per row of dz). dz is kept for the
backward in place of the logits, which the kernel's output frees: the same memory.

The arithmetic for 16-bit logits: th = tanh(z / cap) from the GPU's one-instruction tanh
(PTX tanh.approx.f32), the capped score s = cap th, exp(s - cap) = 2^((th - 1) cap log2 e) and
d s / d z = 1 - th^2: two special-function operations per logit. The approximate tanh errs far
below the bf16 rounding of the logits it reads: against float64 the loss moved from 5e-6 to 1.2e-4
nats at most over 4,096 d8-sized rows (mean shift under 1e-5), dz stayed at its bf16 rounding (2e-3
of its largest value), and the kernel went 3.63 -> 2.92 ms a d8 micro-batch on an H200
(bench/loss_speed.py; bench/NOTES.md round 10).
val_bpb never sees it: evaluation runs eager in float32. Float32 logits keep exact float32 math:
tanh(u) = 1 - 2 r with r = 1 / (1 + e^(2u)), exp(s - cap) = e^(-2 cap r), 1 - tanh^2 = 4 r (1 - r)
with 1 - r taken as r e^(2u) where r > 1/2 (no cancellation); three special-function operations.

The log-sum-exp shifts by the cap rather than the row max: capped scores lie in (-cap, cap), so
exp(s - cap) >= exp(-2 cap) stays far from float32 underflow for cap <= 40, and one pass suffices.
Rows up to SINGLE_MAX logits stay in registers between the log-sum-exp and the gradient; longer
rows are read twice (the second time mostly from L2) and the scores recomputed.

Registers decide the speed (bench/NOTES.md rounds 5 and 10, bench/triton_registers.py): with 16-bit
logits the kernel keeps th and exp(s - cap) per logit, 64 registers a thread at 16 warps, so an SM
holds two rows and one row's loads overlap the other's math (the exact form needs 89: one row)."""
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
    _LOG2E = tl.constexpr(LOG2E)  # a jit function reads module globals only as constexprs

    @triton.jit
    def _scores(z, cap, APPROX: tl.constexpr):
        # (th, exp(s - cap), d s / d z) for capped scores s = cap th, th = tanh(z / cap)
        if APPROX:
            th = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [z * (1 / cap)],
                                           dtype=tl.float32, is_pure=True, pack=1)
            return th, tl.exp2((th - 1) * (cap * _LOG2E)), 1 - th * th
        x = tl.exp2(z * (2 * _LOG2E / cap))  # e^(2u); r = (1 - th) / 2
        r = 1 / (1 + x)
        return 1 - 2 * r, tl.exp2(r * (-2 * _LOG2E * cap)), 4 * r * tl.where(r < 0.5, 1 - r, r * x)

    @triton.jit
    def _grad(e, dsdz, inv_total, hit):
        return (e * inv_total - tl.where(hit, 1.0, 0.0)) * dsdz  # (softmax - onehot) * d s / d z

    @triton.jit
    def _softcap_ce_kernel(z_ptr, z_stride, dz_ptr, dz_stride, t_ptr, loss_ptr, V, cap,
                           BLOCK: tl.constexpr, SINGLE: tl.constexpr, APPROX: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        z_row, dz_row = z_ptr + row * z_stride, dz_ptr + row * dz_stride
        t = tl.load(t_ptr + row)
        counted = t >= 0
        if SINGLE:
            cols = tl.arange(0, BLOCK)
            ok = cols < V
            _, e, dsdz = _scores(tl.load(z_row + cols, mask=ok, other=0.0).to(tl.float32), cap, APPROX)
            total = tl.sum(tl.where(ok, e, 0.0), axis=0)
            dz = _grad(e, dsdz, 1 / total, cols == t)
            tl.store(dz_row + cols, tl.where(counted, dz, 0.0).to(dz_ptr.dtype.element_ty), mask=ok)
        else:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                _, e, _ = _scores(tl.load(z_row + cols, mask=cols < V, other=0.0).to(tl.float32), cap, APPROX)
                acc += tl.where(cols < V, e, 0.0)
            total = tl.sum(acc, axis=0)
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                _, e, dsdz = _scores(tl.load(z_row + cols, mask=cols < V, other=0.0).to(tl.float32), cap, APPROX)
                dz = _grad(e, dsdz, 1 / total, cols == t)
                tl.store(dz_row + cols, tl.where(counted, dz, 0.0).to(dz_ptr.dtype.element_ty), mask=cols < V)
        th_t, _, _ = _scores(tl.load(z_row + tl.where(counted, t, 0)).to(tl.float32), cap, APPROX)
        tl.store(loss_ptr + row, tl.where(counted, cap + tl.log(total) - cap * th_t, 0.0))


def _launch(logits, targets, cap):
    N, V = logits.shape
    loss = torch.empty(N, device=logits.device, dtype=torch.float32)
    dz = torch.empty_like(logits)
    single = V <= SINGLE_MAX
    _softcap_ce_kernel[(N,)](logits, logits.stride(0), dz, dz.stride(0), targets, loss, V, cap,
                             BLOCK=triton.next_power_of_2(V) if single else BLOCK, SINGLE=single,
                             APPROX=logits.element_size() == 2, num_warps=16 if single else 8)
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
