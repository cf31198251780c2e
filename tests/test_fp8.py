"""FP8 training (llmlabs/fp8.py, torchao's float8): which layers convert, the float8 error against a
float64 reference, evaluation in bf16 on the same weights, the refusals, and whole runs.

torch's CPU build has float8 matmuls (torch._scaled_mm), so the numerics and whole runs are tested
here too, with the device check lifted; `llmlabs train --fp8` itself refuses a CPU (no speed to gain),
and the GPU tests run the compiled path on the device."""
import argparse
import json
import sys

import pytest
import torch
import torch.nn as nn

pytest.importorskip("torchao.float8", reason="torchao is in the test extra: pip install -e '.[test]'")

from conftest import prepared_stdlib, sigint_after  # noqa: E402
from llmlabs import checkpoint, cli, fp8, train  # noqa: E402
from llmlabs.common import LabError  # noqa: E402
from llmlabs.model import build_model  # noqa: E402
from test_model import randomized  # noqa: E402
from test_moe import moe_config  # noqa: E402
from test_train import TINY, metrics, run_train  # noqa: E402

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """test_train's corpus: 80 stdlib modules at vocab 512."""
    return prepared_stdlib(tmp_path_factory.mktemp("fp8"), files=80, vocab_size=512, val_frac=0.1, test_frac=0.1)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# relative error (Frobenius) of a float8 matmul against float64 on random normal operands: e4m3
# keeps 3 mantissa bits (unit roundoff 2^-4), so about 0.036 measured; e5m2 gradients 2 bits. A bf16
# matmul stays near 0.003: the lower bounds prove the layer really ran in float8.
FORWARD_ERR, GRAD_ERR, BF16_ERR = (0.006, 0.06), (0.006, 0.12), 0.006


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def cpu_rowwise_scales() -> bool:
    """Whether this torch's CPU float8 matmul takes per-row scales (2.13 does; 2.11's has per-tensor only)."""
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
    except RuntimeError:
        return False
    return True


def needs(device, recipe="tensorwise"):
    if device == "cuda" and (not torch.cuda.is_available() or fp8.unsupported(torch.device("cuda"))):
        pytest.skip("needs a CUDA GPU with float8 matmuls (compute capability 8.9+)")
    if device == "cpu" and recipe == "rowwise" and not cpu_rowwise_scales():
        pytest.skip(f"torch {torch.__version__}'s CPU float8 matmul has per-tensor scales only (rowwise runs on the GPU)")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_a_float8_layer_is_close_to_float64_within_float8_error(recipe, device):
    needs(device, recipe)
    g = torch.Generator().manual_seed(81)
    lin = nn.Linear(256, 384, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(384, 256, generator=g) / 16)
    lin = lin.to(device)
    layer = fp8.layer_class().from_float(lin, config=fp8._torchao()[0].from_recipe_name(recipe))
    assert layer.weight is lin.weight
    x = torch.randn(8, 64, 256, generator=g).to(device).requires_grad_(True)
    upstream = torch.randn(8, 64, 384, generator=g, dtype=torch.float64).to(device)
    x64, w64 = x.detach().double().requires_grad_(True), lin.weight.detach().double().requires_grad_(True)
    y64 = x64 @ w64.t()
    (y64 * upstream).sum().backward()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        y = layer(x)
    (y.double() * upstream).sum().backward()
    assert FORWARD_ERR[0] < rel(y, y64) < FORWARD_ERR[1]
    assert GRAD_ERR[0] < rel(x.grad, x64.grad) < GRAD_ERR[1]
    assert GRAD_ERR[0] < rel(lin.weight.grad, w64.grad) < GRAD_ERR[1]
    layer.eval()  # evaluation: the same weights, no float8
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        assert rel(layer(x), y64) < BF16_ERR


def test_convert_takes_the_block_matmuls_and_keeps_every_tensor():
    config = moe_config(n_embd=64, n_head=4, head_dim=16, moe_expert_width=64)
    model = randomized(build_model(config, "cpu"), seed=82)
    params = dict(model.named_parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    done = fp8.convert(model, "tensorwise")
    expected = {f"blocks.{i}.attn.{n}" for i in range(config.n_layer) for n in ("c_q", "c_k", "c_v", "c_proj")}
    expected |= {f"blocks.{i}.mlp.{n}" for i in config.moe_layer_ids() for n in ("shared_fc", "shared_proj")}
    expected |= {f"blocks.{i}.mlp.{n}" for i in set(range(config.n_layer)) - set(config.moe_layer_ids())
                 for n in ("c_fc", "c_proj")}
    assert set(done) == expected
    cls = fp8.layer_class()
    assert all(isinstance(model.get_submodule(n), cls) for n in done)
    for name, m in model.named_modules():  # lm_head, value-embedding gates, routers: plain
        if isinstance(m, nn.Linear) and name not in expected:
            assert type(m) is nn.Linear and name.split(".")[-1] in ("lm_head", "ve_gate", "router"), name
    assert dict(model.named_parameters()) == params  # the same Parameter objects: the optimizer sees no change
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(type(t) is torch.Tensor for t in after.values())  # a checkpoint holds plain tensors


def test_eval_mode_is_the_bf16_model_and_training_mode_is_float8():
    config = moe_config(n_embd=64, n_head=4, head_dim=16, moe_expert_width=64, moe_experts=0)
    plain = randomized(build_model(config, "cpu"), seed=83)
    model = randomized(build_model(config, "cpu"), seed=83)
    fp8.convert(model, "tensorwise")
    g = torch.Generator().manual_seed(84)
    idx, targets = (torch.randint(0, config.vocab_size, (2, 32), generator=g) for _ in range(2))
    for m in (plain, model):
        m.eval()
    with torch.no_grad():
        assert torch.equal(model(idx), plain(idx))
        model.train(), plain.train()
        a, b = model(idx, targets).item(), plain(idx, targets).item()
    assert 1e-5 < abs(a - b) < 0.02 * b


def test_refusals_are_one_line(monkeypatch):
    with pytest.raises(LabError, match=r"--fp8 tensorwise: this run is on cpu.*drop --fp8"):
        fp8.check("tensorwise", torch.device("cpu"))
    with pytest.raises(LabError, match="--fp8 e3m4: unknown recipe; choose one of tensorwise, rowwise"):
        fp8.check("e3m4", torch.device("cpu"))
    monkeypatch.setattr(fp8, "unsupported", lambda device: None)
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # import fails, as without torchao
    with pytest.raises(LabError, match=r"needs torchao, which is not installed: pip install 'llmlabs\[fp8\]'"):
        fp8.check("rowwise", torch.device("cpu"))


def test_train_fp8_on_a_cpu_is_one_error_line(data_dir, tmp_path, capsys):
    assert cli.main(["train", *TINY, "--data", str(data_dir), "--run-dir", str(tmp_path / "r"), "--fp8", "rowwise",
                     "--tokens", "1024"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--fp8 rowwise: this run is on cpu" in err[0]
    assert not (tmp_path / "r").exists()  # refused before anything is written


def test_an_fp8_run_tracks_bf16_resumes_exactly_and_evaluates_anywhere(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fp8, "unsupported", lambda device: None)  # lift the CPU refusal: torch's CPU float8 runs
    # one micro-batch a step: torch's CPU float8 matmul takes ~30 ms a call whatever its size
    budget = ["--tokens", str(256 * 16), "--total-batch-size", "256", "--eval-every", "8"]
    assert run_train(data_dir, tmp_path / "bf16", *budget) == 0
    monkeypatch.setattr(fp8, "RECIPE", "tensorwise")  # the knob an experimenter sets in fp8.py
    assert run_train(data_dir, tmp_path / "fp8", *budget) == 0
    assert json.loads((tmp_path / "fp8" / "config.json").read_text())["fp8"] == "tensorwise"
    p = argparse.ArgumentParser()
    train.add_args(p)
    assert train.resolve_config(p.parse_args(TINY + ["--fp8", "none"]), torch.device("cpu"))["fp8"] is None  # beats the knob
    assert "fp8 tensorwise: 12 block matmuls in float8" in capsys.readouterr().out
    bf16, ours = metrics(tmp_path / "bf16"), metrics(tmp_path / "fp8")
    losses = [(a["loss"], b["loss"]) for a, b in zip(bf16, ours) if "loss" in a]
    assert losses[-1][1] < 0.85 * losses[0][1]  # it learns
    assert all(abs(a - b) < 0.03 * a for a, b in losses) and any(a != b for a, b in losses)
    # interrupted after 6 steps and resumed: the same curve and score as uninterrupted
    with monkeypatch.context() as m:
        m.setattr(train, "train_step", sigint_after(6))
        assert run_train(data_dir, tmp_path / "cut", *budget) == 130
    assert train.main(["--resume", str(tmp_path / "cut")]) == 0
    cut = metrics(tmp_path / "cut")
    assert [r.get("loss") for r in cut] == [r.get("loss") for r in ours]
    summary, cut_summary = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("fp8", "cut"))
    assert cut_summary["val_bpb"] == summary["val_bpb"]
    # the checkpoint is plain: `llmlabs eval` scores it with no float8 anywhere, as the run did
    ck = checkpoint.load(checkpoint.latest(tmp_path / "fp8"))
    assert all(t.dtype in (torch.float32, torch.bfloat16) for t in ck["model"].values())
    capsys.readouterr()
    monkeypatch.setattr(fp8, "RECIPE", None)
    assert cli.main(["eval", str(tmp_path / "fp8"), "--device", "cpu"]) == 0  # as trained (a GPU would score in bf16)
    assert float(capsys.readouterr().out.split("val_bpb:")[1].split()[0]) == pytest.approx(summary["val_bpb"], rel=1e-6)


def test_resume_on_a_device_without_float8_continues_in_bf16(data_dir, tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as m:
        m.setattr(fp8, "unsupported", lambda device: None)
        m.setattr(train, "train_step", sigint_after(3))
        assert run_train(data_dir, tmp_path / "r", "--tokens", str(512 * 6), "--fp8", "tensorwise") == 130
    capsys.readouterr()
    assert train.main(["--resume", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "trained with --fp8 tensorwise, but this run is on cpu" in out and "continuing in bf16" in out
    assert json.loads((tmp_path / "r" / "config.json").read_text())["fp8"] is None


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_a_compiled_d4_fp8_run_tracks_bf16_on_a_gpu(recipe, data_dir, tmp_path):
    needs("cuda")
    args = ["--data", str(data_dir), "--depth", "4", "--device", "cuda", "--seq-len", "256", "--device-batch-size",
            "16", "--total-batch-size", str(16 * 256), "--tokens", str(16 * 256 * 40), "--eval-tokens", "8192"]
    assert train.main(args + ["--run-dir", str(tmp_path / "bf16")]) == 0
    assert train.main(args + ["--run-dir", str(tmp_path / "fp8"), "--fp8", recipe]) == 0
    bf16, ours = ([r["loss"] for r in metrics(tmp_path / d) if "loss" in r] for d in ("bf16", "fp8"))
    assert ours[-1] < 0.7 * ours[0]
    assert all(abs(a - b) < 0.05 * a for a, b in zip(bf16, ours)), list(zip(bf16, ours))
    sa, sb = (json.loads((tmp_path / d / "summary.json").read_text())["val_bpb"] for d in ("bf16", "fp8"))
    assert abs(sa - sb) < 0.02 * sa
