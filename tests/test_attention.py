"""attention(): every backend this machine can run against a float64 loop reference (causal,
sliding windows, GQA), and the backend choice / forcing rules."""
import functools
import os
import subprocess
import sys

import pytest
import torch

from llmlabs import attention as attn
from llmlabs.kernels import cudnn_attention
from llmlabs.common import LabError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def visible(T, window):
    """Which key s each query t may see, by a plain loop: s <= t and at most `window` back."""
    mask = torch.zeros(T, T, dtype=torch.bool)
    for t in range(T):
        for s in range(T):
            mask[t, s] = s <= t and (window is None or t - s <= window)
    return mask


def reference(q, k, v, window, scale):
    """float64 softmax attention written out: scores, -inf where not visible, softmax, sum."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.size(2) // k.size(2)
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale
    scores = scores.masked_fill(~visible(q.size(1), window).to(q.device), float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)


def random_qkv(B, T, Hq, Hkv, D, seed, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad)
               for H in (Hq, Hkv, Hkv))
    return q, k, v


@pytest.fixture(autouse=True)
def restore_backend():
    yield
    attn.set_backend("auto")


# T=300 spans three 128-token flex blocks (and a ragged last one). On that grid, window 129 just
# reaches into the block two below the diagonal (smallest q - k there is 129), 255 makes the block
# one below exactly fully visible (largest q - k = 255) and 254 leaves it one pair short.
CASES = [(37, None, 4, 4), (37, 5, 4, 2), (300, None, 4, 1), (300, 5, 2, 2), (300, 129, 4, 2),
         (300, 255, 2, 1), (300, 254, 2, 2)]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager flex on CPU: fine
@pytest.mark.parametrize("backend", ["cpu", "flex"])
@pytest.mark.parametrize("T,window,Hq,Hkv", CASES)
def test_forward_matches_float64_reference(backend, T, window, Hq, Hkv):
    attn.set_backend(backend)
    q, k, v = random_qkv(2, T, Hq, Hkv, 16, seed=T + (window or 0) + Hkv)
    scale = 0.7 / 16**0.5
    with torch.no_grad():
        out = attn.attention(q, k, v, window, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), reference(q, k, v, window, scale), rtol=1e-5, atol=1e-5)
    kind = "full" if window is None else "window"
    assert attn.describe()[kind] == backend


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_compiled_flex_block_sparse_path_matches_float64_reference():
    # Eager flex applies the mask function to every block it visits, so only a compiled flex runs
    # the block-sparse kernel that trusts which blocks _block_mask calls full, partial or empty;
    # fullgraph=True also proves the flex path traces without a graph break.
    attn.set_backend("flex")
    compiled = torch.compile(attn.attention, fullgraph=True, dynamic=False)
    for T, window, Hq, Hkv in ((300, 254, 4, 2), (300, 129, 2, 2)):
        q, k, v = random_qkv(1, T, Hq, Hkv, 16, seed=window)
        with torch.no_grad():
            out = compiled(q, k, v, window)
        torch.testing.assert_close(out.double(), reference(q, k, v, window, 16**-0.5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,window,Hq,Hkv", CASES[:2] + CASES[-1:])
def test_cpu_backend_gradients_match_float64_reference(T, window, Hq, Hkv):
    # (FlexAttention has no backward on this CPU torch build; bench/gpu_check_attention.py checks
    # its gradients, and every other CUDA backend's, on a GPU)
    attn.set_backend("cpu")
    q, k, v = random_qkv(2, T, Hq, Hkv, 8, seed=7 * T, grad=True)
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
    (attn.attention(q, k, v, window).double() * dout).sum().backward()
    (reference(q64, k64, v64, window, 8**-0.5) * dout).sum().backward()
    for ours, ref in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(ours.grad.double(), ref.grad, rtol=1e-4, atol=1e-5)


def test_window_covering_the_whole_sequence_is_full_causal():
    attn.set_backend("cpu")
    q, k, v = random_qkv(1, 20, 2, 2, 8, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(attn.attention(q, k, v, window=19), attn.attention(q, k, v, window=None))
        # one position shorter is a real window: the first key drops out for the last query
        assert not torch.allclose(attn.attention(q, k, v, window=18), attn.attention(q, k, v, window=None))


def test_forcing_unavailable_or_unknown_backend_raises_lab_error():
    q, k, v = random_qkv(1, 8, 2, 2, 8, seed=4)
    for name in ("fa3", "cudnn", "flash", "sdpa-cudnn", "sdpa"):
        attn.set_backend(name)
        with pytest.raises(LabError, match="needs a CUDA GPU"):
            attn.attention(q, k, v)
    with pytest.raises(LabError, match="pick one of"):
        attn.set_backend("flash9")


def test_bad_shapes_raise_lab_error():
    q, k, v = random_qkv(1, 8, 3, 2, 8, seed=5)  # 3 query heads cannot share 2 kv heads
    with pytest.raises(LabError, match="multiple of Hkv"):
        attn.attention(q, k, v)


def test_environment_variable_is_validated_at_import():
    env = dict(os.environ, LLMLABS_ATTENTION="bogus", PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, "-c", "import llmlabs.attention"], env=env, capture_output=True,
                            text=True, cwd=REPO)
    assert result.returncode != 0 and "LLMLABS_ATTENTION='bogus'" in result.stderr


def test_describe_plans_for_a_device():
    assert attn.describe("cpu", torch.float32) == {"full": "cpu", "window": "cpu"}
    attn.set_backend("flex")
    assert attn.describe("cpu", torch.float32) == {"full": "flex", "window": "flex"}


def test_a_head_dim_off_the_multiples_of_8_plans_sdpa_and_refuses_fused_kernels():
    """cuDNN, flash and FA3 take head dims in multiples of 8: auto must not hand them a 12 (cuDNN raised
    "hidden_dim should be multiple of 8" mid-forward), and forcing one names the head dim."""
    assert attn.describe("cuda", torch.bfloat16, head_dim=12) == {"full": "sdpa", "window": "cpu"}
    for backend in ("cudnn", "sdpa-cudnn", "flash", "fa3"):
        attn.set_backend(backend)
        with pytest.raises(LabError, match="head dim that is a multiple of 8, the model's is 12"):
            attn.describe("cuda", torch.bfloat16, head_dim=12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA backends need a GPU")
@pytest.mark.parametrize("backend", ["sdpa-cudnn", "sdpa-flash", "cudnn", "flash", "flex", "fa3"])
def test_cuda_backends_match_float64_reference_in_bf16(backend):
    if backend == "fa3" and attn._load_fa3() is None:
        pytest.skip("FA3 is not importable here")  # reported by name in the pytest summary
    if backend == "cudnn" and cudnn_attention.cudnn is None:
        pytest.skip("cudnn-frontend is not installed (pip install nvidia-cudnn-frontend)")
    attn.set_backend(backend)
    for T, window, Hq, Hkv in CASES:
        q, k, v = (x.cuda().bfloat16().requires_grad_(True) for x in random_qkv(2, T, Hq, Hkv, 64, seed=T))
        q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
        dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(T), dtype=torch.float64).cuda()
        out = attn.attention(q, k, v, window)  # (sdpa-* hand windows to cudnn or flex)
        (out.double() * dout).sum().backward()
        ref = reference(q64, k64, v64, window, 64**-0.5)
        (ref * dout).sum().backward()
        for name, ours, theirs in (("out", out, ref), ("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad),
                                   ("dv", v.grad, v64.grad)):
            err = (ours.double() - theirs).norm() / theirs.norm()
            assert err < 2e-2, (backend, T, window, name, err.item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA backends need a GPU")
def test_cuda_auto_runs_a_head_dim_of_12_against_float64():
    for T, window, Hq, Hkv in CASES:
        q, k, v = (x.cuda().bfloat16() for x in random_qkv(2, T, Hq, Hkv, 12, seed=T))
        ref = reference(*(x.double() for x in (q, k, v)), window, 12**-0.5)
        err = (attn.attention(q, k, v, window).double() - ref).norm() / ref.norm()
        assert err < 2e-2, (T, window, err.item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cuDNN backend needs a GPU")
def test_cuda_cudnn_probe_passes_where_the_frontend_imports():
    """On Hopper with cudnn-frontend installed the window graphs build: usable() False here means
    the probe itself broke and every window layer would silently fall back to flex."""
    if cudnn_attention.cudnn is None:
        pytest.skip("cudnn-frontend is not installed (pip install nvidia-cudnn-frontend)")
    assert cudnn_attention.usable(torch.bfloat16) and cudnn_attention.usable(torch.float16)
    if attn._load_fa3() is None:  # auto prefers FA3 where it imports
        assert attn.describe("cuda", torch.bfloat16)["window"] == "cudnn"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cuDNN backend needs a GPU")
def test_cuda_cudnn_attention_reads_views_into_one_qkv_buffer():
    """q, k and v as views into one [B, T, (Hq + 2 Hkv) * D] buffer, as a single q/k/v matmul leaves
    them (not dense: rows lie (Hq + 2 Hkv) * D apart). Outputs and gradients are allocated dense;
    cuDNN must be told their own strides, not the inputs' (it wrote out of bounds before)."""
    if cudnn_attention.cudnn is None:
        pytest.skip("cudnn-frontend is not installed (pip install nvidia-cudnn-frontend)")
    attn.set_backend("cudnn")
    B, T, Hq, Hkv, D, window = 2, 300, 4, 2, 64, 77
    g = torch.Generator().manual_seed(31)
    buf = torch.randn(B, T, (Hq + 2 * Hkv) * D, generator=g).cuda().bfloat16().requires_grad_(True)
    q, k, v = (x.view(B, T, -1, D) for x in buf.split((Hq * D, Hkv * D, Hkv * D), -1))
    assert not v.is_contiguous()
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    dout = torch.randn(B, T, Hq, D, generator=g, dtype=torch.float64).cuda()
    out = attn.attention(q, k, v, window)
    (out.double() * dout).sum().backward()
    ref = reference(q64, k64, v64, window, D**-0.5)
    (ref * dout).sum().backward()
    grads = buf.grad.split((Hq * D, Hkv * D, Hkv * D), -1)
    for name, ours, theirs in (("out", out, ref), ("dq", grads[0], q64.grad), ("dk", grads[1], k64.grad),
                               ("dv", grads[2], v64.grad)):
        theirs = theirs.reshape(ours.shape)
        assert (ours.double() - theirs).norm() / theirs.norm() < 2e-2, name
