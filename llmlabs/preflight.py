"""Checks made before a run allocates or trains, each one line naming the problem and the fix.

- Memory: a model that cannot fit is refused before it is allocated (a `--depth 999` would otherwise
  swap the machine to a halt or die in the allocator), with the largest depth that fits named.
- Data passes: a budget that reads the training split many times measures memorisation, not
  learning (the GPU default on the 2.5M-token pystdlib corpus read it ~230 times: val_bpb 2.36, worse
  than the CPU default), so the run warns past PASSES_WARN, naming the corpus, the passes and the fix.
"""
import os

import torch

from llmlabs.errors import LabError

# Repeated tokens lose value slowly: in Muennighoff et al.'s fit (arXiv 2305.16264, R*_D ~ 15.4) a
# token seen over 4 passes is worth ~93% of a fresh one, over 8 ~83%, over 16 ~66%, and the loss
# stops improving not long after. Past 8 passes a run measures memorisation more than learning. (The
# GPU default, 5 minutes of d8 on an H200, reads pysrc's 103M training tokens 5.5 times: ~89%.)
PASSES_WARN = 8
# Activation bytes per layer x row x channel x position: the peaks train.py's ACT_BYTES note lists
# were 30-34 bytes with triton_mlp; the check assumes the smallest, so no run that fits is refused.
ACT_BYTES_MIN = 30


def gpu_memory(device) -> int:
    """Total memory of the GPU `device` names, in bytes; 0 where no GPU is visible."""
    return torch.cuda.get_device_properties(device).total_memory if torch.cuda.is_available() else 0


def memory_available(device) -> int:
    """Bytes of the GPU, or of the machine's RAM for a CPU run; 0 where unknown (then nothing is checked)."""
    if device.type == "cuda":
        return gpu_memory(device)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def memory_need(mcfg, rows) -> tuple[int, int]:
    """(parameters, bytes) a training step needs at least: fp32 weights, gradients and one optimizer
    buffer (12 bytes a parameter; Muon keeps one momentum, AdamW two moments) plus ACT_BYTES_MIN of
    activations per layer x row x channel x position. A lower bound. Counted on the meta device:
    nothing is allocated."""
    from llmlabs.model import GPT

    with torch.device("meta"):
        params = sum(p.numel() for p in GPT(mcfg).parameters())
    return params, 12 * params + ACT_BYTES_MIN * mcfg.n_layer * rows * mcfg.n_embd * mcfg.sequence_len


def check_memory(mcfg, rows, device, at_depth):
    """Raise LabError when `mcfg` at `rows` rows a forward cannot fit on `device`; `at_depth(d)` gives
    the run's GPTConfig at depth d, for the search of the largest depth that fits."""
    have = memory_available(device)
    params, need = memory_need(mcfg, rows)
    if not have or need <= have:
        return
    lo, hi = 0, mcfg.n_layer  # lo fits (0: nothing does), hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if memory_need(at_depth(mid), rows)[1] <= have else (lo, mid)
    hint = f"the largest depth that fits is {lo} (--depth {lo})" if lo else "no depth fits"
    raise LabError(f"--depth {mcfg.n_layer} needs at least {need / 2**30:.1f} GiB ({params / 1e9:.2f}B parameters with "
                   f"their gradients and optimizer state, plus activations at {rows} rows a forward) and the "
                   f"{device.type} has {have / 2**30:.1f} GiB: {hint} at --device-batch-size {rows}")


def passes_warning(tokens, data, what) -> str | None:
    """A warning line when `tokens` of training read the training split more than PASSES_WARN times."""
    train = data.manifest["splits"]["train"]["tokens"]
    passes = tokens / max(train, 1)
    if passes <= PASSES_WARN:
        return None
    return (f"warning: {what} reads about {tokens / 1e6:.0f}M tokens, the {train / 1e6:.1f}M training tokens of "
            f"{data.path} {passes:.0f} times: the model memorises them and val_bpb suffers; give --data a larger "
            f"corpus (a folder, or a hub corpus: `llmlabs prepare climbmix`) or a smaller budget")
