"""Run an untrusted process (the coding agent, the training run of its code, the evaluator) inside
bubblewrap (bwrap, https://github.com/containers/bubblewrap): it sees the machine read-only, writes
only where it is told to, sees none of the hidden directories, and has no network unless asked.

    if sandbox.available():
        argv = sandbox.wrap(argv, rw=[worktree], ro=[worktree / "prepare.py"], hide=[home], chdir=worktree)

What each flag of wrap's command line is for:
    --ro-bind / /         the whole filesystem, read-only: programs, libraries and the venv work unchanged
    --dev /dev            a private /dev (null, zero, urandom, tty, shm, pts): no host disks or devices
    --dev-bind D D        gpu=True: each /dev/nvidia* of the host, so CUDA works (see the warning below)
    --proc /proc          the new pid namespace's procfs: host processes and their environments unseen
    --tmpfs /tmp          an empty private /tmp: nothing of the host's /tmp is visible or left behind
    --unshare-pid         the child cannot see or signal processes outside the sandbox
    --unshare-net         net=False: a loopback of its own only: local TCP between processes inside works
    --die-with-parent     SIGKILL for the sandbox when the process that started bwrap dies: nothing outlives it
    --new-session         setsid(): no controlling terminal to push keystrokes into (TIOCSTI)
    --tmpfs H             each hidden directory H: an empty tmpfs over it (writable, but only in memory and discarded)
    --ro-bind P P         each ro path, read-only (needed inside a hidden or rw directory, or under /tmp)
    --bind P P            each rw path, writable; the changes land on the host
    --chdir DIR           the working directory inside

Order: the hide, ro and rw mounts go shallowest path first, so the deepest path decides what a place is:
a rw or ro path inside a hidden directory is visible again (bwrap makes its mount point inside the
tmpfs, also for the cwd), a ro file inside a rw worktree stays read-only, and a hidden directory inside
a rw one stays hidden. For one path given twice, rw wins over ro, and ro over hide. Paths are resolved
to real absolute paths; a missing one is a LabError.

Seen with bubblewrap 0.8.0 (kernel 6.18, 2026-12-03): file descriptors passed with subprocess's
pass_fds reach the child under the same numbers (bwrap closes none it inherits; it has no option
to), and the environment passes through unchanged. On an H200 (driver 580, as root) torch ran a CUDA
matmul inside with gpu=True and found no GPU with gpu=False; tests/test_auto_sandbox.py passed there.

Warnings:
- The host's /tmp is invisible inside: list any path under it (a worktree, a venv) in rw or ro.
- The harness's SIGTERM to the process group does not reach the child: bwrap dies of it at once
  and the child is SIGKILLed with it (--die-with-parent; also --new-session takes the child out of
  the group). A timeout is therefore a kill, with no time for the child to clean up.
- --die-with-parent follows the THREAD that started bwrap (prctl PR_SET_PDEATHSIG): start and wait
  for a sandboxed process in one thread; one started from a thread that then exits is killed (seen
  here ~2 s after the thread ended).
- gpu=True binds the /dev/nvidia* nodes that exist when wrap is called; on a machine where no CUDA
  program has run since boot /dev/nvidia-uvm may not exist yet, and CUDA fails inside until a CUDA
  program run outside has made it. We bind these nodes
  rather than the host's whole /dev because a harness running as root would otherwise let its
  child open the disks (root-owned, mode 660: no capability needed).
"""
import functools
import glob
import shutil
import subprocess
from pathlib import Path

from llmlabs.common import LabError

INSTALL_HINT = "apt-get install bubblewrap"


def _base(bwrap: str, net: bool, gpu: bool) -> list[str]:
    cmd = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev"]
    for node in sorted(glob.glob("/dev/nvidia*")) if gpu else ():
        cmd += ["--dev-bind", node, node]
    cmd += ["--proc", "/proc", "--tmpfs", "/tmp", "--unshare-pid", "--die-with-parent", "--new-session"]
    return cmd if net else cmd + ["--unshare-net"]


@functools.cache
def _probe() -> tuple[str | None, str]:
    """(path of bwrap, "") when a sandbox can be made here, else (None, why not). Tried once with the
    flags wrap uses: a container can have bwrap and still forbid user namespaces or a new /proc."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return None, f"bubblewrap (bwrap) is not installed: {INSTALL_HINT}"
    try:
        r = subprocess.run(_base(bwrap, net=False, gpu=False) + ["--", "true"], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{bwrap} cannot run: {e}"
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
        return None, f"{bwrap} cannot create a sandbox here ({why}): user namespaces may be disabled"
    return bwrap, ""


def why_not() -> str:
    """Why no sandbox can be made here ("" when one can)."""
    return _probe()[1]


def available() -> bool:
    """Whether wrap's sandbox can be made on this machine (checked once per process)."""
    return _probe()[0] is not None


def _real(path, what: str) -> str:
    try:
        return str(Path(path).resolve(strict=True))
    except (FileNotFoundError, NotADirectoryError):
        raise LabError(f"sandbox: {what} path {str(path)!r} does not exist") from None


def wrap(argv: list[str], *, rw=(), ro=(), hide=(), net: bool = False, gpu: bool = False, chdir=None) -> list[str]:
    """The argv that runs `argv` in the sandbox the module docstring describes: everything read-only
    but the `rw` paths, the `hide` directories empty, `ro` paths read-only even inside those, no
    network unless `net`, the GPUs only with `gpu`, starting in `chdir` (default: the caller's cwd when
    it is visible inside, else $HOME)."""
    bwrap, why = _probe()
    if bwrap is None:
        raise LabError(f"sandbox unavailable: {why}")
    mounts = [(kind, _real(p, name)) for kind, name, paths in
              ((0, "hide", hide), (1, "ro", ro), (2, "rw", rw)) for p in paths]
    cmd = _base(bwrap, net, gpu)
    for kind, p in sorted(mounts, key=lambda m: (len(Path(m[1]).parts), m[0])):
        cmd += [["--tmpfs"], ["--ro-bind", p], ["--bind", p]][kind] + [p]
    if chdir is not None:
        cmd += ["--chdir", _real(chdir, "chdir")]
    return cmd + ["--", *argv]
