"""Mixture-of-Experts (llmlabs/moe.py): the dense limit, the two dispatch paths against each other,
routing and gates by hand, balancing, counters that evaluation never touches, Muon per expert, the
model, generation, training, checkpoints and resume."""
import json
import os

import pytest
from conftest import bench_script, sigint_after
import torch

from llmlabs import checkpoint, train
from llmlabs import moe as moe_mod
from llmlabs.common import LabError
from llmlabs.config import GPTConfig
from llmlabs.engine import generate
from llmlabs.model import MLP, build_model
from llmlabs.moe import MoE
from llmlabs.optim import MuonAdamW

def moe_config(**kw):
    base = dict(sequence_len=32, vocab_size=61, n_layer=3, n_embd=48, n_head=4, n_kv_head=2, head_dim=12,
                window_pattern="SL", short_window=5, moe_experts=6, moe_top_k=2, moe_shared=1, moe_expert_width=40)
    return GPTConfig(**{**base, **kw})


def random_moe(config, seed=0, dtype=torch.float32):
    """An MoE with random weights everywhere (a fresh one has zero output projections) and a random
    balancing bias, so routing depends on both scores and bias."""
    torch.manual_seed(seed)
    m = MoE(config, 1).to(dtype)
    m.init_weights()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
        m.expert_bias.copy_(torch.randn_like(m.expert_bias) * 0.3)
    return m


def test_one_expert_top1_no_shared_is_the_dense_mlp_in_float64():
    config = moe_config(moe_experts=1, moe_top_k=1, moe_shared=0, moe_expert_width=4 * 48)
    moe, mlp = random_moe(config, dtype=torch.float64), MLP(config, 1).double()
    with torch.no_grad():
        mlp.c_fc.weight.copy_(moe.w_fc[0])
        mlp.c_proj.weight.copy_(moe.w_proj[0])
    x = torch.randn(3, 7, 48, dtype=torch.float64)
    for path in ("loop", "auto"):  # one sigmoid score normalised over k = 1 is a gate of exactly 1
        moe.path = path
        torch.testing.assert_close(moe(x), mlp(x), rtol=1e-12, atol=1e-12)


def naive_moe(m, x):
    """Token by token, straight from the definition, in float64."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        s = torch.sigmoid(m.router.weight.double() @ x[t].double())
        chosen = torch.topk(s + m.expert_bias.double(), m.top_k).indices
        g = s[chosen] if m.raw_gates else s[chosen] / s[chosen].sum()
        for e, gate in zip(chosen.tolist(), g * m.routed_scale):
            h = torch.relu(m.w_fc[e].double() @ x[t].double()).square()
            out[t] += gate * (m.w_proj[e].double() @ h)
        if m.shared_fc is not None:
            out[t] += m.shared_proj.weight.double() @ torch.relu(m.shared_fc.weight.double() @ x[t].double()).square()
    return out


@pytest.mark.parametrize("E,k", [(8, 1), (8, 2), (16, 4), (5, 5)])
def test_top_k_indices_are_torch_topk_in_order(E, k):
    # random float64 scores (no ties), and a row of equal scores, where the lower index wins
    x = torch.randn(300, E, dtype=torch.float64)
    got = moe_mod.top_k_indices(x, k)
    assert torch.equal(got, torch.topk(x, k, dim=-1, sorted=True).indices)
    assert moe_mod.top_k_indices(torch.zeros(1, E), k).tolist() == [list(range(k))]
    # compiled fullgraph inside the whole MoE layer: test_grouped_path_on_cuda_matches_the_loop_path_compiled_and_not


def test_grouped_buffer_layout_against_a_python_loop(monkeypatch):
    """Each expert's assignments fill a block of the buffer in assignment order, the blocks in expert
    order, each starting on a multiple of ALIGN_ROWS (an idle expert's block is empty): the rows the
    one-hot running count gives, against a loop that deals the assignments out one by one."""
    m = random_moe(moe_config())
    seen = {}
    dispatch = moe_mod._Dispatch.apply
    monkeypatch.setattr(moe_mod._Dispatch, "apply", lambda x, src, row, k: seen.update(src=src, row=row) or dispatch(x, src, row, k))
    x = torch.randn(37, 48)
    m.path = "grouped"
    m(x.view(1, 37, 48))
    expert = m.route(x)[0].flatten().tolist()
    want, start = [None] * len(expert), 0
    for e in range(m.n_experts):
        mine = [i for i, c in enumerate(expert) if c == e]
        for j, i in enumerate(mine):
            want[i] = start + j
        start += -(-len(mine) // moe_mod.ALIGN_ROWS) * moe_mod.ALIGN_ROWS
    assert seen["row"].tolist() == want
    assert (seen["src"][seen["row"]] == torch.arange(len(expert)) // m.top_k).all()  # each row reads its own token


@pytest.mark.parametrize("raw_gates,scale", [(False, 1.0), (True, 2.5)])
def test_routing_gates_and_shared_expert_match_a_token_by_token_loop(raw_gates, scale):
    m = random_moe(moe_config(moe_raw_gates=raw_gates, moe_routed_scale=scale))
    x = torch.randn(2, 9, 48)
    for path in ("loop", "grouped"):
        m.path = path
        torch.testing.assert_close(m(x).reshape(18, 48).double(), naive_moe(m, x.reshape(18, 48)), rtol=1e-4, atol=1e-5)
    chosen, gates, _ = m.route(x.reshape(18, 48))
    if not raw_gates:
        torch.testing.assert_close(gates.sum(-1), torch.full((18,), scale))


@pytest.mark.parametrize("pieces", [0, 4])
def test_grouped_path_equals_loop_path_with_gradients(pieces, monkeypatch):
    """Random routing with empty and crowded experts (the bias makes expert 0 popular, expert 5 idle):
    outputs and every gradient agree between the two paths, the weight gradients whole or in pieces."""
    monkeypatch.setattr("llmlabs.moe.WGRAD_PIECES", pieces)
    m = random_moe(moe_config())
    with torch.no_grad():
        m.expert_bias.copy_(torch.tensor([2.0, 0.1, 0.0, -0.1, 0.05, -9.0]))
    x = torch.randn(4, 16, 48)
    dy = torch.randn(4, 16, 48)
    got = {}
    for path in ("loop", "grouped"):
        m.path = path
        m.zero_grad()
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(dy)
        got[path] = [y.detach(), xi.grad] + [p.grad for p in m.parameters()]
    chosen = m.route(x.reshape(-1, 48))[0]
    assert (chosen == 0).any(dim=-1).all() and not (chosen == 5).any()
    for a, b in zip(got["loop"], got["grouped"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the grouped path's GPU kernels (grouped_mm in bf16) need CUDA")
@pytest.mark.parametrize("pieces", [0, 4])
def test_grouped_path_on_cuda_matches_the_loop_path_compiled_and_not(pieces, monkeypatch):
    monkeypatch.setattr("llmlabs.moe.WGRAD_PIECES", pieces)
    m = random_moe(moe_config(n_embd=128, moe_expert_width=128, moe_experts=8)).cuda()
    x = torch.randn(4, 64, 128, device="cuda")
    dy = torch.randn(4, 64, 128, device="cuda")
    got = {}
    for name, path, compiled in (("loop", "loop", False), ("grouped", "grouped", False), ("compiled", "grouped", True)):
        m.path = path
        m.zero_grad()
        xi = x.clone().requires_grad_()
        f = torch.compile(m, fullgraph=True, dynamic=False) if compiled else m
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = f(xi)
        y.float().backward(dy)
        got[name] = [y.float(), xi.grad, m.w_fc.grad, m.w_proj.grad, m.router.weight.grad]
    for name in ("grouped", "compiled"):
        for a, b in zip(got["loop"], got[name]):
            torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2 * a.abs().max().item())


def test_balancing_turns_a_skewed_router_toward_uniform_load():
    """Inputs share a direction the router's row 0 points along, so expert 0 takes nearly every token.
    Bias steps (one per 'optimizer step', as in training) spread the load; with rate 0 it stays skewed."""
    def run(rate, steps=300):
        m = random_moe(moe_config(moe_bias_rate=rate, moe_experts=4, moe_top_k=1))
        with torch.no_grad():
            m.expert_bias.zero_()
            m.router.weight[0] = 3 * torch.ones(48) / 48 ** 0.5
        g = torch.Generator().manual_seed(1)
        cvs = []
        for _ in range(steps):
            x = torch.randn(2, 32, 48, generator=g) * 0.5 + 1.0
            m(x.requires_grad_())  # a training forward counts the load
            load = m.balance()
            cvs.append((load.std(unbiased=False) / load.mean()).item())
        return cvs
    skewed = run(0.0)
    balanced = run(0.01)
    assert skewed[0] > 1.2 and min(skewed) > 1.2  # expert 0 holds nearly all 64 tokens throughout
    assert balanced[0] > 1.2 and max(balanced[-50:]) < 0.5


def test_eval_and_generation_never_touch_the_counters_or_the_bias():
    config = moe_config()
    model = build_model(config, "cpu")
    moes = model.moe_layers()
    assert [type(b.mlp).__name__ for b in model.blocks] == ["MLP", "MoE", "MoE"]  # default: all but the first
    for m in moes:
        m.expert_bias.copy_(torch.randn_like(m.expert_bias))
    bias = [m.expert_bias.clone() for m in moes]
    idx = torch.randint(0, 61, (2, 16))
    model.eval()
    model(idx, idx)
    model.train()
    with torch.no_grad():  # no_grad in train mode: still not training
        model(idx, idx)
    assert len(list(generate(model, [1, 2, 3], 8, temperature=0.0))) == 8
    assert all(float(m.expert_load.abs().sum()) == 0 for m in moes)
    assert all(torch.equal(m.expert_bias, b) for m, b in zip(moes, bias))
    model.train()
    model(idx, idx).backward()
    assert all(float(m.expert_load.sum()) == 2 * 16 * 2 for m in moes)  # tokens x k
    stats = model.balance_experts()
    assert all(float(m.expert_load.abs().sum()) == 0 for m in moes)
    assert not all(torch.equal(m.expert_bias, b) for m, b in zip(moes, bias))
    assert len(stats["moe_load"]) == 2 and all(sum(row) == pytest.approx(1, abs=1e-3) for row in stats["moe_load"])


def test_kv_cache_generation_equals_a_full_forward_with_moe():
    config = moe_config()
    model = build_model(config, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    model.eval()
    cached = list(generate(model, [5, 7, 11], 12, temperature=0.0))
    uncached = list(generate(model, [5, 7, 11], 12, temperature=0.0, use_cache=False))
    assert cached == uncached
    seq = torch.tensor([[5, 7, 11] + cached])
    with torch.no_grad():
        greedy = model(seq[:, :-1]).argmax(-1)[0, 2:].tolist()
    assert greedy == cached


def test_sequence_balance_loss_by_hand_and_in_the_training_loss():
    config = moe_config(moe_aux_loss=0.01)
    m = random_moe(config)
    x = torch.randn(2, 8, 48)
    chosen, _, scores = m.route(x.reshape(-1, 48))
    chosen, scores = chosen.view(2, 8, 2), scores.detach().view(2, 8, 6)
    total = 0.0
    for b in range(2):  # DeepSeek-V3 eq. 17-20, one sequence at a time
        f = [6 / (2 * 8) * sum(int(e in chosen[b, t].tolist()) for t in range(8)) for e in range(6)]
        P = [sum(float(scores[b, t, e] / scores[b, t].sum()) for t in range(8)) / 8 for e in range(6)]
        total += sum(fi * pi for fi, pi in zip(f, P)) / 2
    assert m._sequence_balance_loss(chosen, scores).item() == pytest.approx(total, rel=1e-5)
    model = build_model(config, "cpu")
    idx = torch.randint(0, 61, (2, 16))
    with_aux = model(idx, idx)
    aux = sum(mm.aux_loss for mm in model.moe_layers())
    model.eval()
    plain = model(idx, idx)
    assert with_aux.item() == pytest.approx(plain.item() + aux.item(), rel=1e-6) and aux.item() > 0
    model.train()
    model(idx, idx).backward()
    assert all(mm.router.weight.grad.abs().sum() > 0 for mm in model.moe_layers())


def test_active_parameters_flops_and_optimizer_groups():
    config = moe_config(moe_expert_width=None, n_embd=384, n_head=4, head_dim=96)
    assert config.expert_width() == 512  # 4 * 384 / (2 + 1), to a multiple of 64
    model = build_model(config, "cpu")
    dense = build_model(moe_config(moe_experts=0, n_embd=384, n_head=4, head_dim=96), "cpu")
    moe = model.blocks[1].mlp
    assert moe.matmul_params_per_token() == 6 * 384 + 2 * 2 * 512 * 384 + 2 * 512 * 384  # router, k routed, shared
    per_layer = moe.matmul_params_per_token() - 8 * 384 * 384  # active MoE minus the dense MLP
    assert model.active_params() - dense.active_params() == 2 * per_layer  # two MoE layers
    assert model.flops_per_token() - dense.flops_per_token() == 6 * 2 * per_layer
    assert model.num_params()["block_matrices"] - model.active_params() == 2 * (6 - 2) * 2 * 512 * 384 - 384 * 61
    opt = model.setup_optimizer()
    kind = {id(p): g["kind"] for g in opt.param_groups for p in g["params"]}
    assert all(kind[id(m.router.weight)] == "adamw" for m in model.moe_layers())
    assert all(kind[id(m.w_fc)] == kind[id(m.w_proj)] == "muon" for m in model.moe_layers())


def test_muon_orthogonalises_each_expert_of_a_3d_weight_alone():
    """One Muon step on an [E, m, n] weight equals E separate steps on its [m, n] slices."""
    torch.manual_seed(0)
    w3 = torch.randn(4, 24, 16)
    w2 = [w3[e].clone() for e in range(4)]
    p3 = torch.nn.Parameter(w3.clone())
    p2 = [torch.nn.Parameter(w) for w in w2]
    kw = dict(kind="muon", lr=0.02, momentum=0.95, beta2=0.9, weight_decay=0.1, ns_steps=5)
    o3 = MuonAdamW([dict(params=[p3], **kw)])
    o2s = [MuonAdamW([dict(params=[p], **kw)]) for p in p2]
    for step in range(3):
        g = torch.randn(4, 24, 16)
        p3.grad = g.clone()
        for e in range(4):
            p2[e].grad = g[e].clone()
            o2s[e].step()
        o3.step()
    torch.testing.assert_close(p3.data, torch.stack([p.data for p in p2]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw,match", [
    (dict(moe_top_k=7), "moe_top_k=7: must be between 1 and moe_experts=6"),
    (dict(moe_layers="5:"), "names none of the 3 layers"),
    (dict(moe_layers="1,x"), "use a slice"),
    (dict(moe_layers="7"), "use a slice"),
    (dict(moe_routed_scale=0.0), "moe_routed_scale=0.0 must be > 0"),
    (dict(moe_bias_rate=-1.0), "moe_bias_rate=-1.0"),
    (dict(moe_experts=-1), "moe_experts=-1"),
])
def test_bad_moe_configs_are_one_line_errors(kw, match):
    with pytest.raises(LabError, match=match):
        moe_config(**kw)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from conftest import prepared_stdlib

    return prepared_stdlib(tmp_path_factory.mktemp("stdlib"), 40, 512, 0.1, 0.1)


TINY = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "16", "--seq-len", "64", "--window-pattern", "SL",
        "--device-batch-size", "4", "--total-batch-size", "512", "--eval-tokens", "2048", "--device", "cpu",
        "--moe-experts", "4", "--moe-layers", "0:", "--moe-expert-width", "32"]


def test_load_table_tells_a_bouncing_load_from_a_steady_one(tmp_path):
    """bench/moe_load_table.py's shift columns on loads known by hand (4 experts, 2 layers, 6 steps):
    layer 0 swaps all its load between two expert pairs every step (4 expert-means moved over one
    step, none over two), layer 1 holds still; the columns average the layers."""
    load_table = bench_script("moe_load_table")
    a, b, even = [0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5], [0.25] * 4
    rows = [{"step": t, "moe_load_cv": 0.5, "moe_load_min": 0.0, "moe_bias_spread": 0.01,
             "moe_load": [a if t % 2 else b, even]} for t in range(1, 7)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    row = load_table.load_row(tmp_path)
    assert (row["moved_1"], row["moved_2"]) == (2.0, 0.0)
    assert "| 2.00 | 0.00 |" in load_table.table([row])
    by_layer = load_table.per_layer(tmp_path, 4)  # the last 4 steps, each layer alone
    assert "its last 4 steps" in by_layer and "| 1 | 4.00 | 0.00 | 0.00 | 2.00 |" in by_layer
    assert "| 2 | 0.00 | 0.00 | 1.00 | 1.00 |" in by_layer
    drift = [{**r, "moe_load": [[0.25 + 0.01 * r["step"], 0.25 - 0.01 * r["step"], 0.25, 0.25], even]} for r in rows]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in drift))
    row = load_table.load_row(tmp_path)  # a steady drift: twice as much over two steps as over one
    assert row["moved_1"] == pytest.approx(0.02) and row["moved_2"] == pytest.approx(0.04)  # layer 1 still


def test_moe_training_run_metrics_plot_and_exact_resume(data_dir, tmp_path, capsys):
    """A run with 2 micro-batches a step: every step's load covers both (tokens x k x layers), the
    summary says MoE, expert_load.png exists; a run stopped at step 6 and resumed ends where an
    uninterrupted one does (the balancing bias is in the checkpoint), also when its config.json, like
    those written before config.json named every MoE knob, leaves the bias rate out: the rate comes
    from the checkpoint (here 3e-3, not the default), not from today's default."""
    assert GPTConfig.moe_bias_rate != 0.003
    args = TINY + ["--data", str(data_dir), "--device-batch-size", "4", "--total-batch-size", "512", "--moe-bias-rate", "0.003"]
    assert train.main(args + ["--run-dir", str(tmp_path / "full"), "--tokens", str(512 * 12)]) == 0
    out = capsys.readouterr().out
    assert "moe:              4 experts top-2 + 1 shared, width 32, 2 of 2 layers, dropless" in out
    assert "active_params_M:" in out
    rows = [json.loads(r) for r in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(len(r["moe_load"]) == 2 and len(r["moe_load"][0]) == 4 for r in rows)
    assert all(r["moe_load_max"] >= 1 >= r["moe_load_min"] and r["moe_load_cv"] >= 0 for r in rows)
    assert all(r["moe_routed"] == 512 * 2 for r in rows)  # both micro-batches, k = 2, nothing dropped
    assert (tmp_path / "full" / "expert_load.png").stat().st_size > 0
    # config.json names the knobs left unset at the values the run used (GPTConfig's defaults)
    run_cfg = json.loads((tmp_path / "full" / "config.json").read_text())
    assert {k: run_cfg[k] for k in ("moe_routed_scale", "moe_aux_loss", "moe_shared", "moe_top_k", "moe_layers")} \
        == {"moe_routed_scale": GPTConfig.moe_routed_scale, "moe_aux_loss": GPTConfig.moe_aux_loss,
            "moe_shared": GPTConfig.moe_shared, "moe_top_k": GPTConfig.moe_top_k, "moe_layers": "0:"}
    # bench/moe_load_table.py reads the same rows: its per-run figures against the rows read here
    load_table = bench_script("moe_load_table")
    row = load_table.load_row(tmp_path / "full")
    assert row["mean_cv"] == pytest.approx(sum(r["moe_load_cv"] for r in rows) / 12, rel=1e-12)
    assert row["starved"] == sum(r["moe_load_min"] < 0.1 for r in rows) / 12
    assert (row["final_spread"], row["bias_rate"], row["steps"]) == (rows[-1]["moe_bias_spread"], 0.003, 12)
    assert "| full | 0.003 | 0 | 12 |" in load_table.table([row])
    assert row["moved_1"] == pytest.approx(sum(sum(abs(x - y) for x, y in zip(now[i], then[i])) for now, then in
                                               ((r["moe_load"], q["moe_load"]) for r, q in zip(rows[1:], rows))
                                               for i in range(2)) * 4 / 2 / 2 / 11, rel=1e-9)
    # bench/moe_router_scores.py's load, chosen from the scores it computes, against the model's own count
    router_scores = bench_script("moe_router_scores")
    model, _ = checkpoint.load_run(tmp_path / "full", "cpu")
    x = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    inputs = router_scores.router_inputs(model, x)
    assert sorted(inputs) == [0, 1] and all(h.shape == (4 * 64, model.config.n_embd) for h in inputs.values())
    model.train()
    model(x, x).backward()  # a training forward counts each layer's load as it routes
    for i, h in inputs.items():
        moe = model.blocks[i].mlp
        stats = router_scores.layer_stats(moe, h)
        load = moe.expert_load
        assert stats["cv_bias"] == pytest.approx((load.std(unbiased=False) / load.mean()).item(), rel=1e-6)
        assert 0 <= stats["common"] <= 0.5 and stats["bias"] == moe.expert_bias.tolist()
    saved = checkpoint.load(checkpoint.latest(tmp_path / "full"))
    assert saved["state"]["model_config"]["moe_experts"] == 4
    assert any(k.endswith("expert_bias") and v.abs().sum() > 0 for k, v in saved["model"].items())

    # a real SIGINT after step 6: the run saves and exits 130, as on Ctrl-C
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "train_step", sigint_after(6))
        assert train.main(args + ["--run-dir", str(tmp_path / "cut"), "--tokens", str(512 * 12)]) == 130
    assert checkpoint.load(checkpoint.latest(tmp_path / "cut"))["step"] == 6
    cut_cfg = json.loads((tmp_path / "cut" / "config.json").read_text())
    old = {k: v for k, v in cut_cfg.items() if k not in ("moe_bias_rate", "moe_routed_scale", "moe_aux_loss")}
    (tmp_path / "cut" / "config.json").write_text(json.dumps(old))  # as a run begun before 07c57e6 wrote it
    assert train.main(["--resume", str(tmp_path / "cut")]) == 0
    assert json.loads((tmp_path / "cut" / "config.json").read_text())["moe_bias_rate"] == 0.003
    full = [json.loads(r) for r in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    cut = [json.loads(r) for r in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in cut] == [r["step"] for r in full]
    for a, b in zip(full, cut):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6) and b["moe_load"] == a["moe_load"], a["step"]
    sa, sb = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("full", "cut"))
    assert sb["val_bpb"] == pytest.approx(sa["val_bpb"], rel=1e-5)


def test_every_moe_flag_reaches_the_model_config():
    import argparse

    p = argparse.ArgumentParser()
    train.add_args(p)
    args = p.parse_args(["--depth", "4", "--moe-experts", "8", "--moe-top-k", "3", "--moe-shared", "2",
                         "--moe-layers", "::2", "--moe-expert-width", "96", "--moe-raw-gates", "--moe-routed-scale",
                         "2.5", "--moe-bias-rate", "0.01", "--moe-aux-loss", "0.001"])
    cfg = train.resolve_config(args, torch.device("cpu"))
    mcfg = train._model_config(cfg, vocab_size=512)
    assert (mcfg.moe_experts, mcfg.moe_top_k, mcfg.moe_shared, mcfg.moe_layers, mcfg.moe_expert_width) == (8, 3, 2, "::2", 96)
    assert (mcfg.moe_raw_gates, mcfg.moe_routed_scale, mcfg.moe_bias_rate, mcfg.moe_aux_loss) == (True, 2.5, 0.01, 0.001)
    assert mcfg.moe_layer_ids() == [0, 2]
    dense = train._model_config(train.resolve_config(p.parse_args(["--depth", "4"]), torch.device("cpu")), 512)
    assert dense.moe_experts == 0 and dense.moe_layer_ids() == []


def test_two_ranks_count_the_load_of_both(data_dir, tmp_path):
    """torchrun, 2 gloo processes: the load a step balances on is summed over the ranks (each rank
    sees half the batch), so every rank moves its biases alike and the replicas stay one model."""
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "llmlabs", "train", *TINY,
                          "--data", str(data_dir), "--run-dir", str(tmp_path / "run"), "--tokens", "5120"],
                         env=dict(os.environ, PYTHONPATH=str(repo)), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and all(r["moe_routed"] == 512 * 2 for r in rows)  # 256 tokens a rank, both counted


@pytest.mark.parametrize("chunk", [0, 16, 32, 48, 1000])
def test_weight_gradient_in_pieces_equals_each_experts_own(chunk):
    """moe.weight_grad (float32: grouped_mm's widest) against a float64 loop over experts: blocks of 0 to 80 rows (an empty expert, ends
    that fall on the chunk grid), pieces of at most `chunk` rows summed per expert; an empty
    piece's output is zeroed even when the kernel leaves garbage there (NaN here)."""
    from llmlabs import moe

    g = torch.Generator().manual_seed(3)
    sizes = [32, 0, 80, 16, 7, 48]
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
    R = int(offs[-1])
    x, dy = torch.randn(R, 12, generator=g), torch.randn(R, 8, generator=g)  # rows of 16-byte multiples
    want = torch.stack([dy[a:b].double().t() @ x[a:b].double() for a, b in zip([0] + offs[:-1].tolist(), offs.tolist())])
    torch.testing.assert_close(moe.weight_grad(dy, x, offs, chunk).double(), want, rtol=1e-5, atol=1e-5)
    real = moe.grouped_mm

    def garbage_in_empty_groups(a, b, offs):
        out = real(a, b, offs=offs)
        empty = torch.diff(offs, prepend=offs.new_zeros(1)) == 0
        return out.masked_fill(empty[:, None, None], float("nan"))

    moe.grouped_mm = garbage_in_empty_groups
    try:
        got = moe.weight_grad(dy, x, offs, chunk)
    finally:
        moe.grouped_mm = real
    if chunk:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    else:  # whole blocks: the empty expert's gradient is whatever the kernel wrote
        assert got[1].isnan().all() and not got[[0, 2, 3, 4, 5]].isnan().any()


def test_expert_matmul_gradients_match_autograd_of_the_plain_grouped_matmul():
    """_ExpertMM gives the output, input and weight gradients of autograd through grouped_mm,
    whatever the chunk (float32 throughout; bf16 inputs against float32 weights on CUDA:
    test_grouped_path_on_cuda_matches_the_loop_path_compiled_and_not)."""
    from llmlabs.moe import _ExpertMM, grouped_mm

    g = torch.Generator().manual_seed(5)
    offs = torch.tensor([16, 16, 64, 80], dtype=torch.int32)
    x = torch.randn(80, 24, generator=g, requires_grad=True)
    w = torch.randn(4, 20, 24, generator=g, requires_grad=True)
    dy = torch.randn(80, 20, generator=g)
    y = grouped_mm(x, w.transpose(1, 2), offs=offs)
    want = [y, *torch.autograd.grad(y, (x, w), dy)]
    for chunk in (0, 16, 48):
        y = _ExpertMM.apply(x, w, offs, chunk)
        got = [y, *torch.autograd.grad(y, (x, w), dy)]
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
