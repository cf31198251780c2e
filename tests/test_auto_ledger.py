"""The ledger: round trip, concurrent writers, and the keyed hash chain that makes an edit, insertion,
deletion or reordering of rows, or an edited result file, fail verification at the line where it is."""
import json
import multiprocessing as mp
import os
import random
import threading

import pytest

from llmlabs.auto.ledger import COLUMNS, Ledger, file_sha256, load_or_create_key
from llmlabs.common import LabError

KEY = bytes(range(32))


def _rand_row(rng, writer, i):
    # long, unicode, with tabs/newlines that the ledger must flatten
    desc = f"w{writer}-{i} " + "".join(rng.choice("abcdef \t\nxyzé→") for _ in range(rng.randint(5, 400)))
    return {"commit": f"{writer:04x}{i:08x}", "val_bpb": rng.random() * 3, "status": "discard", "description": desc,
            "seed": i, "worker": f"gpu{writer}", "started": 1.7e9 + rng.random()}


def _writer(path, writer, n, seed):
    rng = random.Random(seed)
    led = Ledger(path, KEY)
    i = 0
    while i < n:
        batch = [_rand_row(rng, writer, i + j) for j in range(min(rng.randint(1, 3), n - i))]
        led.append(batch)
        i += len(batch)
        led.read()  # readers interleave with writers, and every state they see verifies


def test_ledger_concurrent_writers_lose_and_interleave_nothing_and_the_chain_holds(tmp_path):
    path = tmp_path / "results.tsv"
    procs = [mp.get_context("fork").Process(target=_writer, args=(path, w, 60, w)) for w in range(6)]
    threads = [threading.Thread(target=_writer, args=(path, 100 + w, 60, 100 + w)) for w in range(3)]
    for p in procs + threads:
        p.start()
    for p in procs + threads:
        p.join()
    assert all(p.exitcode == 0 for p in procs)
    rows = Ledger(path, KEY).read()  # verifies the whole chain
    assert path.read_text().count("commit\tval_bpb") == 1  # one header, from whoever wrote first
    expected = {}
    for w in list(range(6)) + [100 + w for w in range(3)]:
        rng = random.Random(w)
        i = 0
        while i < 60:
            k = min(rng.randint(1, 3), 60 - i)
            for j in range(k):
                r = _rand_row(rng, w, i + j)
                expected[r["commit"]] = r
            i += k
    assert len(rows) == len(expected) == 9 * 60
    for r in rows:
        e = expected[r["commit"]]
        assert r["description"] == " ".join(e["description"].split())[:300]
        assert float(r["val_bpb"]) == pytest.approx(e["val_bpb"], abs=1e-6)
        assert r["worker"] == e["worker"] and int(r["seed"]) == e["seed"]
    # each writer's rows appear in its own order
    for w in range(6):
        seeds = [int(r["seed"]) for r in rows if r["worker"] == f"gpu{w}"]
        assert seeds == list(range(60))
    assert len({r["chain"] for r in rows}) == len(rows)


def test_ledger_refuses_a_torn_row_and_a_foreign_header(tmp_path):
    led = Ledger(tmp_path / "results.tsv", KEY)
    led.append([{"commit": "abc", "status": "keep", "description": "x"}])
    with open(led.path, "a") as f:
        f.write("def\t1.2\t")  # a writer killed mid-row
    with pytest.raises(LabError, match="cut short"):
        led.read()
    with pytest.raises(LabError, match="cut short"):  # and nothing is chained onto a torn row
        led.append([{"commit": "ghi", "status": "keep"}])
    (tmp_path / "other.tsv").write_text("commit\tval_bpb\tstatus\n")
    with pytest.raises(LabError, match="header"):
        Ledger(tmp_path / "other.tsv").read()
    with pytest.raises(ValueError, match="unknown ledger columns"):
        led.append([{"bogus": 1, "status": "keep"}])
    with pytest.raises(ValueError, match="a status not in"):
        led.append([{"commit": "abc", "status": "kept"}])
    with pytest.raises(ValueError, match="chain is the ledger's"):
        led.append([{"commit": "abc", "status": "keep", "chain": "0" * 64}])
    with pytest.raises(ValueError, match="result_sha"):
        led.append([{"commit": "abc", "status": "keep", "result_sha": "not-a-digest"}])


def _session(tmp_path, n=5):
    """A keyed ledger of n runs r0..r{n-1} (lines 2..n+1), each with its result.json, then a row without a run."""
    runs = tmp_path / "runs"
    led = Ledger(tmp_path / "results.tsv", KEY, result_root=runs)
    for i in range(n):
        result = runs / f"r{i}" / "result.json"
        result.parent.mkdir(parents=True)
        result.write_text(json.dumps({"val_bpb": 1.0 - i / 100}))
        led.append([{"commit": f"c{i}", "val_bpb": 1.0 - i / 100, "status": "discard", "seed": i, "run": f"r{i}",
                     "result_sha": file_sha256(result)}])
    led.append([{"commit": f"c{n}", "status": "invalid", "reason": "fingerprint differs"}])
    return led


def _edit_lines(path, fn):
    lines = path.read_text().split("\n")[:-1]
    path.write_text("\n".join(fn(lines)) + "\n")


def test_round_trip(tmp_path):
    led = _session(tmp_path)
    rows = led.read()
    assert [r["run"] for r in rows] == ["r0", "r1", "r2", "r3", "r4", ""]
    assert [r["status"] for r in rows] == ["discard"] * 5 + ["invalid"] and rows[-1]["result_sha"] == ""
    assert float(rows[3]["val_bpb"]) == 0.97 and rows[3]["seed"] == "3" and rows[-1]["reason"] == "fingerprint differs"
    assert rows[2]["result_sha"] == file_sha256(tmp_path / "runs/r2/result.json")
    assert all(len(r["chain"]) == 64 for r in rows) and list(rows[0]) == COLUMNS
    assert Ledger(led.path).read() == rows  # an unkeyed reader (display) parses the same rows
    # the new statuses go in like any other
    led.append([{"commit": "c0", "status": s} for s in ("test", "confirmed", "failed")])
    assert [r["status"] for r in led.read()[-3:]] == ["test", "confirmed", "failed"]


@pytest.mark.parametrize("tamper,line,run", [
    ("edit", 4, "r2"), ("delete", 4, "r3"), ("insert", 4, "forged"), ("reorder", 4, "r3"),
])
def test_rows_changed_outside_the_harness_break_the_chain_at_their_line(tmp_path, tamper, line, run):
    led = _session(tmp_path)
    i = line - 1  # 0-based index into the file's lines (the header is line 1)

    def change(lines):
        if tamper == "edit":  # a better val_bpb for r2
            cells = lines[i].split("\t")
            cells[COLUMNS.index("val_bpb")] = "0.5"
            lines[i] = "\t".join(cells)
        elif tamper == "delete":
            del lines[i]
        elif tamper == "insert":  # a row copied from a real one, renamed, its chain kept
            cells = lines[i].split("\t")
            cells[COLUMNS.index("run")], cells[COLUMNS.index("status")] = "forged", "keep"
            lines.insert(i, "\t".join(cells))
        else:
            lines[i], lines[i + 1] = lines[i + 1], lines[i]
        return lines

    _edit_lines(led.path, change)
    with pytest.raises(LabError, match=rf"^results\.tsv line {line} \(run {run}\): the hash chain breaks here"):
        led.read()
    assert len(led.read(verify=False)) in (5, 6, 7)  # display still reads it


def test_an_edited_or_missing_result_file_fails_at_its_row(tmp_path):
    led = _session(tmp_path)
    (tmp_path / "runs/r3/result.json").write_text(json.dumps({"val_bpb": 0.5}))
    with pytest.raises(LabError, match=r"^results\.tsv line 5 \(run r3\): its result file .* was changed after the run"):
        led.read()
    (tmp_path / "runs/r3/result.json").unlink()
    with pytest.raises(LabError, match=r"^results\.tsv line 5 \(run r3\): its result file .* is missing"):
        led.read()
    assert len(Ledger(led.path, KEY).read()) == 6  # without result_root only the chain is checked


def test_a_wrong_key_fails_at_the_first_row(tmp_path):
    led = _session(tmp_path)
    with pytest.raises(LabError, match=r"^results\.tsv line 2 \(run r0\): the hash chain breaks here.*not this ledger's"):
        Ledger(led.path, bytes(32)).read()


def _make_key(path, queue):
    queue.put(load_or_create_key(path))


def test_key_file_is_private_shared_and_refused_when_readable(tmp_path):
    path = tmp_path / "harness/ledger.key"
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_make_key, args=(path, queue)) for _ in range(6)]
    for p in procs:
        p.start()
    keys = [queue.get(timeout=30) for _ in procs]
    for p in procs:
        p.join()
    assert len(set(keys)) == 1 and len(keys[0]) == 32  # racing creators agree on one key
    assert os.stat(path).st_mode & 0o777 == 0o600 and load_or_create_key(path) == keys[0]
    assert [p.name for p in path.parent.iterdir()] == ["ledger.key"]  # no temporary files left
    os.chmod(path, 0o644)
    with pytest.raises(LabError, match=r"group or others may read or write the ledger key \(mode 0o644\)"):
        load_or_create_key(path)
    os.chmod(path, 0o600)
    path.write_bytes(b"short")
    with pytest.raises(LabError, match="5 bytes, expected 32"):
        load_or_create_key(path)
