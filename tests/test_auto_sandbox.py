"""The bubblewrap sandbox, with real sandboxed processes: hidden directories, which paths are writable,
the network, death with the parent, pass_fds, the environment, GPU device nodes, and the errors."""
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from llmlabs.auto import sandbox
from llmlabs.common import LabError

needs_bwrap = pytest.mark.skipif(not sandbox.available(), reason="bubblewrap (bwrap) not installed or user "
                                 "namespaces unavailable: apt-get install bubblewrap")
# the interpreter itself, not the venv's link to it: the venv may sit under /tmp, which is empty inside
PY = os.path.realpath(sys.executable)
REPO = Path(__file__).resolve().parents[1]
# opens each path of argv for writing; prints the errno's name, or ok
WRITE = """import errno, sys
for p in sys.argv[1:]:
    try:
        open(p, "w").write("x")
        print("ok")
    except OSError as e:
        print(errno.errorcode[e.errno])
"""


def run_in(code, *args, env=None, cwd=None, **wrap_kw) -> list[str]:
    """Run python `code` in the sandbox; its stdout lines."""
    r = subprocess.run(sandbox.wrap([PY, "-c", code, *map(str, args)], **wrap_kw), env=env, cwd=cwd,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def unwritable(path) -> str:
    # the host's /tmp is replaced by an empty tmpfs, so a path under it is missing rather than read-only
    return "ENOENT" if Path(path).resolve().is_relative_to("/tmp") else "EROFS"


@needs_bwrap
def test_hidden_directory_is_empty_inside(tmp_path):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key.txt").write_text("k")
    (tmp_path / "visible.txt").write_text("v")
    code = ("import os, sys; print(os.listdir(sys.argv[1])); print(os.path.exists(sys.argv[2]));"
            "print(open(sys.argv[3]).read())")
    # hidden inside a rw directory stays hidden; and a directory of the read-only root can be hidden
    out = run_in(code, secret, secret / "key.txt", tmp_path / "visible.txt", rw=[tmp_path], hide=[secret])
    assert out == ["[]", "False", "v"]
    assert run_in("import os, sys; print(os.listdir(sys.argv[1]))", REPO / "tests", hide=[REPO / "tests"]) == ["[]"]
    assert (secret / "key.txt").read_text() == "k" and Path(__file__).exists()


@needs_bwrap
def test_only_rw_paths_are_writable(tmp_path):
    wt, data, sibling = tmp_path / "wt", tmp_path / "data", tmp_path / "sibling"
    for d in (wt, data, sibling):
        d.mkdir()
    (wt / "prepare.py").write_text("fixed\n")
    (data / "train.bin").write_text("d")
    in_repo = REPO / f".sandbox-test-{uuid.uuid4().hex}"
    targets = [wt / "new.txt", wt / "prepare.py", data / "train.bin", sibling / "f.txt", in_repo]
    try:
        out = run_in(WRITE, *targets, rw=[wt], ro=[wt / "prepare.py", data])
        escaped = in_repo.exists()
    finally:
        in_repo.unlink(missing_ok=True)
    assert out == ["ok", "EROFS", "EROFS", unwritable(sibling), unwritable(in_repo)]
    assert (wt / "new.txt").read_text() == "x"
    assert (wt / "prepare.py").read_text() == "fixed\n" and (data / "train.bin").read_text() == "d"
    assert not (sibling / "f.txt").exists() and not escaped


@needs_bwrap
@pytest.mark.parametrize("how", ["chdir", "cwd"])
def test_rw_path_inside_hidden_directory(tmp_path, how):
    home = tmp_path / "home"
    work, other = home / "work", home / "other"
    work.mkdir(parents=True)
    other.mkdir()
    (other / "s.txt").write_text("s")
    (home / "notes.txt").write_text("n")
    code = ("import os; open('made.txt', 'w').write('m'); print(os.getcwd()); print(sorted(os.listdir('..')));"
            "print(open('../notes.txt').read())")
    where = {"chdir": work} if how == "chdir" else {"cwd": work}  # the cwd bwrap inherits, mounted inside the tmpfs
    out = run_in(code + "\n" + WRITE, home / "notes.txt", rw=[work], ro=[home / "notes.txt"], hide=[home], **where)
    assert out == [str(work), "['notes.txt', 'work']", "n", "EROFS"]
    assert (work / "made.txt").read_text() == "m" and (home / "notes.txt").read_text() == "n"


@needs_bwrap
@pytest.mark.parametrize("net", [False, True])
def test_network_only_when_asked(net):
    server = socket.create_server(("127.0.0.1", 0))  # outside the sandbox; the backlog accepts without accept()
    code = """import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
    print("connected")
except OSError as e:
    print(type(e).__name__)
own = socket.create_server(("127.0.0.1", 0))
socket.create_connection(own.getsockname(), timeout=10)
print("own loopback works")
"""
    with server:
        out = run_in(code, server.getsockname()[1], net=net)
    assert out == ["connected" if net else "ConnectionRefusedError", "own loopback works"]


def marked(marker: str) -> list[int]:
    """Pids of the processes whose command line holds `marker`."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and marker.encode() in (d / "cmdline").read_bytes():
                pids.append(int(d.name))
        except OSError:
            pass  # exited while we looked
    return pids


def wait_until(cond, seconds: float) -> bool:
    end = time.time() + seconds
    while not cond():
        if time.time() > end:
            return False
        time.sleep(0.05)
    return True


@needs_bwrap
def test_sandbox_dies_with_its_parent(tmp_path):
    marker = f"sandbox-test-{uuid.uuid4().hex}"
    ready = tmp_path / "ready"
    inner = [PY, "-c", "import pathlib, sys, time; pathlib.Path(sys.argv[1]).write_text('up'); time.sleep(60)",
             str(ready), marker]
    parent_code = "import subprocess, sys, time; subprocess.Popen(sys.argv[1:]); time.sleep(120)"
    parent = subprocess.Popen([PY, "-c", parent_code, *sandbox.wrap(inner, rw=[tmp_path])])
    try:
        assert wait_until(ready.exists, 30), "the sandboxed process never started"
        assert len(marked(marker)) >= 3  # the parent, bwrap, the sandboxed python
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert wait_until(lambda: not marked(marker), 10), f"left running after the parent's SIGKILL: {marked(marker)}"
    finally:
        parent.kill()
        parent.wait()
        for pid in marked(marker):
            os.kill(pid, signal.SIGKILL)


@needs_bwrap
def test_pass_fds_reach_the_child():
    r, w = os.pipe()
    try:
        code = "import os, sys; os.write(int(sys.argv[1]), b'event\\n')"
        proc = subprocess.Popen(sandbox.wrap([PY, "-c", code, str(w)]), pass_fds=[w])
    finally:
        os.close(w)  # so a write end lost on the way gives EOF here rather than a hang
    with os.fdopen(r) as f:
        line = f.readline()
    assert proc.wait(30) == 0 and line == "event\n"


@needs_bwrap
def test_environment_passes_through():
    env = {**os.environ, "LLMLABS_SANDBOX_TEST": "passes through"}
    assert run_in("import os; print(os.environ['LLMLABS_SANDBOX_TEST'])", env=env) == ["passes through"]


@needs_bwrap
def test_gpu_adds_only_nvidia_device_nodes():
    listing = "import os; print(*sorted(os.listdir('/dev')), sep='\\n')"
    base, with_gpu = run_in(listing), run_in(listing, gpu=True)
    nvidia = [d for d in os.listdir("/dev") if d.startswith("nvidia")]
    assert with_gpu == sorted(base + nvidia)
    assert not {"loop0", "sda", "vda", "nvme0n1", "kmsg"} & set(with_gpu)  # no host disks either way


@needs_bwrap
@pytest.mark.parametrize("kw", ["rw", "ro", "hide", "chdir"])
def test_missing_path_is_a_one_line_error(tmp_path, kw):
    missing = tmp_path / "nope" / "x"
    with pytest.raises(LabError) as e:
        sandbox.wrap(["true"], **{kw: missing if kw == "chdir" else [tmp_path, missing]})
    assert "\n" not in str(e.value) and str(missing) in str(e.value) and kw in str(e.value)


@pytest.fixture
def fresh_probe():
    sandbox._probe.cache_clear()
    yield
    sandbox._probe.cache_clear()  # so later tests probe the real machine again


def test_without_bwrap_wrap_raises_with_install_hint(monkeypatch, fresh_probe):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    assert not sandbox.available()
    with pytest.raises(LabError, match="apt-get install bubblewrap"):
        sandbox.wrap(["true"])
