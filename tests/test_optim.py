"""MuonAdamW and Polar Express: orthogonalisation quality, the update math against a float64
reference written out step by step, AdamW against torch's, a real loss decrease, and state_dict
round trips."""
import copy
import uuid

import pytest
import torch

from llmlabs.common import LabError
from llmlabs.config import GPTConfig
from llmlabs.model import build_model
from llmlabs.optim import POLAR_EXPRESS_COEFFS, MuonAdamW, polar_express


def randn(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("shape", [(96, 96), (256, 64), (64, 256), (3, 128, 32)])
def test_polar_express_singular_values_in_a_tight_band(shape):
    G = randn(*shape, seed=sum(shape))
    # converged (12 steps: enough even for a random square matrix, whose sigma_min / ||G||_F
    # ~ 1e-4 is below the 1e-3 the coefficients were designed for)
    s = torch.linalg.svdvals(polar_express(G, steps=12))
    assert s.min() > 0.99 and s.max() < 1.01
    # Muon's 5 steps on well-conditioned (rectangular) matrices: within 15% of 1
    if shape[-1] != shape[-2]:
        s = torch.linalg.svdvals(polar_express(G, steps=5))
        assert s.min() > 0.85 and s.max() < 1.15, (s.min(), s.max())


def test_polar_express_approximates_the_polar_factor():
    G = randn(200, 50, seed=1)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    X = polar_express(G, steps=12)
    assert (X - U @ Vh).norm() / (U @ Vh).norm() < 1e-3
    # in float32 too (the CPU path), and the coefficients are the paper's: first one ~ 8.2/1.01
    X32 = polar_express(G.float(), steps=12).double()
    assert (X32 - U @ Vh).norm() / (U @ Vh).norm() < 1e-3
    assert POLAR_EXPRESS_COEFFS[0][0] == pytest.approx(8.28721201814563 / 1.01)


def reference_muon(W, grads, lr, momentum, beta2, weight_decay, steps=5):
    """Muon as documented, one matrix at a time in float64: Nesterov momentum, Polar Express,
    NorMuon per-row (tall) / per-column (wide) second moment with the norm kept, cautious decay,
    lr * sqrt(max(1, rows / cols))."""
    W = [w.clone() for w in W]
    m, n = W[0].shape
    buf = [torch.zeros_like(w) for w in W]
    second = [None] * len(W)
    for G in grads:
        for i in range(len(W)):
            buf[i] = momentum * buf[i] + (1 - momentum) * G[i]
            g = (1 - momentum) * G[i] + momentum * buf[i]
            O = polar_express(g, steps)
            v = (O**2).mean(dim=1 if m >= n else 0, keepdim=True)
            second[i] = (1 - beta2) * v if second[i] is None else beta2 * second[i] + (1 - beta2) * v
            U = O / second[i].sqrt()
            U = U * O.norm() / U.norm()
            mask = (U * W[i] >= 0).double()
            W[i] = W[i] - lr * max(1, m / n) ** 0.5 * (U + weight_decay * mask * W[i])
    return W


@pytest.mark.parametrize("shape", [(48, 16), (16, 48)])
def test_muon_matches_float64_reference(shape):
    params = [torch.nn.Parameter(randn(*shape, seed=i)) for i in range(3)]
    start = [p.detach().clone() for p in params]
    grads = [[randn(*shape, seed=100 * s + i) for i in range(3)] for s in range(3)]
    opt = MuonAdamW([dict(kind="muon", params=params, lr=0.03, momentum=0.9, beta2=0.8, weight_decay=0.5,
                          ns_steps=5)])
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    expected = reference_muon(start, grads, lr=0.03, momentum=0.9, beta2=0.8, weight_decay=0.5)
    for p, e, s in zip(params, expected, start):
        assert (p.detach() - s).abs().max() > 1e-2  # the steps did move the weights
        torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-9)


def test_adamw_groups_match_torch_adamw():
    p = torch.nn.Parameter(randn(7, 5, seed=2))
    q = torch.nn.Parameter(p.detach().clone())
    ours = MuonAdamW([dict(kind="adamw", params=[p], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)])
    torchs = torch.optim.AdamW([q], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    for s in range(4):
        g = randn(7, 5, seed=10 + s)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        torchs.step()
    torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def tiny_model():
    config = GPTConfig(sequence_len=32, vocab_size=53, n_layer=2, n_embd=32, n_head=2, n_kv_head=2, head_dim=16,
                       window_pattern="SL", short_window=6)
    torch.manual_seed(0)
    return config, build_model(config, "cpu")


def test_one_step_on_a_tiny_model_lowers_the_loss():
    config, model = tiny_model()
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, config.vocab_size, (4, 32), generator=g)
    targets = torch.randint(0, config.vocab_size, (4, 32), generator=g)
    opt = model.setup_optimizer(matrix_lr=0.02, embedding_lr=0.3, unembedding_lr=0.008, scalar_lr=0.5,
                                weight_decay=0.0)
    assert {grp["kind"] for grp in opt.param_groups} == {"muon", "adamw"}
    before = model(idx, targets)
    before.backward()
    opt.step()
    with torch.no_grad():
        after = model(idx, targets)
    assert after.item() < before.item() - 1e-3, (before.item(), after.item())


def test_state_dict_round_trip_continues_identically():
    config, model = tiny_model()
    g = torch.Generator().manual_seed(4)
    batches = [torch.randint(0, config.vocab_size, (2, 32), generator=g) for _ in range(3)]

    def train_step(m, opt, idx):
        m(idx, idx).backward()
        opt.step()
        m.zero_grad(set_to_none=True)

    opt = model.setup_optimizer()
    train_step(model, opt, batches[0])
    train_step(model, opt, batches[1])
    for group in opt.param_groups:  # a schedule changed the hyperparameters: they must round-trip
        group["lr"] = group["initial_lr"] * 0.5
        if group["kind"] == "muon":
            group["momentum"], group["weight_decay"] = 0.9, 0.1
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train_step(model, opt, batches[2])

    _, clone = tiny_model()
    clone.load_state_dict(saved_model)
    clone_opt = clone.setup_optimizer()
    clone_opt.load_state_dict(saved_opt)
    assert [grp["lr"] for grp in clone_opt.param_groups] == [grp["lr"] for grp in opt.param_groups]
    train_step(clone, clone_opt, batches[2])
    for (name, a), b in zip(model.state_dict().items(), clone.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_hyperparameters_change_between_steps():
    W = torch.nn.Parameter(randn(8, 8, seed=5))
    opt = MuonAdamW([dict(kind="muon", params=[W], lr=0.1, momentum=0.95, beta2=0.9, weight_decay=0.0, ns_steps=5)])
    assert opt.param_groups[0]["initial_lr"] == 0.1
    W.grad = randn(8, 8, seed=6)
    opt.param_groups[0]["lr"] = 0.0
    before = W.detach().clone()
    opt.step()
    torch.testing.assert_close(W.detach(), before, rtol=0, atol=0)  # lr 0: nothing moves
    opt.param_groups[0]["lr"] = 0.1
    opt.step()
    assert (W.detach() - before).norm() > 0.05


def test_bad_param_groups_raise_lab_error():
    a, b = torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Parameter(torch.zeros(4, 2))
    muon = dict(kind="muon", lr=0.02, momentum=0.95, beta2=0.9, weight_decay=0.0, ns_steps=5)
    with pytest.raises(LabError, match="single shape"):
        MuonAdamW([dict(muon, params=[a, b])])
    with pytest.raises(LabError, match="single shape"):
        MuonAdamW([dict(muon, params=[torch.nn.Parameter(torch.zeros(4))])])
    with pytest.raises(LabError, match="missing betas"):
        MuonAdamW([dict(kind="adamw", params=[a], lr=0.1, eps=1e-8, weight_decay=0.0)])
    with pytest.raises(LabError, match="kind="):
        MuonAdamW([dict(kind="sgd", params=[a], lr=0.1)])


# ---- DistMuonAdamW: N gloo processes step exactly as one process on the same total batch -----------

DIST_CONFIG = dict(sequence_len=16, vocab_size=53, n_layer=3, n_embd=32, n_head=2, n_kv_head=2, head_dim=16,
                   window_pattern="L", moe_experts=3, moe_top_k=2, moe_expert_width=24)  # 3-D experts, a router


def _dist_model():
    torch.manual_seed(0)
    model = build_model(GPTConfig(**DIST_CONFIG), "cpu").double()
    with torch.no_grad():
        for p in model.parameters():  # every output projection nonzero, so every gradient is
            p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    return model


def _global_batch(step, rows=8):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 53, (rows, 16), generator=g), torch.randint(0, 53, (rows, 16), generator=g)


def _dist_worker(rank, world, init_file, out, resume_state):
    from llmlabs.optim import DistMuonAdamW

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _dist_model()
        opt = model.setup_optimizer(distributed=True)
        assert isinstance(opt, DistMuonAdamW)
        if resume_state is not None:
            opt.load_state_dict(torch.load(resume_state))
        for step in range(3):
            x, y = _global_batch(step)
            model(x[rank::world], y[rank::world]).backward()  # this rank's rows: the mean of the means is the mean
            opt.step()
            model.zero_grad(set_to_none=True)
        state = opt.state_dict()  # a collective: every rank
        if rank == 0:
            torch.save({"params": {k: v.detach() for k, v in model.named_parameters()}, "opt": state}, out)
    finally:
        torch.distributed.destroy_process_group()


def _run_dist(world, tmp_path, resume_state=None):
    import torch.multiprocessing as mp

    out = tmp_path / f"dist{world}.pt"
    # a fresh rendezvous file every run: a second run on a file the first left behind read the first's
    # addresses and timed out connecting to a rank long gone (seen once in CI, 2026-12-05)
    init = tmp_path / f"init{world}-{uuid.uuid4().hex}"
    mp.spawn(_dist_worker, args=(world, str(init), str(out), resume_state), nprocs=world)
    return torch.load(out)


def test_distributed_optimizer_equals_one_process_and_its_state_moves_across_rank_counts(tmp_path):
    model = _dist_model()
    opt = model.setup_optimizer()
    for step in range(3):
        model(*_global_batch(step)).backward()
        opt.step()
        model.zero_grad(set_to_none=True)
    one = {"params": {k: v.detach().clone() for k, v in model.named_parameters()}, "opt": opt.state_dict()}

    # float64. Muon's matrices agree to ~1e-11. AdamW's eps (1e-10) turns a gradient that is zero in
    # exact arithmetic but +-1e-17 after rounding (the MoE's normalised gates cancel so) into a step
    # of lr * 1e-7: ~1e-7 apart, which atol allows; without the MoE layers everything agrees to 1e-13.
    def close(a, b):
        assert a["params"].keys() == b["params"].keys()
        for k in a["params"]:
            torch.testing.assert_close(b["params"][k], a["params"][k], rtol=1e-9, atol=1e-6, msg=k)
        sa, sb = a["opt"]["state"], b["opt"]["state"]
        assert sa.keys() == sb.keys()
        for i in sa:
            for k in sa[i]:
                torch.testing.assert_close(torch.as_tensor(sb[i][k]).double(), torch.as_tensor(sa[i][k]).double(),
                                           rtol=1e-9, atol=1e-6, msg=f"state {i} {k}")
    for world in (2, 4):  # 4 ranks: more ranks than some Muon groups have matrices (padding)
        close(one, _run_dist(world, tmp_path))
    # the single-process optimizer state after those 3 steps, loaded on 2 ranks (each keeps its share)
    # and stepped 3 more times from fresh weights, equals the same in one process
    torch.save(one["opt"], tmp_path / "one.pt")  # (state_dict holds the live tensors: saved now)
    resumed = _run_dist(2, tmp_path, str(tmp_path / "one.pt"))
    ref = _dist_model()
    ref_opt = ref.setup_optimizer()
    ref_opt.load_state_dict(torch.load(tmp_path / "one.pt"))
    for step in range(3):
        ref(*_global_batch(step)).backward()
        ref_opt.step()
        ref.zero_grad(set_to_none=True)
    close({"params": {k: v.detach() for k, v in ref.named_parameters()}, "opt": ref_opt.state_dict()}, resumed)
    assert resumed["opt"]["state"][0]["step"] == 6  # an AdamW tensor's step count went on from 3


def test_communication_volume_counts_the_padding_by_hand():
    """3 Muon matrices of 4x4 and a 10-element AdamW vector, float32. 2 ranks: Muon sends 4 padded
    matrices (2 per rank), AdamW 10 elements: 2 x (4 x 16 + 10) x 4 bytes x 1/2 = 296. 4 ranks:
    4 matrices and 12 elements: 2 x (64 + 12) x 4 x 3/4 = 456."""
    from llmlabs.optim import DistMuonAdamW

    muon = [torch.nn.Parameter(torch.randn(4, 4)) for _ in range(3)]
    vec = torch.nn.Parameter(torch.randn(10))
    opt = DistMuonAdamW([dict(kind="muon", params=muon, lr=0.02, momentum=0.95, beta2=0.95, weight_decay=0.0, ns_steps=5),
                         dict(kind="adamw", params=[vec], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)])
    assert opt.comm_bytes_per_step(2) == 296 and opt.comm_bytes_per_step(4) == 456
    assert opt.comm_bytes_per_step(1) == 0
