"""Checkpoints: atomic, complete (model, optimizer, loader, RNG, counters) and safe to load.

Layout: RUN/checkpoints/step_000123/{model.safetensors, state.safetensors, meta.json}, plus
RUN/checkpoints/LATEST naming the newest one. A checkpoint is written into a temporary directory and
renamed into place, and LATEST is rewritten (atomically) only after that, so a write killed at any
moment leaves the previous checkpoint loadable. Nothing is unpickled on load: tensors come from
safetensors, everything else from JSON.
"""
import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from llmlabs.common import LabError, atomic_write_bytes

KEEP = 2  # checkpoints kept per run: the newest and the one before, in case the newest is bad


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
    """Write checkpoint `step` of `run_dir`. `state` holds everything else needed to continue (loader
    state, counters, run config): JSON-able values and tensors."""
    ckdir = Path(run_dir) / "checkpoints"
    final = ckdir / f"step_{step:06d}"
    tmp = ckdir / f".step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in _unwrap(model).state_dict().items()}
    save_file(weights, tmp / "model.safetensors")
    skel, tensors = flatten({"optimizer": optimizer.state_dict(), "rng": rng_state(), "state": state})
    save_file(tensors, tmp / "state.safetensors")
    (tmp / "meta.json").write_text(json.dumps({"step": step, "skeleton": skel}))
    if final.exists():  # re-saving the same step (e.g. Ctrl-C right after a periodic save)
        shutil.rmtree(final)
    tmp.rename(final)
    atomic_write_bytes(ckdir / "LATEST", final.name.encode())
    for old in sorted(ckdir.glob("step_*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(run_dir) -> Path | None:
    ptr = Path(run_dir) / "checkpoints" / "LATEST"
    return ptr.parent / ptr.read_text().strip() if ptr.exists() else None


def load(path, device="cpu"):
    """Read a checkpoint directory; returns {"step", "model" (state dict), "optimizer", "rng", "state"}.
    Any damage gives one LabError naming the checkpoint."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        weights = load_file(path / "model.safetensors", device=str(device))
        rest = unflatten(meta["skeleton"], load_file(path / "state.safetensors"))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise LabError(f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e)[:120]}): "
                       "delete it and resume from an earlier one, or retrain") from e
    return {"step": meta["step"], "model": weights, **rest}


def load_run(run_dir, device):
    """Rebuild the model of a finished or interrupted run from its newest checkpoint, for eval and
    sample. Returns (model in eval mode, checkpoint dict with "run_config" and "tokenizer_hash")."""
    from llmlabs.config import GPTConfig
    from llmlabs.model import build_model

    run_dir = Path(run_dir)
    path = latest(run_dir)
    if path is None:
        raise LabError(f"{run_dir} has no checkpoint (checkpoints/LATEST missing): is it a run directory "
                       "of `llmlabs train`?")
    ck = load(path, device)
    model = build_model(GPTConfig(**ck["state"]["model_config"]), device)
    model.load_state_dict(ck["model"])
    model.eval()
    return model, {"run_config": ck["state"]["run_config"], "tokenizer_hash": ck["state"]["tokenizer_hash"],
                   "step": ck["step"]}


def _unwrap(model):
    return getattr(model, "_orig_mod", model)  # torch.compile wraps the module
