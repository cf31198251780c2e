"""Generation (engine.py): with and without the KV cache, the same tokens for a seed (the cache is
an optimisation, never a different model); greedy picks the argmax of a full forward at every step;
top-k never samples outside the k most likely, top-p outside the nucleus; the context bounds the
output. Batches: prompts of different lengths in one batch get, greedy, the tokens each gets alone,
and the cache's logits equal each row's own full forward to float64 rounding; `llmlabs sample`
batches, streams, and reports tokens/s on stderr."""
import copy
import random
from dataclasses import asdict

import pytest
import torch

from llmlabs import checkpoint, cli
from llmlabs.attention import KVCache
from llmlabs.common import LabError
from llmlabs.engine import _graphed_decode, _nucleus, generate, generate_batch
from llmlabs.model import build_model

from conftest import random_text
from test_model import randomized, tiny_config

# lengths 5, 2, 13 and 3: one row longer than the short window (5), one of 2 padded by 11
PROMPTS = [[0, 17, 3, 42, 8], [0, 9], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [0, 33, 33]]


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


@pytest.fixture(scope="module")
def model64():
    """The model in float64 with float64 RoPE tables: rope_tables rounds its angles to float32, which
    moves a padded row's logits by ~1e-7 (its positions are shifted); with exact angles the only
    difference left between a padded row and its lone run is float64 rounding."""
    m = randomized(build_model(tiny_config(sequence_len=48), "cpu"), seed=5).double().eval()
    c = m.config
    inv_freq = c.rope_base ** (-torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim)
    angles = torch.outer(torch.arange(c.sequence_len, dtype=torch.float64), inv_freq)
    m.rope_cos.copy_(angles.cos())
    m.rope_sin.copy_(angles.sin())
    return m


def test_batched_greedy_equals_one_at_a_time(model64):
    alone = [list(generate(model64, p, 12, temperature=0.0)) for p in PROMPTS]
    assert generate_batch(model64, PROMPTS, 12, temperature=0.0) == alone
    # a row stops at its own stop token (yielded), the others go on
    stop = alone[1][3]
    assert stop not in alone[1][:3] and stop not in alone[0]
    out = generate_batch(model64, PROMPTS, 12, temperature=0.0, stop_ids=(stop,))
    assert out == [list(generate(model64, p, 12, temperature=0.0, stop_ids=(stop,))) for p in PROMPTS]
    assert out[1] == alone[1][:4] and out[0] == alone[0]
    # the context is counted from the longest prompt (13 of 48)
    assert [len(r) for r in generate_batch(model64, PROMPTS, 100, temperature=0.0)] == [48 - 13] * 4


@pytest.mark.parametrize("static", [False, True])
def test_kv_cache_logits_equal_each_rows_full_forward(model64, static):
    """static: every query attends over the whole buffer, positions from the device (the shape a
    captured CUDA graph needs), with the same logits."""
    new = torch.randint(0, 61, (4, 6), generator=torch.Generator().manual_seed(3))
    longest = max(map(len, PROMPTS))
    pads = [longest - len(p) for p in PROMPTS]
    ids = torch.tensor([[0] * n + p for n, p in zip(pads, PROMPTS)])
    with torch.no_grad():
        cache = KVCache(4, longest + 6, model64.config, "cpu", torch.float64, starts=pads, static=static)
        pieces = [model64(ids, kv_cache=cache)]                                   # padded prefill
        pieces += [model64(new[:, t:t + 1], kv_cache=cache) for t in range(4)]  # decode one at a time
        pieces.append(model64(new[:, 4:], kv_cache=cache))                      # a chunk
        cached = torch.cat(pieces, dim=1)
        for row, (p, n) in enumerate(zip(PROMPTS, pads)):
            full = model64(torch.tensor([p + new[row].tolist()]))[0]
            torch.testing.assert_close(cached[row, n:], full, rtol=0, atol=1e-12)
    assert cache.pos == int(cache.pos_t) if static else cache.pos == longest + 6


def test_graphed_decoding_needs_a_gpu(model):
    with pytest.raises(LabError, match="needs a model on a GPU"):
        generate_batch(model, PROMPTS, 3, graph=True)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (1.5, 7, 0.6)])
def test_batched_sampling_is_reproducible_and_the_same_without_cache(model, temperature, top_k, top_p):
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=11)
    cached = generate_batch(model, PROMPTS, 10, **kw)
    assert cached == generate_batch(model, PROMPTS, 10, **kw)
    assert cached == generate_batch(model, PROMPTS, 10, use_cache=False, **kw)  # each row alone, full forwards
    assert cached != generate_batch(model, PROMPTS, 10, **{**kw, "seed": 12})


def test_nucleus_keeps_the_smallest_set_reaching_p(model):
    probs = torch.tensor([[0.125, 0.5, 0.25, 0.125], [0.25, 0.25, 0.25, 0.25]])  # exact in binary
    kept = lambda p: [(row > 0).nonzero().view(-1).tolist() for row in _nucleus(probs, p)]  # noqa: E731
    assert kept(0.5) == [[1], [0, 1]]            # 0.5 reaches 0.5 alone; ties: the lower indices
    assert kept(0.75) == [[1, 2], [0, 1, 2]]     # 0.5 + 0.25 = 0.75, not one more
    assert kept(0.76) == [[0, 1, 2], [0, 1, 2, 3]]  # of the tied 0.125s, the first index
    assert kept(0.0) == [[1], [0]] and kept(1.0) == [[0, 1, 2, 3]] * 2  # the top token always stays
    torch.testing.assert_close(_nucleus(probs, 0.75)[0], torch.tensor([0, 0.5, 0.25, 0]))
    # sampling with top_p draws only inside the nucleus of the model's own distribution
    ids = [0, 23, 1]
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([ids]))[0, -1] / 2.0, dim=-1)
    order = p.argsort(descending=True)
    size = int((p[order].cumsum(0) < 0.5).sum()) + 1
    firsts = {next(generate(model, ids, 1, temperature=2.0, top_p=0.5, seed=s)) for s in range(40)}
    assert firsts <= set(order[:size].tolist()) and len(firsts) > 1


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory without training: a small BPE tokenizer and a randomized tiny model's checkpoint."""
    from llmlabs.data.tokenizer import Tokenizer

    run = tmp_path_factory.mktemp("run")
    rng = random.Random(0)
    tok = Tokenizer.train((random_text(rng, 200) for _ in range(30)), 300)
    tok.save(run / "tokenizer.json")
    config = tiny_config(vocab_size=300, sequence_len=64)
    m = randomized(build_model(config, "cpu"), seed=2)
    checkpoint.save(run, 0, m, torch.optim.SGD(m.parameters(), lr=0.0),
                    {"model_config": asdict(config), "run_config": {}, "tokenizer_hash": tok.hash})
    return str(run)


def sample(capsys, *argv):
    capsys.readouterr()
    assert cli.main(["sample", *argv, "--device", "cpu"]) == 0
    return capsys.readouterr()


def test_sample_command_batches_streams_and_reports_tokens_per_second(run_dir, tmp_path, capsys):
    greedy = ["--max-tokens", "12", "--temperature", "0"]
    one = sample(capsys, run_dir, "--prompt", "the data", *greedy)
    assert one.out.startswith("the data") and len(one.err.strip().splitlines()) == 1
    assert " tokens/s (1 row, prefill included, cpu)" in one.err and one.err.startswith("12 tokens in ")
    # --stream prints the same text, as it comes
    assert sample(capsys, run_dir, "--prompt", "the data", "--stream", *greedy).out == one.out
    # several prompts (and samples) in one batch: each row as it would be alone (greedy)
    many = sample(capsys, run_dir, "--prompt", "東京", "--prompt", "the data", "--num-samples", "2", *greedy)
    texts = many.out.split("-" * 40 + "\n")
    alone = sample(capsys, run_dir, "--prompt", "東京", *greedy).out
    assert texts == [alone, alone, one.out, one.out] and "(4 rows" in many.err
    (tmp_path / "prompts.txt").write_text("東京\n\nthe data\n", encoding="utf-8")
    assert sample(capsys, run_dir, "--prompts-file", str(tmp_path / "prompts.txt"), *greedy).out == \
        alone + "-" * 40 + "\n" + one.out
    # top-p 0 keeps only the most likely token: greedy whatever the temperature
    assert sample(capsys, run_dir, "--prompt", "the data", "--max-tokens", "12", "--top-p", "0").out == one.out
    assert cli.main(["sample", run_dir, "--prompt", "a", "--prompt", "b", "--stream"]) == 2
    assert "--stream prints one text" in capsys.readouterr().err
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert cli.main(["sample", run_dir, "--prompts-file", str(tmp_path / "blank.txt")]) == 2
    assert "holds no prompt" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the KV cache's CUDA attention (bf16, SDPA's memory-efficient "
                                                          "kernel) needs a GPU")
def test_cuda_kv_cache_in_bf16_is_as_close_to_float64_as_the_full_forward(model64):
    """`llmlabs sample` on a GPU: bf16 weights, prefill and one-token decode steps through the cache.
    Each row's cached logits are about as far from the float64 CPU reference as a bf16 full forward."""
    new = torch.randint(0, 61, (4, 5), generator=torch.Generator().manual_seed(4))
    longest = max(map(len, PROMPTS))
    pads = [longest - len(p) for p in PROMPTS]
    ids = torch.tensor([[0] * n + p for n, p in zip(pads, PROMPTS)])
    bf16 = copy.deepcopy(model64).to("cuda", torch.bfloat16)
    with torch.no_grad():
        cache = KVCache(4, longest + 5, bf16.config, "cuda", torch.bfloat16, starts=pads)
        pieces = [bf16(ids.cuda(), kv_cache=cache)] + [bf16(new[:, t:t + 1].cuda(), kv_cache=cache) for t in range(5)]
        cached = torch.cat(pieces, dim=1).double().cpu()
        for row, (p, n) in enumerate(zip(PROMPTS, pads)):
            seq = torch.tensor([p + new[row].tolist()])
            ref = model64(seq)[0]
            full_err = (bf16(seq.cuda())[0].double().cpu() - ref).abs().max().item()
            cache_err = (cached[row, n:] - ref).abs().max().item()
            assert cache_err <= 2 * full_err + 1e-2, (row, cache_err, full_err)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphed_decode_replays_the_static_step_exactly(model64):
    """Each replay gives the logits an eager step through a static cache gives (the same kernels),
    positions advance on the device, and the engine's graphed greedy tokens repeat."""
    new = torch.randint(0, 61, (4, 6), generator=torch.Generator().manual_seed(6)).cuda()
    longest = max(map(len, PROMPTS))
    pads = [longest - len(p) for p in PROMPTS]
    ids = torch.tensor([[0] * n + p for n, p in zip(pads, PROMPTS)]).cuda()
    bf16 = copy.deepcopy(model64).to("cuda", torch.bfloat16)
    with torch.no_grad():
        eager, graphed = (KVCache(4, longest + 6, bf16.config, "cuda", torch.bfloat16, starts=pads, static=True)
                          for _ in range(2))
        bf16(ids, kv_cache=eager), bf16(ids, kv_cache=graphed)
        step = _graphed_decode(bf16, graphed, 4)
        for t in range(6):
            want = bf16(new[:, t:t + 1], kv_cache=eager)[:, -1, :]
            assert torch.equal(step(new[:, t]), want), t
        assert graphed.pos == eager.pos == int(graphed.pos_t) == longest + 6
    out = generate_batch(bf16, PROMPTS, 12, temperature=0.0, graph=True)
    assert out == generate_batch(bf16, PROMPTS, 12, temperature=0.0, graph=True) and [len(r) for r in out] == [12] * 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="`llmlabs sample` captures CUDA graphs on a GPU only")
def test_cuda_sample_command_decodes_through_one_graph(run_dir, capsys, monkeypatch):
    """On CUDA the sample command decodes through _graphed_decode (captured once for the batch), and
    prints what generate_batch(graph=True) makes of the checkpoint it loads."""
    from llmlabs import engine
    from llmlabs.checkpoint import load_run
    from llmlabs.data.tokenizer import Tokenizer

    captures = []
    monkeypatch.setattr(engine, "_graphed_decode", lambda *a: captures.append(a) or _graphed_decode(*a))
    capsys.readouterr()
    assert cli.main(["sample", run_dir, "--prompt", "the data", "--prompt", "東京", "--max-tokens", "12",
                     "--temperature", "0", "--device", "cuda"]) == 0
    out = capsys.readouterr()
    assert len(captures) == 1 and "(2 rows, prefill included, cuda" in out.err  # cuda:0 on a GPU machine
    model, _ = load_run(run_dir, torch.device("cuda"))
    tok = Tokenizer.load(f"{run_dir}/tokenizer.json")
    rows = generate_batch(model, [[tok.bos_id] + tok.encode(p) for p in ("the data", "東京")], 12, temperature=0.0,
                          stop_ids=(tok.bos_id,), graph=True)
    want = [p + tok.decode(r[:-1] if r and r[-1] == tok.bos_id else r) for p, r in zip(("the data", "東京"), rows)]
    assert out.out == want[0] + "\n" + "-" * 40 + "\n" + want[1] + "\n"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphed_decode_of_an_moe_model_replays_its_eager_step(model64):
    """The MoE's grouped path (device-side routing and offsets, no host sync) is captured whole: each
    replay equals the eager static step, and the routing counters stay untouched."""
    from test_moe import moe_config

    config = moe_config(sequence_len=48, vocab_size=61)
    bf16 = randomized(build_model(config, "cpu"), seed=9).to("cuda", torch.bfloat16).eval()
    loads = [b.mlp.expert_load for b in bf16.blocks if hasattr(b.mlp, "expert_load")]
    before = [x.clone() for x in loads]
    new = torch.randint(0, 61, (4, 5), generator=torch.Generator().manual_seed(7)).cuda()
    longest = max(map(len, PROMPTS))
    pads = [longest - len(p) for p in PROMPTS]
    ids = torch.tensor([[0] * n + p for n, p in zip(pads, PROMPTS)]).cuda()
    with torch.no_grad():
        eager, graphed = (KVCache(4, longest + 5, config, "cuda", torch.bfloat16, starts=pads, static=True)
                          for _ in range(2))
        bf16(ids, kv_cache=eager), bf16(ids, kv_cache=graphed)
        step = _graphed_decode(bf16, graphed, 4)
        for t in range(5):
            assert torch.equal(step(new[:, t]), bf16(new[:, t:t + 1], kv_cache=eager)[:, -1, :]), t
    assert len(loads) == 2 and all(torch.equal(a, b) for a, b in zip(before, loads))
