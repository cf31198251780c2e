"""The named ops: each formula's one definition in plain PyTorch (the reference), and the hand-written
kernel a compiled forward runs in its place where that kernel is usable (see kernels/__init__.py for
the contract). Eager runs the reference: evaluation, sampling, the CPU.

    op                                               reference                       compiled, on a GPU
    relu2_mlp(x, fc, proj)                           relu(x fc^T)^2 proj^T           triton_mlp (bf16 layers)
    rope_norm(x, cos, sin)                           norm(apply_rope(x, cos, sin))   triton_rope_norm
    softcap_logits(h, w_head, cap)                   softcap(h w_head^T, cap)        (the reference)
    softcap_cross_entropy(h, w_head, targets, cap)   cross-entropy of the above      triton_loss
                                                     (compiled CPU, caps over 40: SoftcapCrossEntropy)
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmlabs.kernels import triton_loss, triton_mlp, triton_rope_norm


def norm(x):
    """Parameter-free RMSNorm (arXiv 1910.07467) over the last dimension."""
    return F.rms_norm(x, (x.size(-1),))


def softcap(logits, cap: float):
    """tanh logit softcap (Gemma 2, arXiv 2408.00118): scores squashed into (-cap, cap)."""
    return cap * torch.tanh(logits / cap)


def apply_rope(x, cos, sin):
    """Rotate channel pairs (j, j + D/2) of x [B, T, H, D] by each position's angle (RoPE, arXiv
    2104.09864; cos/sin [T, D/2] from model.rope_tables, or [B, T, D/2] per row from
    model.mrope_tables). Done in at least float32 (bf16 rotations drift at long positions) and cast
    back; compile fuses it."""
    d, dtype = x.size(-1) // 2, torch.promote_types(x.dtype, torch.float32)
    x1, x2 = x[..., :d].to(dtype), x[..., d:].to(dtype)
    if cos.dim() == 2:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def _compute_dtype(x):
    t = x.device.type
    return torch.get_autocast_dtype(t) if torch.is_autocast_enabled(t) else x.dtype


def _linear(x, layer):
    return F.linear(x, layer) if isinstance(layer, torch.Tensor) else layer(x)


def relu2_mlp(x, fc, proj):
    """The ReLU^2 MLP (Primer, arXiv 2109.08668): relu(x fc^T)^2 proj^T for x [..., C], where fc and
    proj are weights ([4C, C], [C, 4C]) or the nn.Linear layers holding them. A layer is called, so a
    converted one (fp8.py's float8 layers) runs its own matmul; plain weights and plain nn.Linear
    layers compile, on a GPU, to the activation inside two Triton matmuls' epilogues (triton_mlp.py)."""
    w_fc, w_proj = (w if isinstance(w, torch.Tensor) else w.weight if type(w) is nn.Linear else None
                    for w in (fc, proj))
    if (torch.compiler.is_compiling() and w_fc is not None and w_proj is not None
            and triton_mlp.usable(x, w_fc)):
        return triton_mlp.relu2_mlp(x, w_fc, w_proj)
    return _linear(F.relu(_linear(x, fc)).square(), proj)


def rope_norm(x, cos, sin):
    """QK-norm (arXiv 2010.04245) after RoPE, in x's dtype (rms_norm runs in float32 under autocast:
    cast back so the attention kernel gets bf16 q/k). Compiled on a GPU: triton_rope_norm.py's two
    kernels, whose backward needs only the output and one rstd per row. Per-row (MRoPE) tables run the
    reference: the kernels read one [T, D/2] table."""
    if torch.compiler.is_compiling() and cos.dim() == 2 and triton_rope_norm.usable(x):
        return triton_rope_norm.rope_norm(x, cos, sin)
    return norm(apply_rope(x, cos, sin)).to(x.dtype)


def softcap_logits(h, w_head, cap: float):
    """Soft-capped logits h w_head^T: h [..., C], w_head [vocab, C] -> [..., vocab] in float32
    (float64 for float64 inputs): what evaluation and sampling read."""
    logits = F.linear(h, w_head)
    return softcap(logits.to(torch.promote_types(logits.dtype, torch.float32)), cap)


def softcap_cross_entropy(h, w_head, targets, cap: float):
    """Per-token cross-entropy of softcap_logits(h, w_head, cap), the training loss: h [..., C],
    targets [...] (-1 = ignored, scoring 0) -> loss shaped like targets, float32 (float64 for float64
    inputs). Compiled: on a GPU, lm_head's matmul then one Triton kernel that writes the loss and its
    gradient together (triton_loss.py); elsewhere SoftcapCrossEntropy. Eager runs the reference, since
    eager would run each op of the Function as a kernel of its own, while F.cross_entropy's are fused."""
    h2, flat = h.reshape(-1, h.size(-1)), targets.reshape(-1)
    if not torch.compiler.is_compiling():
        loss = F.cross_entropy(softcap_logits(h2, w_head, cap), flat, ignore_index=-1, reduction="none")
    elif triton_loss.usable(h, cap):
        # the matmul's dtype: rms_norm computes in float32 under autocast, and the kernel reads h as is
        loss = triton_loss.lm_head_softcap_cross_entropy(h2.to(_compute_dtype(h)), w_head, flat, cap)
    else:
        loss = SoftcapCrossEntropy.apply(F.linear(h2, w_head), flat, cap)
    return loss.view(targets.shape)


class SoftcapCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of soft-capped logits, -log softmax(cap * tanh(z / cap))[target],
    with targets -1 scoring 0. Written as one autograd Function so that both passes are single fused
    kernels under torch.compile: the forward reads the (bf16) logits z once for the log-sum-exp, the
    backward reads them once more and writes dz in z's dtype. F.cross_entropy on float32 logits would
    write and keep a float32 copy of the [N, vocab] scores (at d8, 4.3 GB per micro-batch).
    dz = (softmax - onehot) * (1 - tanh^2), the tanh recomputed from z.

    On a GPU triton_loss.py runs the same math in one hand-written kernel; this Function serves the
    compiled CPU path and caps above 40. Inductor's kernels for it were bound by arithmetic at vocab
    8192 (an H200 profile, bench/NOTES.md round 3), so softcap() is rewritten here with
    tanh(u) = 2 sigmoid(2u) - 1, where inductor's libdevice tanh costs dozens of instructions; and
    the log-sum-exp shifts by the cap instead of the row max, one pass instead of two. That is exact:
    capped scores lie in (-cap, cap), so exp(s - cap) lies in (exp(-2 cap), 1], far from float32's
    underflow for cap <= 40; larger caps take the max."""

    @staticmethod
    def _capped(z, cap):
        return cap * (2 * torch.sigmoid(z * (2 / cap)) - 1)

    @staticmethod
    def forward(ctx, logits, targets, cap: float):
        dtype = torch.promote_types(logits.dtype, torch.float32)  # math in float32 (float64 stays)
        s = SoftcapCrossEntropy._capped(logits.to(dtype), cap)
        if cap <= 40:
            lse = cap + torch.log(torch.exp(s - cap).sum(-1))
        else:
            lse = torch.logsumexp(s, dim=-1)
        counted = targets >= 0
        safe = torch.where(counted, targets, 0)
        picked = SoftcapCrossEntropy._capped(logits.gather(1, safe[:, None]).squeeze(1).to(dtype), cap)
        ctx.save_for_backward(logits, safe, counted, lse)
        ctx.cap = cap
        return torch.where(counted, lse - picked, 0.0)

    @staticmethod
    def backward(ctx, grad):
        logits, safe, counted, lse = ctx.saved_tensors
        s = SoftcapCrossEntropy._capped(logits.to(lse.dtype), ctx.cap)
        th = s * (1 / ctx.cap)  # inductor divides exactly (div_rn, many instructions); this multiplies
        probs = torch.exp(s - lse[:, None])
        hit = torch.arange(logits.size(1), device=logits.device) == safe[:, None]
        g = torch.where(counted, grad, 0.0)[:, None]
        return ((probs - hit.to(lse.dtype)) * (1 - th * th) * g).to(logits.dtype), None, None
