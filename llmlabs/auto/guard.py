"""What the harness installs inside the processes that run an experiment's code (training, evaluator)
before that code is imported: a file guard, death with the harness, and the integrity snapshot.

The experiment's code is untrusted Python. It runs in the same interpreter as harness code, so
anything the harness relies on there is checked:

- `guard_files`: a PEP 578 audit hook (sys.addaudithook) sees every open(), listdir and scandir,
  every write, delete and rename where `read_only` is set (the evaluator), and every process start
  where `spawn` is off (the evaluator without bubblewrap). A hook cannot be removed once added, so code imported later cannot switch it
  off. A forbidden access ends the process at once (os._exit, so no `except` can swallow it) after
  writing one line naming the path to stderr and to the harness's event pipe. It is the harness's
  own check, with or without bubblewrap: with bubblewrap (sandbox.py) the held-out files are not
  even mounted, and the hook still names the attempt. What it cannot see: native code (ctypes,
  a compiled extension) calling the C library directly; the sandbox covers that where installed.
- `snapshot` / `changed`: the identity of every function and class attribute of the harness modules,
  and of the torch functions the harness calls, taken before the experiment's code is imported and
  compared after: monkeypatching evaluate_bpb, F.cross_entropy, a Tensor method, a function's
  __code__, or leaving a torch function mode or dispatch mode switched on are all named.
"""
import os
import sys

# what a process that only reads its inputs and computes never needs to do
_WRITE_EVENTS = ("os.remove", "os.rename", "os.rmdir", "os.truncate", "os.chmod", "os.chown", "os.link",
                 "os.symlink", "os.mkdir", "shutil.rmtree", "shutil.move", "os.utime")
_SPAWN_EVENTS = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                 "os.forkpty", "pty.spawn")
VIOLATION_EXIT = 86


def die_with_parent():
    """Linux: the kernel kills this process when the harness process that started it dies (even by
    SIGKILL), so a killed harness never leaves a training run holding the GPU."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG


def guard_files(forbidden, allowed=(), read_only=False, report_fd=None, scratch=None, spawn=True):
    """Forbid any access to paths under `forbidden` (except under `allowed`); with read_only, also
    every file write, delete and rename, except under `scratch` (the temporary directory: torch
    probes that it is writable, compilers keep caches there); spawn=False forbids starting processes
    (a child process would not carry this hook)."""
    def prefixes(paths):
        return tuple(os.path.join(os.path.realpath(p), "") for p in paths)

    deny, allow, tmp = prefixes(forbidden), prefixes(allowed), prefixes([scratch] if scratch else [])
    fs_encode, realpath, write, exit_now = os.fsdecode, os.path.realpath, os.write, os._exit

    def stop(what):
        line = f"error: the experiment's code {what}: forbidden to it by the harness\n".encode()
        frame, where = sys._getframe(2), []
        while frame is not None and len(where) < 6:
            where.append(f"  at {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}\n")
            frame = frame.f_back
        try:
            write(2, "".join(where).encode())
        except OSError:
            pass
        for fd in filter(None, (2, report_fd)):
            try:
                write(fd, line if fd == 2 else b"violation " + line[7:])
            except OSError:
                pass
        exit_now(VIOLATION_EXIT)

    def hook(event, args):
        if event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.join(realpath(fs_encode(args[0])), "")
            if path.startswith(deny) and not path.startswith(allow):
                stop(f"opened {path.rstrip(os.sep)}")
            if read_only and event == "open" and _writes(args) and not (tmp and path.startswith(tmp)):
                stop(f"opened {path.rstrip(os.sep)} for writing")
        elif read_only and event in _WRITE_EVENTS:
            paths = [os.path.join(realpath(fs_encode(a)), "") for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
            if not (tmp and paths and all(p.startswith(tmp) for p in paths)):
                stop(f"called {event}{tuple(a for a in args if isinstance(a, (str, bytes)))[:2]}")
        elif not spawn and event in _SPAWN_EVENTS:
            stop(f"called {event}{tuple(a for a in args if isinstance(a, (str, bytes)))[:2]}")

    sys.addaudithook(hook)


def _writes(args) -> bool:
    mode = args[1] if len(args) > 1 else "r"
    flags = args[2] if len(args) > 2 else 0
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND)) if isinstance(flags, int) else False


# ---------------------------------------------------------------------------------------------
# integrity of the harness inside the experiment's process

def _torch_namespaces():
    import torch
    import torch.nn.functional as F

    return {"torch": torch, "torch.nn.functional": F, "torch.Tensor": torch.Tensor,
            "torch._C.TensorBase": torch._C.TensorBase, "torch._C._nn": torch._C._nn,
            "torch._C._VariableFunctions": torch._C._VariableFunctions, "torch.autocast": torch.autocast,
            "torch.nn.Module": torch.nn.Module}


def _members(obj) -> dict:
    """name -> (value, its __code__ if any) of a module's or class's own attributes."""
    out = {}
    own = getattr(obj, "__dict__", None)  # C namespaces without one: every attribute
    items = list(own.items()) if own is not None else [(n, getattr(obj, n, None)) for n in dir(obj)
                                                       if not n.startswith("__")]
    for name, value in items:
        code = getattr(value, "__code__", None)
        out[name] = (value, code, getattr(value, "__defaults__", None), getattr(value, "__kwdefaults__", None))
        if isinstance(value, type) and getattr(value, "__module__", None) == getattr(obj, "__name__", None):
            for sub, (v, c, d, k) in _members(value).items():  # classes defined in a harness module
                out[f"{name}.{sub}"] = (v, c, d, k)
    return out


def snapshot(modules) -> dict:
    """Taken BEFORE the experiment's code is imported: {namespace: {name: (object, code, ...)}} for
    the given harness modules and the torch namespaces the harness's scoring uses."""
    spaces = {m.__name__: m for m in modules}
    spaces.update(_torch_namespaces())
    snap = {name: _members(ns) for name, ns in spaces.items()}
    snap["sys.modules"] = {m.__name__: (sys.modules.get(m.__name__), None, None, None) for m in modules}
    return snap


def changed(snap) -> str | None:
    """None when everything in `snap` is still what it was; else one line naming the first change."""
    import torch

    for space, members in snap.items():
        if space == "sys.modules":
            for name, (mod, *_) in members.items():
                if sys.modules.get(name) is not mod:
                    return f"the harness module {name} was replaced in sys.modules"
            continue
        ns = sys.modules.get(space) or _torch_namespaces().get(space)
        now = _members(ns) if ns is not None else {}
        for name, (value, code, defaults, kwdefaults) in members.items():
            if name not in now:
                return f"{space}.{name} was deleted"
            v, c, d, k = now[name]
            if v is not value or c is not code or d is not defaults or k is not kwdefaults:
                return f"{space}.{name} was replaced after the experiment's code was imported"
        extra = sorted(set(now) - set(members))
        if extra and space in ("torch.Tensor", "torch._C.TensorBase", "torch.nn.functional", "torch._C._nn"):
            return f"{space}.{extra[0]} was added after the experiment's code was imported"
    if torch._C._is_torch_function_mode_enabled() and torch.overrides._get_current_function_mode_stack():
        return "a torch function mode is active (it could rewrite the harness's tensor operations)"
    if torch._C._len_torch_dispatch_stack():
        return "a torch dispatch mode is active (it could rewrite the harness's tensor operations)"
    if sys.gettrace() is not None or sys.getprofile() is not None:
        return "a trace or profile function is set (it could run code inside the harness's scoring)"
    return None
