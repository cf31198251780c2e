"""Why bits per byte and not loss per token: the same text scored under two tokenizers.

Shows: a model's loss per token is nats / tokens, and how many tokens a text is depends on the
tokenizer. A tokenizer with longer tokens makes each token harder to predict (more bytes' worth of
information in each) and fewer of them, so per-token losses of models with different tokenizers are
in different units and cannot be ranked. Bits per byte divides the same total (the model's code
length for the text, nats / ln 2) by the number of UTF-8 bytes, which no tokenizer changes:

    bpb = (sum of nats over tokens) / (ln 2 x bytes) = loss per token x (tokens / bytes) / ln 2

Here, on this Python's standard library (train and validation are different files):
- tokenizer A: bytes (256 symbols);
- tokenizer B: a byte-level BPE (Sennrich et al., arXiv 1508.07909) trained in this file, pure Python,
  a few hundred merges, text pre-split into words, numbers, punctuation and spaces as GPT-2 does;
- for each, a unigram model (token frequencies) and a bigram model (the previous token as context),
  both fitted on train and scored on validation.
Measured with 500 merges (2.44 bytes per token): the byte bigram's per-token loss is 0.43x the BPE
unigram's (2.45 vs 5.71 nats), yet by bits per byte, the number a compressor reports, the BPE
unigram is the better model of the text (3.37 vs 3.54 bits): per-token loss ranks them the wrong
way. (With 256 merges, 2.11 bytes per token, the BPE unigram is not yet better: 3.61 bits.)
lzma's and zlib's bits per byte on the same text are printed for scale. The lab's version
is llmlabs/evaluate.py (val_bpb, the one definition: special tokens count 0 bytes and are left out),
with the tokenizer in llmlabs/data/tokenizer.py (rustbpe to train, tiktoken to encode).

    python basics/bpb.py"""
import argparse
import lzma
import math
import re
import sysconfig
import time
import zlib
from collections import Counter, defaultdict
from pathlib import Path

# the pre-split (a simpler cousin of GPT-2's): merges never cross a word/number/punctuation boundary
SPLIT = re.compile(r" ?[A-Za-z_]+| ?[0-9]+| ?[^\sA-Za-z_0-9]+|\s+(?!\S)|\s+")


def merge(word, pair, new):
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_bpe(text, n_merges):
    """Byte-level BPE: repeatedly give the most frequent adjacent pair a new id. Returns {pair: id}.
    Pair counts are kept up to date by touching only the words that contain the merged pair."""
    counts = Counter(SPLIT.findall(text))
    words, freq = [list(w.encode()) for w in counts], list(counts.values())
    pairs, where = Counter(), defaultdict(set)
    for i, w in enumerate(words):
        for p in zip(w, w[1:]):
            pairs[p] += freq[i]
            where[p].add(i)
    merges = {}
    for new in range(256, 256 + n_merges):
        best = max(pairs, key=pairs.get)
        merges[best] = new
        for i in where.pop(best):
            for p in zip(words[i], words[i][1:]):
                pairs[p] -= freq[i]
            words[i] = merge(words[i], best, new)
            for p in zip(words[i], words[i][1:]):
                pairs[p] += freq[i]
                where[p].add(i)
        for p in [p for p, c in pairs.items() if c <= 0]:
            del pairs[p]
    return merges


def encoder(merges):
    """text -> token ids: each pre-split chunk's bytes, merged lowest-rank pair first (as GPT-2)."""
    cache = {}

    def encode_chunk(chunk):
        w = list(chunk.encode())
        while len(w) > 1:
            pair = min(zip(w, w[1:]), key=lambda p: merges.get(p, math.inf))
            if pair not in merges:
                break
            w = merge(w, pair, merges[pair])
        return w

    def encode(text):
        out = []
        for chunk in SPLIT.findall(text):
            if chunk not in cache:
                cache[chunk] = encode_chunk(chunk)
            out.extend(cache[chunk])
        return out
    return encode


def unigram_nats(train, val, vocab):
    """Summed nats of val under token frequencies from train (add-one, so nothing is impossible)."""
    c, total = Counter(train), len(train) + vocab
    return -sum(math.log((c[t] + 1) / total) for t in val)


def bigram_nats(train, val, vocab, lam=0.9):
    """The same with the previous token as context: lam * p(b | a) + (1 - lam) * unigram(b). The first
    token has no context and is scored by the unigram."""
    c, total, c2 = Counter(train), len(train) + vocab, Counter(zip(train, train[1:]))
    nats = -math.log((c[val[0]] + 1) / total)
    for a, b in zip(val, val[1:]):
        p_bigram = c2[a, b] / c[a] if c[a] else 0.0
        nats -= math.log(lam * p_bigram + (1 - lam) * (c[b] + 1) / total)
    return nats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--merges", type=int, default=500)
    args = p.parse_args(argv)
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    train_text = "".join(f.read_text(encoding="utf-8") for f in files[1::10])
    val_text = "".join(f.read_text(encoding="utf-8") for f in files[::10])
    n_bytes = len(val_text.encode())
    t0 = time.time()
    merges = train_bpe(train_text, args.merges)
    encode = encoder(merges)
    print(f"BPE: {args.merges} merges trained on {len(train_text.encode()):,} bytes in {time.time() - t0:.1f}s; "
          f"vocab {256 + args.merges}")

    tokenizers = {"bytes": (list(train_text.encode()), list(val_text.encode()), 256),
                  "bpe": (encode(train_text), encode(val_text), 256 + args.merges)}
    print(f"validation: {n_bytes:,} bytes = {len(tokenizers['bpe'][1]):,} BPE tokens "
          f"({n_bytes / len(tokenizers['bpe'][1]):.2f} bytes per token)")
    results = {}
    print(f"  {'model':<16}{'tokens':>10}{'nats/token':>12}{'bits/byte':>11}")
    for model, fn in (("unigram", unigram_nats), ("bigram", bigram_nats)):
        for tok, (train, val, vocab) in tokenizers.items():
            nats = fn(train, val, vocab)
            per_token, bpb = nats / len(val), nats / (math.log(2) * n_bytes)
            # the identity: the two numbers are one total divided by two different counts
            assert abs(bpb - per_token * len(val) / n_bytes / math.log(2)) < 1e-9
            results[f"{tok} {model}"] = per_token, bpb
            print(f"  {tok + ' ' + model:<16}{len(val):>10,}{per_token:>12.3f}{bpb:>11.3f}")
    data = val_text.encode()
    print(f"  {'lzma -9':<16}{'':>10}{'':>12}{8 * len(lzma.compress(data, preset=9)) / n_bytes:>11.3f}")
    print(f"  {'zlib -9':<16}{'':>10}{'':>12}{8 * len(zlib.compress(data, 9)) / n_bytes:>11.3f}")

    (tok_a, bpb_a), (tok_b, bpb_b) = results["bytes bigram"], results["bpe unigram"]
    print(f"per token, the byte bigram ({tok_a:.2f} nats) looks {tok_b / tok_a:.1f}x better than the BPE unigram "
          f"({tok_b:.2f});\nper byte, the BPE unigram ({bpb_b:.2f} bits) is the better model of the text "
          f"({bpb_a:.2f} bits for the byte bigram).")
    assert tok_a < 0.6 * tok_b, "the byte bigram should have the much lower per-token loss"
    assert bpb_b < bpb_a, "the BPE unigram should compress the text better"
    for model in ("unigram", "bigram"):  # a better tokenizer helps the same kind of model, in bits per byte
        assert results[f"bpe {model}"][1] < results[f"bytes {model}"][1]
    print("OK: per-token loss ranks these models the wrong way; bits per byte ranks them by how well they predict the text")


if __name__ == "__main__":
    main()
