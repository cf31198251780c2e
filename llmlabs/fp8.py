"""FP8 training for the block matmuls: research surface (an experimenter may turn it on, tune which
layers it takes, or replace it), plain PyTorch through torchao's float8 training.

torchao's Float8Linear (torchao.float8) keeps the weight in high precision and casts both operands
of each matmul to float8 on the fly with dynamic scales (arXiv 2209.05433 for the formats):
- `tensorwise`: one scale per tensor; e4m3 for the input and weight, e5m2 for the output gradient
  (its wider range, less precision), the recipe of the FP8 papers.
- `rowwise`: one scale per row (per column of the weight), e4m3 everywhere, scales rounded to powers
  of two: more accurate at outliers, slower casts.
Under torch.compile the casts (amax, scale, cast) can fuse into the kernels that produce the
operands; only then can FP8 pay at these widths, where a bare cast per call costs about what the
float8 matmul saves. They do in our graph on the CPU (bench/fp8_fusion.py: each activation's amax
and cast inside its rms_norm, ReLU^2 or attention-output kernel; the weights' casts apart). On an
H200 the attention output's cast is apart too (cuDNN makes that output, not a Triton kernel; 6 of the
forward's 13 amax kernels fused, fp8_fusion-h200-fb0eb45.log). Measured (bench/fp8_speed.py, H200, tensorwise, the whole step):
d8 0.84x bf16, d12 0.96x, d20 1.13x, d26 1.21x; rowwise d12 0.64x.

What runs in float8: the attention projections (q, k, v, out) and the MLP's two matmuls, the MoE's
shared expert too. What stays bf16, by choice: the embeddings, lm_head (the logits are precision-
sensitive and vocab-wide), the value-embedding gates and the MoE router (tiny; routing decisions
flip on small errors), and the routed experts (torchao's scaled grouped matmul is a prototype; the
grouped bf16 path is kept). A layer whose sides are not multiples of 16 stays bf16 (the float8 GEMM
needs them).

Evaluation and generation read the same weights in bf16: the converted layer runs float8 only in
training mode. Checkpoints hold the plain weights (a Float8Linear's state is its nn.Linear's), so an
FP8 run resumes, evaluates and samples anywhere.
"""
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmlabs.common import LabError

RECIPES = ("tensorwise", "rowwise")
# The knob: the recipe every run uses when `llmlabs train --fp8` is not given (None: bf16). An
# experimenter on an FP8-capable GPU may set it here; `--fp8` on the command line wins.
RECIPE: str | None = None
# which nn.Linear children go to float8, by attribute name: the attention projections and the MLP's
FLOAT8_LAYERS = ("c_q", "c_k", "c_v", "c_proj", "c_fc", "shared_fc", "shared_proj")
INSTALL = "pip install 'llmlabs[fp8]' (torchao)"


def _torchao():
    try:
        from torchao.float8 import Float8LinearConfig
        from torchao.float8.float8_linear import Float8Linear
    except ImportError:
        raise LabError(f"--fp8 needs torchao, which is not installed: {INSTALL}") from None
    return Float8LinearConfig, Float8Linear


def unsupported(device: torch.device) -> str | None:
    """Why `device` cannot train in float8 (CPU; GPUs before compute capability 8.9, Ada), or None."""
    if device.type != "cuda":
        return f"this run is on {device.type}, and float8 training needs a GPU of compute capability 8.9+ (Ada, Hopper or newer)"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        return (f"{torch.cuda.get_device_name(device)} is compute capability {cap[0]}.{cap[1]}, and float8 training "
                "needs 8.9+ (Ada, Hopper or newer)")
    return None


def check(recipe: str, device: torch.device):
    """Refuse, in one line, a recipe this lab lacks, a device without float8 matmuls, a missing torchao."""
    if recipe not in RECIPES:
        raise LabError(f"--fp8 {recipe}: unknown recipe; choose one of {', '.join(RECIPES)}")
    if why := unsupported(device):
        raise LabError(f"--fp8 {recipe}: {why}; drop --fp8 (or set fp8.RECIPE = None)")
    _torchao()


@functools.cache  # one class: torch.compile guards on a module's type
def layer_class():
    """torchao's Float8Linear, in float8 while training and plain bf16 otherwise (eval mode)."""
    _, Float8Linear = _torchao()

    class TrainingFloat8Linear(Float8Linear):
        def forward(self, x):
            if self.training:
                return super().forward(x)
            return F.linear(x, self.weight, self.bias)

    return TrainingFloat8Linear


def convert(model: nn.Module, recipe: str) -> list[str]:
    """Swap the FLOAT8_LAYERS of every block for float8 training layers, in place, keeping the same
    weight Parameters (convert before building the optimizer, or after: either sees the same tensors).
    Returns the names of the converted layers."""
    Float8LinearConfig, _ = _torchao()
    config = Float8LinearConfig.from_recipe_name(recipe)
    cls = layer_class()
    done = []
    for parent_name, parent in list(model.named_modules()):
        if not parent_name.startswith("blocks."):
            continue
        for name, child in list(parent.named_children()):
            if (name in FLOAT8_LAYERS and type(child) is nn.Linear
                    and child.in_features % 16 == 0 and child.out_features % 16 == 0):
                setattr(parent, name, cls.from_float(child, config=config))
                done.append(f"{parent_name}.{name}")
    return done


def describe(peak_bf16: float | None, recipe: str, layers: list[str]) -> str:
    """The start-up line of an FP8 run. MFU stays counted in bf16-equivalent FLOPs against the bf16
    peak, so FP8 and bf16 runs compare on one scale; the FP8 peak (twice bf16's on Ada/Hopper) is named."""
    peaks = (f"; MFU counts bf16-equivalent FLOPs against the bf16 peak {peak_bf16 / 1e12:.0f} TFLOP/s "
             f"(the FP8 peak is {2 * peak_bf16 / 1e12:.0f})") if peak_bf16 else ""
    return f"fp8 {recipe}: {len(layers)} block matmuls in float8 (lm_head, embeddings, router, experts bf16){peaks}"
