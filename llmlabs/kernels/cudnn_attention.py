"""Causal and sliding-window attention on cuDNN's own fused SDPA kernels, called through NVIDIA's
cudnn-frontend (`pip install nvidia-cudnn-frontend`, optional). PyTorch's SDPA already runs cuDNN
for causal layers on Hopper, but it has no window argument; cuDNN's diagonal band does, and its
kernels skip the key tiles outside the band. attention.py uses this for window layers when the
`cudnn` module imports and a probe graph builds.

A window w (a query at t sees keys t-w..t) is cuDNN's left bound w + 1 (keys with q - k < bound)
with the causal right bound 0. Both passes are custom ops, so torch.compile keeps them whole as
single kernel calls. One cuDNN graph is built per (pass, shapes, strides, dtype, window, scale),
on first use, and cached; execution binds device pointers and costs no rebuild."""
import functools

import torch

try:
    import cudnn
except (ImportError, OSError):  # not installed, or no cuDNN library it can open
    cudnn = None

_graphs = {}
_handles = {}


def _handle():
    device = torch.cuda.current_device()
    if device not in _handles:
        _handles[device] = cudnn.create_handle()
    handle = _handles[device]
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    return handle


def _io_type(dtype):
    return {torch.bfloat16: cudnn.data_type.BFLOAT16, torch.float16: cudnn.data_type.HALF}[dtype]


def _bhsd(x):
    """cuDNN reads dims as [B, H, S, D]: our [B, T, H, D] tensors, described by their own strides."""
    return list(x.transpose(1, 2).shape), list(x.transpose(1, 2).stride())


def _build(tensors, window, scale, backward):
    """A built cuDNN graph for these tensors (name -> torch tensor), and its tensor handles."""
    g, t = _graph(tensors, window, scale, backward)
    g.build_plans()  # the first plan heuristic A ranks (bench/cudnn_plans.py times the others)
    return g, t


def _graph(tensors, window, scale, backward):
    """The validated graph with its candidate execution plans, not built yet, and its tensors."""
    io = _io_type(tensors["q"].dtype)
    g = cudnn.pygraph(io_data_type=io, intermediate_data_type=cudnn.data_type.FLOAT,
                      compute_data_type=cudnn.data_type.FLOAT, handle=_handle())
    t = {}
    for name in ("q", "k", "v", "o", "do", "stats") if backward else ("q", "k", "v"):  # the graph's inputs
        x = tensors[name]
        if name == "stats":
            t[name] = g.tensor(dim=list(x.shape), stride=list(x.stride()), data_type=cudnn.data_type.FLOAT)
        else:
            dim, stride = _bhsd(x)
            t[name] = g.tensor(dim=dim, stride=stride, data_type=io)
    band = {} if window is None else {"diagonal_band_left_bound": window + 1}
    if backward:
        outs = g.sdpa_backward(q=t["q"], k=t["k"], v=t["v"], o=t["o"], dO=t["do"], stats=t["stats"],
                               attn_scale=scale, use_causal_mask=True, **band)
        for out, name in zip(outs, ("dq", "dk", "dv")):  # each described by its own buffer's strides:
            dim, stride = _bhsd(tensors[name])          # q/k/v may be views into a wider one
            out.set_output(True).set_dim(dim).set_stride(stride)
        t["dq"], t["dk"], t["dv"] = outs
    else:
        o, stats = g.sdpa(q=t["q"], k=t["k"], v=t["v"], generate_stats=True, attn_scale=scale,
                          use_causal_mask=True, **band)
        dim, stride = _bhsd(tensors["o"])
        o.set_output(True).set_dim(dim).set_stride(stride)
        stats.set_output(True).set_data_type(cudnn.data_type.FLOAT)
        t["o"], t["stats"] = o, stats
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    return g, t


def _run(tensors, window, scale, backward):
    key = (backward, window, scale, tensors["q"].device.index,
           tuple((n, x.dtype, tuple(x.shape), x.stride()) for n, x in tensors.items()))
    if key not in _graphs:
        _graphs[key] = _build(tensors, window, scale, backward)
    g, t = _graphs[key]
    workspace = torch.empty(g.get_workspace_size(), device=tensors["q"].device, dtype=torch.uint8)
    g.execute({t[n]: x for n, x in tensors.items()}, workspace, handle=_handle())


@torch.library.custom_op("llmlabs::cudnn_attention", mutates_args=(), device_types="cuda")
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, H, _ = q.shape
    o = torch.empty_like(q)
    stats = torch.empty(B, H, T, 1, device=q.device, dtype=torch.float32)  # log-sum-exp per query
    _run(dict(q=q, k=k, v=v, o=o, stats=stats), window, scale, backward=False)
    return o, stats


@_forward.register_fake
def _(q, k, v, window, scale):
    B, T, H, _ = q.shape
    return torch.empty_like(q), q.new_empty(B, H, T, 1, dtype=torch.float32)


@torch.library.custom_op("llmlabs::cudnn_attention_backward", mutates_args=(), device_types="cuda")
def _backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
              stats: torch.Tensor, window: int | None, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    # dO is read with o's layout: an incoming gradient of other strides is copied into it first
    do = do if do.stride() == o.stride() else torch.empty_like(o).copy_(do)
    _run(dict(q=q, k=k, v=v, o=o, do=do, stats=stats, dq=dq, dk=dk, dv=dv), window, scale, backward=True)
    return dq, dk, dv


@_backward.register_fake
def _(do, q, k, v, o, stats, window, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, window, scale = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.window, ctx.scale = window, scale


def _grads(ctx, do, _dstats):
    q, k, v, o, stats = ctx.saved_tensors
    return (*_backward(do, q, k, v, o, stats, ctx.window, ctx.scale), None, None)


_forward.register_autograd(_grads, setup_context=_setup_context)


def attention(q, k, v, window: int | None, scale: float):
    """q [B, T, Hq, D], k/v [B, T, Hkv, D] (bf16/fp16, CUDA, last dim contiguous) -> [B, T, Hq, D]."""
    return _forward(q, k, v, window, scale)[0]


@functools.cache
def usable(dtype) -> bool:
    """Importable, half precision, and small probe graphs (forward and backward, with a window)
    build on this GPU and cuDNN: a cuDNN without the diagonal band fails here, not in a step. The
    probe only builds (meta tensors carry the shapes), so it is safe to run while dynamo traces."""
    if cudnn is None or dtype not in (torch.bfloat16, torch.float16):
        return False
    q = torch.empty(1, 256, 2, 64, device="meta", dtype=dtype)
    stats = torch.empty(1, 2, 256, 1, device="meta", dtype=torch.float32)
    try:
        _build(dict(q=q, k=q, v=q, o=q), 64, 0.125, backward=False)
        _build(dict(q=q, k=q, v=q, o=q, do=q, stats=stats, dq=q, dk=q, dv=q), 64, 0.125, backward=True)
        return True
    except (cudnn.cudnnGraphNotSupportedError, RuntimeError):  # this cuDNN lacks the graph: another
        return False  # backend is used. Only cuDNN's errors: a bug of ours here must raise, not hide
