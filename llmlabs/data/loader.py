"""BOS-aligned best-fit packing of pre-tokenized documents into [B, T] batches.

Every row holds T+1 tokens and starts with BOS. Documents are taken from a buffer in a seeded shuffled
order: the row gets the largest buffered segment that still fits; when none fits, the shortest one is
cropped to fill the row. No padding, so every target is a real token. Best-fit decreasing keeps the
cropped share small (same idea as the packing in nanochat and autoresearch; cf. "Fewer Truncations
Improve Language Modeling", arXiv:2404.10830).

What happens to a cropped tail: nanochat drops it (`keep_tails=False`, counted in
`cropped_fraction`). That is cheap on web text (documents ~1k tokens: ~30% dropped at T=2048) but on
source code, where files run to 5k tokens, it drops ~75% of the corpus and trains on file beginnings
only. So by default the tail goes back into the buffer as a new segment, BOS + the rest of the
document, and every token of the corpus is trained on (and scored, in evaluation).

Speed: the buffer is a list kept sorted by length (bisect), and a segment is copied with one numpy
slice from a memory-mapped shard, so the Python cost is per segment, not per token.
"""
import bisect
from pathlib import Path

import numpy as np
import torch

from llmlabs.common import LabError
from llmlabs.data.shards import DataDir


class BestFitLoader:
    """Iterating yields (inputs, targets): int64 [B, T] on `device`, from rows of T+1 packed tokens
    (inputs = row[:-1], targets = row[1:]). Each epoch visits the split's documents in a permutation
    seeded by (seed, epoch). Every rank packs the same stream of rows, world_size x batch_size at a
    time, and keeps rows [rank x batch_size, (rank + 1) x batch_size) of them: a step's global batch is
    the same rows however many ranks share it, so 1, 2 or 4 ranks follow one loss trajectory, and the
    state (the same on every rank) resumes on any rank count. The price: each rank packs world_size
    times its own rows (a d8 micro-batch's rows take ~1.5 ms, bench/results/loader_speed-cpu2.json),
    off the GPU's path (prefetch). loop=False stops at the end of the split: the last batch may have
    fewer rows (or none, for a rank past them), and an unfinished last row is dropped rather than
    padded. buffer_docs is how many segments best-fit chooses from (a bigger choice crops less).
    keep_tails: see the module docstring."""

    def __init__(self, data, split: str, batch_size: int, seq_len: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device="cpu", buffer_docs: int = 1000, loop: bool = True,
                 keep_tails: bool = True):
        self.data = data if isinstance(data, DataDir) else DataDir.open(Path(data))
        shards = self.data.shards(split)  # validates the split name
        if batch_size < 1 or seq_len < 1 or buffer_docs < 1:
            raise LabError(f"batch_size {batch_size}, seq_len {seq_len} and buffer_docs {buffer_docs} must be >= 1")
        if not 0 <= rank < world_size:
            raise LabError(f"rank {rank} is outside 0..{world_size - 1} (world_size {world_size})")
        self.split, self.B, self.T = split, batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device, self.buffer_docs, self.loop = torch.device(device), buffer_docs, loop
        self.keep_tails, self._bos = keep_tails, self.data.tokenizer.bos_id
        if not shards:
            raise LabError(f"split {split!r} of {self.data.path} has no documents: prepare more data or raise "
                           f"its fraction")
        self._tokens = [t for t, _ in shards]
        self._doc_shard = np.concatenate([np.full(len(o) - 1, i, np.int64) for i, (_, o) in enumerate(shards)])
        self._doc_start = np.concatenate([o[:-1] for _, o in shards])
        self._doc_len = np.concatenate([np.diff(o) for _, o in shards])
        self._rows = np.empty((world_size * batch_size, seq_len + 1), dtype=self._tokens[0].dtype)
        if self.device.type == "cuda":
            # two pinned host buffers: we fill one while the async copy from the other may still run
            self._pinned = [torch.empty((2, batch_size, seq_len), dtype=torch.int64, pin_memory=True) for _ in range(2)]
            self._copied = [None, None]
            self._flip = 0
        # no rank or world size: every rank holds the same state, which resumes on any rank count
        self._fingerprint = {"split": split, "seed": seed, "tokenizer": self.data.tokenizer.hash,
                             "documents": len(self._doc_len), "keep_tails": keep_tails}
        self._reset()

    def _reset(self):
        self._epoch, self._cursor, self._order = 0, 0, None
        # the buffer, sorted by segment length: (document index, offset) pairs; offset 0 is the whole
        # document (which starts with its own BOS), offset k > 0 is BOS + the document from token k on
        self._buf_lens, self._buf_ids = [], []
        self._read = self._dropped = 0
        self._done = False
        self._ahead = None  # (state before it, batch or None at the end) from prefetch()

    def _epoch_order(self) -> np.ndarray:
        """The documents of the current epoch: a seeded permutation."""
        if self._order is None:
            self._order = np.random.default_rng([self.seed, self._epoch]).permutation(len(self._doc_len))
        return self._order

    def _refill(self):
        # never more buffered than the split has documents: a small split would otherwise fill the
        # buffer with one document several times, from several epochs
        while len(self._buf_ids) < min(self.buffer_docs, len(self._epoch_order())):
            order = self._epoch_order()
            if self._cursor == len(order):
                if not self.loop:
                    return
                self._epoch, self._cursor, self._order = self._epoch + 1, 0, None
                continue
            doc = int(order[self._cursor])
            self._cursor += 1
            self._insert(doc, 0)

    def _insert(self, doc: int, offset: int):
        length = int(self._doc_len[doc]) - offset + (offset > 0)
        i = bisect.bisect_right(self._buf_lens, length)
        self._buf_lens.insert(i, length)
        self._buf_ids.insert(i, (doc, offset))

    def _fill_row(self, row: np.ndarray) -> bool:
        """Pack one row; False when the split ran out first (loop=False), leaving the row unfinished."""
        pos, cap = 0, len(row)
        while pos < cap:
            self._refill()
            if not self._buf_ids:
                self._dropped += pos  # an unfinished last row is not emitted
                return False
            room = cap - pos
            i = bisect.bisect_right(self._buf_lens, room) - 1  # largest segment that fits
            if i < 0:
                i = 0  # none fits: crop the shortest (the fewest tokens lose their document's start)
            length, (doc, offset) = self._buf_lens.pop(i), self._buf_ids.pop(i)
            n = min(length, room)
            tokens = self._tokens[int(self._doc_shard[doc])]
            start = int(self._doc_start[doc]) + offset
            if offset:  # a tail: BOS, then the document from `offset` on
                row[pos] = self._bos
                row[pos + 1:pos + n] = tokens[start:start + n - 1]
            else:
                row[pos:pos + n] = tokens[start:start + n]
            used = n - (offset > 0)  # document tokens placed
            if n < length and self.keep_tails:
                self._insert(doc, offset + used)
                self._read += used
            else:
                self._read += length - (offset > 0)
                self._dropped += length - n
            pos += n
        return True

    def __iter__(self):
        return self

    def prefetch(self):
        """Pack the next batch and start its copy to the device now; the next `next()` returns it
        at once. train_step calls this once the optimizer step is queued, so the ~1.5 ms of packing
        a d8 micro-batch (bench/results/loader_speed-cpu2.json) runs while the GPU still works,
        not at the start of the step, where the GPU would wait for it. Until that `next()`,
        state_dict() is the state before the prefetch: a checkpoint taken in between resumes with
        this same batch."""
        if self._ahead is None:
            state = self.state_dict()
            try:
                self._ahead = (state, self._pack())
            except StopIteration:
                self._ahead = (state, None)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._ahead is not None:
            batch, self._ahead = self._ahead[1], None
            if batch is None:
                raise StopIteration
            return batch
        return self._pack()

    def _pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._done:
            raise StopIteration
        n, total = 0, len(self._rows)
        while n < total and self._fill_row(self._rows[n]):
            n += 1
        if n < total:
            self._done = True
        mine = self._rows[self.rank * self.B:min((self.rank + 1) * self.B, n)]
        n = len(mine)
        if n == 0:  # the split ended before this rank's rows (loop=False)
            self._done = True
            raise StopIteration
        rows = mine  # fewer than B rows only for the last batch of a loop=False pass
        if self.device.type != "cuda":
            return (torch.from_numpy(rows[:, :-1].astype(np.int64)).to(self.device),
                    torch.from_numpy(rows[:, 1:].astype(np.int64)).to(self.device))
        k = self._flip
        self._flip ^= 1
        if self._copied[k] is not None:
            self._copied[k].synchronize()  # the copy that last read this host buffer has finished
        host = self._pinned[k]
        view = host.numpy()
        view[0, :n] = rows[:, :-1]
        view[1, :n] = rows[:, 1:]
        out = host[:, :n].to(self.device, non_blocking=True)
        self._copied[k] = torch.cuda.Event()
        self._copied[k].record()
        return out[0], out[1]

    @property
    def cropped_fraction(self) -> float:
        """Tokens dropped (cropped tails unless keep_tails, plus an unfinished last row) / document
        tokens read."""
        return self._dropped / max(self._read, 1)

    def state_dict(self) -> dict:
        """Small JSON-able state: after load_state_dict a loader yields exactly the batches this one
        would yield next (batch_size and seq_len may differ; the document stream is the same)."""
        if self._ahead is not None:
            return self._ahead[0]
        return {**self._fingerprint, "epoch": self._epoch, "cursor": self._cursor,
                "buffer": [list(entry) for entry in self._buf_ids],
                "read": self._read, "dropped": self._dropped, "done": self._done}

    def load_state_dict(self, state: dict):
        mismatch = {k: (state.get(k), v) for k, v in self._fingerprint.items() if state.get(k) != v}
        if mismatch:
            raise LabError("loader state does not fit this loader (" + ", ".join(
                f"{k}: state {a!r} vs loader {b!r}" for k, (a, b) in mismatch.items()) +
                "): resume with the same data directory, split and seed")
        self._reset()
        self._epoch, self._cursor = state["epoch"], state["cursor"]
        for doc, offset in state["buffer"]:  # saved in buffer order: re-inserting keeps ties in order
            self._insert(doc, offset)
        self._read, self._dropped, self._done = state["read"], state["dropped"], state["done"]
