"""The harness's evaluation of an experiment: a process of its own that the trained model cannot reach.

Two processes. The harness (parent, `evaluate_run`) holds the data: it reads the held-out split,
cuts it into the same batches as evaluate.evaluate_bpb, and does all the accounting (bytes, unigram,
the bpb sums) with evaluate.py's functions. The evaluator (child, `child_main`) holds the model: it
is started isolated (`python -I`: no PYTHONPATH, no user site, no current directory, so no
sitecustomize or .pth of the experiment's), imports the harness from the experiment's code snapshot
(whose harness files the allowlist has checked equal to the session's), snapshots every harness
function and the torch functions the scoring uses (guard.snapshot), only then imports the model code,
loads the trained weights from safetensors and checks that nothing was replaced.

Per batch, over two pipes:   parent X (inputs)  -> child runs the model, answers L (logits ready)
                             parent Y (targets) -> child scores with the harness's token_nats, N (nats)
The targets reach the child only after the model has produced its logits, and the next inputs only
after that, so the model never sees a token it is asked to predict, in memory or in the pipe. The
child then answers the end frame E with R: the causality check on real validation tokens, whether
the weights changed during evaluation, and the integrity check once more. The parent scores the
first batch twice more at the end, unannounced: as it was, and with every row's tokens from a random
position on replaced by random tokens. A model without memory and causal scores both exactly as
before (the second up to the cut); one that adapts to the data it evaluates on (a cache of earlier
batches) does not, and is refused. The spliced copy is an input never seen before, so a model that
memorises its answers per input cannot replay them; one that matched stored prefixes could, which
is beyond what this check closes.

Protocol frames: 1 byte kind, two little-endian uint32 (rows, cols), then rows x cols values
(int32 tokens for X/Y, float32 nats for N) or, for R, `rows` bytes of JSON.
"""
import hashlib
import json
import os
import struct
import sys
import tempfile
import threading
import time

import numpy as np

_HEAD = struct.Struct("<cII")
# nats: how far any token's score may move when the first batch is scored again. The same input gives
# the same bits on one device; a summed-score test (relative 1e-4, until 2026-12-03) let a unigram cache
# through whose first batch moved by 6e-4 of its sum in one session and less in another (the GPU suite)
RESCORE_TOLERANCE = 1e-4


def send(f, kind: bytes, arr=None, payload: bytes = b""):
    if arr is not None:
        arr = np.ascontiguousarray(arr)
        f.write(_HEAD.pack(kind, arr.shape[0], arr.shape[1]) + arr.tobytes())
    else:
        f.write(_HEAD.pack(kind, len(payload), 0) + payload)
    f.flush()


class Verdict(Exception):
    """The evaluator's R frame arrived where another frame was expected: it refused early."""

    def __init__(self, payload: bytes):
        super().__init__("early verdict")
        self.verdict = json.loads(payload)


def recv(f, want: bytes):
    head = f.read(_HEAD.size)
    if len(head) < _HEAD.size:
        raise EOFError("the other side closed the pipe")
    kind, rows, cols = _HEAD.unpack(head)
    if kind == b"R" and want != b"R":
        raise Verdict(f.read(rows))
    if kind != want:
        raise ValueError(f"expected frame {want!r}, got {kind!r}")
    if kind in (b"R", b"E", b"L"):
        return f.read(rows) if rows else b""
    dtype = np.float32 if kind == b"N" else np.int32
    data = f.read(rows * cols * 4)
    if len(data) < rows * cols * 4:
        raise EOFError("the other side closed the pipe mid-frame")
    return np.frombuffer(data, dtype=dtype).reshape(rows, cols)


# ---------------------------------------------------------------------------------------------
# the harness's side

def evaluate_run(cmd, env, *, data, split, rows, seq_len, max_tokens, timeout, log_path) -> dict:
    """Start the evaluator `cmd` (its argv up to the two pipe fds, which are appended) and score
    the run. Returns {"ok", "reason", "bpb", "unigram_bpb", "tokens", "bytes", "eval_s", "causal"}."""
    import subprocess

    import torch

    from llmlabs.auto.guard import VIOLATION_EXIT
    from llmlabs.evaluate import accumulate, bpb_result, eval_batches, token_bytes_and_unigram

    token_bytes, unigram = token_bytes_and_unigram(data, "cpu")
    r_in, w_in = os.pipe()
    r_out, w_out = os.pipe()
    start = time.monotonic()
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(map(str, cmd))} <fds>\n")
        log.flush()
        proc = subprocess.Popen([*map(str, cmd), str(r_in), str(w_out)], pass_fds=(r_in, w_out), env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    os.close(r_in)
    os.close(w_out)
    timer = threading.Timer(timeout, _kill, (proc,))
    timer.start()
    out = {"ok": False, "reason": "", "causal": None}
    verdict = None
    try:
        with os.fdopen(w_in, "wb") as to_child, os.fdopen(r_out, "rb") as from_child:
            try:
                sums = torch.zeros(4, dtype=torch.float64)
                first, first_nats = None, None
                for x, y in eval_batches(data, split, rows, seq_len, max_tokens):
                    nats = _score(to_child, from_child, x, y)
                    if first is None:
                        first, first_nats = (x, y), nats
                    accumulate(sums, torch.from_numpy(nats.copy()), y, token_bytes, unigram)
                again = _score(to_child, from_child, *first)
                cut, spliced = _splice(first[0], len(token_bytes))
                after = _score(to_child, from_child, spliced, first[1])
                send(to_child, b"E")
                verdict = json.loads(recv(from_child, b"R"))
            except Verdict as v:
                verdict = v.verdict
            except BrokenPipeError:  # the evaluator stopped reading: it may have said why first
                try:
                    verdict = json.loads(recv(from_child, b"R"))
                except (EOFError, ValueError):
                    pass
    except (EOFError, ValueError, OSError):  # the evaluator died: its log and exit code say why (below)
        pass
    if verdict is not None and verdict.get("reason"):
        out.update(reason=verdict["reason"], causal=verdict.get("causal"))
    elif verdict is not None:
        out.update(bpb_result(sums, split, data), causal=verdict.get("causal"))
        moved = float(np.abs(again - first_nats).max())
        moved_cut = float(np.abs(after[:, :cut] - first_nats[:, :cut]).max())
        if moved > RESCORE_TOLERANCE:
            out["reason"] = (f"the model's output depends on what it evaluated before: scored again after the "
                             f"others, a token of the first batch moved by {moved:.3g} nats (tolerance "
                             f"{RESCORE_TOLERANCE:g})")
        elif moved_cut > RESCORE_TOLERANCE:
            out["reason"] = (f"the model's output depends on what it evaluated before, or on later tokens: the "
                             f"first batch with its tokens from position {cut} on replaced moved a score before "
                             f"{cut} by {moved_cut:.3g} nats (tolerance {RESCORE_TOLERANCE:g})")
        else:
            out["ok"] = True
    else:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            _kill(proc)
            proc.wait()
        code = proc.returncode
        out["crashed"] = code != VIOLATION_EXIT
        out["reason"] = ("evaluator ran past the timeout" if code in (-9, -15) and time.monotonic() - start >= timeout
                         else _last_error(log_path) if code == VIOLATION_EXIT
                         else f"evaluator failed: {_last_line(log_path, code)}")
    timer.cancel()
    if proc.poll() is None:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            _kill(proc)
    out["eval_s"] = time.monotonic() - start
    return out


def _score(to_child, from_child, x, y):
    send(to_child, b"X", x.numpy().astype(np.int32))
    recv(from_child, b"L")
    send(to_child, b"Y", y.numpy().astype(np.int32))
    return recv(from_child, b"N")


def _splice(x, vocab):
    """(cut, x with every row's tokens from `cut` on random): the cut and the tokens come from the OS's
    randomness, which the experiment's code cannot predict."""
    import torch

    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
    cut = int(torch.randint(max(1, x.shape[1] // 4), max(2, 3 * x.shape[1] // 4), (1,), generator=g))
    out = x.clone()
    out[:, cut:] = torch.randint(0, vocab, out[:, cut:].shape, generator=g, dtype=x.dtype)
    return cut, out


def _kill(proc):
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _last_line(log_path, code) -> str:
    from llmlabs.auto.runs import crash_reason

    return crash_reason(open(log_path, errors="replace").read(), code)


def _last_error(log_path) -> str:
    lines = [ln.strip() for ln in open(log_path, errors="replace").read().splitlines() if ln.startswith("error: ")]
    return lines[-1][len("error: "):] if lines else "the evaluator was stopped by the harness's file guard"


# ---------------------------------------------------------------------------------------------
# the evaluator's side (runs the experiment's model code)

def child_main(argv):
    """argv: RUN_DIR DEVICE FORBIDDEN_JSON ALLOWED_JSON SPAWN IN_FD OUT_FD (runs.evaluate). SPAWN "1":
    child processes may start (inside bubblewrap, which confines them as it confines this one)."""
    from llmlabs.auto import guard

    t0 = time.monotonic()
    guard.die_with_parent()
    run_dir, device_name, forbidden, allowed, spawn, in_fd, out_fd = argv[0], argv[1], *map(json.loads, argv[2:4]), \
        argv[4] == "1", int(argv[5]), int(argv[6])
    import torch
    import torch._dynamo  # noqa: F401 - imported for its side effect: it re-wraps torch.manual_seed and
    # friends, which must happen before the snapshot (the model's kernels import it anyway)

    import llmlabs.auto.causal as causal
    import llmlabs.checkpoint as checkpoint
    import llmlabs.common as common
    import llmlabs.evaluate as evaluate
    from llmlabs.data import loader, shards, tokenizer

    scratch = tempfile.gettempdir()
    for var, sub in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):
        os.environ[var] = os.path.join(scratch, f"llmlabs-eval-{os.getpid()}", sub)  # a compiled kernel's caches
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"  # compile in this process: no worker pool to start
    guard.guard_files(forbidden, allowed=[*allowed, run_dir], read_only=True,  # says why on stderr (the log)
                      scratch=scratch, spawn=spawn)
    to_parent, from_parent = os.fdopen(out_fd, "wb"), os.fdopen(in_fd, "rb")
    snap = guard.snapshot([guard, causal, checkpoint, common, evaluate, loader, shards, tokenizer,
                           sys.modules[__name__]])
    # references taken before the experiment's code exists in this process: replacing the module
    # attributes later does not change these, and guard.changed() reports the replacement
    changed, token_nats, check_causal, send_, recv_ = guard.changed, evaluate.token_nats, causal.check_causal, send, recv
    Tensor, no_grad, dumps = torch.Tensor, torch.no_grad, json.dumps

    marks = {"imports": time.monotonic() - t0}  # where the evaluation's seconds go, for the run log

    def finish(reason=None, **extra):
        print("evaluator timeline (s): " + ", ".join(f"{k} {v:.2f}" for k, v in marks.items()), file=sys.stderr)
        send_(to_parent, b"R", payload=dumps({"reason": reason, **extra}).encode())
        to_parent.close()
        os._exit(0)

    device = common.compute_init(device_name)[0]
    import llmlabs.config as model_config  # the experiment's code, from here on
    import llmlabs.model as model_code

    if reason := changed(snap):
        finish(reason)
    ck = checkpoint.load(checkpoint.latest(run_dir), device)
    model = model_code.build_model(model_config.GPTConfig(**ck["state"]["model_config"]), device)
    model.load_state_dict(ck["model"])
    model.eval().requires_grad_(False)
    weights = _digest(model)
    marks["model"] = time.monotonic() - t0
    if reason := changed(snap):
        finish(reason)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    first = None
    with no_grad():
        while True:
            head = from_parent.read(1)
            if head == b"E":
                from_parent.read(_HEAD.size - 1)
                break
            x = torch.from_numpy(_rest(from_parent, head, b"X").astype(np.int64)).to(device)
            first = x if first is None else first
            with autocast:
                logits = model(x)
            if type(logits) is not Tensor or logits.shape[:2] != x.shape or not logits.is_floating_point():
                finish(f"the model returned {type(logits).__name__} {tuple(getattr(logits, 'shape', ()))} for inputs "
                       f"{tuple(x.shape)}: a float tensor [rows, positions, vocab] is required")
            send_(to_parent, b"L")
            y = torch.from_numpy(recv_(from_parent, b"Y").astype(np.int64)).to(device)
            if reason := changed(snap):
                finish(reason)
            send_(to_parent, b"N", token_nats(logits, y).cpu().numpy())
            del y, logits  # nothing of this batch stays in reach of the next forward
            marks.setdefault("first_batch", time.monotonic() - t0)
        marks["batches"] = time.monotonic() - t0
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        verdict = check_causal(model, model.config.vocab_size, first.size(1), device, probes=4, dtype=dtype,
                               tokens=first[0])
        marks["causal"] = time.monotonic() - t0
    reason = changed(snap)
    if not reason and _digest(model) != weights:
        reason = "the model's weights changed during evaluation"
    if not reason and not verdict["causal"]:
        reason = (f"non-causal: changing token {verdict['changed']} moved the logits at position "
                  f"{verdict['position']} by {verdict['max_leak']:.3g} (tolerance {verdict['tolerance']:g})")
    finish(reason, causal=verdict)


def _rest(f, head, want):
    if head != want:
        raise ValueError(f"expected frame {want!r}, got {head!r}")
    rows, cols = struct.unpack("<II", f.read(8))
    return np.frombuffer(f.read(rows * cols * 4), dtype=np.int32).reshape(rows, cols)


def _digest(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()
