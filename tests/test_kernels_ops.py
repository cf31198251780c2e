"""The named ops (llmlabs/kernels/ops.py): each reference against a float64 computation written out
by hand, values and gradients; the dispatch, which reaches a kernel only through an op's call; and
the contract that what is trained is what is written: the training loss is the cross-entropy of the
logits evaluation reads, for the model as it is and for one whose MLP call was replaced. The
kernels themselves are checked against float64 on a GPU in tests/test_model.py."""
import pytest
import torch
import torch.nn.functional as F

import llmlabs.model as model_module
from llmlabs.kernels import ops, triton_loss, triton_mlp, triton_rope_norm
from llmlabs.model import build_model, rope_tables

from test_model import randomized, tiny_config


def leaves(*tensors):
    """float32 leaves and their float64 twins holding the same values."""
    ours = [t.detach().float().requires_grad_(True) for t in tensors]
    return ours, [t.detach().double().requires_grad_(True) for t in ours]


def assert_values_and_grads_close(y, y64, ours, theirs, rtol=1e-5, atol=1e-6):
    g = torch.Generator().manual_seed(99)
    upstream = torch.randn(y64.shape, generator=g, dtype=torch.float64)
    (y.double() * upstream).sum().backward()
    (y64 * upstream).sum().backward()
    torch.testing.assert_close(y.double(), y64, rtol=rtol, atol=atol)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=rtol, atol=atol)


def gelu_mlp(x, fc, proj):
    """What an experimenter writes in model.py in place of the relu2_mlp call (given the two layers)."""
    return proj(F.gelu(fc(x)))


def test_relu2_mlp_reference_equals_float64():
    g = torch.Generator().manual_seed(31)
    C = 16
    (x, w_fc, w_proj), (x64, fc64, proj64) = leaves(torch.randn(3, 5, C, generator=g),
                                                   torch.randn(4 * C, C, generator=g) * C**-0.5,
                                                   torch.randn(C, 4 * C, generator=g) * (4 * C) ** -0.5)
    a = (x64[..., None, :] * fc64).sum(-1)  # [3, 5, 4C], a dot product per output channel
    h = torch.where(a > 0, a * a, 0.0)
    y64 = (h[..., None, :] * proj64).sum(-1)
    assert_values_and_grads_close(ops.relu2_mlp(x, w_fc, w_proj), y64, (x, w_fc, w_proj), (x64, fc64, proj64))


def test_relu2_mlp_calls_layers_and_reads_plain_ones_as_weights(monkeypatch):
    # given nn.Linear layers it computes what it does from their weights; a subclass (fp8.py's float8
    # layers) is called, never bypassed by the Triton kernel, which gets plain layers' weights
    g = torch.Generator().manual_seed(38)
    fc, proj = torch.nn.Linear(16, 64, bias=False), torch.nn.Linear(64, 16, bias=False)
    x = torch.randn(2, 5, 16, generator=g)
    torch.testing.assert_close(ops.relu2_mlp(x, fc, proj), ops.relu2_mlp(x, fc.weight, proj.weight), rtol=0, atol=0)

    class Doubled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    doubled = Doubled(16, 64, bias=False)
    doubled.weight = fc.weight
    kernel_calls = []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(triton_mlp, "usable", lambda *args: True)
    monkeypatch.setattr(triton_mlp, "relu2_mlp", 
                        lambda x, w1, w2: kernel_calls.append((w1, w2)) or F.linear(F.relu(F.linear(x, w1)).square(), w2))
    torch.testing.assert_close(ops.relu2_mlp(x, doubled, proj), 4 * ops.relu2_mlp(x, fc, proj))
    assert len(kernel_calls) == 1 and kernel_calls[0][0] is fc.weight  # the plain pair only


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_norm_reference_equals_float64(dtype):
    # angles computed here in float64, from the formula; the op gets model.rope_tables' float32 tables
    g = torch.Generator().manual_seed(32)
    B, T, H, D, base = 2, 37, 3, 16, 100_000.0
    x = (torch.randn(B, T, H, D, generator=g) * 3).to(dtype).requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    cos, sin = rope_tables(T, D, base)
    j = torch.arange(D // 2, dtype=torch.float64)
    angle = (torch.arange(T, dtype=torch.float64)[:, None] * base ** (-2 * j / D))[None, :, None, :]
    x1, x2 = x64[..., :D // 2], x64[..., D // 2:]
    r = torch.cat([x1 * angle.cos() - x2 * angle.sin(), x1 * angle.sin() + x2 * angle.cos()], dim=-1)
    y64 = r / (r.square().mean(-1, keepdim=True) + torch.finfo(torch.float32).eps).sqrt()
    y = ops.rope_norm(x, cos, sin)
    assert y.dtype == dtype
    if dtype == torch.float32:
        assert_values_and_grads_close(y, y64, (x,), (x64,))
    else:  # float32 math inside, one rounding to bf16 at the end
        assert (y.double() - y64).abs().max() <= 2**-8 * y64.abs().max()


def test_softcap_logits_and_cross_entropy_references_equal_float64():
    g = torch.Generator().manual_seed(33)
    B, T, C, V, cap = 3, 7, 16, 29, 4.0  # a small cap, so the tanh saturates for some logits
    (h, w), (h64, w64) = leaves(torch.randn(B, T, C, generator=g), torch.randn(V, C, generator=g))
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :3] = targets[2, -1] = -1
    s = cap * torch.tanh((h64[..., None, :] * w64).sum(-1) / cap)  # [B, T, V]
    logits = ops.softcap_logits(h, w, cap)
    assert logits.dtype == torch.float32 and logits.shape == (B, T, V)
    assert_values_and_grads_close(logits, s, (h, w), (h64, w64))

    (h, w), (h64, w64) = leaves(h, w)
    s = cap * torch.tanh((h64[..., None, :] * w64).sum(-1) / cap)
    nll = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            if targets[b, t] >= 0:
                nll[b, t] = s[b, t].exp().sum().log() - s[b, t, targets[b, t]]
    loss = ops.softcap_cross_entropy(h, w, targets, cap)
    assert loss.dtype == torch.float32 and loss.shape == (B, T)
    assert_values_and_grads_close(loss, nll, (h, w), (h64, w64))
    assert (loss[0, :3] == 0).all() and loss[2, -1] == 0


def test_a_compiled_forward_reaches_each_kernel_only_through_its_named_op(monkeypatch):
    # A compiled GPU forward, simulated: is_compiling() true and every kernel usable, each kernel a
    # spy that records its call and runs the formula. The model as written reaches all three; once
    # its MLP call is replaced, the MLP kernel is never run, and the loss is unchanged in meaning.
    calls = []

    def spy(name, formula):
        def run(*args):
            calls.append(name)
            return formula(*args)
        return run

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    for kernel in (triton_mlp, triton_rope_norm, triton_loss):
        monkeypatch.setattr(kernel, "usable", lambda *args: True)
    monkeypatch.setattr(triton_mlp, "relu2_mlp", spy("mlp", lambda x, w1, w2: F.linear(F.relu(F.linear(x, w1)).square(), w2)))
    monkeypatch.setattr(triton_rope_norm, "rope_norm", spy("rope_norm", lambda x, c, s: ops.norm(ops.apply_rope(x, c, s))))
    monkeypatch.setattr(triton_loss, "lm_head_softcap_cross_entropy", spy(
        "loss", lambda h, w, t, cap: F.cross_entropy(ops.softcap(h @ w.t(), cap), t, ignore_index=-1, reduction="none")))
    config = tiny_config()
    model = randomized(build_model(config, "cpu"), seed=34)
    g = torch.Generator().manual_seed(35)
    idx, targets = (torch.randint(0, config.vocab_size, (2, 32), generator=g) for _ in range(2))

    def both_paths():
        calls.clear()
        loss = model(idx, targets, loss_reduction="none")
        seen = list(calls)
        with monkeypatch.context() as m:
            m.setattr(torch.compiler, "is_compiling", lambda: False)
            eager = model(idx, targets, loss_reduction="none")
        torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
        return seen

    seen = both_paths()
    assert seen.count("mlp") == config.n_layer and seen.count("rope_norm") == 2 * config.n_layer
    assert seen.count("loss") == 1
    monkeypatch.setattr(model_module, "relu2_mlp", gelu_mlp)
    seen = both_paths()
    assert "mlp" not in seen and seen.count("loss") == 1


def train_and_eval_losses(model, idx, targets, train_forward=None):
    """Per token: (the loss training computes, the cross-entropy of the logits evaluation reads)."""
    train = (model if train_forward is None else train_forward)(idx, targets, loss_reduction="none")
    with torch.no_grad():
        logits = model(idx)
    evaluated = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1, reduction="none")
    return train.detach(), evaluated.view(targets.shape)


def test_training_loss_is_the_cross_entropy_of_the_evaluated_logits(monkeypatch):
    # for the model as written and for one whose MLP call in model.py an experimenter replaced:
    # the edit reaches training and evaluation alike
    config = tiny_config()
    g = torch.Generator().manual_seed(36)
    idx, targets = (torch.randint(0, config.vocab_size, (2, 32), generator=g) for _ in range(2))
    targets[1, :5] = -1
    model = randomized(build_model(config, "cpu"), seed=37)
    train, evaluated = train_and_eval_losses(model, idx, targets)
    torch.testing.assert_close(train, evaluated, rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(model_module, "relu2_mlp", gelu_mlp)
    gelu_train, gelu_evaluated = train_and_eval_losses(model, idx, targets)
    torch.testing.assert_close(gelu_train, gelu_evaluated, rtol=1e-6, atol=1e-6)
    assert (gelu_train - train).abs().mean() > 0.1  # the replacement did change the model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled path's Triton kernels run on a CUDA GPU")
def test_compiled_training_loss_is_the_cross_entropy_of_the_evaluated_logits_on_cuda(monkeypatch):
    # Training compiled under bf16 autocast (Triton MLP, RoPE + QK-norm and loss kernels), evaluation
    # eager: per token the two agree to bf16 rounding, for the model as written and with its MLP call
    # replaced (which moves the per-token losses by ~0.4 on average), and the replaced model's
    # compiled step runs no MLP kernel (the profiler lists the custom ops it ran)
    config = tiny_config(sequence_len=256, n_embd=128, n_head=2, n_kv_head=2, head_dim=64, short_window=64)
    g = torch.Generator().manual_seed(38)
    idx, targets = (torch.randint(0, config.vocab_size, (2, 256), generator=g).cuda() for _ in range(2))
    targets[0, :40] = -1
    losses = {}
    for name in ("relu2", "gelu"):
        if name == "gelu":
            monkeypatch.setattr(model_module, "relu2_mlp", gelu_mlp)
        torch._dynamo.reset()
        model = randomized(build_model(config, "cuda"), seed=39)
        compiled = torch.compile(model, fullgraph=True, dynamic=False)
        with torch.autocast("cuda", torch.bfloat16):
            compiled(idx, targets, loss_reduction="none")  # compiles, outside the profile
            with torch.profiler.profile() as prof:
                train, evaluated = train_and_eval_losses(model, idx, targets, train_forward=compiled)
        ops_run = {e.name for e in prof.events() if e.name.startswith("llmlabs::")}
        assert ("llmlabs::relu2_mlp" in ops_run) == (name == "relu2"), ops_run
        assert {"llmlabs::rope_norm", "llmlabs::softcap_ce_with_grad"} <= ops_run, ops_run
        assert (train - evaluated).abs().mean() < 0.05, name
        losses[name] = evaluated
    assert (losses["relu2"] - losses["gelu"]).abs().mean() > 0.2
