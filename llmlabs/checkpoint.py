"""Checkpoints: atomic, complete (model, optimizer, loader, RNG, counters) and safe to load.

Layout: RUN/checkpoints/step_000123/{model.safetensors, state.safetensors, meta.json}, plus
RUN/checkpoints/LATEST naming the newest one. A checkpoint is written into a temporary directory of
its own (named after the process) and renamed into place, and LATEST is rewritten (atomically) only
after that, so a write killed at any moment leaves the previous checkpoint loadable, and load_newest
falls back to it if the newest one is damaged anyway. One process at a time writes a run directory:
`llmlabs train` holds RUN/.lock (lock_run). Nothing is unpickled on load: tensors come from
safetensors, everything else from JSON.
"""
import fcntl
import json
import os
import random
import secrets
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from llmlabs.common import LabError, atomic_write_bytes, print0

# Checkpoints kept per run: the one just saved and the one before it, which --resume, eval and sample
# fall back to when the newest does not load (load_newest).
KEEP = 2


def lock_run(run_dir):
    """Take the run directory's lock (RUN/.lock, creating RUN) or raise a one-line LabError naming the
    process that holds it. The lock lasts while the returned file stays open; the kernel drops it when
    the process dies, so a killed run never leaves the directory locked."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"  # the holder may not have written its pid yet
        f.close()
        raise LabError(f"{run_dir} is locked by process {holder}, a run still using it: wait for it to end, "
                       "or pass another --run-dir") from None
    f.truncate(0)  # "a+" appends: the file is empty now, so the pid lands at the start
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def flatten(obj, prefix="", tensors=None):
    """Split a nested structure into (json-able skeleton, {key: tensor}); tensors are replaced by
    {"__tensor__": key}. Tuples become lists, which is how torch's state_dicts accept them back."""
    tensors = {} if tensors is None else tensors
    if isinstance(obj, torch.Tensor):
        key = prefix or "t"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}, tensors
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"checkpoint keys must be str or int, got {list(obj)[:3]}")
        # int keys (optimizer state ids) are kept distinguishable from str keys
        return {"__dict__": [[k, flatten(v, f"{prefix}.{k}", tensors)[0]] for k, v in obj.items()]}, tensors
    if isinstance(obj, (list, tuple)):
        return [flatten(v, f"{prefix}.{i}", tensors)[0] for i, v in enumerate(obj)], tensors
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj, tensors
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint (at {prefix!r})")


def unflatten(skel, tensors):
    if isinstance(skel, dict) and "__tensor__" in skel:
        return tensors[skel["__tensor__"]]
    if isinstance(skel, dict) and "__dict__" in skel:
        return {k: unflatten(v, tensors) for k, v in skel["__dict__"]}
    if isinstance(skel, list):
        return [unflatten(v, tensors) for v in skel]
    return skel


def rng_state():
    py = random.getstate()
    npy = np.random.get_state()
    return {"python": [py[0], list(py[1]), py[2]],
            "numpy": [npy[0], torch.from_numpy(npy[1].astype(np.int64)), int(npy[2]), int(npy[3]), float(npy[4])],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s):
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save(run_dir, step, model, optimizer, state: dict):
    """Write checkpoint `step` of `run_dir`. `optimizer`: the optimizer or its state_dict (already
    gathered, as a distributed one must be on every rank). `state` holds everything else needed to
    continue (loader state, counters, run config): JSON-able values and tensors."""
    ckdir = Path(run_dir) / "checkpoints"
    final = ckdir / f"step_{step:06d}"
    _remove_dead_temps(ckdir)
    tmp = _temp_dir(ckdir, step)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in _unwrap(model).state_dict().items()}
    save_file(weights, tmp / "model.safetensors")
    opt = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    skel, tensors = flatten({"optimizer": opt, "rng": rng_state(), "state": state})
    save_file(tensors, tmp / "state.safetensors")
    (tmp / "meta.json").write_text(json.dumps({"step": step, "skeleton": skel}))
    if final.exists():  # re-saving the same step (e.g. Ctrl-C right after a periodic save)
        shutil.rmtree(final)
    tmp.rename(final)
    atomic_write_bytes(ckdir / "LATEST", final.name.encode())
    # keep the newest KEEP up to this step; any later ones belong to a trajectory abandoned when
    # --resume fell back past them (load_newest), and would otherwise crowd out the good ones
    steps = sorted(ckdir.glob("step_*"), key=_step_of)
    older = [d for d in steps if _step_of(d) <= step]
    for old in older[:-KEEP] + [d for d in steps if _step_of(d) > step]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _temp_dir(ckdir, step):
    """A name no other process (nor an earlier save of this one) uses: pid plus a random suffix."""
    return Path(ckdir) / f".step_{step:06d}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _remove_dead_temps(ckdir):
    """Delete temp directories left by saves of processes that died mid-write (or that predate pids in
    the name); a live process's temp directory is left alone."""
    for d in Path(ckdir).glob(".step_*.tmp"):
        parts = d.name.split(".")  # "", "step_000007", pid, suffix, "tmp"
        if len(parts) == 5 and parts[2].isdigit() and _alive(int(parts[2])):
            continue
        shutil.rmtree(d, ignore_errors=True)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _step_of(path):
    return int(path.name.split("_")[1])  # by number: step_1000000 sorts before step_999999 as text


def latest(run_dir) -> Path | None:
    ptr = Path(run_dir) / "checkpoints" / "LATEST"
    return ptr.parent / ptr.read_text().strip() if ptr.exists() else None


def candidates(run_dir) -> list[Path]:
    """The run's checkpoints in the order to try them: LATEST's target, then the others newest first."""
    first = latest(run_dir)
    rest = sorted((Path(run_dir) / "checkpoints").glob("step_*"), key=_step_of, reverse=True)
    return ([first] if first else []) + [d for d in rest if d != first]


def saved_model_config(run_dir) -> dict | None:
    """The model config the run's newest readable checkpoint holds (its meta.json alone, no tensors
    read), or None where there is none."""
    for path in candidates(run_dir):
        try:
            skeleton = json.loads((path / "meta.json").read_text())["skeleton"]
            return unflatten(skeleton, defaultdict(lambda: None))["state"]["model_config"]  # tensors as None
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def load_newest(run_dir, device="cpu"):
    """The newest checkpoint of `run_dir` that loads (see load), or None if the run has none. Each one
    skipped is reported in one line; if none loads, one LabError lists what was tried."""
    tried = []
    for path in candidates(run_dir):
        try:
            return load(path, device)
        except LabError as e:
            why = _why(e.__cause__)
            print0(f"skipped checkpoint {path}: unreadable ({why})")
            tried.append(f"{path.name}: {why}")
    if tried:
        raise LabError(f"no checkpoint of {run_dir} loads (tried {'; '.join(tried)}): retrain it (a new run, another --run-dir)")
    return None


def _why(e):
    return f"{type(e).__name__}: {str(e)[:120]}"


def load(path, device="cpu"):
    """Read a checkpoint directory; returns {"step", "model" (state dict), "optimizer", "rng", "state"}.
    Any damage gives one LabError naming the checkpoint."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        weights = load_file(path / "model.safetensors", device=str(device))
        rest = unflatten(meta["skeleton"], load_file(path / "state.safetensors"))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise LabError(f"checkpoint {path} is unreadable ({_why(e)}): `llmlabs train --resume`, eval and sample "
                       "fall back to the run's newest checkpoint that loads") from e
    return {"step": meta["step"], "model": weights, **rest}


def load_run(run_dir, device, path=None):
    """Rebuild the model of a finished or interrupted run from its newest checkpoint that loads (or
    from the checkpoint directory `path`), for eval and sample. Returns (model in eval mode,
    checkpoint dict with "run_config", "tokenizer_hash", "step", and for a --vision run "encoder",
    its vision encoder in eval mode)."""
    from llmlabs.config import GPTConfig
    from llmlabs.model import build_model

    run_dir = Path(run_dir)
    ck = load(path, device) if path else load_newest(run_dir, device)
    if ck is None:
        raise LabError(f"{run_dir} has no checkpoint (checkpoints/ is empty or missing): is it a run directory "
                       "of `llmlabs train`?")
    model = build_model(GPTConfig(**ck["state"]["model_config"]), device)
    model.load_state_dict(ck["model"])
    model.eval()
    cfg = ck["state"]["run_config"]
    info = {"run_config": cfg, "tokenizer_hash": ck["state"]["tokenizer_hash"], "step": ck["step"]}
    if cfg.get("vision"):
        from llmlabs.multimodal import load_encoder

        info["encoder"] = load_encoder(model, cfg, ck["state"]["encoder"], device)
    return model, info


def _unwrap(model):
    return getattr(model, "_orig_mod", model)  # torch.compile wraps the module
