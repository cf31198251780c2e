"""The ReLU^2 MLP, y = relu(x W1^T)^2 W2^T, with the activation done inside two matmuls' epilogues
(ops.relu2_mlp in a compiled GPU forward; CPU and eager run the reference composite).

Forward: h = relu(x W1^T)^2 from one Triton matmul that squares its rectified float32 accumulator
before the single store, so the pre-activation never reaches memory; then y = h W2^T on cuBLAS.
Backward keeps only h, because relu(a) = sqrt(h): dL/da = 2 sqrt(h) * (dy W2) comes out of a
second Triton matmul, whose epilogue reads h; dW2 = dy^T h, dx = da W1 and dW1 = da^T x stay on
cuBLAS. Inductor instead writes the pre-activation and runs two pointwise passes over
[tokens, 4 x width] (19.8 ms of a 281.5 ms d8 step on an H200, bench/NOTES.md round 7).

Two kernels do each matmul: on Hopper and newer a persistent one with TMA loads and stores whose
programs walk many tiles, before Hopper (no TMA) a plain tiled loop over pointers."""
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds ship without Triton
    triton = None
try:  # host-side TMA descriptors: newer Tritons only (torch>=2.6 allows older); without, the pointer kernel
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

BLOCK_K = 64  # the reduction dimension (the model width) must be a multiple of it
RELU2, TIMES_2SQRT = 0, 1  # the epilogues

if triton is not None:
    import inspect

    # the winning config of each shape saved in the Triton cache (Tritons that can; 3.6 on the H200 host): a
    # fresh process of the same shapes, each autoresearch run, reads it instead of timing every config again
    # (autotuning took 1.3 s of a d4 run's start under cProfile, bench/results/startup_profile-h200-9d89567.txt)
    _SAVED = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}

    @triton.jit
    def _tile(t, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
        # tile t -> (row block, column block): GROUP_M row blocks walk the columns together, so the
        # weight's tiles stay in L2 while they are reused
        grid_m, grid_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
        per_group = GROUP_M * grid_n
        first_m = (t // per_group) * GROUP_M
        rows_here = min(grid_m - first_m, GROUP_M)
        return first_m + (t % per_group) % rows_here, (t % per_group) // rows_here

    @triton.jit
    def _epilogue(acc, h, EPILOGUE: tl.constexpr):
        if EPILOGUE == 0:  # RELU2
            acc = tl.maximum(acc, 0.0)
            return acc * acc
        return acc * 2.0 * tl.sqrt(h.to(tl.float32))  # TIMES_2SQRT: 2 relu(a) from h = relu(a)^2

    # With K = the width (512 at d8) a tile runs only K / 64 steps, so its prologue and epilogue count:
    # tiles whose pipeline fits twice in an SM's 228 KB of shared memory (2-3 stages) let one tile's
    # stores overlap another's loads. d8 on an H200 (bench/NOTES.md round 7): the first five configs
    # ran 1.55 ms a matmul (355 TFLOP/s), all ten 1.48 ms (372; picked: 256x128 forward, 128x128 at
    # 4 warps backward); cuBLAS runs the same shape in ~0.95 ms.
    CONFIGS = [triton.Config(dict(BM=bm, BN=bn, BK=BLOCK_K, GROUP_M=8), num_stages=s, num_warps=w)
               for bm, bn, s, w in ((128, 256, 3, 8), (256, 128, 3, 8), (128, 128, 4, 4), (128, 128, 4, 8),
                                    (64, 256, 4, 4), (128, 256, 2, 8), (128, 128, 3, 8), (128, 128, 3, 4),
                                    (128, 128, 2, 8), (64, 256, 3, 4))]

    @triton.autotune(configs=CONFIGS, key=["M", "N", "K", "EPILOGUE"], **_SAVED)
    @triton.jit
    def _matmul_kernel(a_ptr, b_ptr, c_ptr, h_ptr, M, N, K, stride_am, stride_bk, stride_bn,
                       EPILOGUE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                       GROUP_M: tl.constexpr):
        # c [M, N] = epilogue(a [M, K] @ b [K, N]); a and c row-major, b by its strides (W^T or W)
        pid_m, pid_n = _tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        # ragged edges read wrapped rows/columns (never out of bounds) and are masked at the store
        a = a_ptr + (rm % M).to(tl.int64)[:, None] * stride_am + rk[None, :]
        b = b_ptr + rk[:, None] * stride_bk + (rn % N)[None, :] * stride_bn
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for _ in range(0, K // BK):
            acc = tl.dot(tl.load(a), tl.load(b), acc)
            a += BK
            b += BK * stride_bk
        at = rm.to(tl.int64)[:, None] * N + rn[None, :]
        ok = (rm < M)[:, None] & (rn < N)[None, :]
        if EPILOGUE == 1:
            h = tl.load(h_ptr + at, mask=ok, other=0.0)
        else:
            h = acc  # unread
        tl.store(c_ptr + at, _epilogue(acc, h, EPILOGUE).to(c_ptr.dtype.element_ty), mask=ok)

    def _tma_blocks(nargs):  # the descriptors' block shapes follow the config being run
        BM, BN, BK = nargs["BM"], nargs["BN"], nargs["BK"]
        nargs["a_desc"].block_shape = [BM, BK]
        nargs["b_desc"].block_shape = [BN, BK] if nargs["B_NK"] else [BK, BN]
        nargs["c_desc"].block_shape = nargs["h_desc"].block_shape = [BM, BN // nargs["SPLIT"]]

    # SPLIT 2 stores (and reads h) in two [BM, BN / 2] halves: half the epilogue's shared memory, so
    # 128 x 256 tiles keep 3-4 stages beside h's tile in the backward. On an H200 (bench/NOTES.md
    # round 8) autotuning kept 128 x 256 at 8 warps for d8, d12 and d20: split in five of the six
    # matmuls. Two programs per SM on 128 x 128 tiles (one's epilogue beside the other's MMAs) won
    # none and were dropped.
    TMA_CONFIGS = [triton.Config(dict(BM=bm, BN=bn, BK=BLOCK_K, GROUP_M=8, SPLIT=split), num_stages=s,
                                 num_warps=w, pre_hook=_tma_blocks)
                   for bm, bn, s, w, split in ((128, 256, 3, 8, 1), (128, 256, 2, 8, 1), (256, 128, 3, 8, 1),
                                               (128, 128, 4, 8, 1), (128, 128, 4, 4, 1), (128, 256, 3, 8, 2),
                                               (128, 256, 4, 8, 2))]

    @triton.jit
    def _tma_store(c_desc, h_desc, m, n, acc, EPILOGUE: tl.constexpr):
        if EPILOGUE == 1:
            h = h_desc.load([m, n])
        else:
            h = acc  # unread
        c_desc.store([m, n], _epilogue(acc, h, EPILOGUE).to(c_desc.dtype))

    @triton.autotune(configs=TMA_CONFIGS, key=["M", "N", "K", "EPILOGUE"], **_SAVED)
    @triton.jit
    def _tma_kernel(a_desc, b_desc, c_desc, h_desc, M, N, K, EPILOGUE: tl.constexpr, B_NK: tl.constexpr,
                    NUM_SMS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    GROUP_M: tl.constexpr, SPLIT: tl.constexpr):
        # Persistent: one program per SM walks the tiles NUM_SMS apart, and the flattened loop lets
        # the pipeliner issue the next tile's TMA loads while this tile's epilogue runs. TMA zero-fills
        # reads past the edges and clips the stores there. b is W [N, K] (B_NK) or W [K, N].
        tiles = tl.cdiv(M, BM) * tl.cdiv(N, BN)
        done = tl.program_id(0) - NUM_SMS  # a second tile counter for the epilogue (the pipeliner's
        for t in tl.range(tl.program_id(0), tiles, NUM_SMS, flatten=True):  # values stay per stage)
            pid_m, pid_n = _tile(t, M, N, BM, BN, GROUP_M)
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k in range(0, K, BK):
                a = a_desc.load([pid_m * BM, k])
                if B_NK:
                    b = b_desc.load([pid_n * BN, k]).T
                else:
                    b = b_desc.load([k, pid_n * BN])
                acc = tl.dot(a, b, acc)
            done += NUM_SMS
            pid_m, pid_n = _tile(done, M, N, BM, BN, GROUP_M)
            if SPLIT == 2:
                left, right = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))
                _tma_store(c_desc, h_desc, pid_m * BM, pid_n * BN, left, EPILOGUE)
                _tma_store(c_desc, h_desc, pid_m * BM, pid_n * BN + BN // 2, right, EPILOGUE)
            else:
                _tma_store(c_desc, h_desc, pid_m * BM, pid_n * BN, acc, EPILOGUE)


def _pointer_matmul(a, w, w_is_nk, epilogue, h):
    b = w.t() if w_is_nk else w  # [K, N], a view
    M, K = a.shape
    N = b.size(1)
    c = a.new_empty(M, N)
    grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)  # noqa: E731
    _matmul_kernel[grid](a, b, c, c if h is None else h, M, N, K, a.stride(0), b.stride(0), b.stride(1),
                         EPILOGUE=epilogue)
    return c


def _tma_matmul(a, w, w_is_nk, epilogue, h):
    M, K = a.shape
    N = w.size(0) if w_is_nk else w.size(1)
    c = a.new_empty(M, N)
    sms = torch.cuda.get_device_properties(a.device).multi_processor_count
    desc = lambda t: TensorDescriptor.from_tensor(t, [64, 64])  # noqa: E731  (blocks: _tma_blocks)
    grid = lambda meta: (min(sms, triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"])),)  # noqa: E731
    _tma_kernel[grid](desc(a), desc(w), desc(c), desc(c if h is None else h), M, N, K, EPILOGUE=epilogue,
                      B_NK=w_is_nk, NUM_SMS=sms)
    return c


KERNELS = {"pointer": _pointer_matmul, "tma": _tma_matmul}


def _matmul(a, w, w_is_nk, epilogue, h=None):
    """epilogue(a [M, K] @ W^T) for w = W [N, K] (w_is_nk), or epilogue(a @ w) for w [K, N], in a's
    dtype: on the TMA kernel where the GPU has TMA (compute capability 9.0 and up) and Triton its
    descriptors. On an H200 it beat the pointer kernel at every d8, d12 and d20 shape, by 1.35-1.4x
    forward and 1.2x backward (bench/NOTES.md round 8)."""
    has_tma = TensorDescriptor is not None and torch.cuda.get_device_capability(a.device)[0] >= 9
    kernel = "tma" if has_tma else "pointer"
    return KERNELS[kernel](a, w, w_is_nk, epilogue, h)


@torch.library.custom_op("llmlabs::relu2_mlp", mutates_args=(), device_types="cuda")
def _forward(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x2 = x.reshape(-1, x.size(-1))
    h = _matmul(x2, w_fc.to(x.dtype), True, RELU2)
    y = h @ w_proj.to(x.dtype).t()
    return y.view(*x.shape[:-1], -1), h


@_forward.register_fake
def _(x, w_fc, w_proj):
    return x.new_empty(*x.shape[:-1], w_proj.size(0)), x.new_empty(x.numel() // x.size(-1), w_fc.size(0))


@torch.library.custom_op("llmlabs::relu2_mlp_backward", mutates_args=(), device_types="cuda")
def _backward(dy: torch.Tensor, x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor,
              h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x2 = x.reshape(-1, x.size(-1))
    dy2 = dy.reshape(-1, dy.size(-1)).to(x.dtype).contiguous()
    da = _matmul(dy2, w_proj.to(x.dtype), False, TIMES_2SQRT, h)
    dw_proj = (dy2.t() @ h).to(w_proj.dtype)
    dw_fc = (da.t() @ x2).to(w_fc.dtype)
    return (da @ w_fc.to(x.dtype)).view(x.shape), dw_fc, dw_proj


@_backward.register_fake
def _(dy, x, w_fc, w_proj, h):
    return torch.empty_like(x), torch.empty_like(w_fc), torch.empty_like(w_proj)


def _setup_context(ctx, inputs, output):
    x, w_fc, w_proj = inputs
    ctx.save_for_backward(x, w_fc, w_proj, output[1])


def _grads(ctx, dy, _dh):
    return _backward(dy, *ctx.saved_tensors)


_forward.register_autograd(_grads, setup_context=_setup_context)


def _compute_dtype(x):
    t = x.device.type
    return torch.get_autocast_dtype(t) if torch.is_autocast_enabled(t) else x.dtype


def usable(x, w_fc) -> bool:
    """CUDA, half-precision compute (autocast or inputs), a width that is a multiple of BLOCK_K, Triton."""
    return (triton is not None and x.is_cuda and _compute_dtype(x) in (torch.bfloat16, torch.float16)
            and x.size(-1) % BLOCK_K == 0 and w_fc.size(0) % 8 == 0)


def relu2_mlp(x, w_fc, w_proj):
    """relu(x w_fc^T)^2 w_proj^T in the compute dtype (autocast's, else x's); w_fc [4C, C], w_proj [C, 4C]."""
    return _forward(x.to(_compute_dtype(x)).contiguous(), w_fc, w_proj)[0]
