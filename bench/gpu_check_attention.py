"""GPU correctness check for every CUDA attention backend (run on an H100 by the lead):

    PYTHONPATH=. python3 bench/gpu_check_attention.py

1. For sdpa-cudnn, sdpa-flash, cudnn, flash, flex and fa3 (when importable): bf16 outputs AND gradients of
   attention() against a float64 reference (dense masked softmax), causal, sliding windows and GQA.
   Error = ||x - ref|| / ||ref|| (Frobenius); pass: output < 1e-2, gradients < 2e-2.
   (sdpa-* hand windowed layers to cudnn or flex, so they are checked on full layers only.)
2. For each backend: torch.compile(model, fullgraph=True) forward + backward of a small GPT under
   bf16 autocast (fullgraph: any graph break is an error), loss compared with the eager model.
Prints a table last; exits 1 if anything failed."""
import sys
import time

import torch

from llmlabs import attention as attn
from llmlabs.kernels import cudnn_attention
from llmlabs.config import GPTConfig
from llmlabs.model import build_model

# (T, window, Hq, Hkv): MHA and GQA, a ragged length (1000 is not a multiple of the 128 tiles),
# nanochat's short window (512 at 2048) and one ending exactly on a flex block edge (255)
CASES = [(2048, None, 8, 8), (2048, None, 8, 2), (1000, None, 4, 1), (2048, 512, 8, 2), (1000, 255, 4, 4)]
OUT_TOL, GRAD_TOL = 1e-2, 2e-2


def reference(q, k, v, window, scale):
    q, k, v = q.double(), k.double(), v.double()
    rep = q.size(2) // k.size(2)
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    T = q.size(1)
    pos = torch.arange(T, device=q.device)
    visible = (pos[None, :] <= pos[:, None]) & ((pos[:, None] - pos[None, :] <= window) if window else True)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale
    return torch.einsum("bhts,bshd->bthd", scores.masked_fill(~visible, float("-inf")).softmax(-1), v)


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def check_kernel(backend, T, window, Hq, Hkv, D=128, B=2):
    g = torch.Generator(device="cuda").manual_seed(T + Hq + Hkv + (window or 0))
    q, k, v = (torch.randn(B, T, H, D, device="cuda", generator=g) for H in (Hq, Hkv, Hkv))
    dout = torch.randn(B, T, Hq, D, device="cuda", generator=g)
    qb, kb, vb = (x.bfloat16().requires_grad_(True) for x in (q, k, v))
    q64, k64, v64 = (x.double().requires_grad_(True) for x in (qb.detach(), kb.detach(), vb.detach()))
    scale = 1.44 / D**0.5  # the model's QK-norm gain
    out = attn.attention(qb, kb, vb, window, scale)
    (out.float() * dout).sum().backward()
    ref = reference(q64, k64, v64, window, scale)
    (ref * dout.double()).sum().backward()
    errors = [rel_err(out, ref)] + [rel_err(x.grad, r.grad) for x, r in ((qb, q64), (kb, k64), (vb, v64))]
    used = attn.describe()["full" if window is None or window >= T - 1 else "window"]
    ok = errors[0] < OUT_TOL and max(errors[1:]) < GRAD_TOL
    return ok, used, errors


def check_compile(backend):
    config = GPTConfig(sequence_len=1024, vocab_size=8192, n_layer=4, n_embd=512, n_head=4, n_kv_head=2,
                       head_dim=128, window_pattern="SSSL", short_window=256)
    torch.manual_seed(0)
    model = build_model(config, "cuda")
    with torch.no_grad():  # nonzero output projections, so attention shapes the loss and gradients
        for block in model.blocks:
            block.attn.c_proj.weight.normal_(std=0.02)
            block.mlp.c_proj.weight.normal_(std=0.02)
    idx = torch.randint(0, config.vocab_size, (4, 1024), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model(idx, idx).item()
    torch._dynamo.reset()  # the backend is baked into a traced graph: trace afresh for each one
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    t0 = time.time()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = compiled(idx, idx)
    loss.backward()
    torch.cuda.synchronize()
    grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    ok = grads_finite and abs(loss.item() - eager) < 1e-2 * abs(eager)
    return ok, f"loss {loss.item():.4f} (eager {eager:.4f}), compile+step {time.time() - t0:.0f}s"


def main():
    if not torch.cuda.is_available():
        print("error: this check needs a CUDA GPU (run it on the H100)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    torch._dynamo.config.recompile_limit = 64  # each case is a new shape for the eagerly compiled flex
    backends = (["sdpa-cudnn", "sdpa-flash"] + (["cudnn"] if cudnn_attention.usable(torch.bfloat16) else [])
                + ["flash", "flex"] + (["fa3"] if attn._load_fa3() is not None else []))
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  backends: {', '.join(backends)}")
    rows, failures = [], 0
    for backend in backends:
        attn.set_backend(backend)
        for T, window, Hq, Hkv in CASES:
            if window is not None and backend.startswith("sdpa"):
                continue
            try:
                ok, used, errors = check_kernel(backend, T, window, Hq, Hkv)
                detail = "out {:.1e}  dq {:.1e}  dk {:.1e}  dv {:.1e}".format(*errors)
            except Exception as e:  # a kernel that refuses an input is a finding, not a crash
                ok, used, detail = False, "-", f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"
            failures += not ok
            rows.append((backend, f"T={T} w={window} H={Hq}/{Hkv}", used, "ok" if ok else "FAIL", detail))
        try:
            ok, detail = check_compile(backend)
        except Exception as e:
            ok, detail = False, f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"
        failures += not ok
        rows.append((backend, "compile fullgraph fwd+bwd", str(attn.describe()), "ok" if ok else "FAIL", detail))
    print()
    print(f"{'backend':<11} {'case':<26} {'used':<36} {'result':<6} detail")
    for row in rows:
        print(f"{row[0]:<11} {row[1]:<26} {row[2]:<36} {row[3]:<6} {row[4]}")
    print(f"\n{len(rows) - failures}/{len(rows)} checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
