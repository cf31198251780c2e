import json
import math
import random

import pytest
import regex
import torch

from llmlabs.common import LabError
from llmlabs.data.shards import DataDir
from llmlabs.data.tokenizer import SPECIAL_NAMES, Tokenizer
from conftest import random_text

HELD_OUT = [
    "Plain ASCII: the quick brown fox jumps over the lazy dog 1234567890 !@#$%^&*()",
    "CJK: 東京で数据加载器の模型を训练する。한국어 문장도 있습니다。",
    "Emoji: 🙂🚀 👩‍💻 family 👨‍👩‍👧‍👦 flag 🇫🇷 skin 👍🏽",
    "Mixed\r\n\ttabs   and  spaces, naïve café Größe, math ∑λ→∞, rare 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and \u200b zero-width",
]


@pytest.fixture(scope="module")
def tok(data_dir):
    return DataDir.open(data_dir).tokenizer


def naive_bpe(text: str, tok: Tokenizer) -> list[int]:
    """Reference encoder: regex pre-split, then repeatedly merge the adjacent pair whose merged bytes
    have the lowest rank (leftmost on ties), straight from the merge table."""
    rank = {b: i for i, b in enumerate(tok.ranks)}
    out = []
    for piece in regex.findall(tok.pattern, text):
        parts = [bytes([b]) for b in piece.encode("utf-8")]
        while len(parts) > 1:
            i = min(range(len(parts) - 1), key=lambda j: rank.get(parts[j] + parts[j + 1], math.inf))
            if parts[i] + parts[i + 1] not in rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        out += [rank[p] for p in parts]
    return out


@pytest.mark.parametrize("text", HELD_OUT)
def test_round_trip_and_reference_encoding(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids == naive_bpe(text, tok)
    assert max(ids) < tok.vocab_size - len(SPECIAL_NAMES)


def test_random_multilingual_round_trip(tok):
    rng = random.Random(7)
    texts = [random_text(rng, rng.randint(1, 300)) for _ in range(50)]
    batch = tok.encode_batch(texts, num_threads=2)
    assert batch == [tok.encode(t) for t in texts]
    assert [tok.decode(ids) for ids in batch] == texts


def test_special_tokens(tok):
    assert tok.vocab_size == 600 and len(tok.ranks) == 600 - len(SPECIAL_NAMES)
    assert set(tok.special_ids) == set(SPECIAL_NAMES)
    assert {"bos", "image_start", "image_end", "image_patch"} <= set(tok.special_ids)
    assert sorted(tok.special_ids.values()) == list(range(len(tok.ranks), tok.vocab_size))
    # the literal text of a special token is ordinary text, never the special id
    ids = tok.encode("<|bos|> hello <|image_patch|>")
    assert not set(ids) & set(tok.special_ids.values())
    assert tok.decode(ids) == "<|bos|> hello <|image_patch|>"
    assert tok.decode([tok.bos_id]) == "<|bos|>"


def test_token_bytes_counts_exact_utf8_bytes(tok):
    tb = tok.token_bytes()
    assert tb.dtype == torch.int32 and tb.shape == (tok.vocab_size,)
    assert (tb[list(tok.special_ids.values())] == 0).all()
    assert (tb[:len(tok.ranks)] >= 1).all()
    partial = 0
    for text in HELD_OUT:
        ids = tok.encode(text)
        assert int(tb[ids].sum()) == len(text.encode("utf-8"))
        for i in ids:  # tokens that hold only part of a multi-byte character
            try:
                tok.ranks[i].decode("utf-8")
            except UnicodeDecodeError:
                partial += 1
    assert partial > 0, "held-out text should contain tokens that split a character"
    # decode-then-encode, the shortcut token_bytes avoids, miscounts those tokens
    naive = sum(len(tok.decode([i]).encode("utf-8")) for t in HELD_OUT for i in tok.encode(t))
    assert naive != sum(len(t.encode("utf-8")) for t in HELD_OUT)


def test_save_load_is_plain_json_with_hash(tok, tmp_path):
    p = tmp_path / "tok.json"
    tok.save(p)
    d = json.loads(p.read_text())  # plain data: loading runs no code
    assert d["hash"] == tok.hash and len(d["ranks"]) == len(tok.ranks)
    t2 = Tokenizer.load(p)
    assert t2.hash == tok.hash and t2.special_ids == tok.special_ids
    assert t2.encode(HELD_OUT[2]) == tok.encode(HELD_OUT[2])
    d["ranks"][300], d["ranks"][301] = d["ranks"][301], d["ranks"][300]  # tamper: swap two merges
    p.write_text(json.dumps(d))
    with pytest.raises(LabError, match="corrupt"):
        Tokenizer.load(p)
    p.write_text("{not json")
    with pytest.raises(LabError, match="not a valid"):
        Tokenizer.load(p)


def test_training_is_deterministic_and_sized(corpus):
    texts = list(corpus[1].values())
    a, b = Tokenizer.train(iter(texts), 400), Tokenizer.train(iter(texts), 400)
    assert a.hash == b.hash and a.vocab_size == 400


def test_vocab_too_small_for_special_tokens():
    with pytest.raises(LabError, match="vocab size 200 is too small.*at least 272"):
        Tokenizer.train(iter(["some text"]), 200)


def test_too_little_text_for_vocab():
    with pytest.raises(LabError, match="too few distinct byte pairs"):
        Tokenizer.train(iter(["abc abc abc"]), 8192)
