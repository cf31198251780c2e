"""Generation with a KV cache, and the `llmlabs sample RUN --prompt TEXT` command.

With the cache, the prompt is run once (prefill) and each new token costs one position of compute;
without it, the whole sequence is re-run for every token. Both draw the same random numbers in the
same order, so for a seed they give the same tokens (tests/test_engine.py checks this, with greedy
against a full forward, top-k and the context bound).
"""
import torch

from llmlabs import flags
from llmlabs.common import LabError


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens, *, temperature=1.0, top_k=None, seed=0, use_cache=True,
             stop_ids=()):
    """Yield up to `max_new_tokens` token ids continuing `prompt_ids` (a list of ints, BOS first),
    never past the model's context (sequence_len). temperature 0 is greedy; top_k keeps the k most
    likely tokens before sampling."""
    from llmlabs.attention import KVCache

    cfg = model.config
    if not 0 < len(prompt_ids) < cfg.sequence_len:
        raise LabError(f"prompt of {len(prompt_ids)} tokens: give 1 to {cfg.sequence_len - 1} tokens "
                       f"(the model's context is {cfg.sequence_len})")
    max_new_tokens = min(max_new_tokens, cfg.sequence_len - len(prompt_ids))
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    total = len(prompt_ids) + max_new_tokens
    cache = KVCache(1, total, cfg, device, next(model.parameters()).dtype) if use_cache else None
    logits = model(ids, kv_cache=cache)[:, -1, :] if use_cache else None
    for _ in range(max_new_tokens):
        if not use_cache:
            logits = model(ids)[:, -1, :]
        nxt = _pick(logits.float(), temperature, top_k, gen)
        tok = int(nxt)
        yield tok
        if tok in stop_ids:
            return
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        if use_cache:
            logits = model(nxt.view(1, 1), kv_cache=cache)[:, -1, :]


def _pick(logits, temperature, top_k, gen):
    if temperature == 0:
        return logits.argmax(dim=-1)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=gen).view(-1)


def complete(model, tokenizer, prompt, max_new_tokens, **kw):
    """Prompt text -> generated text (the prompt not included), stopping at the next document (BOS)."""
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    out = list(generate(model, ids, max_new_tokens, stop_ids=(tokenizer.bos_id,), **kw))
    if out and out[-1] == tokenizer.bos_id:
        out = out[:-1]
    return tokenizer.decode(out)


# ---------------------------------------------------------------------------------------------
# `llmlabs sample RUN --prompt TEXT`

def add_args(p):
    p.add_argument("run", help="a run directory written by `llmlabs train`")
    p.add_argument("--prompt", default="", help="text to continue (default: none, a new document in the style of "
                                                "the run's corpus, whatever it is)")
    p.add_argument("--max-tokens", type=flags.positive_int, default=128, help="tokens to generate")
    p.add_argument("--temperature", type=flags.nonnegative, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=flags.count, default=50, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=flags.positive_int, default=1)
    p.add_argument("--device", help="cpu | cuda | mps (default: best available)")


def run(args):
    from llmlabs.checkpoint import load_run
    from llmlabs.common import compute_init
    from llmlabs.data.tokenizer import Tokenizer

    device = compute_init(args.device)[0]
    model, ck = load_run(args.run, device)
    from pathlib import Path
    tokenizer = Tokenizer.load(Path(args.run) / "tokenizer.json")
    for i in range(args.num_samples):
        text = complete(model, tokenizer, args.prompt, args.max_tokens, temperature=args.temperature,
                        top_k=args.top_k or None, seed=args.seed + i)
        print(args.prompt + text)
        if i + 1 < args.num_samples:
            print("-" * 40)
