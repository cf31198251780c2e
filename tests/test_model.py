"""GPT: causality, RoPE, loss, KV cache == no cache, FLOP and parameter hand counts, the depth dial
and nanochat's scaling rules, the MLP slot, bf16 under autocast."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import llmlabs.model as model_module
from llmlabs.attention import KVCache
from llmlabs.common import LabError
from llmlabs.config import PRESETS, GPTConfig, config_for_depth
from llmlabs.scaling import hyperparams_for
from llmlabs.kernels import ops, triton_loss, triton_mlp, triton_rope_norm
from llmlabs.kernels.ops import apply_rope
from llmlabs.model import GPT, MLP, build_model, rope_tables


def tiny_config(**overrides):
    kw = dict(sequence_len=32, vocab_size=61, n_layer=4, n_embd=48, n_head=4, n_kv_head=2, head_dim=12,
              window_pattern="SSL", short_window=5)
    kw.update(overrides)
    return GPTConfig(**kw)


def randomized(model, seed=0):
    """A fresh model has zero output projections (every block starts as the identity), which would
    hide attention bugs: give every parameter random values of a sane scale instead."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = p.shape[-1] ** -0.5 if p.ndim >= 2 else 0.5
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)
    return model


def tokens(config, B, T, seed):
    return torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def test_build_model_initialises_everything_off_meta():
    config = tiny_config()
    model = build_model(config, "cpu")
    assert all(t.device.type == "cpu" for t in list(model.parameters()) + list(model.buffers()))
    torch.testing.assert_close(model.resid_lambdas, torch.linspace(1.15, 1.05, config.n_layer))
    torch.testing.assert_close(model.x0_lambdas, torch.linspace(0.20, 0.05, config.n_layer))
    assert all(b.attn.c_proj.weight.abs().sum() == 0 and b.mlp.c_proj.weight.abs().sum() == 0 for b in model.blocks)
    # value embeddings on alternating layers, always the last
    assert sorted(model.value_embeds.keys()) == ["1", "3"]
    # lm_head std 0.001 makes the first prediction nearly uniform: loss ~ ln(vocab)
    idx = tokens(config, 2, 32, seed=1)
    assert abs(model(idx, idx).item() - math.log(config.vocab_size)) < 0.02


def test_changing_a_token_never_changes_earlier_logits():
    config = tiny_config()
    model = randomized(build_model(config, "cpu")).double()
    idx = tokens(config, 2, 32, seed=2)
    with torch.no_grad():
        base = model(idx)
        for t in (0, 6, 19, 31):
            changed = idx.clone()
            changed[:, t] = (idx[:, t] + 1) % config.vocab_size
            logits = model(changed)
            if t:
                assert (logits[:, :t] - base[:, :t]).abs().max().item() < 1e-12
            assert (logits[:, t] - base[:, t]).abs().max().item() > 1e-6  # the change does reach t


def test_rope_preserves_norms_and_depends_only_on_relative_position():
    D, T = 16, 64
    cos, sin = rope_tables(T, D, base=100_000.0)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, T, 3, D, generator=g, dtype=torch.float64)
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))
    q, k = torch.randn(D, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)

    def score(m, n):  # <rope(q) at position m, rope(k) at position n>
        q_m = apply_rope(q.expand(1, T, 1, D), cos, sin)[0, m, 0]
        k_n = apply_rope(k.expand(1, T, 1, D), cos, sin)[0, n, 0]
        return (q_m @ k_n).item()

    for m, n, shift in ((5, 2, 11), (9, 9, 40), (3, 20, 7)):
        assert score(m, n) == pytest.approx(score(m + shift, n + shift), rel=1e-5, abs=1e-6)
    assert abs(score(5, 2) - score(5, 3)) > 1e-3  # and it does depend on the offset


def test_loss_is_masked_cross_entropy_of_softcapped_logits():
    config = tiny_config()
    model = randomized(build_model(config, "cpu"))
    idx, targets = tokens(config, 3, 32, seed=4), tokens(config, 3, 32, seed=5)
    targets[0, :7] = -1
    targets[2, 30:] = -1
    with torch.no_grad():
        logits = model(idx)
        per_token = model(idx, targets, loss_reduction="none")
        mean = model(idx, targets)
    assert logits.dtype == torch.float32 and logits.shape == (3, 32, config.vocab_size)
    assert logits.abs().max() < config.softcap
    logp = logits.double().log_softmax(-1)
    expected = torch.zeros(3, 32, dtype=torch.float64)
    for b in range(3):
        for t in range(32):
            if targets[b, t] != -1:
                expected[b, t] = -logp[b, t, targets[b, t]]
    torch.testing.assert_close(per_token.double(), expected, rtol=1e-5, atol=1e-6)
    assert mean.item() == pytest.approx(expected[targets != -1].mean().item(), rel=1e-5)


@pytest.mark.parametrize("dtype,cap", [(torch.float32, 15.0), (torch.bfloat16, 15.0), (torch.float32, 60.0)])
def test_fused_softcap_cross_entropy_matches_float64_autograd(dtype, cap):
    # logits up to ~4x the cap, so the tanh saturates for some and not others; every 5th target ignored;
    # cap 60 takes the max-shifted log-sum-exp, 15 the cap-shifted one
    g = torch.Generator().manual_seed(21)
    N, V = 40, 97
    z = (torch.randn(N, V, generator=g, dtype=torch.float64) * 1.3 * cap).to(dtype).requires_grad_(True)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::5] = -1
    upstream = torch.randn(N, generator=g, dtype=torch.float64)
    loss = ops.SoftcapCrossEntropy.apply(z, targets, cap)
    (loss.double() * upstream).sum().backward()
    z64 = z.detach().double().requires_grad_(True)
    ref = F.cross_entropy(cap * torch.tanh(z64 / cap), targets, ignore_index=-1, reduction="none")
    (ref * upstream).sum().backward()
    assert loss.dtype == torch.float32 and z.grad.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-3)
    torch.testing.assert_close(loss.double(), ref, **tol)
    torch.testing.assert_close(z.grad.double(), z64.grad, **tol)
    assert (loss[::5] == 0).all() and (z.grad[::5] == 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton loss kernel runs on a CUDA GPU")
@pytest.mark.parametrize("dtype,V", [(torch.float32, 97), (torch.bfloat16, 8192 + 7), (torch.bfloat16, 16384 + 5)])
def test_triton_lm_head_softcap_cross_entropy_matches_float64_autograd_on_cuda(dtype, V):
    # 8192 + 7: a ragged row held in registers; 16384 + 5: past SINGLE_MAX, the two-pass loop. Then
    # through a fullgraph compile with a mean, whose gradient arrives as an expanded (stride 0) tensor
    g = torch.Generator().manual_seed(26)
    N, C, cap = 37, 64, 15.0
    h = (torch.randn(N, C, generator=g, dtype=torch.float64) * 2).to(dtype).cuda().requires_grad_(True)
    w = (torch.randn(V, C, generator=g) * 0.5).cuda().requires_grad_(True)  # float32, as the model's
    targets = torch.randint(0, V, (N,), generator=g).cuda()
    targets[::5] = -1
    upstream = torch.randn(N, generator=g, dtype=torch.float64).cuda()
    assert triton_loss.usable(h, cap) and (V > triton_loss.SINGLE_MAX) == (V == 16384 + 5)
    h64, w64 = (t.detach().double().requires_grad_(True) for t in (h, w))

    def reference(reduction):
        z = h64 @ w64.to(dtype).double().t()  # the matmul's inputs rounded as the kernel sees them
        return F.cross_entropy(cap * torch.tanh(z / cap), targets, ignore_index=-1, reduction=reduction)

    tol = dict(rtol=1e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    loss = triton_loss.lm_head_softcap_cross_entropy(h, w, targets, cap)
    (loss.double() * upstream).sum().backward()
    ref = reference("none")
    (ref * upstream).sum().backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == dtype and w.grad.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, **tol)
    assert (loss[::5] == 0).all()
    for grad, grad64 in ((h.grad, h64.grad), (w.grad, w64.grad)):
        assert (grad.double() - grad64).norm() / grad64.norm() < (1e-5 if dtype == torch.float32 else 1e-2)
    h.grad = w.grad = h64.grad = w64.grad = None
    mean = torch.compile(lambda a, b: triton_loss.lm_head_softcap_cross_entropy(a, b, targets, cap).sum()
                         / (targets >= 0).sum(), fullgraph=True)(h, w)
    mean.backward()
    ref_mean = reference("mean")
    ref_mean.backward()
    torch.testing.assert_close(mean.double(), ref_mean, **tol)
    for grad, grad64 in ((h.grad, h64.grad), (w.grad, w64.grad)):
        assert (grad.double() - grad64).norm() / grad64.norm() < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton loss kernel runs on a CUDA GPU")
@pytest.mark.parametrize("V,scale", [(8192 + 7, 0.3), (8192 + 7, 1.3), (16384 + 5, 1.3)])
def test_triton_softcap_ce_kernel_on_bf16_logits_matches_float64(V, scale):
    # bf16 logits straight into the kernel (its approximate tanh), against float64 on the very same
    # logits: what is left is the kernel's own error, which the matmul's bf16 rounding hides in the
    # test above. Logits at 0.3x the cap (mostly unsaturated) and 1.3x (many saturated).
    g = torch.Generator().manual_seed(28)
    N, cap = 300, 15.0
    z = (torch.randn(N, V, generator=g, dtype=torch.float64) * scale * cap).bfloat16().cuda()
    targets = torch.randint(0, V, (N,), generator=g).cuda()
    targets[::7] = -1
    loss, dz = triton_loss._loss_and_grad(z, targets, cap)
    z64 = z.double().requires_grad_(True)
    ref = F.cross_entropy(cap * torch.tanh(z64 / cap), targets, ignore_index=-1, reduction="none")
    ref.sum().backward()
    assert (loss.double() - ref).abs().max() < 5e-4  # nats; bf16 rounding of z itself moves it ~1e-2
    assert (dz.double() - z64.grad).abs().max() < 2**-8 * z64.grad.abs().max()  # dz's own bf16 rounding
    assert (loss[::7] == 0).all() and (dz[::7] == 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton RoPE + QK-norm kernels run on a CUDA GPU")
@pytest.mark.parametrize("dtype,shape", [(torch.float32, (2, 37, 3, 16)), (torch.bfloat16, (2, 256, 4, 128))])
def test_triton_rope_norm_matches_float64_reference_on_cuda(dtype, shape):
    # 37 positions x 3 heads: a ragged last program; cos/sin sliced at an offset, as a KV cache would
    B, T, H, D = shape
    g = torch.Generator().manual_seed(27)
    x = (torch.randn(shape, generator=g) * 3).to(dtype).cuda().requires_grad_(True)
    cos, sin = (t[5:5 + T].cuda() for t in rope_tables(T + 9, D, 100000.0))
    upstream = torch.randn(shape, generator=g, dtype=torch.float64).cuda()
    assert triton_rope_norm.usable(x)
    for run in (lambda x: triton_rope_norm.rope_norm(x, cos, sin),
                torch.compile(lambda x: ops.rope_norm(x, cos, sin), fullgraph=True)):
        x.grad = None
        y = run(x)
        (y.double() * upstream).sum().backward()
        x64 = x.detach().double().requires_grad_(True)
        ref = F.rms_norm(apply_rope(x64, cos.double(), sin.double()), (D,), eps=torch.finfo(torch.float32).eps)
        (ref * upstream).sum().backward()
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        assert y.dtype == dtype and x.grad.dtype == dtype
        assert (y.double() - ref).norm() / ref.norm() < tol
        assert (x.grad.double() - x64.grad).norm() / x64.grad.norm() < tol


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton ReLU^2 matmuls run on a CUDA GPU")
@pytest.mark.parametrize("kernel,autotuned", [("pointer", "_matmul_kernel"), ("tma", "_tma_kernel")])
def test_every_config_of_each_triton_mlp_kernel_matches_float64_on_cuda(kernel, autotuned, monkeypatch):
    # autotuning would check only the config it picks, so each config runs alone. 40000 x 200
    # outputs: ragged row and column tiles, and more tiles than programs, so each persistent program
    # walks several. Both epilogues, both weight layouts. A config may not fit in shared memory for
    # one epilogue (autotuning skips it there), but each must run for at least one
    from triton.runtime.errors import OutOfResources
    g = torch.Generator().manual_seed(29)
    M, C, N = 40000, 128, 200
    x, dy = (torch.randn(M, C, generator=g).cuda().bfloat16() for _ in range(2))
    w1 = (torch.randn(N, C, generator=g) * C**-0.5).cuda().bfloat16()
    w2 = (torch.randn(C, N, generator=g) * C**-0.5).cuda().bfloat16()
    a = x.double() @ w1.double().t()
    h = F.relu(a).square().bfloat16()
    calls = (((x, w1, True, triton_mlp.RELU2, None), F.relu(a).square()),
             ((dy, w2, False, triton_mlp.TIMES_2SQRT, h), (dy.double() @ w2.double()) * 2 * h.double().sqrt()))
    tuner = getattr(triton_mlp, autotuned)
    for config in tuner.configs:
        monkeypatch.setattr(triton_mlp, autotuned, triton_mlp.triton.autotune([config], tuner.keys)(tuner.fn))
        ran = 0
        for args, theirs in calls:
            try:
                ours = triton_mlp.KERNELS[kernel](*args)
            except OutOfResources:
                continue
            ran += 1
            assert ours.shape == theirs.shape, config
            assert (ours.double() - theirs).norm() / theirs.norm() < 1e-2, config
        assert ran, f"{config} fits neither epilogue: drop it"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton ReLU^2 matmuls run on a CUDA GPU")
@pytest.mark.parametrize("shape", [(3, 37, 128), (2, 256, 512)])
def test_triton_relu2_mlp_matches_float64_reference_on_cuda(shape):
    # 3 x 37 rows: ragged row and column blocks; float32 weights and input under bf16 autocast, as
    # the model runs; then the compiled MLP module, which takes this path
    g = torch.Generator().manual_seed(28)
    B, T, C = shape
    x = torch.randn(shape, generator=g).cuda().requires_grad_(True)
    w_fc = (torch.randn(4 * C, C, generator=g) * C**-0.5).cuda().requires_grad_(True)
    w_proj = (torch.randn(C, 4 * C, generator=g) * (4 * C) ** -0.5).cuda().requires_grad_(True)
    upstream = torch.randn(B, T, C, generator=g, dtype=torch.float64).cuda()
    x64, fc64, proj64 = (t.detach().double().requires_grad_(True) for t in (x, w_fc, w_proj))
    ref = F.relu(x64 @ fc64.t()).square() @ proj64.t()
    (ref * upstream).sum().backward()
    mlp = model_module.MLP(GPTConfig(n_embd=C), 0).cuda()
    with torch.no_grad():
        mlp.c_fc.weight.copy_(w_fc)
        mlp.c_proj.weight.copy_(w_proj)
    compiled = torch.compile(mlp, fullgraph=True)
    for run, params in ((lambda x: triton_mlp.relu2_mlp(x, w_fc, w_proj), (w_fc, w_proj)),
                        (compiled, (mlp.c_fc.weight, mlp.c_proj.weight))):
        x.grad = None
        with torch.autocast("cuda", torch.bfloat16):
            assert triton_mlp.usable(x, w_fc)
            y = run(x)
        (y.double() * upstream).sum().backward()
        assert y.dtype == torch.bfloat16 and x.grad.dtype == params[0].grad.dtype == torch.float32
        for ours, theirs in ((y, ref), (x.grad, x64.grad), (params[0].grad, fc64.grad), (params[1].grad, proj64.grad)):
            assert (ours.double() - theirs).norm() / theirs.norm() < 1e-2
    with torch.profiler.profile() as prof, torch.autocast("cuda", torch.bfloat16):
        compiled(x)
    assert any("llmlabs::relu2_mlp" in e.name for e in prof.events())  # the compiled module took this path


def test_fused_softcap_cross_entropy_passes_gradcheck():
    g = torch.Generator().manual_seed(22)
    z = (torch.randn(6, 11, generator=g, dtype=torch.float64) * 8).requires_grad_(True)
    targets = torch.tensor([3, -1, 0, 10, 7, 3])
    assert torch.autograd.gradcheck(lambda x: ops.SoftcapCrossEntropy.apply(x, targets, 5.0), (z,))


def test_model_loss_gradients_equal_plain_cross_entropy():
    config = tiny_config()
    model = randomized(build_model(config, "cpu"), seed=23).double()
    idx, targets = tokens(config, 2, 32, seed=24), tokens(config, 2, 32, seed=25)
    targets[1, :9] = -1
    model(idx, targets).backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    F.cross_entropy(model(idx).flatten(0, 1), targets.flatten(), ignore_index=-1).backward()
    for a, (name, p) in zip(ours, model.named_parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-9, atol=1e-12, msg=name)
    with pytest.raises(LabError, match="loss_reduction='sum'"):
        model(idx, targets, loss_reduction="sum")


def test_compiled_loss_and_gradients_equal_eager():
    # the compiled forward takes the fused SoftcapCrossEntropy, eager takes F.cross_entropy: in
    # float32 (no autocast, so the residual stream stays float32 too) both must agree to rounding
    config = tiny_config()
    model = randomized(build_model(config, "cpu"), seed=26)
    idx, targets = tokens(config, 2, 32, seed=27), tokens(config, 2, 32, seed=28)
    targets[0, 3:11] = -1
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    loss = compiled(idx, targets)
    loss.backward()
    fused = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = model(idx, targets)
    eager.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for a, (name, p) in zip(fused, model.named_parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_kv_cache_logits_equal_full_forward():
    config = tiny_config()  # short window 5 and GQA: the cache must respect both
    model = randomized(build_model(config, "cpu"), seed=6)
    idx = tokens(config, 2, 15, seed=7)
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(2, 20, config, "cpu", torch.float32)
        pieces = [model(idx[:, :7], kv_cache=cache)]                      # prefill
        pieces += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(7, 12)]  # one token at a time
        pieces.append(model(idx[:, 12:15], kv_cache=cache))              # a chunk
    assert cache.pos == 15
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(LabError, match="KV cache overflow"):
        model(tokens(config, 2, 6, seed=8), kv_cache=cache)


def test_too_long_input_raises_lab_error():
    config = tiny_config()
    model = build_model(config, "cpu")
    with pytest.raises(LabError, match="sequence_len=32"):
        model(tokens(config, 1, 33, seed=9))


def test_flops_and_params_equal_a_hand_count():
    config = GPTConfig(sequence_len=8, vocab_size=50, n_layer=2, n_embd=32, n_head=2, n_kv_head=1, head_dim=16,
                       window_pattern="SL", short_window=2)
    with torch.device("meta"):
        model = GPT(config)
    # per layer: c_q 32x32 + c_k 16x32 + c_v 16x32 + c_proj 32x32 + MLP 2 x 32x128 = 11264;
    # the value-embedding gate (12 channels -> 1 kv head) only on layer 1; lm_head 50x32
    weights = 2 * 11264 + 12 + 1600
    assert model.num_params() == {"embedding": 1600, "value_embeds": 50 * 16, "block_matrices": 2 * 11264 + 12,
                                  "lm_head": 1600, "scalars": 4, "total": 1600 + 800 + 22540 + 1600 + 4}
    # attention, 12 * heads * head_dim = 384 FLOPs per (query, key) pair. Layer 0, window 2:
    # queries 0..7 see 1, 2, 3, 3, 3, 3, 3, 3 keys = 21; layer 1, full: 1 + ... + 8 = 36
    assert model.flops_per_token() == 6 * weights + 384 * (21 + 36) // 8
    # nanochat's estimate: window length for the windowed layer, T for the full one
    assert model.flops_per_token("nanochat") == 6 * weights + 384 * (2 + 8)
    with pytest.raises(LabError):
        model.flops_per_token("palm")


def test_attended_pairs_equal_a_loop_count():
    for T in (1, 7, 40):
        for window in (None, 0, 3, T - 1, 100):
            loop = sum(1 for t in range(T) for s in range(T) if s <= t and (window is None or t - s <= window))
            assert model_module.attended_pairs(T, window) == loop, (T, window)


def test_depth_dial_presets_and_validation():
    for depth, width, heads in ((4, 256, 2), (8, 512, 4), (12, 768, 6), (20, 1280, 10), (26, 1664, 13)):
        c = config_for_depth(depth)
        assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim) == (depth, width, heads, heads, 128)
    assert config_for_depth(5, aspect_ratio=60).n_embd == 384  # 300 rounded up to the head size
    assert set(PRESETS) >= {"d4", "d8", "d12", "d20", "d26"} and PRESETS["d12"] == 12
    # SSSL tiled over 8 layers, last one full, short = a quarter of 2048
    assert config_for_depth(8).window_sizes() == [512, 512, 512, None, 512, 512, 512, None]
    assert config_for_depth(3, window_pattern="L").window_sizes() == [None, None, None]
    for bad in (dict(window_pattern="SXL"), dict(n_head=4, n_kv_head=3), dict(head_dim=7), dict(short_window=0)):
        with pytest.raises(LabError):
            tiny_config(**bad)
    with pytest.raises(LabError, match="depth"):
        config_for_depth(0)


def test_hyperparams_follow_nanochat_rules():
    d12 = hyperparams_for(config_for_depth(12))  # the reference point itself
    assert d12["total_batch_size"] == 2**19
    assert (d12["matrix_lr"], d12["embedding_lr"], d12["unembedding_lr"], d12["scalar_lr"]) == (0.02, 0.3, 0.008, 0.5)
    assert d12["weight_decay"] == pytest.approx(0.28)
    # d20 by hand: scaling params (block matrices + lm_head) 20 x 12 x 1280^2 + 10 gates x 12 x 10
    # + 8192 x 1280 = 403,702,960; d12: 12 x 12 x 768^2 + 6 x 12 x 6 + 8192 x 768 = 91,226,544.
    # batch 2**19 x 4.4253^0.383 = 2**19.82 -> 2**20
    d20 = hyperparams_for(config_for_depth(20))
    assert d20["target_tokens"] == 12 * 403_702_960
    assert d20["total_batch_size"] == 2**20
    assert d20["matrix_lr"] == pytest.approx(0.02 * 2**0.5)
    assert d20["weight_decay"] == pytest.approx(0.28 * 2**0.5 * 91_226_544 / 403_702_960)


def test_bf16_autocast_reaches_attention_as_bf16(monkeypatch):
    seen, real = [], model_module.attention

    def spy(q, k, v, window, scale):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, window, scale)

    monkeypatch.setattr(model_module, "attention", spy)
    config = tiny_config()
    model = randomized(build_model(config, "cpu"))
    stream = []
    for block in model.blocks:  # what each block reads and writes: the residual stream
        block.register_forward_hook(lambda mod, args, out: stream.append((args[0].dtype, out.dtype)))
    idx = tokens(config, 2, 32, seed=10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(idx)
        loss = model(idx, idx)
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    assert seen and all(dtypes == (torch.bfloat16,) * 3 for dtypes in seen)
    # eager keeps the stream in float32 (it would round after every op); see the compiled test below
    assert stream and all(dtypes == (torch.float32,) * 2 for dtypes in stream)


def test_compiled_autocast_forward_keeps_the_residual_stream_in_bf16():
    # dynamo's graph only (no inductor): the inputs of the residual-stream norms ([B, T, n_embd], the
    # 3-D rms_norm calls; QK-norm is 4-D) are bf16 when compiled under autocast, float32 without it
    config = tiny_config()
    model = randomized(build_model(config, "cpu"))
    idx = tokens(config, 2, 32, seed=10)

    def stream_dtypes(autocast):
        found = []

        def backend(gm, example_inputs):
            for node in gm.graph.nodes:
                if node.op == "call_function" and "rms_norm" in str(node.target):
                    x = node.args[0].meta["example_value"]
                    if x.dim() == 3:
                        found.append(x.dtype)
            return gm.forward

        torch._dynamo.reset()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            torch.compile(model, backend=backend, fullgraph=True)(idx, idx)
        return found

    # per layer two norms, plus the embedding's and the final one; the embedding norm runs before the cast
    expected = 2 * config.n_layer + 1
    assert stream_dtypes(True)[1:] == [torch.bfloat16] * expected
    assert stream_dtypes(False) == [torch.float32] * (expected + 1)


def test_mlp_slot_takes_any_module():
    class GatedMLP(nn.Module):  # a different occupant: SwiGLU-like, 2x wide
        def __init__(self, config, layer_idx):
            super().__init__()
            self.up = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
            self.down = nn.Linear(2 * config.n_embd, config.n_embd, bias=False)

        def forward(self, x):
            a, b = self.up(x).chunk(2, dim=-1)
            return self.down(nn.functional.silu(a) * b)

        def init_weights(self):
            nn.init.normal_(self.up.weight, std=0.02)
            nn.init.zeros_(self.down.weight)

        def matmul_params_per_token(self):
            return self.up.weight.numel() + self.down.weight.numel()

    config = tiny_config()
    model = build_model(config, "cpu", mlp_factory=GatedMLP)
    dense = build_model(config, "cpu")
    assert all(isinstance(b.mlp, GatedMLP) for b in model.blocks) and isinstance(dense.blocks[0].mlp, MLP)
    per_layer_difference = 6 * (4 * 48 * 48 + 2 * 48 * 48) - 6 * (8 * 48 * 48)
    assert model.flops_per_token() - dense.flops_per_token() == config.n_layer * per_layer_difference
    loss = randomized(model)(tokens(config, 2, 32, seed=11), tokens(config, 2, 32, seed=12))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile on CUDA needs a GPU")
def test_fullgraph_compile_forward_backward_on_cuda():
    config = tiny_config(sequence_len=256, n_embd=128, n_head=2, n_kv_head=2, head_dim=64, short_window=64)
    model = build_model(config, "cuda")
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    idx = tokens(config, 2, 256, seed=13).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = compiled(idx, idx)
    loss.backward()
    assert torch.isfinite(loss)
