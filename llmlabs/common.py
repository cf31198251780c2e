"""Small shared helpers: errors, paths, atomic writes, device and distributed setup, peak FLOPs."""
import ctypes
import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from llmlabs.errors import LabError  # noqa: F401 - re-exported: the modules raise common.LabError


def llmlabs_home() -> Path:
    """Where prepared data lives by default (runs go to ./runs, next to where you work);
    LLMLABS_HOME overrides ~/.cache/llmlabs."""
    return Path(os.environ.get("LLMLABS_HOME") or Path.home() / ".cache" / "llmlabs")


def atomic_write_bytes(path, data: bytes):
    """Write to a temporary name in the same directory, fsync, then rename: a reader sees either the
    old file or the whole new one, never half of it (also after Ctrl-C or a kill)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_dir(path, flag: str) -> Path:
    """mkdir -p for a directory the user named with `flag`, or one LabError line saying why it cannot be."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, a file as a parent, no permission
        raise LabError(f"{flag} {path}: cannot make that directory ({e.strerror}): give another path") from None
    return path


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


# ---------------------------------------------------------------------------------------------
# devices and processes

def dist_info():
    """(is_distributed, rank, local_rank, world_size) from torchrun's environment variables."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def print0(*args, **kwargs):
    if dist_info()[1] == 0:
        print(*args, **kwargs)


def autodetect_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def compute_init(device: str | None = None):
    """Pick the device, set matmul precision, and join the process group under torchrun.
    Returns (device: torch.device, rank, local_rank, world_size)."""
    device = device or autodetect_device()
    if device not in ("cpu", "cuda", "mps"):
        raise LabError(f"unknown device {device!r}: use cpu, cuda or mps")
    if device == "cuda" and not torch.cuda.is_available():
        raise LabError("--device cuda asked for, but torch sees no CUDA device: drop the flag to run on CPU")
    ddp, rank, local_rank, world = dist_info()
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        if ddp and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl", device_id=dev)
    else:
        dev = torch.device(device)
        if device == "cpu":
            _reuse_freed_memory()
        if ddp and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo")
    return dev, rank, local_rank, world


def _reuse_freed_memory():
    """PyTorch's CPU allocator hands large tensors to glibc, which maps each one fresh from the kernel
    and unmaps it when freed: every [B*T, vocab] logits tensor then pays a page fault per 4 KB. Raising
    glibc's mmap and trim thresholds keeps freed blocks for reuse; measured on the 2-core CI machine:
    softcap over 4096 x 8192 logits 196 -> 70 ms, a training step of the CPU preset ~2x faster."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks under 1 GiB come from the reusable heap
    libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD: keep up to 2 GiB of freed heap instead of returning it


def seed_all(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# Dense bf16 tensor-core peak (no sparsity), from the vendors' datasheets, keyed by a substring of
# torch.cuda.get_device_name(). MFU = achieved model FLOP/s / this number.
PEAK_BF16_FLOPS = [
    ("H200", 989.5e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989.5e12),  # SXM
    ("H800", 989.5e12),
    ("GH200", 989.5e12),
    ("B200", 2.25e15),
    ("A100", 312e12),
    ("A10G", 125e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
]


def peak_flops(device: torch.device) -> float | None:
    """Peak dense FLOP/s for MFU, or None where no number is known (CPU, unknown GPU): then MFU is
    reported as 0 rather than guessed."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None
