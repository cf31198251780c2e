"""basics/: every file's own self-check (its main() asserts what the file claims), run in-process on
one thread (steady when other processes share the cores) with arguments that keep this whole file
near a minute on 2 CPU cores; plus the files' promises: torch and the standard library only, and a
line in basics/README.md that links a module of the lab that exists."""
import ast
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BASICS = ROOT / "basics"
FILES = ("gpt", "attention", "flash_triton", "muon", "moe", "rope", "vit", "bpb")
# what a basics file may import beyond the standard library (sklearn only inside vit.py's loader)
ALLOWED = {"torch", "triton", "sklearn"}


def load(name):
    spec = importlib.util.spec_from_file_location(f"basics_{name}", BASICS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_gpt_trains_below_the_unigram_baseline():
    # 40 of the default 500 steps (2.45 here); main() also asserts the loss is below the unigram baseline (~3.13)
    loss = load("gpt").main(["--steps", "40", "--max-loss", "2.7"])
    assert loss < 2.7


def test_attention_three_ways_agree():
    load("attention").main([])


def test_muon_polar_express_against_svd():
    load("muon").main([])


def test_moe_bias_balancing():
    load("moe").main(["--steps", "100"])


def test_rope_relative_and_mrope_equals_rope_on_text():
    load("rope").main([])


def test_vit_on_digits():
    # the test extra installs scikit-learn; without it vit.py exits naming `pip install scikit-learn`
    acc = load("vit").main(["--epochs", "15", "--min-accuracy", "0.85"])
    assert acc >= 0.85


def test_bpb_ranks_models_where_per_token_loss_cannot():
    load("bpb").main([])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash_triton.py needs a CUDA GPU")
def test_flash_triton_against_sdpa():
    load("flash_triton").main()


@pytest.mark.parametrize("name", FILES)
def test_standalone(name):
    """Imports only torch, Triton, scikit-learn and the standard library; a main() and a docstring
    that names the lab's module doing the same job fast."""
    tree = ast.parse((BASICS / f"{name}.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported - ALLOWED - set(sys.stdlib_module_names) == set()
    assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)
    assert "llmlabs/" in ast.get_docstring(tree)


def test_readme_links_each_file_to_a_lab_module_that_exists():
    readme = (BASICS / "README.md").read_text()
    for name in FILES:
        assert f"({name}.py)" in readme, f"basics/README.md does not link {name}.py"
    linked = re.findall(r"\(\.\./(llmlabs/[\w/.]*)\)", readme)
    assert linked and all((ROOT / path).exists() for path in linked), linked
