import itertools
import json

import numpy as np
import pytest
import torch

from llmlabs.common import LabError
from llmlabs.data.loader import BestFitLoader
from llmlabs.data.shards import DataDir


@pytest.fixture(scope="module")
def dd(data_dir):
    return DataDir.open(data_dir)


def documents(d: DataDir, split: str) -> list[list[int]]:
    return [t[a:b].tolist() for t, o in d.shards(split) for a, b in zip(o[:-1], o[1:])]


def rows_of(x: torch.Tensor, y: torch.Tensor) -> list[list[int]]:
    assert torch.equal(x[:, 1:], y[:, :-1])
    return torch.cat([x[:, :1], y], dim=1).tolist()


def reference_rows(docs, n_rows, T, seed=0, buffer_docs=1000, loop=True, keep_tails=True, bos=None):
    """Naive best-fit packer (linear scans, same order and tie rules: the largest fitting segment,
    latest buffered first; else crop the shortest, earliest buffered first; a kept tail is buffered
    last as BOS + the rest). Returns rows and (document tokens read, tokens dropped)."""
    buffer, rows, epoch, cursor, read, dropped = [], [], 0, 0, 0, 0  # buffer: token lists
    order = np.random.default_rng([seed, 0]).permutation(len(docs)).tolist()
    while len(rows) < n_rows:
        row = []
        while len(row) < T + 1:
            while len(buffer) < min(buffer_docs, len(order)):
                if cursor == len(order):
                    if not loop:
                        break
                    epoch, cursor = epoch + 1, 0
                    order = np.random.default_rng([seed, epoch]).permutation(len(docs)).tolist()
                buffer.append((docs[order[cursor]], False))
                cursor += 1
            if not buffer:
                return rows, (read, dropped + len(row))
            room = T + 1 - len(row)
            fits = [i for i, (seg, _) in enumerate(buffer) if len(seg) <= room]
            if fits:
                i = max(fits, key=lambda i: (len(buffer[i][0]), i))
            else:
                i = min(range(len(buffer)), key=lambda i: (len(buffer[i][0]), i))
            seg, is_tail = buffer.pop(i)
            row += seg[:room]
            if len(seg) > room and keep_tails:
                read += room - is_tail
                buffer.append(([bos] + seg[room:], True))
            else:
                read += len(seg) - is_tail
                dropped += len(seg) - len(seg[:room])
        rows.append(row)
    return rows, (read, dropped)


@pytest.mark.parametrize("keep_tails", [True, False])
@pytest.mark.parametrize("B, T, buffer_docs", [(4, 64, 1000), (3, 200, 5), (2, 1000, 50)])
def test_matches_naive_reference(dd, B, T, buffer_docs, keep_tails):
    docs = documents(dd, "train")
    loader = BestFitLoader(dd, "train", B, T, seed=3, buffer_docs=buffer_docs, keep_tails=keep_tails)
    got = []
    for _ in range(25):  # several epochs of this small split at T=1000
        x, y = next(loader)
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        got += rows_of(x, y)
    want, (read, dropped) = reference_rows(docs, len(got), T, seed=3, buffer_docs=buffer_docs,
                                           keep_tails=keep_tails, bos=dd.tokenizer.bos_id)
    assert got == want
    assert loader.cropped_fraction == pytest.approx(dropped / read)
    if keep_tails:
        assert loader.cropped_fraction == 0
    else:
        assert 0 < loader.cropped_fraction < 1


def test_packing_invariants(dd):
    bos = dd.tokenizer.bos_id
    docs = documents(dd, "train")
    by_first = {}
    for i, d in enumerate(docs):
        by_first.setdefault(tuple(d[:2]), []).append(i)
    texts = {i: bytes(np.asarray(d[1:], np.uint32)) for i, d in enumerate(docs)}
    tails = 0
    for keep_tails in (False, True):
        loader = BestFitLoader(dd, "train", 8, 128, seed=1, keep_tails=keep_tails)
        for _ in range(10):
            for row in rows_of(*next(loader)):
                assert row[0] == bos and len(row) == 129  # BOS first, full, no padding
                starts = [i for i, t in enumerate(row) if t == bos] + [len(row)]
                for k, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
                    seg = row[a:b]
                    # each segment is a document, in order; only the row's last one may be cropped
                    match = [i for i in by_first.get(tuple(seg[:2]), []) if docs[i][:len(seg)] == seg]
                    if not match and keep_tails:  # else a kept tail: BOS + a piece of one document
                        piece = bytes(np.asarray(seg[1:], np.uint32))
                        match = [i for i, t in texts.items() if _aligned_find(t, piece)]
                        tails += bool(match)
                    assert match, "segment is neither a document's start nor a piece of one"
                    if k < len(starts) - 2 and seg == docs[match[0]][:len(seg)] and not keep_tails:
                        assert any(len(docs[i]) == len(seg) for i in match)
    assert tails > 0


def _aligned_find(haystack: bytes, needle: bytes) -> bool:
    """needle occurs in haystack at a multiple of 4 bytes (whole uint32 tokens)."""
    i = haystack.find(needle)
    while i >= 0 and i % 4:
        i = haystack.find(needle, i + 1)
    return i >= 0


def _segments(row, bos):
    starts = [i for i, t in enumerate(row) if t == bos] + [len(row)]
    return [row[a:b] for a, b in zip(starts[:-1], starts[1:])]


def _doc_ids(rows, docs, bos):
    """Which document each segment of 4+ tokens starts (random text: such prefixes are unique)."""
    index = {}
    for i, d in enumerate(docs):
        index.setdefault(tuple(d[:4]), []).append(i)
    ids = []
    for row in rows:
        for seg in _segments(row, bos):
            if len(seg) >= 4:
                match = [i for i in index.get(tuple(seg[:4]), []) if docs[i][:len(seg)] == seg]
                assert len(match) == 1
                ids.append(match[0])
    return ids


def test_loop_false_reads_the_split_once(dd):
    docs = documents(dd, "val")
    T = 300
    loader = BestFitLoader(dd, "val", 3, T, loop=False, seed=2, keep_tails=False)
    rows = [r for x, y in loader for r in rows_of(x, y)]
    assert next(loader, None) is None and rows
    ids = _doc_ids(rows, docs, dd.tokenizer.bos_id)
    assert len(ids) == len(set(ids))  # no document twice
    total = sum(map(len, docs))
    # every token of the split was read once: emitted, cropped, or in the unfinished last row
    assert loader.state_dict()["read"] == total
    assert loader.cropped_fraction == pytest.approx((total - len(rows) * (T + 1)) / total)
    want, _ = reference_rows(docs, 10 ** 6, T, seed=2, loop=False, keep_tails=False)
    assert rows == want
    # keeping tails, every token of every document is emitted (bar the unfinished last row)
    loader = BestFitLoader(dd, "val", 3, T, loop=False, seed=2)
    rows = [r for x, y in loader for r in rows_of(x, y)]
    emitted = sum(len(r) for r in rows) - sum(r.count(dd.tokenizer.bos_id) for r in rows)
    assert loader.state_dict()["read"] == total
    # each document's own BOS aside, every token is emitted except those of the unfinished last row
    assert total - len(docs) - (T + 1) <= emitted <= total - len(docs)
    assert rows == reference_rows(docs, 10 ** 6, T, seed=2, loop=False, bos=dd.tokenizer.bos_id)[0]


@pytest.mark.parametrize("buffer_docs", [8, 10 ** 6])
def test_ranks_split_one_stream_of_rows(dd, buffer_docs):
    """3 ranks of 2 rows each: global batch k is ranks 0, 1, 2's k-th batches in order, and the global
    batches are the one-process stream (the naive packer's rows); every rank ends in the one state,
    which a loader of any other rank count takes. The split's end leaves the last ranks a short batch or none."""
    docs = documents(dd, "train")
    ref = reference_rows(docs, 10 ** 6, 64, seed=5, loop=False, buffer_docs=buffer_docs, keep_tails=False)[0]
    per_rank, states = [], []
    for rank in range(3):
        loader = BestFitLoader(dd, "train", 2, 64, rank=rank, world_size=3, loop=False, seed=5,
                               buffer_docs=buffer_docs, keep_tails=False)
        per_rank.append([rows_of(x, y) for x, y in loader])
        states.append(loader.state_dict())
    assert len(per_rank[0]) >= len(per_rank[1]) >= len(per_rank[2]) >= len(per_rank[0]) - 1
    stream = [r for k in range(len(per_rank[0])) for b in per_rank if k < len(b) for r in b[k]]
    assert stream == ref and len(ref) > 20
    assert states[0] == states[1] == states[2]
    one = BestFitLoader(dd, "train", 5, 64, loop=False, seed=5, buffer_docs=buffer_docs, keep_tails=False)
    one.load_state_dict(states[0])  # a 3-rank state resumes on one rank (and the split is done)
    with pytest.raises(StopIteration):
        next(one)


def test_a_state_moves_between_rank_counts(dd):
    """2 ranks x 4 rows for 3 steps, then 1 rank x 8 rows (and back): the rows go on as one stream."""
    ref = [rows_of(*b) for b in itertools.islice(BestFitLoader(dd, "train", 8, 64, seed=3), 6)]
    two = [BestFitLoader(dd, "train", 4, 64, rank=r, world_size=2, seed=3) for r in range(2)]
    got = [rows_of(*next(two[0])) + rows_of(*next(two[1])) for _ in range(3)]
    one = BestFitLoader(dd, "train", 8, 64, seed=3)
    one.load_state_dict(two[1].state_dict())
    got.append(rows_of(*next(one)))
    again = [BestFitLoader(dd, "train", 4, 64, rank=r, world_size=2, seed=3) for r in range(2)]
    for loader in again:
        loader.load_state_dict(one.state_dict())
    got += [rows_of(*next(again[0])) + rows_of(*next(again[1])) for _ in range(2)]
    assert got == ref


def test_resume_reproduces_the_same_batches(dd):
    a = BestFitLoader(dd, "train", 4, 96, seed=11, buffer_docs=20)
    for _ in range(7):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # JSON-able
    assert len(json.dumps(state)) < 2000
    expected = [next(a) for _ in range(30)]  # crosses an epoch boundary of this split
    b = BestFitLoader(dd, "train", 4, 96, seed=11, buffer_docs=20)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, (next(b) for _ in range(30))):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert a.cropped_fraction == b.cropped_fraction and a.state_dict() == b.state_dict()


def test_prefetch_keeps_the_stream_and_a_checkpoint_in_between_resumes_with_the_prefetched_batch(dd):
    plain = BestFitLoader(dd, "train", 4, 96, seed=11, buffer_docs=20)
    expected = [next(plain) for _ in range(12)]
    a = BestFitLoader(dd, "train", 4, 96, seed=11, buffer_docs=20)
    got = []
    for i in range(12):
        if i == 5:
            before = json.loads(json.dumps(a.state_dict()))  # after 5 batches, nothing prefetched
            a.prefetch()
            a.prefetch()  # a second prefetch before next() packs nothing more
            state = json.loads(json.dumps(a.state_dict()))
            assert state == before  # the state names the stream before the prefetched batch
        got.append(next(a))
    for (x1, y1), (x2, y2) in zip(expected, got):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    b = BestFitLoader(dd, "train", 4, 96, seed=11, buffer_docs=20)
    b.load_state_dict(state)  # taken while batch 5 was prefetched: b yields it again
    for (x1, _), (x2, _) in zip(expected[5:], (next(b) for _ in range(7))):
        assert torch.equal(x1, x2)
    # at the end of a loop=False pass the prefetch finds nothing and next() stops
    val = BestFitLoader(dd, "val", 3, 64, loop=False, seed=2)
    n = sum(1 for _ in val)
    val = BestFitLoader(dd, "val", 3, 64, loop=False, seed=2)
    for _ in range(n):
        val.prefetch()
        next(val)
    val.prefetch()
    with pytest.raises(StopIteration):
        next(val)


def test_seed_changes_the_order_deterministically(dd):
    # a buffer smaller than the split, so the order matters (a buffer holding every document
    # packs the same rows whatever the order)
    x1, _ = next(BestFitLoader(dd, "train", 4, 64, seed=0, buffer_docs=8))
    x2, _ = next(BestFitLoader(dd, "train", 4, 64, seed=0, buffer_docs=8))
    x3, _ = next(BestFitLoader(dd, "train", 4, 64, seed=1, buffer_docs=8))
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)


def test_bad_arguments(dd, data_dir):
    with pytest.raises(LabError, match="unknown split 'valid'"):
        BestFitLoader(dd, "valid", 2, 16)
    with pytest.raises(LabError, match="rank 2 is outside"):
        BestFitLoader(dd, "train", 2, 16, rank=2, world_size=2)
    state = BestFitLoader(data_dir, "train", 2, 16, seed=1).state_dict()
    with pytest.raises(LabError, match="seed: state 1 vs loader 2"):
        BestFitLoader(dd, "train", 2, 16, seed=2).load_state_dict(state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (pinned memory, async copy)")
def test_cuda_batches_equal_cpu_batches(dd):
    cpu = BestFitLoader(dd, "train", 8, 256, seed=4)
    gpu = BestFitLoader(dd, "train", 8, 256, seed=4, device="cuda")
    batches = []
    for i in range(20):  # held while later batches are written: no aliasing, with prefetches too
        if i % 3 == 0:
            gpu.prefetch()
        batches.append(next(gpu))
    for x, y in batches:
        assert x.is_cuda and y.is_cuda
        xc, yc = next(cpu)
        assert torch.equal(x.cpu(), xc) and torch.equal(y.cpu(), yc)
