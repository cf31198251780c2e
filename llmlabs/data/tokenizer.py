"""Byte-level BPE tokenizer: trained with rustbpe, encoded with tiktoken, stored as plain JSON.

Byte-level BPE (Sennrich et al., arXiv:1508.07909; byte-level as in GPT-2) over text pre-split by the
GPT-4 regex, so merges never cross a word/number/punctuation boundary. The file holds the split pattern,
every token's raw bytes (base64, in id order) and the special tokens: loading it runs no code (unlike a
pickled tiktoken Encoding) and its sha256 content hash ties the shards to the exact tokenizer that made
them.
"""
import base64
import hashlib
import json
from pathlib import Path

import tiktoken
import torch

from llmlabs.common import LabError, atomic_write_json

FORMAT = "llmlabs-bpe-v1"

# cl100k (GPT-4) pre-split pattern: contractions, letter runs with one leading non-letter, numbers of up
# to 3 digits, punctuation runs, newlines, other whitespace.
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")

# A fixed block of special ids after the BPE ids. BOS starts every document; the image tokens frame the
# patch embeddings of the multimodal path; the rest is reserved so later uses (chat roles, tools) do not
# change the vocab size and invalidate prepared data.
SPECIAL_NAMES = ("bos", "image_start", "image_end", "image_patch") + tuple(f"reserved_{i}" for i in range(4, 16))


def _special_text(name: str) -> str:
    return f"<|{name}|>"


class Tokenizer:
    """`ranks[i]` is the raw bytes of token i (tiktoken's rank == id); special tokens follow them."""

    def __init__(self, pattern: str, ranks: list[bytes], special_ids: dict[str, int]):
        n = len(ranks)
        if len(set(ranks)) != n or set(ranks[:256]) != {bytes([b]) for b in range(256)}:
            raise LabError("tokenizer has duplicate tokens or does not start with the 256 byte tokens")
        if sorted(special_ids.values()) != list(range(n, n + len(special_ids))) or "bos" not in special_ids \
                or not {"image_start", "image_end", "image_patch"} <= set(special_ids):
            raise LabError(f"tokenizer special tokens {sorted(special_ids)} are not a contiguous block after "
                           f"the {n} BPE ids with bos and image_start/end/patch")
        self.pattern = pattern
        self.ranks = ranks
        self.special_ids = dict(special_ids)
        self.vocab_size = n + len(special_ids)
        self.bos_id = special_ids["bos"]
        self._enc = tiktoken.Encoding(
            name="llmlabs-bpe", pat_str=pattern, mergeable_ranks={b: i for i, b in enumerate(ranks)},
            special_tokens={_special_text(k): v for k, v in special_ids.items()})
        self.hash = hashlib.sha256(self._canonical_json()).hexdigest()

    def _canonical_json(self) -> bytes:
        content = {"pattern": self.pattern, "ranks": [base64.b64encode(b).decode() for b in self.ranks],
                   "special_ids": self.special_ids}
        return json.dumps(content, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def train(cls, texts_iter, vocab_size: int) -> "Tokenizer":
        """Learn vocab_size - len(SPECIAL_NAMES) byte-level BPE ids from texts_iter (an iterator of str)."""
        n_special = len(SPECIAL_NAMES)
        if vocab_size < 256 + n_special:
            raise LabError(f"vocab size {vocab_size} is too small: the 256 byte tokens and {n_special} special "
                           f"tokens need at least {256 + n_special}; raise --vocab-size")
        import rustbpe  # only training needs it: loading and encoding are tiktoken alone

        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(iter(texts_iter), vocab_size - n_special, pattern=SPLIT_PATTERN)
        pairs = sorted((rank, bytes(b)) for b, rank in bpe.get_mergeable_ranks())
        assert [r for r, _ in pairs] == list(range(len(pairs))), "rustbpe ranks are not 0..n-1"
        ranks = [b for _, b in pairs]
        if len(ranks) < vocab_size - n_special:
            raise LabError(f"the training text has too few distinct byte pairs for vocab size {vocab_size}: BPE "
                           f"stopped at {len(ranks) + n_special} ids; use --vocab-size {len(ranks) + n_special} or "
                           f"less, or more text")
        return cls(bpe.get_pattern(), ranks, {name: len(ranks) + i for i, name in enumerate(SPECIAL_NAMES)})

    def save(self, path):
        atomic_write_json(path, {"format": FORMAT, "hash": self.hash, **json.loads(self._canonical_json())})

    @classmethod
    def load(cls, path) -> "Tokenizer":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
            if d.get("format") != FORMAT:
                raise ValueError(f"format is {d.get('format')!r}, expected {FORMAT!r}")
            tok = cls(d["pattern"], [base64.b64decode(s) for s in d["ranks"]], d["special_ids"])
        except FileNotFoundError:
            raise LabError(f"tokenizer file {path} is missing: re-run `llmlabs prepare` for this data "
                           f"directory") from None
        except (ValueError, KeyError, TypeError) as e:
            raise LabError(f"tokenizer file {path} is not a valid {FORMAT} file ({e}): re-run "
                           f"`llmlabs prepare --force`") from None
        if tok.hash != d.get("hash"):
            raise LabError(f"tokenizer file {path} is corrupt: its content hashes to {tok.hash[:12]}, the file says "
                           f"{str(d.get('hash'))[:12]}; re-run `llmlabs prepare --force`")
        return tok

    def encode(self, text: str) -> list[int]:
        """Ordinary text only: a literal "<|bos|>" in the text is encoded as text, never as the special id."""
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts, num_threads: int = 8) -> list[list[int]]:
        # tiktoken releases the GIL while encoding, so threads use all cores without pickling anything.
        return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids) -> str:
        return self._enc.decode(ids.tolist() if hasattr(ids, "tolist") else list(ids))

    def decode_bytes(self, ids) -> bytes:
        """The raw bytes of ids, for decoding a stream of tokens incrementally: one token may hold part
        of a multi-byte character, which decode() alone would turn into U+FFFD."""
        return self._enc.decode_bytes(list(ids))

    def token_bytes(self) -> torch.Tensor:
        """UTF-8 byte length of each id's raw bytes (0 for special tokens), for bits-per-byte.
        Taken from the merge table, not from decode(id).encode(): a token holding part of a multi-byte
        character decodes to U+FFFD (3 bytes) whatever its true length, so that count is wrong."""
        return torch.tensor([len(b) for b in self.ranks] + [0] * len(self.special_ids), dtype=torch.int32)
