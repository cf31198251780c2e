"""One attention call for the whole lab: `attention(q, k, v, window)`. The model never names a
backend; this module picks the fastest correct kernel for the device and dtype, once per process,
logs the choice, and lets the `--attention` flag (`set_backend`) or the LLMLABS_ATTENTION
environment variable force one for tests and benchmarks.

Plans (layer kind -> kernel):
  CUDA, bf16/fp16, FA3 importable (Hopper)  full: fa3          window: fa3
  CUDA, bf16/fp16, otherwise                full: sdpa-cudnn   window: cudnn (cudnn-frontend installed)
                                            (sdpa-flash where PyTorch   or flex (without it)
                                             would not pick cuDNN)
  CUDA, fp32                                full: sdpa (PyTorch picks)  window: flex
  CPU                                       full and window: cpu (SDPA, with a mask for windows)
  CUDA, head dim not a multiple of 8        full: sdpa          window: cpu (no fused kernel takes it)
A GPU never gets a dense T x T mask in training. "cudnn" is cuDNN's fused attention with its
diagonal band (kernels/cudnn_attention.py): the kernels PyTorch's SDPA runs for full layers,
reached through cudnn-frontend because SDPA has no window argument. Without it, window layers get
FlexAttention, whose 128 x 128 block mask computes ~1.5x the needed scores at window 512. "flash"
(forced only) is the FlashAttention-2 kernel inside PyTorch (arXiv 2307.08691), called directly
with its window: on an H200 it ran window layers slower than flex inside the compiled step
(bench/NOTES.md round 3).

Layout everywhere is FA3's [B, T, H, D]: the q/k/v projections reshape into it without a copy, and
SDPA/flex see a transposed view of it. A window w means a query at t sees keys t-w..t (w+1 keys)."""
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from llmlabs.kernels import cudnn_attention
from llmlabs.common import LabError, print0

CHOICES = ("auto", "fa3", "cudnn", "flash", "sdpa", "sdpa-cudnn", "sdpa-flash", "flex", "cpu")
ENV_VAR = "LLMLABS_ATTENTION"
# FA3 from the HF kernels hub downloads a binary: only where the user says so (the lab's rule is
# that only `prepare` touches the network).
HUB_ENV_VAR = "LLMLABS_KERNELS_HUB"
FLEX_BLOCK = 128  # FlexAttention's default tile; the block mask is built on this grid


def _check_choice(name, source):
    if name not in CHOICES:
        raise LabError(f"{source}={name!r} is not an attention backend: pick one of {', '.join(CHOICES)}")
    return name


_forced = _check_choice(os.environ.get(ENV_VAR, "auto").lower(), ENV_VAR)
_plans: dict[tuple, str] = {}   # (device type, dtype, kind) -> backend
_used: dict[str, str] = {}      # kind -> backend, as resolved so far (what describe() reports)
_fa3 = None
_fa3_tried = False
_flex_compiled = None


def set_backend(name: str):
    """Force a backend for this process (the trainer's --attention flag). Call it before the first
    forward or torch.compile: a compiled graph keeps the kernel it was traced with."""
    global _forced
    _forced = _check_choice(name.lower(), "--attention")
    _plans.clear()
    _used.clear()


def _load_fa3():
    """FA3's Python interface: a source build of flash-attention/hopper (`flash_attn_interface`),
    else the HF kernels hub build nanochat uses, when LLMLABS_KERNELS_HUB=1."""
    global _fa3, _fa3_tried
    if not _fa3_tried:
        _fa3_tried = True
        try:
            import flash_attn_interface
            _fa3 = flash_attn_interface
        except ImportError:
            if os.environ.get(HUB_ENV_VAR) == "1":
                try:
                    from kernels import get_kernel
                    _fa3 = get_kernel("varunneal/flash-attention-3").flash_attn_interface
                except Exception as e:  # any failure here just means no FA3; say why once
                    print0(f"attention: FA3 from the kernels hub failed ({type(e).__name__}: {e})")
    return _fa3


def _fa3_usable(dtype) -> bool:
    # FA3 kernels are built for Hopper (sm90) and half precision only
    return (dtype in (torch.bfloat16, torch.float16) and torch.cuda.get_device_capability()[0] == 9
            and _load_fa3() is not None)


def _flash_window_usable(dtype) -> bool:
    # the window_size_left/right arguments of aten._flash_attention_forward (torch 2.11 and 2.13
    # have them, and their autograd passes them to the backward; forcing flash on a build without
    # them is an error); the kernel runs on Ampere and newer, in half precision only
    schema = str(torch.ops.aten._flash_attention_forward.default._schema)
    return (dtype in (torch.bfloat16, torch.float16) and "window_size_left" in schema
            and torch.cuda.get_device_capability()[0] >= 8)


@torch.compiler.assume_constant_result
def _plan(device_type: str, dtype: torch.dtype, kind: str, head_dim: int) -> str:
    """The backend for one layer kind ("full" | "window"). Runs eagerly even while dynamo traces
    (assume_constant_result), so the imports, the log line and the cache cost nothing per step and
    the traced graph holds just the chosen kernel."""
    key = (device_type, dtype, kind, head_dim)
    if key in _plans:
        return _plans[key]
    choice, half = _forced, dtype in (torch.bfloat16, torch.float16)
    # cuDNN's and flash's fused kernels take head dims in multiples of 8 only ("hidden_dim should be
    # multiple of 8"): auto sends any other head dim to SDPA's own pick, windows through a dense mask
    odd = head_dim % 8 != 0
    if device_type != "cuda":
        if choice not in ("auto", "cpu", "flex"):
            raise LabError(f"attention backend {choice!r} needs a CUDA GPU, the tensors are on {device_type}: "
                           f"use auto, cpu or flex (unset {ENV_VAR} / drop --attention)")
        name = "flex" if choice == "flex" else "cpu"
    elif choice in ("cpu", "flex"):
        name = choice
    elif choice in ("fa3", "cudnn", "flash", "sdpa-cudnn", "sdpa-flash") and odd:
        raise LabError(f"attention backend {choice} needs a head dim that is a multiple of 8, the model's is "
                       f"{head_dim}: change --head-dim or use --attention auto")
    elif odd:
        name = "sdpa" if kind == "full" else "cpu"
    elif choice in ("auto", "fa3") and _fa3_usable(dtype):
        name = "fa3"
    elif choice == "fa3":
        raise LabError("attention backend fa3 is not available: it needs a Hopper GPU, bf16/fp16 tensors and "
                       f"`flash_attn_interface` (build flash-attention/hopper) or {HUB_ENV_VAR}=1 with the "
                       "`kernels` package; or use --attention auto")
    elif choice == "flash" and not _flash_window_usable(dtype):
        raise LabError(f"attention backend flash needs bf16/fp16 tensors (got {dtype}), an Ampere or newer GPU and "
                       "a torch whose flash kernel takes a window (window_size_left); or use --attention auto")
    elif choice == "flash":
        name = "flash"
    elif choice == "cudnn" and not cudnn_attention.usable(dtype):
        raise LabError(f"attention backend cudnn needs bf16/fp16 tensors (got {dtype}) and cuDNN's attention "
                       "through `pip install nvidia-cudnn-frontend` (its probe graph must build); or use "
                       "--attention auto")
    elif choice == "cudnn" or (kind == "window" and cudnn_attention.usable(dtype)):
        name = "cudnn"
    elif kind == "window":
        name = "flex"  # SDPA has no sliding-window kernel; a dense mask would waste most of the work
    elif not half:
        if choice in ("sdpa-cudnn", "sdpa-flash"):
            raise LabError(f"attention backend {choice} runs bf16/fp16 only, got {dtype}: "
                           "run the model under torch.autocast('cuda', dtype=torch.bfloat16)")
        name = "sdpa"
    elif choice in ("sdpa-cudnn", "sdpa-flash"):
        name = choice
    else:
        # PyTorch's own rule (check_prefer_cudnn_attention, torch >= 2.10): cuDNN attention first on
        # sm90/sm100 with cuDNN > 9.15.0, whose predecessors mishandled lengths not divisible by
        # 128 (pytorch#169849); flash attention everywhere else
        cudnn_ok = torch.backends.cudnn.is_available() and torch.backends.cudnn.version() > 91500
        name = "sdpa-cudnn" if cudnn_ok and torch.cuda.get_device_capability()[0] in (9, 10) else "sdpa-flash"
    _plans[key] = name
    if _used.get(kind) != name:
        _used[kind] = name
        print0(f"attention: {kind} layers -> {name} ({device_type}, {str(dtype).removeprefix('torch.')})")
    return name


def describe(device=None, dtype=None, head_dim: int = 128) -> dict:
    """Layer kind -> backend. With no arguments: what attention() has used so far (the trainer
    prints it and records it in the run summary). With a device: the plan for inputs of that
    device, dtype (default: bf16 on CUDA, as the trainer runs, float32 elsewhere) and head dim, resolved now."""
    if device is None:
        return dict(_used)
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return {kind: _plan(device.type, dtype, kind, head_dim) for kind in ("full", "window")}


def _block_mask(T: int, window: int | None, device) -> BlockMask:
    """Block-sparse causal (sliding-window) mask for FlexAttention, from index arithmetic on the
    (T/128)^2 block grid: a handful of tiny tensor ops that dynamo traces into the compiled graph,
    so there is no graph break, no Python-side cache keyed by shape, and no T x T mask anywhere.
    Fully visible blocks skip the mask function; blocks cut by the diagonal or the window edge
    apply it; the rest are skipped."""
    span = T if window is None else window  # largest q - k a query may see
    n = -(-T // FLEX_BLOCK)
    q0 = torch.arange(n, device=device)[:, None] * FLEX_BLOCK  # first query row of each block
    k0 = torch.arange(n, device=device)[None, :] * FLEX_BLOCK
    lo = q0 - (k0 + FLEX_BLOCK - 1)   # smallest q - k inside a (q block, kv block) pair
    hi = (q0 + FLEX_BLOCK - 1) - k0   # largest
    full = (lo >= 0) & (hi <= span) & (q0 + FLEX_BLOCK <= T)  # a ragged last q block stays partial
    partial = (hi >= 0) & (lo <= span) & ~full

    def listed(blocks):  # per q block: how many kv blocks, and their indices (selected ones first)
        count = blocks.sum(-1, dtype=torch.int32)
        order = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return count[None, None], order[None, None]

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= span)

    return BlockMask.from_kv_blocks(*listed(partial), *listed(full), BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=mask_mod, seq_lengths=(T, T))


def _compiled_flex():
    """Flex builds its fused kernel only under torch.compile (eager flex materialises all scores).
    Inside a compiled model plain flex_attention is traced into the model's graph; eager callers on
    a GPU get this separately compiled flex (made on first use: compiling costs imports)."""
    global _flex_compiled
    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled


def _window_mask(q_pos, k_pos, window):
    """Dense boolean mask [Tq, Tk]: causal, and at most `window` positions back."""
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask = mask & (q_pos[:, None] - k_pos[None, :] <= window)
    return mask


def attention(q, k, v, window: int | None = None, scale: float | None = None):
    """Causal self-attention. q [B, T, Hq, D], k/v [B, T, Hkv, D] with Hq a multiple of Hkv
    (grouped-query attention); window None = full causal; scale defaults to 1/sqrt(D).
    Returns [B, T, Hq, D] in q's dtype."""
    B, T, Hq, D = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, T) or k.size(3) != D or Hq % k.size(2):
        raise LabError(f"attention: q {tuple(q.shape)} and k/v {tuple(k.shape)}/{tuple(v.shape)} must be "
                       "[B, T, Hq, D] and [B, T, Hkv, D] with Hq a multiple of Hkv")
    if window is not None and window >= T - 1:
        window = None  # the window covers every key: plain causal attention, the fast path
    name = _plan(q.device.type, q.dtype, "full" if window is None else "window", D)
    gqa = k.size(2) != Hq
    if name == "fa3":
        out = _fa3.flash_attn_func(q, k, v, softmax_scale=scale, causal=True,
                                   window_size=(-1 if window is None else window, 0))
        return out[0] if isinstance(out, tuple) else out  # older FA3 builds also return the LSE
    if name == "cudnn":  # [B, T, H, D] described to cuDNN by its strides; GQA is native
        return cudnn_attention.attention(q, k, v, window, D**-0.5 if scale is None else scale)
    if name == "flash":  # [B, T, H, D] is the kernel's own layout; GQA is native
        return torch.ops.aten._flash_attention_forward(
            q, k, v, None, None, T, T, 0.0, True, False, scale=scale,
            window_size_left=-1 if window is None else window, window_size_right=0)[0]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # SDPA/flex layout, views
    if name == "flex":
        flex = _compiled_flex() if q.is_cuda and not torch.compiler.is_compiling() else flex_attention
        y = flex(q, k, v, block_mask=_block_mask(T, window, q.device), scale=scale, enable_gqa=gqa)
    elif name in ("sdpa-cudnn", "sdpa-flash"):
        kernel = SDPBackend.CUDNN_ATTENTION if name == "sdpa-cudnn" else SDPBackend.FLASH_ATTENTION
        with sdpa_kernel([kernel]):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    elif window is None:  # "sdpa" and "cpu" full layers
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:  # "cpu" windows: a dense mask is fine at CPU sizes
        pos = torch.arange(T, device=q.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=_window_mask(pos, pos, window), scale=scale,
                                           enable_gqa=gqa)
    return y.transpose(1, 2)


_DECODE_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class KVCache:
    """Keys and values of the tokens seen so far, for generation. `model(idx, kv_cache=cache)` takes
    the tokens at positions cache.pos.., appends their K/V to every layer, attends over the cache
    (windows respected, RoPE offset by cache.pos) and advances cache.pos. Decoding reads a few
    tokens at a time, so it uses SDPA with an explicit [T_new, pos + T_new] mask on every device:
    exact, and independent of the training backend.

    Rows of different lengths: `starts[b]` is where row b's tokens begin. Prompts are left-padded to
    one length and the padding's keys are masked, so cache.pos stays one number for the batch. RoPE
    and the windows depend only on position differences, so a padded row attends exactly as it
    would alone, its first token at position starts[b] instead of 0 (tests/test_engine.py).

    static=True fixes every shape whatever pos is: new keys are written at positions held on the device
    (pos_t), and each query attends over the whole buffer, the keys not yet written masked. A decode
    step then launches the same kernels with the same shapes every time, so it can be captured once as
    a CUDA graph and replayed (engine.stream(graph=True)): decoding is launch-bound, not compute-bound."""

    def __init__(self, batch_size, max_len, config, device, dtype=torch.float32, starts=None, static=False):
        shape = (config.n_layer, batch_size, max_len, config.n_kv_head, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.starts = (torch.zeros(batch_size, dtype=torch.long, device=device) if starts is None
                       else torch.as_tensor(starts, dtype=torch.long, device=device))
        self.max_len = max_len
        self.pos = 0
        self.static = static
        self.pos_t = torch.zeros((), dtype=torch.long, device=device)  # pos on the device (static)
        self.slots = torch.arange(max_len, device=device)
        # (new tokens, window) -> mask at this pos: every layer of one forward shares it (decode is
        # launch-bound, and the mask's ~10 small kernels a layer were a sixth of a d12 step's launches)
        self._masks = {}

    def attend(self, layer: int, q, k, v, window: int | None, scale: float | None):
        """Store this layer's new k/v [B, T_new, Hkv, D] and attend q [B, T_new, Hq, D] over the
        cache. Does not advance pos: the model does that once after its last layer."""
        end = self.pos + q.size(1)
        if end > self.max_len:
            raise LabError(f"KV cache overflow: {self.pos} + {q.size(1)} tokens > max_len={self.max_len}; "
                           "make the KVCache larger or generate fewer tokens")
        if self.static:  # written where pos_t says; read whole, the slots past the new tokens masked
            q_pos, k_pos = self.positions(q.size(1)), self.slots
            self.k[layer].index_copy_(1, q_pos, k.to(self.k.dtype))
            self.v[layer].index_copy_(1, q_pos, v.to(self.v.dtype))
            keys, values = self.k[layer], self.v[layer]
        else:
            q_pos, k_pos = torch.arange(self.pos, end, device=q.device), self.slots[:end]
            self.k[layer, :, self.pos:end] = k
            self.v[layer, :, self.pos:end] = v
            keys, values = self.k[layer, :, :end], self.v[layer, :, :end]
        mask = self._masks.get((q.size(1), window))
        if mask is None:
            real = k_pos[None, :] >= self.starts[:, None]  # [B, Tk]: not padding
            # [B, 1, Tq, Tk]; a padding query also sees itself: a row with no key would softmax to NaN,
            # and NaN times a zero weight is still NaN in the next layer's values
            mask = (_window_mask(q_pos, k_pos, window) & real[:, None, None, :]) | (q_pos[:, None] == k_pos[None, :])
            self._masks[(q.size(1), window)] = mask
        # not cuDNN: SDPA's cuDNN backend builds a graph per shape, and every decode step is a new
        # key length (64 ms a step at d12 on an H200, whatever the batch); the memory-efficient
        # kernel takes the mask as it is
        with sdpa_kernel(_DECODE_BACKENDS):
            y = F.scaled_dot_product_attention(q.to(keys.dtype).transpose(1, 2), keys.transpose(1, 2),
                                               values.transpose(1, 2), attn_mask=mask, scale=scale,
                                               enable_gqa=keys.size(2) != q.size(2))
        return y.transpose(1, 2).to(q.dtype)

    def positions(self, n: int) -> torch.Tensor:
        """A static cache's positions of the next n tokens, [n], read from pos_t on the device (no
        host value enters a captured step)."""
        return self.pos_t + self.slots[:n]

    def advance(self, n: int):
        self.pos += n
        if self.static:
            self.pos_t += n  # in place: a captured step advances it on every replay
        self._masks.clear()

    def reset(self):
        self.pos = 0
        self.pos_t.zero_()
        self._masks.clear()
