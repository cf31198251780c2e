"""triton_mlp's two matmuls as a warp-specialised Hopper kernel, written in Gluon (Triton's
lower-level language, triton.experimental.gluon): c = epilogue(a @ W^T) for W [N, K].

Why (bench/NOTES.md round 8): Triton's own persistent TMA kernel runs the MMAs, the loads' waits and
the epilogue on the same warps, so with K = the model width (8 steps of 64 at d8) every tile stops its
tensor cores for the epilogue, and the backward's epilogue waits on a synchronous load of h's tile:
0.94 and 1.35 ms a d8 matmul against cuBLAS's 0.81. Here one warp only issues TMA loads (operands
into a ring of STAGES buffers, and h's tile for the backward epilogue ahead of time, while the MMAs of
that tile run), and the MMA warps never wait on memory except through the ring's barriers. The
epilogue writes its output into the h buffers and stores them asynchronously; the stores are waited
for only after the next tile's first MMA is issued.

Layout of a program's work: persistent, one program per SM walking the tiles NUM_SMS apart (GROUP_M
row blocks walk the columns together, as triton_mlp._tile). Shared memory: STAGES x (a [BM, BK] +
w [BN, BK]) + SPLIT epilogue buffers [BM, BN / SPLIT]."""
import torch

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                   warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # no Triton (CPU torch builds), or one without Gluon's Hopper API
    gluon = None

BLOCK_K = 64

if gluon is not None:
    @gluon.jit
    def _tile(t, M, N, BM: gl.constexpr, BN: gl.constexpr, GROUP_M: gl.constexpr):
        grid_m = gl.cdiv(M, BM)
        grid_n = gl.cdiv(N, BN)
        per_group = GROUP_M * grid_n
        first_m = (t // per_group) * GROUP_M
        rows_here = min(grid_m - first_m, GROUP_M)
        return first_m + (t % per_group) % rows_here, (t % per_group) // rows_here  # triton_mlp._tile's order

    # EPILOGUE as triton_mlp: 0 = RELU2 (relu(acc)^2), 1 = TIMES_2SQRT (acc * 2 sqrt(h))
    @gluon.jit
    def _loader(a_desc, w_desc, h_desc, a_bufs, w_bufs, e_bufs, ready, empty, h_ready, h_empty, M, N, K,
                EPILOGUE: gl.constexpr, NUM_SMS: gl.constexpr, GROUP_M: gl.constexpr):
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = w_desc.block_type.shape[0]
        STAGES: gl.constexpr = a_bufs.type.shape[0]
        SPLIT: gl.constexpr = e_bufs.type.shape[0]
        HALF: gl.constexpr = BN // SPLIT
        steps = gl.cdiv(K, BK)
        h_at = min(STAGES, steps) - 1  # h's tile follows the loads the ring takes before the first MMA
        tiles = gl.cdiv(M, BM) * gl.cdiv(N, BN)
        it = 0
        n = 0
        for t in range(gl.program_id(0), tiles, NUM_SMS):
            pid_m, pid_n = _tile(t, M, N, BM, BN, GROUP_M)
            for k in range(steps):
                s = it % STAGES
                mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(s), a_desc.block_type.nbytes + w_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(a_desc, [pid_m * BM, k * BK], ready.index(s), a_bufs.index(s))
                tma.async_copy_global_to_shared(w_desc, [pid_n * BN, k * BK], ready.index(s), w_bufs.index(s))
                it += 1
                if EPILOGUE == 1:
                    if k == h_at:
                        # the buffers are free once the consumer has seen last tile's stores read them
                        mbarrier.wait(h_empty, (n & 1) ^ 1)
                        mbarrier.expect(h_ready, SPLIT * h_desc.block_type.nbytes)
                        for j in gl.static_range(SPLIT):
                            tma.async_copy_global_to_shared(h_desc, [pid_m * BM, pid_n * BN + j * HALF], h_ready,
                                                            e_bufs.index(j))
            n += 1

    @gluon.jit
    def _consumer(a_desc, w_desc, c_desc, a_bufs, w_bufs, e_bufs, ready, empty, h_ready, h_empty, M, N, K,
                  EPILOGUE: gl.constexpr, NUM_SMS: gl.constexpr, GROUP_M: gl.constexpr, num_warps: gl.constexpr):
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = w_desc.block_type.shape[0]
        STAGES: gl.constexpr = a_bufs.type.shape[0]
        SPLIT: gl.constexpr = e_bufs.type.shape[0]
        HALF: gl.constexpr = BN // SPLIT
        # one warpgroup per 64 rows; each wgmma as wide as the half it stores (N <= 256)
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, HALF, 16])
        steps = gl.cdiv(K, BK)
        tiles = gl.cdiv(M, BM) * gl.cdiv(N, BN)
        it = 0
        n = 0
        for t in range(gl.program_id(0), tiles, NUM_SMS):
            pid_m, pid_n = _tile(t, M, N, BM, BN, GROUP_M)
            accs = ()
            for j in gl.static_range(SPLIT):
                accs += (gl.zeros((BM, HALF), dtype=gl.float32, layout=acc_layout),)
            for k in range(steps):
                s = it % STAGES
                mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                new = ()
                for j in gl.static_range(SPLIT):
                    w = w_bufs.index(s).slice(j * HALF, HALF, dim=0).permute((1, 0))
                    new += (warpgroup_mma(a_bufs.index(s), w, accs[j], use_acc=k > 0, is_async=True),)
                # keep this step's MMAs in flight; the previous step's are done, so its slot is free
                accs = warpgroup_mma_wait(SPLIT, deps=new)
                if k > 0:
                    mbarrier.arrive(empty.index((it - 1) % STAGES))
                if k == 0:
                    # last tile's stores have had this MMA's time to read the epilogue buffers
                    tma.store_wait(0)
                    if EPILOGUE == 1:
                        mbarrier.arrive(h_empty, pred=n > 0)
                it += 1
            accs = warpgroup_mma_wait(0, deps=accs)
            mbarrier.arrive(empty.index((it - 1) % STAGES))
            if EPILOGUE == 1:
                mbarrier.wait(h_ready, n & 1)
            for j in gl.static_range(SPLIT):
                acc = accs[j]
                if EPILOGUE == 0:
                    acc = gl.maximum(acc, 0.0)
                    out = acc * acc
                else:
                    h = e_bufs.index(j).load(acc_layout).to(gl.float32)
                    out = acc * 2.0 * gl.sqrt(h)
                e_bufs.index(j).store(out.to(c_desc.dtype))
            fence_async_shared()
            for j in gl.static_range(SPLIT):
                tma.async_copy_shared_to_global(c_desc, [pid_m * BM, pid_n * BN + j * HALF], e_bufs.index(j))
            n += 1
        tma.store_wait(0)

    def _blocks(nargs):  # the descriptors' block shapes (and their shared layouts) follow the config
        BM, BN, SPLIT = nargs["BM"], nargs["BN"], nargs["SPLIT"]
        for name, block in (("a_desc", [BM, BLOCK_K]), ("w_desc", [BN, BLOCK_K]), ("c_desc", [BM, BN // SPLIT]),
                            ("h_desc", [BM, BN // SPLIT])):
            nargs[name].block_shape, nargs[name].layout = block, _layout(block)

    # Timed on an H200 alone at the d8/d12/d20 shapes (bench/NOTES.md round 9): 128 x 256 with 3 stages
    # and 128 x 128 with 4-5 each won some; GROUP_M 16 helped most forwards (the weight's tiles are L2
    # reads, and the ring is L2-bound); 2 stages lost everywhere.
    CONFIGS = [triton.Config(dict(BM=128, BN=bn, STAGES=s, SPLIT=2, GROUP_M=g), num_warps=8, maxnreg=168,
                             pre_hook=_blocks)
               for bn, s, g in ((256, 3, 8), (256, 3, 16), (128, 4, 8), (128, 5, 8), (128, 5, 16))]

    @triton.autotune(configs=CONFIGS, key=["M", "N", "K", "EPILOGUE"])
    @gluon.jit
    def _ws_kernel(a_desc, w_desc, c_desc, h_desc, M, N, K, EPILOGUE: gl.constexpr, NUM_SMS: gl.constexpr,
                   BM: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr, SPLIT: gl.constexpr,
                   GROUP_M: gl.constexpr, num_warps: gl.constexpr):
        # maxnreg 168 lets 12 warps launch (the 8 MMA warps and the loader's warpgroup: 384 x 168 fit
        # the 64K registers); the partitions then hand the loader's registers to the MMA warps (240)
        BK: gl.constexpr = BLOCK_K
        dtype: gl.constexpr = a_desc.dtype
        a_bufs = gl.allocate_shared_memory(dtype, [STAGES, BM, BK], a_desc.layout)
        w_bufs = gl.allocate_shared_memory(dtype, [STAGES, BN, BK], w_desc.layout)
        e_bufs = gl.allocate_shared_memory(dtype, [SPLIT, BM, BN // SPLIT], c_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        h_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        h_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        mbarrier.init(h_ready, count=1)
        mbarrier.init(h_empty, count=1)
        gl.warp_specialize([
            (_consumer, (a_desc, w_desc, c_desc, a_bufs, w_bufs, e_bufs, ready, empty, h_ready, h_empty, M, N, K,
                         EPILOGUE, NUM_SMS, GROUP_M, num_warps)),
            (_loader, (a_desc, w_desc, h_desc, a_bufs, w_bufs, e_bufs, ready, empty, h_ready, h_empty, M, N, K,
                       EPILOGUE, NUM_SMS, GROUP_M)),
        ], [1], [40])


def _layout(block):
    return gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16)


def ws_matmul(a, w, w_is_nk, epilogue, h=None):
    """epilogue(a [M, K] @ W^T) for w = W [N, K] (w_is_nk), or epilogue(a @ w) for w [K, N]: the
    kernel reads W [N, K] only, so a [K, N] weight is transposed first (a copy of the weight, 2 MB at
    d8). a, w and h bf16; h [M, N] for epilogue 1."""
    M, K = a.shape
    w = w if w_is_nk else w.t().contiguous()
    N = w.size(0)
    c = a.new_empty(M, N)
    sms = torch.cuda.get_device_properties(a.device).multi_processor_count
    desc = lambda t: TensorDescriptor.from_tensor(t, [64, 64], _layout([64, 64]))  # noqa: E731  (_blocks)
    grid = lambda meta: (min(sms, triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"])),)  # noqa: E731
    _ws_kernel[grid](desc(a), desc(w), desc(c), desc(c if h is None else h), M, N, K, EPILOGUE=epilogue,
                     NUM_SMS=sms)
    return c
