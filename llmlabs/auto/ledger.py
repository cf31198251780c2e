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

Integrity: only the harness appends rows, and the agent must not be able to edit, insert, delete or
reorder them unnoticed. Each row ends with `chain` = HMAC-SHA256(key, previous row's chain + its
other cells, joined by tabs), the first row chaining from ""; the key is random, made once per
session by load_or_create_key and kept where the agent does not read it. `result_sha` is the sha256
of the run's result.json (the caller computes it: it wrote the file), so a result edited after its
run no longer matches. read() recomputes the chain from the top and checks each result file.
What a chain cannot show: rows cut from the end (the shorter file is a valid chain of its own).
A Ledger without a key writes an empty chain and checks none (tests; sessions made before keys).
"""
import fcntl
import hashlib
import hmac
import math
import os
import re
import secrets
import stat
import threading
from contextlib import contextmanager
from pathlib import Path

from llmlabs.common import LabError

COLUMNS = [
    "commit", "val_bpb", "memory_gb", "status", "description",  # autoresearch's columns
    "seed", "tokens_M", "mfu", "wall_s", "delta", "sigma",       # noise-aware bookkeeping
    "worker", "parent", "started", "run", "reason",             # where, against what, when, why
    "result_sha", "chain",                                      # integrity: the run's result file, the row's HMAC
]
STATUSES = ("baseline", "keep", "discard", "crash", "invalid",  # experiments
            "test", "confirmed", "failed",                      # confirmation runs on the test split, their verdicts
            "ablate")                                           # promote's leave-one-out runs on the test split
KEY_BYTES = 32
TAIL_BYTES = 16384  # more than the longest row (two 300-character cells of up to 4 bytes each, two digests)


def clean(value) -> str:
    """One TSV cell: floats rounded to 6 decimals, whitespace runs (tabs, newlines) as one space,
    at most 300 characters, None and NaN as empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(round(value, 6))
    return " ".join(str(value).split())[:300]


def file_sha256(path) -> str:
    """The result_sha of a run's result file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_or_create_key(path) -> bytes:
    """The session's ledger key: read it, or make a random one if there is none yet. Creation is
    atomic and exclusive (written to a private temporary file, then hard-linked into place, which
    fails if another process got there first), so every process of a session gets the same key and
    nobody ever reads half of one. A key file that group or others may read is refused."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_bytes(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made the key first: use theirs
        finally:
            tmp.unlink()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077:
            raise LabError(f"{path}: group or others may read or write the ledger key (mode {oct(st.st_mode & 0o777)}), "
                           "so rows may have been forged with it: start a new session")
        key = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(key) != KEY_BYTES:
        raise LabError(f"{path}: the ledger key is {len(key)} bytes, expected {KEY_BYTES}: start a new session")
    return key


class Ledger:
    def __init__(self, path, key: bytes | None = None, result_root=None):
        """`key`: the session's (load_or_create_key); `result_root`: the folder of run folders, each
        holding the result.json whose sha256 its row records."""
        if key is not None and (not isinstance(key, bytes) or len(key) < 16):
            raise ValueError("a ledger key is at least 16 random bytes")
        self.path = Path(path)
        self.key = key
        self.result_root = None if result_root is None else Path(result_root)
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

    def _link(self, prev: str, cells: list[str]) -> str:
        """The chain cell of a row: HMAC of the previous row's chain and this row's other cells."""
        if self.key is None:
            return ""
        return hmac.new(self.key, "\t".join([prev, *cells]).encode(), hashlib.sha256).hexdigest()

    def _last_chain(self) -> str:
        """The chain cell of the last row on disk ("" for none); called under the write lock."""
        with open(self.path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - TAIL_BYTES))
            tail = f.read()
        if not tail.endswith(b"\n"):
            raise LabError(f"{self.path}: the last row is cut short (a crash while writing?): delete that line")
        lines = tail.split(b"\n")
        if len(lines) < 3 and size > len(tail):
            raise LabError(f"{self.path}: the last row is longer than {TAIL_BYTES} bytes: it was not written by the harness")
        last = lines[-2].decode().split("\t")
        return "" if last == COLUMNS else last[-1]

    def append(self, rows: list[dict]):
        """Append rows (column -> value; the caller gives result_sha, the ledger computes chain)."""
        unknown = {k for r in rows for k in r} - set(COLUMNS[:-1])
        if unknown or any(r.get("status") not in STATUSES for r in rows):
            raise ValueError(f"unknown ledger columns {sorted(unknown)} (chain is the ledger's to compute) "
                             f"or a status not in {STATUSES}")
        if any(not re.fullmatch(r"([0-9a-f]{64})?", clean(r.get("result_sha"))) for r in rows):
            raise ValueError("result_sha must be a sha256 hex digest (file_sha256) or empty")
        cells = [[clean(r.get(c)) for c in COLUMNS[:-1]] for r in rows]
        with self._lock(fcntl.LOCK_EX):
            new = not self.path.exists() or self.path.stat().st_size == 0
            prev, lines = "" if new else self._last_chain(), []
            for c in cells:
                prev = self._link(prev, c)
                lines.append("\t".join(c + [prev]) + "\n")
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                data = (("\t".join(COLUMNS) + "\n") if new else "") + "".join(lines)
                view = memoryview(data.encode())
                while view:  # a regular-file write is whole in practice; loop in case it is not
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)

    def read(self, verify=True) -> list[dict]:
        """All rows, each a dict of column -> string ("" for no value). With verify (the default),
        every row's chain and every recorded result file are checked, and the first mismatch raises
        LabError naming its line; verify=False only parses (for display)."""
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
        rows, prev = [], ""
        for i, line in enumerate(body, start=2):
            cells = line.split("\t")
            if len(cells) != len(COLUMNS):
                raise LabError(f"{self.path} line {i}: {len(cells)} cells, expected {len(COLUMNS)}: fix or delete that line")
            row = dict(zip(COLUMNS, cells))
            if verify:
                self._verify(i, row, cells, prev)
            prev = row["chain"]
            rows.append(row)
        return rows

    def _verify(self, i: int, row: dict, cells: list[str], prev: str):
        where = f"{self.path.name} line {i} ({'run ' + row['run'] if row['run'] else 'commit ' + row['commit']})"
        if self.key is not None and not hmac.compare_digest(self._link(prev, cells[:-1]), row["chain"]):
            hint = " (or the key is not this ledger's)" if i == 2 else ""
            raise LabError(f"{where}: the hash chain breaks here: the row was edited, or a row was inserted, deleted "
                           f"or moved just before it, outside the harness{hint}; the ledger cannot be trusted: "
                           "restore it or start a new session")
        if self.result_root is not None and row["run"] and row["result_sha"]:
            result = self.result_root / row["run"] / "result.json"
            if not result.is_file():
                raise LabError(f"{where}: its result file {result} is missing; the ledger cannot be trusted: "
                               "restore it or start a new session")
            if file_sha256(result) != row["result_sha"]:
                raise LabError(f"{where}: its result file {result} was changed after the run (sha256 differs from "
                               "the one recorded); the ledger cannot be trusted: restore it or start a new session")
