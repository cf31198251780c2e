"""The lm-evaluation-harness adapter (llmlabs/lm_eval_adapter.py) on a tiny random model, offline: lm-eval
runs tasks defined on local jsonl files; the adapter's log-likelihoods equal the model's own scoring
(tasks.continuation_logprobs), rolling log-likelihoods a full forward's, generations one prompt at a
time; `llmlabs eval RUN --tasks` routes names the offline suite does not know to lm-eval."""
import json
import random
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import random_text
from llmlabs import checkpoint, cli, evaluate, tasks
from llmlabs.common import LabError
from llmlabs.data.tokenizer import Tokenizer
from llmlabs.engine import generate
from llmlabs.model import build_model
from test_model import randomized, tiny_config

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from llmlabs.lm_eval_adapter import LabLM  # noqa: E402

L = 64  # the model's context


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(3)
    return Tokenizer.train(iter([random_text(rng, 300) for _ in range(60)]), 400)


@pytest.fixture(scope="module")
def model(tok):
    return randomized(build_model(tiny_config(sequence_len=L, vocab_size=tok.vocab_size), "cpu"), seed=7).double().eval()


def words(rng, n):
    """Text that ends in a word: a continuation starting with a space then tokenizes apart from it."""
    return " ".join(rng.choice(["data", "loader", "café", "東京", "naïve", "rows", "model", "x1", "façade"])
                    for _ in range(n))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Three lm-eval tasks on local jsonl files: multiple choice, generation, rolling log-likelihood."""
    d = tmp_path_factory.mktemp("lm_tasks")
    rng = random.Random(11)
    docs = {"mc": [{"context": words(rng, rng.randint(2, 9)), "choices": [words(rng, rng.randint(1, 3)) for _ in range(3)],
                    "answer": rng.randrange(3)} for _ in range(7)],
            "gen": [{"prompt": words(rng, rng.randint(1, 6)), "target": "data"} for _ in range(5)],
            "roll": [{"text": words(rng, n)} for n in (3, 12, 40)]}  # the last is longer than the context
    kinds = {"mc": 'output_type: multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\n'
                   'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n',
             "gen": 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{target}}"\n'
                    'generation_kwargs:\n  until: ["s"]\n  max_gen_toks: 9\n  do_sample: false\n'
                    'metric_list:\n  - metric: exact_match\n',
             "roll": 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                     'metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n'}
    for name, rows in docs.items():
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (d / f"{name}.yaml").write_text(f"task: lab_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                        f"    test: {d / f'{name}.jsonl'}\n  cache_dir: {d / 'hf'}\n"
                                        f"test_split: test\n{kinds[name]}")
    return d, docs


def test_lm_eval_loglikelihoods_are_the_models_own_scoring(model, tok, task_dir):
    d, docs = task_dir
    out = lm_eval.simple_evaluate(model=LabLM(model, tok, batch_size=4), tasks=["lab_mc"], log_samples=True,
                                  task_manager=TaskManager(include_path=str(d), include_defaults=False))
    samples = sorted(out["samples"]["lab_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(docs["mc"]) == 7
    hits = 0
    for s, doc in zip(samples, docs["mc"]):
        conts = [" " + c for c in doc["choices"]]
        for c in conts:  # the setup: tokenized apart or together, the same tokens
            assert tok.encode(doc["context"] + c) == tok.encode(doc["context"]) + tok.encode(c)
        want = tasks.continuation_logprobs(model, tok, doc["context"], conts, "cpu")
        got = [r[0][0] for r in s["resps"]]
        assert got == pytest.approx(want, rel=1e-9, abs=1e-9)
        hits += max(range(3), key=want.__getitem__) == doc["answer"]
    assert out["results"]["lab_mc"]["acc,none"] == pytest.approx(hits / 7)


def test_a_long_context_keeps_the_last_tokens_and_is_greedy_checked(model, tok):
    rng = random.Random(5)
    lm = LabLM(model, tok, batch_size=2)
    ctx, cont = words(rng, 60), " rows model"
    requests = [Instance("loglikelihood", {}, (ctx, cont), 0), Instance("loglikelihood", {}, ("data", " loader"), 1)]
    (long_lp, _), (short_lp, _) = lm.loglikelihood(requests, disable_tqdm=True)
    whole = [tok.bos_id] + tok.encode(ctx + cont)
    n = len(tok.encode(ctx + cont)) - len(tok.encode(ctx))
    assert len(whole) > L + 1
    logp = F.log_softmax(model(torch.tensor([whole[-(L + 1):-1]]))[0], -1)  # the L tokens before the last
    assert long_lp == pytest.approx(sum(float(logp[L - n + j, t]) for j, t in enumerate(whole[-n:])), rel=1e-9)
    assert short_lp == pytest.approx(tasks.continuation_logprobs(model, tok, "data", [" loader"], "cpu")[0], rel=1e-9)
    # is_greedy: true for the model's own argmax continuation
    ids = [tok.bos_id] + tok.encode("data")
    nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
    assert lm._loglikelihood_tokens([(None, ids, [nxt]), (None, ids, [(nxt + 1) % 300])]) == [
        (pytest.approx(float(F.log_softmax(model(torch.tensor([ids]))[0, -1], -1)[nxt])), True),
        (pytest.approx(float(F.log_softmax(model(torch.tensor([ids]))[0, -1], -1)[(nxt + 1) % 300])), False)]


def test_rolling_loglikelihood_scores_every_token_once(model, tok, task_dir):
    _, docs = task_dir
    lm = LabLM(model, tok, batch_size=3)
    texts = [d["text"] for d in docs["roll"]]
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)],
                                   disable_tqdm=True)
    for text, value in zip(texts, got):
        t = tok.encode(text)
        assert len(t) <= 2 * L
        first = F.log_softmax(model(torch.tensor([[tok.bos_id] + t[:L - 1]]))[0], -1)
        want = sum(float(first[i, t[i]]) for i in range(min(L, len(t))))
        if len(t) > L:  # the rest: predicted by one window of the L tokens before the end
            rest = F.log_softmax(model(torch.tensor([t[-L - 1:-1]]))[0], -1)
            want += sum(float(rest[L - (len(t) - i), t[i]]) for i in range(L, len(t)))
        assert value == pytest.approx(want, rel=1e-9)
    assert len(tok.encode(texts[-1])) > L  # the two-window case was exercised


def test_generate_until_equals_one_prompt_at_a_time_greedy(model, tok):
    rng = random.Random(8)
    prompts = [words(rng, k) for k in (1, 5, 2, 9, 3)]
    alone = [tok.decode([t for t in generate(model, [tok.bos_id] + tok.encode(p), 12, temperature=0.0,
                                             stop_ids=(tok.bos_id,), use_cache=False) if t != tok.bos_id])
             for p in prompts]
    stop = alone[1][3:5]  # a stop string that cuts at least one row
    want = [a[:a.index(stop)] if stop in a else a for a in alone]
    lm = LabLM(model, tok, batch_size=3)
    got = lm.generate_until([Instance("generate_until", {}, (p, {"until": [stop], "max_gen_toks": 12}), i)
                             for i, p in enumerate(prompts)], disable_tqdm=True)
    assert got == want and sum(w != a for w, a in zip(want, alone)) >= 1
    calls = []  # a batch stops once every row holds a stop string: "" is in every text after one token
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        assert lm.generate_until([Instance("generate_until", {}, (p, {"until": [""], "max_gen_toks": 12}), i)
                                  for i, p in enumerate(prompts[:3])], disable_tqdm=True) == ["", "", ""]
    finally:
        hook.remove()
    assert len(calls) == 1  # the prefill, and no decoding step
    with pytest.raises(LabError, match=r"generation settings \['num_beams'\]"):
        lm.generate_until([Instance("generate_until", {}, ("x", {"num_beams": 4}), 0)])


@pytest.fixture(scope="module")
def run(tmp_path_factory, model, tok):
    """A run directory as `llmlabs train` leaves it (checkpoint + tokenizer.json), for the CLI."""
    d = tmp_path_factory.mktemp("run")
    float_model = build_model(model.config, "cpu")
    float_model.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    state = {"model_config": vars(model.config), "tokenizer_hash": tok.hash,
             "run_config": {"device_batch_size": 4, "data": str(d / "none")}}
    checkpoint.save(d, 3, float_model, {}, state)
    tok.save(d / "tokenizer.json")
    return d


def test_registered_for_lm_evals_own_api(run, model, tok, tmp_path):
    lm = lm_eval.api.registry.get_model("llmlabs").create_from_arg_string(f"run={run},device=cpu", {"batch_size": "2"})
    assert isinstance(lm, LabLM) and lm.batch_size == 2 and lm.max_length == L
    req = [Instance("loglikelihood", {}, ("rows data", " model"), 0)]
    assert lm.loglikelihood(req)[0][0] == pytest.approx(LabLM(model, tok).loglikelihood(req)[0][0], rel=1e-5)  # float32
    with pytest.raises(LabError, match="model_args must name the run: run=RUN"):
        LabLM.create_from_arg_obj({"device": "cpu"})
    other = tmp_path / "other"
    shutil.copytree(run, other)
    Tokenizer.train(iter([random_text(random.Random(9), 300) for _ in range(20)]), 300).save(other / "tokenizer.json")
    with pytest.raises(LabError, match="tokenizer.json is not the tokenizer its checkpoint was trained with"):
        LabLM.create_from_arg_obj({"run": str(other), "device": "cpu"})


def test_eval_command_routes_other_names_to_lm_eval(run, task_dir, capsys):
    d, _ = task_dir
    assert cli.main(["eval", str(run), "--tasks", "lab_mc,lab_gen,lab_roll", "--include-path", str(d),
                     "--device", "cpu", "--items", "4"]) == 0
    out = capsys.readouterr().out
    rows = {r["task"]: r for r in map(json.loads, (run / "evals.jsonl").read_text().splitlines())}
    assert set(rows) == {"lab_mc", "lab_gen", "lab_roll"} and all(r["step"] == 3 for r in rows.values())
    assert rows["lab_mc"]["metric"] == "acc_norm,none" and rows["lab_mc"]["items"] == 4  # --items is lm-eval's limit
    assert rows["lab_gen"]["metric"] == "exact_match,none" and rows["lab_roll"]["items"] == 3
    assert rows["lab_roll"]["metrics"]["bits_per_byte,none"] > 0
    assert "lab_gen" in out and "lm-eval exact_match,none" in out and (run / "evals.png").stat().st_size > 0


def test_unknown_names_and_a_missing_lm_eval_are_one_line(run, task_dir, monkeypatch, capsys):
    d, _ = task_dir
    # lm-eval's own ~15k task files take ~10 s to index: here the fallback manager indexes --include-path only
    monkeypatch.setattr("lm_eval.tasks.TaskManager",
                        lambda include_path=None, **kw: TaskManager(include_path=include_path, include_defaults=False))
    with pytest.raises(LabError, match=r"unknown task 'lab_nope': not one of bpb, next_line, signature, offline, core"):
        evaluate._lm_eval(["lab_mc", "lab_nope"], str(d))
    assert cli.main(["eval", str(run), "--tasks", "bpb", "--include-path", str(d)]) == 2
    assert capsys.readouterr().err.startswith("error: --include-path adds lm-eval tasks, and --tasks bpb names none")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    assert cli.main(["eval", str(run), "--tasks", "hellaswag,core"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: hellaswag: not one of bpb, next_line, signature, offline, core, so lm-eval tasks, and lm-eval "
                   "is not installed: pip install 'llmlabs[eval]'"]


def test_bench_lm_eval_local_agrees_with_the_labs_scoring(tmp_path, capsys, monkeypatch):
    """bench/lm_eval_local.py on a run of random weights over held-out stdlib source: lm-eval's acc and acc_bytes
    equal tasks.evaluate's acc and acc_norm on the same items; the rolling task's bits per byte is a number; a
    disagreement, or a RUN that is no run, is one line and a non-zero exit."""
    from conftest import bench_script, prepared_stdlib
    from llmlabs.data.shards import DataDir

    data = DataDir.open(prepared_stdlib(tmp_path, 60, 400, 0.3, 0.1))
    run = tmp_path / "run"
    model = randomized(build_model(tiny_config(sequence_len=128, vocab_size=400, n_layer=2), "cpu"), seed=4)
    checkpoint.save(run, 5, model, {}, {"model_config": vars(model.config), "tokenizer_hash": data.tokenizer.hash,
                                        "run_config": {"data": str(data.path), "device_batch_size": 8, "seq_len": 128,
                                                       "eval_tokens": 1024}})
    bench = bench_script("lm_eval_local")
    out = tmp_path / "rows.jsonl"
    assert bench.main([str(run), "--items", "12", "--device", "cpu", "--out", str(out),
                       "--tasks-dir", str(tmp_path / "tasks")]) == 0
    rows = {(r["task"], r["scorer"]): r for r in map(json.loads, out.read_text().splitlines())}
    for task in ("lab_next_line", "lab_signature"):
        lm, lab = rows[task, "lm-eval, lab's split"], rows[task, "tasks.evaluate"]
        assert lm["items"] == lab["items"] == 12 and lm["near_ties"] == [0, 0]
        assert (lm["acc"], lm["acc_norm"]) == (lab["acc"], lab["acc_norm"])
        assert 0 <= rows[task, "lm-eval, its split"]["acc"] <= 1
    roll = rows["lab_heldout_bpb", "lm-eval rolling"]
    assert roll["items"] == 12 and 0 < roll["bits_per_byte"] < 20 and rows["val_bpb", "evaluate_bpb"]["bits_per_byte"] > 0
    assert "lab_signature" in capsys.readouterr().out
    assert bench.main([str(tmp_path / "nope"), "--device", "cpu"]) == 2
    assert "nope has no checkpoint" in capsys.readouterr().err
    real = tasks.evaluate
    monkeypatch.setattr(tasks, "evaluate", lambda *a: {**real(*a), "acc": -1.0})
    assert bench.main([str(run), "--items", "4", "--device", "cpu"]) == 1
    assert "cross-check failed: lab_next_line: lm-eval acc" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="generate_until decodes through CUDA graphs on a GPU only")
def test_cuda_generate_until_decodes_through_a_graph_under_autocast(model, tok, monkeypatch):
    """On CUDA, with float32 weights under bf16 autocast as `llmlabs eval` runs them, generate_until
    captures the decode step (autocast's cache off) and returns what generate_batch(graph=True) makes
    under the same autocast: the same kernels, the same tokens."""
    from llmlabs import engine

    cuda = build_model(model.config, "cpu")
    cuda.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    cuda = cuda.cuda().eval()
    captures = []
    real = engine._graphed_decode
    monkeypatch.setattr(engine, "_graphed_decode", lambda *a: captures.append(1) or real(*a))
    rng = random.Random(9)
    prompts = sorted((words(rng, k) for k in (1, 5, 2, 9)), key=len, reverse=True)  # the adapter's batch order
    lm = LabLM(cuda, tok, batch_size=4, autocast=torch.autocast("cuda", dtype=torch.bfloat16))
    got = lm.generate_until([Instance("generate_until", {}, (p, {"until": ["\x00"], "max_gen_toks": 10}), i)
                             for i, p in enumerate(prompts)], disable_tqdm=True)
    assert captures == [1]
    with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        ids = engine.generate_batch(cuda, [lm.tok_encode(p) for p in prompts], 10, temperature=0.0,
                                    stop_ids=(tok.bos_id,), graph=True)
    assert got == [tok.decode([t for t in r if t != tok.bos_id]) for r in ids]
