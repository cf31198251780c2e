"""The harness's side of the evaluator protocol (evaluator.evaluate_run) against stand-in evaluator
processes: an early refusal keeps its reason whatever the batch size (an X frame larger than a pipe's
buffer meets a closed pipe), a dying evaluator is a crash with its last line, a silent one times out,
and an honest stand-in's nats give evaluate.py's bpb."""
import math
import sys

import pytest
from conftest import prepared_stdlib

from llmlabs.auto import evaluator

REFUSE = ("import os, sys, json; from llmlabs.auto.evaluator import send; f = os.fdopen(int(sys.argv[-1]), 'wb'); "
          "send(f, b'R', payload=json.dumps({'reason': 'refused: harness replaced'}).encode()); f.close(); os._exit(0)")
DIE = "raise RuntimeError('evaluator broke')"
HANG = "import time; time.sleep(60)"
# scores every target at log(V) nats (a uniform model), then answers the end frame with no reason
UNIFORM = """
import math, os, sys, json
import numpy as np
from llmlabs.auto.evaluator import send, recv, _HEAD
fin, fout = os.fdopen(int(sys.argv[-2]), "rb"), os.fdopen(int(sys.argv[-1]), "wb")
while True:
    head = fin.read(_HEAD.size)
    if head[:1] == b"E":
        break
    rows, cols = _HEAD.unpack(head)[1:]
    fin.read(rows * cols * 4)
    send(fout, b"L")
    y = recv(fin, b"Y")
    send(fout, b"N", np.full(y.shape, math.log(300), dtype=np.float32))
send(fout, b"R", payload=json.dumps({"reason": None, "causal": {"causal": True}}).encode())
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from llmlabs.data.shards import DataDir

    return DataDir.open(prepared_stdlib(tmp_path_factory.mktemp("d"), 20, 300, 0.2, 0.2))


def run(code, data, tmp_path, rows=2, seq=64, timeout=30):
    return evaluator.evaluate_run([sys.executable, "-c", code], None, data=data, split="val", rows=rows, seq_len=seq,
                                  max_tokens=rows * seq * 2, timeout=timeout, log_path=tmp_path / "log")


@pytest.mark.parametrize("rows,seq", [(2, 64), (20, 1024)])  # 512 B and 80 KiB X frames (a pipe holds 64 KiB)
def test_an_early_refusal_keeps_its_reason(data, tmp_path, rows, seq):
    out = run(REFUSE, data, tmp_path, rows, seq)
    assert not out["ok"] and out["reason"] == "refused: harness replaced" and not out.get("crashed")


def test_a_dying_evaluator_is_a_crash_with_its_last_line(data, tmp_path):
    out = run(DIE, data, tmp_path)
    assert not out["ok"] and out["crashed"] and out["reason"] == "evaluator failed: RuntimeError: evaluator broke"


def test_a_silent_evaluator_times_out(data, tmp_path):
    out = run(HANG, data, tmp_path, timeout=2)
    assert not out["ok"] and out["reason"] == "evaluator ran past the timeout" and out["eval_s"] < 30


def test_honest_nats_give_the_bpb_of_evaluate_py(data, tmp_path):
    from llmlabs.evaluate import accumulate, bpb_result, eval_batches, token_bytes_and_unigram

    import torch

    out = run(UNIFORM, data, tmp_path)
    assert out["ok"] and out["causal"] == {"causal": True}
    tb, uni = token_bytes_and_unigram(data, "cpu")
    sums = torch.zeros(4, dtype=torch.float64)
    for x, y in eval_batches(data, "val", 2, 64, 2 * 64 * 2):
        accumulate(sums, torch.full(y.shape, math.log(300)), y, tb, uni)
    want = bpb_result(sums, "val", data)
    assert out["bpb"] == pytest.approx(want["bpb"], rel=1e-6) and out["tokens"] == want["tokens"]
