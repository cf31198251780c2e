"""RoPE then RMSNorm of q or k [B, T, H, D] as two Triton kernels (ops.rope_norm in a compiled GPU
forward; CPU and eager run the reference composite).

Forward: one pass over x, writing y = rmsnorm(rope(x)) in x's dtype and one float32 rstd per row.
A rotation keeps the norm, so the rstd comes from x directly. Backward: from the output y itself,
which the attention kernel keeps for its own backward anyway, plus the rstd, so x is not kept:
    du = rstd * (g - y * mean(g * y))          (RMSNorm's backward, arXiv 1910.07467)
    dx = rope^-1(du)                           (the inverse rotation, by the same angles)
Inductor's fused version of this backward (recomputing the forward from x) took ~2x its traffic on
an H200 (bench/NOTES.md round 3)."""
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds ship without Triton
    triton = None

ROWS = 16  # rows (one (b, t, h) each) per program
EPS = torch.finfo(torch.float32).eps  # what F.rms_norm uses for float32 math

if triton is not None:
    @triton.jit
    def _offsets(n_rows, T, H, D: tl.constexpr, ROWS: tl.constexpr):
        # this program's ROWS rows of x viewed as [B * T * H, D]: the first half-channels' offsets and
        # the rows' positions into the [T, D/2] cos/sin tables
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        j = tl.arange(0, D // 2)[None, :]
        at = rows.to(tl.int64)[:, None] * D + j
        pos = ((rows // H) % T)[:, None] * (D // 2) + j
        return rows, (rows < n_rows)[:, None], at, pos

    @triton.jit
    def _forward_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, rstd_ptr, n_rows, T, H, eps,
                        D: tl.constexpr, ROWS: tl.constexpr):
        rows, ok, at, pos = _offsets(n_rows, T, H, D, ROWS)
        x1 = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + at + D // 2, mask=ok, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + pos, mask=ok, other=0.0)
        s = tl.load(sin_ptr + pos, mask=ok, other=0.0)
        rstd = 1 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)
        r = rstd[:, None]
        tl.store(y_ptr + at, ((x1 * c - x2 * s) * r).to(y_ptr.dtype.element_ty), mask=ok)
        tl.store(y_ptr + at + D // 2, ((x1 * s + x2 * c) * r).to(y_ptr.dtype.element_ty), mask=ok)
        tl.store(rstd_ptr + rows, rstd, mask=rows < n_rows)

    @triton.jit
    def _backward_kernel(g_ptr, y_ptr, rstd_ptr, cos_ptr, sin_ptr, dx_ptr, n_rows, T, H,
                         D: tl.constexpr, ROWS: tl.constexpr):
        rows, ok, at, pos = _offsets(n_rows, T, H, D, ROWS)
        g1 = tl.load(g_ptr + at, mask=ok, other=0.0).to(tl.float32)
        g2 = tl.load(g_ptr + at + D // 2, mask=ok, other=0.0).to(tl.float32)
        y1 = tl.load(y_ptr + at, mask=ok, other=0.0).to(tl.float32)
        y2 = tl.load(y_ptr + at + D // 2, mask=ok, other=0.0).to(tl.float32)
        r = tl.load(rstd_ptr + rows, mask=rows < n_rows, other=0.0)[:, None]
        m = ((tl.sum(g1 * y1, axis=1) + tl.sum(g2 * y2, axis=1)) / D)[:, None]
        du1, du2 = r * (g1 - y1 * m), r * (g2 - y2 * m)
        c = tl.load(cos_ptr + pos, mask=ok, other=0.0)
        s = tl.load(sin_ptr + pos, mask=ok, other=0.0)
        tl.store(dx_ptr + at, (du1 * c + du2 * s).to(dx_ptr.dtype.element_ty), mask=ok)
        tl.store(dx_ptr + at + D // 2, (du2 * c - du1 * s).to(dx_ptr.dtype.element_ty), mask=ok)


def _grid(n_rows):
    return (triton.cdiv(n_rows, ROWS),)


def _launch_forward(x, cos, sin):
    B, T, H, D = x.shape
    y = torch.empty_like(x)
    rstd = torch.empty(B * T * H, device=x.device, dtype=torch.float32)
    _forward_kernel[_grid(B * T * H)](x, cos, sin, y, rstd, B * T * H, T, H, EPS, D=D, ROWS=ROWS, num_warps=4)
    return y, rstd


def _launch_backward(g, y, rstd, cos, sin):
    B, T, H, D = y.shape
    dx = torch.empty_like(y)
    _backward_kernel[_grid(B * T * H)](g, y, rstd, cos, sin, dx, B * T * H, T, H, D=D, ROWS=ROWS, num_warps=4)
    return dx


@torch.library.custom_op("llmlabs::rope_norm", mutates_args=(), device_types="cuda")
def _forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_forward(x, cos.contiguous(), sin.contiguous())


@_forward.register_fake
def _(x, cos, sin):
    B, T, H, _ = x.shape
    return torch.empty_like(x), x.new_empty(B * T * H, dtype=torch.float32)


@torch.library.custom_op("llmlabs::rope_norm_backward", mutates_args=(), device_types="cuda")
def _backward(g: torch.Tensor, y: torch.Tensor, rstd: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor) -> torch.Tensor:
    return _launch_backward(g.contiguous(), y, rstd, cos.contiguous(), sin.contiguous())


@_backward.register_fake
def _(g, y, rstd, cos, sin):
    return torch.empty_like(y)


def _setup_context(ctx, inputs, output):
    _, cos, sin = inputs
    ctx.save_for_backward(output[0], output[1], cos, sin)


def _grads(ctx, g, _drstd):
    y, rstd, cos, sin = ctx.saved_tensors
    return _backward(g, y, rstd, cos, sin), None, None


_forward.register_autograd(_grads, setup_context=_setup_context)


def usable(x) -> bool:
    """Contiguous CUDA q/k with an even, power-of-two head size, and Triton present."""
    D = x.size(-1)
    return triton is not None and x.is_cuda and x.is_contiguous() and D >= 4 and D & (D - 1) == 0


def rope_norm(x, cos, sin):
    """x [B, T, H, D], cos/sin [T, D/2] float32 -> rmsnorm(rope(x)) in x's dtype."""
    return _forward(x, cos, sin)[0]
