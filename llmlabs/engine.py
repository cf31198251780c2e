"""Generation with a KV cache, batched; the `llmlabs sample RUN --prompt TEXT` command; a finished
run's samples.txt.

With the cache, the prompts are run once (prefill) and each new token costs one position of compute;
without it, every row's whole sequence is re-run for every token, one row at a time (the reference
the tests compare with). A batch holds prompts of any lengths: they are left-padded to the longest
and the cache masks the padding (attention.KVCache), so each row gets the tokens it would get alone.
Both paths draw the same random numbers in the same order, so for a seed they give the same tokens.

Greedy (temperature 0) is per row: row i of a batch is exactly the one-prompt run of prompt i.
Sampling draws one [rows, vocab] multinomial per step from one generator: reproducible for a seed
and batch, but row i of a batch is not the one-prompt run with that seed (tests/test_engine.py).
"""
import codecs
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llmlabs import flags
from llmlabs.common import LabError

SAMPLE_PROMPT_TOKENS = 8  # samples.txt continues the first tokens of the first validation documents


@torch.no_grad()
def stream(model, prompts, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None, seed=0, stop_ids=(),
           use_cache=True, graph=False):
    """Continue several prompts (lists of token ids, BOS first) together. Yields one list per step:
    each row's new token id, or None once the row has stopped: at a token in `stop_ids` (which is
    yielded) or after `max_new_tokens`. Ends when every row has stopped, and at the model's context
    (sequence_len) counted from the longest prompt. temperature 0 is greedy; top_k keeps the k most
    likely tokens, top_p the nucleus (_nucleus), both before sampling. graph=True (CUDA): the decode
    step runs as one captured CUDA graph (_graphed_decode) over a static cache, the same tokens."""
    from llmlabs.attention import KVCache

    cfg = model.config
    if not prompts:
        raise LabError("no prompts to continue")
    for i, p in enumerate(prompts):
        if not 0 < len(p) < cfg.sequence_len:
            raise LabError(f"prompt{f' {i}' if len(prompts) > 1 else ''} of {len(p)} tokens: give 1 to "
                           f"{cfg.sequence_len - 1} tokens (the model's context is {cfg.sequence_len})")
    longest = max(map(len, prompts))
    steps = min(max_new_tokens, cfg.sequence_len - longest)
    param = next(model.parameters())
    gen = torch.Generator(device=param.device).manual_seed(seed)
    if graph and (param.device.type != "cuda" or not use_cache):
        raise LabError(f"graph=True captures the cached decode step as a CUDA graph: it needs a model on a GPU "
                       f"(this one is on {param.device.type}) and use_cache")
    if use_cache:
        pads = [longest - len(p) for p in prompts]
        ids = torch.tensor([[0] * n + list(p) for n, p in zip(pads, prompts)], device=param.device)
        cache = KVCache(len(prompts), longest + steps, cfg, param.device, param.dtype, starts=pads, static=graph)
        logits = model(ids, kv_cache=cache)[:, -1, :]
        decode = (_graphed_decode(model, cache, len(prompts)) if graph and steps > 1
                  else lambda nxt: model(nxt.view(-1, 1), kv_cache=cache)[:, -1, :])
    else:
        rows = [list(p) for p in prompts]
    stopped = [False] * len(prompts)
    for step in range(steps):
        if not use_cache:
            logits = torch.cat([model(torch.tensor([r], device=param.device))[:, -1, :] for r in rows])
        nxt = _pick(logits.float(), temperature, top_k, top_p, gen)
        toks = nxt.tolist()  # the one host sync per step: the caller gets ints
        yield [None if s else t for s, t in zip(stopped, toks)]
        stopped = [s or t in stop_ids for s, t in zip(stopped, toks)]
        if all(stopped) or step + 1 == steps:
            return
        if use_cache:  # stopped rows are still computed (their tokens are dropped): one batch shape throughout
            logits = decode(nxt)
        else:
            for r, t in zip(rows, toks):
                r.append(t)


def _graphed_decode(model, cache, batch):
    """The decode step (one token per row through a static KVCache) captured once as a CUDA graph;
    returns step(ids [batch]) -> logits [batch, vocab], a buffer each call overwrites. Eager decoding
    launches ~700 small kernels a d12 step from Python and the GPU waits on the host (engine_speed
    --profile: busy 2.6 of 13.5 ms); a replay launches them all at once. The capture's inputs are
    fixed buffers (the token ids, pos_t), and the step advances pos_t inside the graph."""
    tok = torch.zeros(batch, 1, dtype=torch.long, device=cache.k.device)
    pos = cache.pos
    side = torch.cuda.Stream()  # warm-up off the default stream, as capture requires: kernels picked, memory pooled
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        model(tok, kv_cache=cache)
    torch.cuda.current_stream().wait_stream(side)
    cache.pos = pos  # the warm-up's token is overwritten by the first real one, at the same position
    cache.pos_t.fill_(pos)
    step = torch.cuda.CUDAGraph()
    with torch.cuda.graph(step):
        logits = model(tok, kv_cache=cache)[:, -1, :]
    cache.pos = pos  # capture only recorded the kernels: nothing ran, pos_t included

    def run(ids):
        tok.copy_(ids.view(-1, 1))
        step.replay()
        cache.pos += 1  # the host's copy; the replay moved pos_t
        return logits

    return run


def generate(model, prompt_ids, max_new_tokens, **kw):
    """Yield up to `max_new_tokens` token ids continuing one prompt (stream's arguments)."""
    for (tok,) in stream(model, [prompt_ids], max_new_tokens, **kw):
        yield tok


def generate_batch(model, prompts, max_new_tokens, **kw) -> list[list[int]]:
    """Each prompt's new token ids, generated together (stream's arguments)."""
    out = [[] for _ in prompts]
    for toks in stream(model, prompts, max_new_tokens, **kw):
        for row, tok in zip(out, toks):
            if tok is not None:
                row.append(tok)
    return out


def _pick(logits, temperature, top_k, top_p, gen):
    if temperature == 0:
        return logits.argmax(dim=-1)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p is not None and top_p < 1:
        probs = _nucleus(probs, top_p)
    return torch.multinomial(probs, 1, generator=gen).view(-1)


def _nucleus(probs, top_p):
    """Nucleus (top-p) sampling (Holtzman et al., arXiv 1904.09751): keep the smallest set of most
    likely tokens whose probabilities sum to >= top_p, zero the rest (multinomial renormalises).
    The most likely token always stays, so top_p 0 is greedy."""
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)  # ties: lower id first
    # a token stays if the more likely ones before it sum to < top_p
    keep = F.pad(sorted_p.cumsum(dim=-1)[..., :-1] < top_p, (1, 0), value=True)
    return torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)


def complete(model, tokenizer, prompts, max_new_tokens, **kw) -> list[str]:
    """Prompt texts -> generated texts (prompts not included), each stopping at the next document (BOS)."""
    out = generate_batch(model, [_encode(tokenizer, p) for p in prompts], max_new_tokens,
                         stop_ids=(tokenizer.bos_id,), **kw)
    return [_decode(tokenizer, ids) for ids in out]


def _encode(tokenizer, prompt):
    return [tokenizer.bos_id] + tokenizer.encode(prompt)


def _decode(tokenizer, ids):
    return tokenizer.decode(ids[:-1] if ids and ids[-1] == tokenizer.bos_id else ids)  # not the stop token


# ---------------------------------------------------------------------------------------------
# `llmlabs sample RUN --prompt TEXT`

def sample_prompts(data, n=4) -> list[str]:
    """The first SAMPLE_PROMPT_TOKENS tokens of the first n validation documents: prompts that fit the
    corpus, whatever it is (each shard's offsets mark where a document's BOS is)."""
    tokens, offsets = data.shards("val")[0]
    return [data.tokenizer.decode([int(t) for t in tokens[a + 1:min(a + 1 + SAMPLE_PROMPT_TOKENS, b)]])
            for a, b in zip(offsets[:n], offsets[1:n + 1])]


def write_samples(model, data, path):
    """samples.txt of a finished run: each sample prompt continued (temperature 0.8, top-k 50, seed 0)."""
    model.eval()
    prompts = sample_prompts(data)
    texts = complete(model, data.tokenizer, prompts, 64, temperature=0.8, top_k=50, seed=0)  # one batch
    out = [p + t for p, t in zip(prompts, texts)]
    path.write_text("\n\n-----\n\n".join(out) + "\n")
    model.train()


def add_args(p):
    p.add_argument("run", help="a run directory written by `llmlabs train`")
    p.add_argument("--prompt", action="append", help="text to continue; repeat for several, generated as one batch "
                                                     "(default: none, a new document in the style of the run's "
                                                     "corpus, whatever it is)")
    p.add_argument("--prompts-file", help="a UTF-8 text file of prompts, one per line (blank lines skipped), after "
                                          "any --prompt")
    p.add_argument("--max-tokens", type=flags.positive_int, default=128, help="tokens to generate")
    p.add_argument("--temperature", type=flags.nonnegative, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=flags.count, default=50, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=flags.fraction, default=1.0,
                   help="sample from the smallest set of most likely tokens holding this much probability "
                        "(nucleus sampling; 1 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=flags.positive_int, default=1, help="samples per prompt, all in the batch")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated (one prompt and one "
                                                         "sample only)")
    p.add_argument("--image", action="append", help="caption this image file (a --vision run); repeat for several, "
                                                    "generated as one batch; --prompt, if given, starts each caption")
    p.add_argument("--device", help="cpu | cuda | mps (default: best available)")


def _read_prompts(path):
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LabError(f"--prompts-file {path}: cannot read it ({type(e).__name__}: {e})") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise LabError(f"--prompts-file {path} holds no prompt: write one per line")
    return prompts


def run(args):
    from llmlabs.checkpoint import load_run
    from llmlabs.common import compute_init
    from llmlabs.data.tokenizer import Tokenizer

    prompts = (args.prompt or []) + (_read_prompts(args.prompts_file) if args.prompts_file else [])
    rows = [p for p in prompts or [""] for _ in range(args.num_samples)]
    if args.stream and len(rows) > 1:
        raise LabError(f"--stream prints one text as it is generated; this asks for {len(rows)} (prompts x "
                       "--num-samples): drop --stream to generate them as one batch, printed at the end")
    device = compute_init(args.device)[0]
    model, info = load_run(args.run, device)
    tokenizer = Tokenizer.load(Path(args.run) / "tokenizer.json")
    if ("encoder" in info) != bool(args.image):
        raise LabError(f"{args.run} is a --vision run: give --image FILE, the image to caption" if "encoder" in info
                       else f"--image captions an image with a --vision run, and {args.run} is a text run: drop --image")
    kw = dict(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p, seed=args.seed,
              stop_ids=(tokenizer.bos_id,))
    # text decoding on a GPU replays one captured CUDA graph a step (a static cache, whose logits equal
    # the growing cache's): d12 at batch 1 on an H200 decodes 607 tokens/s, 61 eager (engine_speed-h200-fb0eb45)
    graph = device.type == "cuda"
    start = time.perf_counter()
    if args.image:
        from llmlabs.data.images import load_image
        from llmlabs.multimodal import caption

        if args.stream or len(prompts) > 1:
            raise LabError("--image takes at most one --prompt (the start of every caption) and no --stream")
        files = rows = [f for f in args.image for _ in range(args.num_samples)]  # rows: counted below
        pixels = torch.from_numpy(np.stack([load_image(f, info["encoder"].image_size) for f in files])).to(device)
        out = caption(model, info["encoder"], tokenizer, pixels, args.max_tokens, prompt=(prompts or [""])[0],
                      **{k: v for k, v in kw.items() if k != "stop_ids"})
        n = sum(map(len, out))
        for f, ids in zip(files, out):
            print(f"{f}: {(prompts or [''])[0] + _decode(tokenizer, ids)}")
    elif args.stream:  # bytes through an incremental UTF-8 decoder: a character split over tokens prints whole
        print(rows[0], end="", flush=True)
        utf8, n = codecs.getincrementaldecoder("utf-8")(errors="replace"), 0
        for (tok,) in stream(model, [_encode(tokenizer, rows[0])], args.max_tokens, graph=graph, **kw):
            n += 1
            if tok != tokenizer.bos_id:
                print(utf8.decode(tokenizer.decode_bytes([tok])), end="", flush=True)
        print(utf8.decode(b"", final=True))
    else:
        out = generate_batch(model, [_encode(tokenizer, p) for p in rows], args.max_tokens, graph=graph, **kw)
        n = sum(map(len, out))
        for i, (prompt, ids) in enumerate(zip(rows, out)):
            print(prompt + _decode(tokenizer, ids))
            if i + 1 < len(rows):
                print("-" * 40)
    seconds = time.perf_counter() - start
    # stderr: piping stdout keeps only the text
    print(f"{n} tokens in {seconds:.2f} s: {n / seconds:.1f} tokens/s ({len(rows)} row{'s' * (len(rows) > 1)}, "
          f"prefill included, {device})", file=sys.stderr)
