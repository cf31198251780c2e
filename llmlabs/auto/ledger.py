"""results.tsv: one row per training run, shared by every worker of a session.

Columns: autoresearch's five (commit, val_bpb, memory_gb, status, description), then ours. Values
never hold tabs or newlines (clean() replaces them), so a row is one line and the file stays
readable with `column -t`, pandas or a spreadsheet.

Concurrency: every access takes `fcntl.flock` on a separate lock file (shared to read, exclusive to
write). A batch of rows goes out in one write() of whole lines followed by fsync, so concurrent
workers never lose or interleave rows, and a crash mid-write can leave at most a torn last line,
which read() reports instead of silently dropping. A worker that must read, decide and append as
one step (the keep rule compares with the current best) holds `exclusive()` across all three.
flock locks belong to the open file description, so threads of one process exclude each other too.
"""
import fcntl
import math
import os
import threading
from contextlib import contextmanager
from pathlib import Path

from llmlabs.common import LabError

COLUMNS = [
    "commit", "val_bpb", "memory_gb", "status", "description",  # autoresearch's columns
    "seed", "tokens_M", "mfu", "wall_s", "delta", "sigma",       # noise-aware bookkeeping
    "worker", "parent", "started", "run", "reason",             # where, against what, when, why
]
STATUSES = ("baseline", "keep", "discard", "crash", "invalid")


def clean(value) -> str:
    """One TSV cell: floats rounded to 6 decimals, whitespace runs (tabs, newlines) as one space,
    at most 300 characters, None and NaN as empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(round(value, 6))
    return " ".join(str(value).split())[:300]


class Ledger:
    def __init__(self, path):
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._local = threading.local()  # whether this thread is inside exclusive()

    @contextmanager
    def _lock(self, mode):
        if getattr(self._local, "held", False):  # inside exclusive(): the lock is already ours
            yield
            return
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as f:
            fcntl.flock(f, mode)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @contextmanager
    def exclusive(self):
        """Hold the write lock across read -> decide -> append (one worker at a time)."""
        with self._lock(fcntl.LOCK_EX):
            self._local.held = True
            try:
                yield self
            finally:
                self._local.held = False

    def append(self, rows: list[dict]):
        unknown = {k for r in rows for k in r} - set(COLUMNS)
        if unknown or any(r.get("status") not in STATUSES for r in rows):
            raise ValueError(f"unknown ledger columns {sorted(unknown)} or a status not in {STATUSES}")
        text = "".join("\t".join(clean(r.get(c)) for c in COLUMNS) + "\n" for r in rows)
        with self._lock(fcntl.LOCK_EX):
            new = not self.path.exists() or self.path.stat().st_size == 0
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                data = (("\t".join(COLUMNS) + "\n") if new else "") + text
                view = memoryview(data.encode())
                while view:  # a regular-file write is whole in practice; loop in case it is not
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)

    def read(self) -> list[dict]:
        """All rows, each a dict of column -> string ("" for no value)."""
        if not self.path.exists():
            return []
        with self._lock(fcntl.LOCK_SH):
            text = self.path.read_text()
        lines = text.split("\n")
        if lines[-1]:
            raise LabError(f"{self.path}: the last row is cut short (a crash while writing?): delete that line")
        header, body = lines[0].split("\t"), lines[1:-1]
        if header != COLUMNS:
            raise LabError(f"{self.path}: header differs from the expected columns {COLUMNS}: "
                           "it was not written by this version of `llmlabs auto`; start a new session")
        rows = []
        for i, line in enumerate(body, start=2):
            cells = line.split("\t")
            if len(cells) != len(COLUMNS):
                raise LabError(f"{self.path} line {i}: {len(cells)} cells, expected {len(COLUMNS)}: fix or delete that line")
            rows.append(dict(zip(COLUMNS, cells)))
        return rows
