"""Bytecode for the runs' interpreters, compiled once per session by the harness.

Every run starts fresh interpreters (training, then the evaluator) with -B, so a process running
an experiment's code never writes a .pyc that a later process, the evaluator above all, would load.
Where the interpreter's packages came without bytecode in read-only directories (some container
images; uv does not compile at install), each of those processes compiled torch's ~2,300 imported
modules from source: 6 s of every process start on the H200 host, twice per run. The harness
compiles the interpreter's library directories once into the session's pycache/ instead, and the
runs read it through `-X pycache_prefix` (PEP 3147's cache, moved): bubblewrap mounts it read-only
and the file guard refuses writes to it, so no run can leave bytecode there for the next.
Where the bytecode is already beside the sources (a pip install), nothing is done.
"""
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

SKIP = r"[/\\](tests?|idle_test)[/\\]"  # test suites: never imported by a run, thousands of files


def library_dirs() -> list[str]:
    """The directories a run's `python -I` imports from: the standard library and site-packages."""
    paths = sysconfig.get_paths()
    return sorted({os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib", "purelib", "platlib")
                   if os.path.isdir(paths[k])})


def missing() -> int:
    """How many of the library modules this process has imported have no bytecode beside their source
    (the parent imports torch, numpy and the standard library before any run starts)."""
    roots = tuple(os.path.join(d, "") for d in library_dirs())
    n = 0
    for m in list(sys.modules.values()):
        src, cached = getattr(m, "__file__", None), getattr(m, "__cached__", None)
        if src and cached and src.endswith(".py") and os.path.realpath(src).startswith(roots):
            n += not os.path.exists(cached)
    return n


def compile_into(dirs, dest: Path, workers: int = 0) -> float:
    """Compile every module under `dirs` into the cache tree `dest` (as `-X pycache_prefix=dest` reads
    it); returns the seconds it took. Files that do not compile (templates, other Pythons' syntax) are
    skipped: the interpreter compiles those from source if it ever imports one."""
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-X", f"pycache_prefix={dest}", "-m", "compileall", "-qq", "-j", str(workers),
                    "-x", SKIP, *map(str, dirs)], stdin=subprocess.DEVNULL, check=False)
    return time.monotonic() - t0


def flags(session) -> list[str]:
    """The interpreter flags of a run's processes: `-X pycache_prefix=<session>/pycache`, compiled on the
    first call where this interpreter's library lacks bytecode (once per session), else none."""
    dest = session.dir / "pycache"
    done = dest / "complete.json"
    if not done.exists():
        n = missing()
        if not n:
            return []
        print(f"compiling the interpreter's library to bytecode once for this session's runs ({n} of the modules "
              f"imported here have none beside their source) ...", flush=True)
        dest.mkdir(parents=True, exist_ok=True)
        secs = compile_into(library_dirs(), dest)
        done.write_text(json.dumps({"python": sys.executable, "dirs": library_dirs(), "seconds": round(secs, 1)}))
        print(f"bytecode compiled in {secs:.0f} s: {dest}", flush=True)
    return ["-X", f"pycache_prefix={dest}"]
