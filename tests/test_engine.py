"""Generation (engine.py): with and without the KV cache, the same tokens for a seed (the cache is
an optimisation, never a different model); greedy picks the argmax of a full forward at every step;
top-k never samples outside the k most likely; the context bounds the output."""
import pytest
import torch

from llmlabs.common import LabError
from llmlabs.engine import generate
from llmlabs.model import build_model

from test_model import randomized, tiny_config


@pytest.fixture(scope="module")
def model():
    return randomized(build_model(tiny_config(sequence_len=48), "cpu"), seed=5).eval()


@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (1.0, None), (0.8, 7)])
def test_cache_and_no_cache_give_the_same_tokens(model, temperature, top_k):
    prompt = [0, 17, 3, 42, 8]
    cached = list(generate(model, prompt, 30, temperature=temperature, top_k=top_k, seed=11))
    plain = list(generate(model, prompt, 30, temperature=temperature, top_k=top_k, seed=11, use_cache=False))
    assert cached == plain and len(cached) == 30
    if temperature:  # another seed, another sample (30 draws over 61 tokens)
        assert list(generate(model, prompt, 30, temperature=temperature, top_k=top_k, seed=12)) != cached


def test_greedy_is_the_argmax_of_a_full_forward(model):
    ids = [0, 5, 9]
    out = list(generate(model, ids, 12, temperature=0.0))
    for tok in out:
        with torch.no_grad():
            assert tok == int(model(torch.tensor([ids]))[0, -1].argmax())
        ids.append(tok)


def test_top_k_samples_only_the_k_most_likely(model):
    ids = [0, 23, 1]
    with torch.no_grad():
        allowed = set(torch.topk(model(torch.tensor([ids]))[0, -1], 3).indices.tolist())
    firsts = {next(generate(model, ids, 1, temperature=5.0, top_k=3, seed=s)) for s in range(40)}
    assert firsts <= allowed and len(firsts) > 1


def test_context_bounds_the_output_and_stop_ids_end_it(model):
    assert len(list(generate(model, list(range(40)), 100, temperature=0.0))) == 48 - 40
    first = next(generate(model, [0, 2], 5, temperature=0.0))
    assert list(generate(model, [0, 2], 5, temperature=0.0, stop_ids=(first,))) == [first]
    with pytest.raises(LabError, match="prompt of 48 tokens: give 1 to 47 tokens"):
        next(generate(model, list(range(48)), 5))
