"""The session's bytecode (auto/bytecode.py): compiled by the harness, read by the runs through
`-X pycache_prefix`, never written by them (the file guard's `readable` paths)."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from llmlabs.auto import bytecode, guard

# the guard as a run installs it, then each action of argv[3:]: "read P", "write P", "remove P"
GUARDED = """import json, os, sys
from llmlabs.auto import guard
guard.guard_files([sys.argv[1]], readable=[sys.argv[2]])
for action in sys.argv[3:]:
    what, path = action.split(" ", 1)
    if what == "read":
        open(path).read()
    elif what == "write":
        open(path, "a").write("x")
    else:
        os.remove(path)
    print(what, "ok", flush=True)
"""


def guarded(tmp_path, *actions):
    session, pyc = tmp_path / "session", tmp_path / "session" / "pycache"
    pyc.mkdir(parents=True, exist_ok=True)
    for name in ("a.pyc", "b.pyc"):
        (pyc / name).write_text("bytecode")
    (session / "results.tsv").write_text("ledger")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-c", GUARDED, str(session), str(pyc), *actions], env=env,
                          capture_output=True, text=True, timeout=60)


def test_readable_paths_are_read_never_written(tmp_path):
    pyc = tmp_path / "session" / "pycache"
    r = guarded(tmp_path, f"read {pyc / 'a.pyc'}")
    assert r.returncode == 0 and r.stdout.split("\n")[0] == "read ok", r.stderr
    for action, said in ((f"write {pyc / 'a.pyc'}", "for writing"), (f"remove {pyc / 'b.pyc'}", "os.remove")):
        r = guarded(tmp_path, f"read {pyc / 'a.pyc'}", action)
        assert r.returncode == guard.VIOLATION_EXIT and r.stdout == "read ok\n", (action, r.stdout, r.stderr)
        assert said in r.stderr and "forbidden to it by the harness" in r.stderr
    assert (pyc / "a.pyc").read_text() == "bytecode" and (pyc / "b.pyc").exists()
    # the rest of the session stays forbidden, even to read
    r = guarded(tmp_path, f"read {tmp_path / 'session' / 'results.tsv'}")
    assert r.returncode == guard.VIOLATION_EXIT and "opened" in r.stderr


def test_runs_read_the_harness_compiled_bytecode(tmp_path):
    lib, dest = tmp_path / "lib", tmp_path / "pycache"
    (lib / "pkg").mkdir(parents=True)
    src = lib / "pkg" / "mod.py"
    src.write_text("VALUE = 'pyc_file'\n")
    (lib / "pkg" / "tests").mkdir()
    (lib / "pkg" / "tests" / "t.py").write_text("X = 1\n")
    bytecode.compile_into([lib], dest, workers=1)
    cached = dest / str(lib.resolve()).lstrip("/") / "pkg"  # the prefix tree mirrors the source paths
    assert any(cached.glob("mod.*.pyc")) and not (cached / "tests").exists()
    # same size and mtime, other text: only a process that reads the bytecode still sees 'pyc_file'
    st = src.stat()
    src.write_text("VALUE = 'src_text'\n")
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    code = f"import sys; sys.path.insert(0, {str(lib)!r}); import pkg.mod; print(pkg.mod.VALUE)"
    run = [sys.executable, "-I", "-B"]
    assert subprocess.run([*run, "-X", f"pycache_prefix={dest}", "-c", code], capture_output=True,
                          text=True).stdout.strip() == "pyc_file"
    assert subprocess.run([*run, "-c", code], capture_output=True, text=True).stdout.strip() == "src_text"
    assert not (lib / "pkg" / "__pycache__").exists()  # -B: the runs never write bytecode themselves


def test_flags_compile_once_and_only_where_bytecode_is_missing(tmp_path, monkeypatch):
    session = SimpleNamespace(dir=tmp_path / "s")
    session.dir.mkdir()
    calls = []
    monkeypatch.setattr(bytecode, "compile_into", lambda dirs, dest: calls.append((dirs, dest)) or 1.5)
    monkeypatch.setattr(bytecode, "missing", lambda: 0)
    assert bytecode.flags(session) == [] and not calls  # a pip install's bytecode beside the sources: nothing
    monkeypatch.setattr(bytecode, "missing", lambda: 2300)
    want = ["-X", f"pycache_prefix={session.dir / 'pycache'}"]
    assert bytecode.flags(session) == want and bytecode.flags(session) == want
    assert calls == [(bytecode.library_dirs(), session.dir / "pycache")]  # compiled once, by the harness
    done = json.loads((session.dir / "pycache" / "complete.json").read_text())
    assert done["python"] == sys.executable and done["seconds"] == 1.5


def test_missing_counts_imported_library_modules_without_bytecode(monkeypatch, tmp_path):
    import email  # a stdlib package this process has imported

    assert bytecode.missing() == 0 or not os.access(os.path.dirname(email.__file__), os.W_OK)
    fake = SimpleNamespace(__file__=email.__file__, __cached__=str(tmp_path / "nowhere.pyc"))
    monkeypatch.setitem(sys.modules, "llmlabs_test_fake_module", fake)
    before = bytecode.missing()
    assert before >= 1
    fake.__cached__ = email.__cached__
    if os.path.exists(email.__cached__):
        assert bytecode.missing() == before - 1
    else:
        pytest.skip(f"this interpreter's stdlib has no bytecode beside {email.__file__}")
