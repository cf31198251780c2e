"""`llmlabs sweep run|fit|table SPEC`: preregistered sweeps, their scaling-law fit, their seed table.

A spec is a TOML file written before any run: what is expected and how it will be judged, then the
grid. Every cell is one plain `llmlabs train` run directory; the fit (llmlabs/scaling_fit.py) reads
those directories, nothing else.

    [sweep]
    name = "cpu-depth-tokens"                    # the sweep directory: ./sweeps/<name> (or --dir)
    hypotheses = ["val_bpb follows E + A/N^alpha + B/D^beta over d1..d4"]
    success = "every cell within 2% of the fit; D_opt/N_opt interval narrower than 10x"
    seeds = [0]                                  # default [0]; each cell runs once per seed
    train_args = "--data pystdlib --eval-tokens 65536"   # or a list; fixed for every cell
    [grid]                                       # any `llmlabs train` flag, underscores or dashes
    depth = [1, 2, 3, 4]
    tokens = [2.5e5, 5e5, 1e6]                   # or target_flops, param_data_ratio, time_budget

Preregistration: the first `run` copies the spec into the sweep directory and records its sha256
(SWEEP/sweep.json); a spec that differs later is refused, by `run` and by `fit`, so criteria cannot
move after the results are in. A changed plan is a new sweep: a new name (or --dir).

Cells run as subprocesses (`python -m llmlabs train`), so one cell's crash or OOM cannot take the
runner down; a cell is done when its summary.json exists. On a re-run done cells are skipped, and
an unfinished cell with a checkpoint continues with `train --resume` (which tests/test_train.py shows
lands on the uninterrupted run's trajectory, so a resumed cell costs only what was lost), one
without a checkpoint starts again in its directory. Each runner takes a cell's claim (an flock on
CELL/.claim) before running it, so several runners on one sweep directory share its cells as a
queue (across nodes only where the shared filesystem honours flock; tested on one machine). --gpus runs one cell per GPU at a time; --slurm
submits the cells as a SLURM job array through submitit. Machines that share no filesystem split a
sweep by name (`run --cells A,B`); their cell directories, copied into one sweep directory, are read
by `fit` and `table` as if run there.

`table` is for sweeps that compare arms over seeds (bf16 against FP8, dense against MoE): each grid
point's val_bpb mean and spread over its seeds, and each point's per-seed difference from the first,
paired by seed (the same seed gives both arms the same data order and, where shapes agree, weights)."""
import argparse
import fcntl
import hashlib
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from llmlabs import flags
from llmlabs.common import LabError, atomic_write_json, make_dir

OWNED = ("run_dir", "resume", "seed")  # the runner sets these per cell
SHORT = {"depth": "d", "tokens": "tok", "target_flops": "flops", "param_data_ratio": "ratio", "time_budget": "t"}
SPEC_KEYS = {"name", "hypotheses", "success", "seeds", "train_args"}


@dataclass
class Cell:
    name: str
    argv: list    # `llmlabs train` flags, without --run-dir
    values: dict  # this cell's value on each grid axis
    seed: int


@dataclass
class Spec:
    path: Path
    sha256: str
    name: str
    hypotheses: list
    success: str
    seeds: list
    train_args: list
    grid: dict
    cells: list


def add_args(p):
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{run,fit,table}")
    s = sub.add_parser("run", help="run (or go on with) every cell of a spec", description="run (or go on with) "
                       "every cell of a spec; done cells are skipped, unfinished ones resumed")
    s.add_argument("spec", help="the sweep's TOML spec")
    s.add_argument("--dir", help="the sweep directory (default: sweeps/<name> under the current directory)")
    s.add_argument("--gpus", type=gpu_list, help="one cell per GPU at a time, e.g. 0,1,2,3 (default: one cell at a time)")
    s.add_argument("--max-cells", type=flags.positive_int, help="start at most this many cells, then stop (run again to go on)")
    s.add_argument("--cells", type=cell_list, metavar="NAME,...",
                   help="run only these cells (names as SWEEP/cells/ has them), e.g. to split a sweep across machines")
    g = s.add_argument_group("SLURM (through submitit: pip install 'llmlabs[sweep]')")
    g.add_argument("--slurm", action="store_true", help="submit the cells as a job array and wait for them")
    g.add_argument("--partition", help="SLURM partition")
    g.add_argument("--slurm-minutes", type=flags.positive_int, default=60, help="time limit of one cell's job")
    g.add_argument("--slurm-gpus", type=flags.count, default=1, help="GPUs per cell's job")
    g.add_argument("--cluster", choices=["slurm", "local"], default="slurm",
                   help="local: submitit runs the jobs on this machine (to try a setup without a cluster)")
    s = sub.add_parser("fit", help="fit L(N, D) to the finished cells; plots and a table next to the spec",
                       description="fit L(N, D) = E + A/N^alpha + B/D^beta to the finished cells (Hoffmann et al. "
                                   "approach 3), bootstrap it, and write SPEC-fit.md/.json and two plots next to the spec")
    s.add_argument("spec", help="the sweep's TOML spec")
    s.add_argument("--dir", help="the sweep directory (default: sweeps/<name> under the current directory)")
    s.add_argument("--bootstrap", type=flags.count, default=200, help="resamples for the intervals (0: none)")
    s = sub.add_parser("table", help="val_bpb per grid point over seeds, and paired differences; SPEC-table.md",
                       description="each grid point's val_bpb over its seeds (mean, sample standard deviation) and "
                                   "its per-seed difference from the first grid point; written to SPEC-table.md")
    s.add_argument("spec", help="the sweep's TOML spec")
    s.add_argument("--dir", help="the sweep directory (default: sweeps/<name> under the current directory)")


def gpu_list(s):
    try:
        ids = [int(g) for g in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: give GPU indices separated by commas, e.g. 0,1,2") from None
    if len(set(ids)) != len(ids) or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"{s!r}: each GPU once, indices >= 0")
    return ids


def cell_list(s):
    names = [c for c in s.split(",") if c]
    if not names:
        raise argparse.ArgumentTypeError(f"{s!r}: give cell names separated by commas, e.g. d1_tok512_s0,d2_tok512_s0")
    return names


def run(args):
    spec = load_spec(args.spec)
    sweep_dir = Path(args.dir or Path("sweeps") / spec.name)
    if args.cmd == "fit":
        from llmlabs.scaling_fit import fit_sweep

        return fit_sweep(spec, _opened(spec, sweep_dir), args.bootstrap)
    if args.cmd == "table":
        return seed_table(spec, _opened(spec, sweep_dir))
    if not args.slurm and args.partition:
        raise LabError("--partition is for --slurm: add --slurm, or drop it")
    return run_sweep(spec, open_sweep(spec, sweep_dir), gpus=args.gpus, max_cells=args.max_cells,
                     slurm=args if args.slurm else None, only=args.cells)


# ---------------------------------------------------------------------------------------------
# the spec

class _Parser(argparse.ArgumentParser):
    """train's flags, with errors raised instead of printed and abbreviations refused (a cell's
    flags are written out in full, so a spec says exactly what ran)."""
    def error(self, message):
        raise LabError(message)


def _train_parser():
    from llmlabs import train

    p = _Parser(prog="llmlabs train", allow_abbrev=False)
    train.add_args(p)
    return p


def load_spec(path) -> Spec:
    """Read and check a spec; every cell's flags are parsed by train's own parser here, before any run."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    path = Path(path)
    try:
        raw = path.read_bytes()
        doc = tomllib.loads(raw.decode())
    except OSError as e:
        raise LabError(f"spec {path}: cannot read it ({e.strerror}): give the path of a TOML spec") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise LabError(f"spec {path} is not valid TOML: {e}") from None

    def bad(what):
        return LabError(f"spec {path}: {what}")

    extra = set(doc) - {"sweep", "grid"}
    if extra:
        raise bad(f"unknown table(s) {', '.join(sorted(extra))}: a spec has [sweep] and [grid]")
    sw, grid = doc.get("sweep"), doc.get("grid")
    if not isinstance(sw, dict):
        raise bad("no [sweep] table: give name, hypotheses and success there")
    if set(sw) - SPEC_KEYS:
        raise bad(f"[sweep] has unknown key(s) {', '.join(sorted(set(sw) - SPEC_KEYS))}: use {', '.join(sorted(SPEC_KEYS))}")
    name = sw.get("name")
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "._-" for c in name):
        raise bad("[sweep] name must be a non-empty string of letters, digits, '.', '_' and '-' (it names a directory)")
    hyp = sw.get("hypotheses")
    if not isinstance(hyp, list) or not hyp or not all(isinstance(h, str) and h.strip() for h in hyp):
        raise bad("[sweep] hypotheses must be a non-empty list of statements, written before any run")
    success = sw.get("success")
    if not isinstance(success, str) or not success.strip():
        raise bad("[sweep] success must say, before any run, what result would support the hypotheses")
    seeds = sw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(type(s) is int and s >= 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise bad("[sweep] seeds must be a non-empty list of distinct integers >= 0")
    train_args = sw.get("train_args", "")
    if isinstance(train_args, str):
        train_args = shlex.split(train_args)
    if not isinstance(train_args, list) or not all(isinstance(a, str) for a in train_args):
        raise bad("[sweep] train_args must be a string of `llmlabs train` flags or a list of them")
    if not isinstance(grid, dict) or not grid:
        raise bad("no [grid], or an empty one: give at least one axis, e.g. depth = [1, 2, 3, 4]")

    parser = _train_parser()
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    fixed = {o.split("=")[0][2:].replace("-", "_") for o in train_args if o.startswith("--")} & set(actions)
    for dest in set(OWNED) & fixed:
        raise bad(f"train_args may not set --{dest.replace('_', '-')}: the sweep sets it per cell "
                  f"({'seeds = [...] in [sweep]' if dest == 'seed' else 'each cell is SWEEP/cells/<cell>'})")
    axes = {}
    for key, values in grid.items():
        dest = key.replace("-", "_")
        if dest not in actions or dest in OWNED or dest == "help":
            raise bad(f"[grid] {key}: not a flag of `llmlabs train` a sweep can vary (see llmlabs train --help)")
        if dest in fixed:
            raise bad(f"[grid] {key} is also set in train_args: set it in one place")
        if not isinstance(values, list) or not values:
            raise bad(f"[grid] {key} must be a non-empty list of values")
        switch = actions[dest].nargs == 0
        if not all(isinstance(v, bool) if switch else isinstance(v, (int, float, str)) and not isinstance(v, bool)
                   for v in values):
            raise bad(f"[grid] {key}: {'true/false' if switch else 'numbers or strings'} only ({values!r})")
        if len(set(map(repr, values))) != len(values):
            raise bad(f"[grid] {key} repeats a value ({values!r})")
        axes[dest] = values

    cells = []
    for combo in itertools.product(*axes.values()):
        argv, parts = list(train_args), []
        for dest, v in zip(axes, combo):
            flag = "--" + dest.replace("_", "-")
            argv += ([flag] if v else []) if isinstance(v, bool) else [flag, repr(v) if isinstance(v, float) else str(v)]
            key = SHORT.get(dest, dest.replace("_", "-"))
            parts.append((key if v else f"{key}-off") if isinstance(v, bool) else key + _label(v))
        for seed in seeds:
            cell = Cell("_".join(parts + [f"s{seed}"]), argv + ["--seed", str(seed)], dict(zip(axes, combo)), seed)
            try:
                parser.parse_args(cell.argv)
            except LabError as e:
                raise bad(f"cell {cell.name}: {e}") from None
            cells.append(cell)
    if len({c.name for c in cells}) != len(cells):
        raise bad("two cells get one name (grid values that print alike): make the values distinct")
    return Spec(path, hashlib.sha256(raw).hexdigest(), name, hyp, success.strip(), seeds, train_args, axes, cells)


def _label(v):
    if isinstance(v, float):
        return f"{v:g}".replace("+", "")
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in str(v))


# ---------------------------------------------------------------------------------------------
# the sweep directory

def open_sweep(spec, sweep_dir) -> Path:
    """Create the sweep directory with its frozen spec, or check that an existing one ran this very spec."""
    sweep_dir = Path(sweep_dir)
    if (sweep_dir / "sweep.json").exists():
        return _opened(spec, sweep_dir)
    make_dir(sweep_dir / "cells", "--dir")
    (sweep_dir / "spec.toml").write_bytes(spec.path.read_bytes())
    atomic_write_json(sweep_dir / "sweep.json", {
        "name": spec.name, "spec": str(spec.path.resolve()), "spec_sha256": spec.sha256,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "commit": _commit(), "cells": [c.name for c in spec.cells]})
    return sweep_dir


def _opened(spec, sweep_dir) -> Path:
    sweep_dir = Path(sweep_dir)
    try:
        manifest = json.loads((sweep_dir / "sweep.json").read_text())
    except (OSError, ValueError):
        raise LabError(f"{sweep_dir} holds no sweep (no readable sweep.json): run `llmlabs sweep run {spec.path}` "
                       "first, or give its --dir") from None
    if manifest["spec_sha256"] != spec.sha256:
        raise LabError(f"{spec.path} is not the spec {sweep_dir} started with (sha256 {manifest['spec_sha256'][:12]}, "
                       f"now {spec.sha256[:12]}; the original is {sweep_dir / 'spec.toml'}): a preregistered spec is "
                       "frozen once it runs; put the change in a new spec with another [sweep] name (or --dir)")
    return sweep_dir


def _commit():
    """The lab's git commit (with '+dirty' for uncommitted changes), or None outside a checkout."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def is_done(cell_dir) -> bool:
    return (Path(cell_dir) / "summary.json").exists()


def one_corpus(sweep_dir, names) -> str:
    """What the finished cells `names` read, checked to be one corpus (raises LabError naming the groups
    if not), as a line for a report. Two marks per cell: the tokenizer saved in its run directory (every
    cell has one; BPE is trained on the corpus, so another corpus almost surely gives another) and the
    data_id its summary records (cells run since 2026-12-05: the hash of every shard). A cell of one
    sweep run on another machine can silently read other data: `pysrc` is the running interpreter's
    own sources, so it changes with the packages installed, and its val split with it."""
    from llmlabs.data.tokenizer import Tokenizer

    marks = {}
    for name in names:
        cell = Path(sweep_dir) / "cells" / name
        tok = Tokenizer.load(cell / "tokenizer.json").hash[:12] if (cell / "tokenizer.json").is_file() else None
        marks[name] = {"tokenizer": tok, "data_id": json.loads((cell / "summary.json").read_text()).get("data_id")}
    seen = {}
    for what in ("tokenizer", "data_id"):
        groups = {}
        for name, m in marks.items():
            if m[what] is not None:
                groups.setdefault(m[what], []).append(name)
        if len(groups) > 1:
            raise LabError(f"{sweep_dir}: its cells read different data (" + "; ".join(
                f"{what} {k}: {', '.join(v)}" for k, v in groups.items()) + "), and val_bpb on different val splits "
                "compares nothing: rerun the odd cells on the sweep's data (for pysrc, the same packages installed "
                "when it is prepared) or move them to a sweep directory of their own")
        seen[what] = (next(iter(groups), None), sum(map(len, groups.values())))
    (tok, n_tok), (did, n_id) = seen["tokenizer"], seen["data_id"]
    return (f"data: tokenizer {tok} in {n_tok} of {len(marks)} cells; " if tok else "data: ") + \
        (f"data_id {did} in the {n_id} that record one" if did else "no cell records a data_id (run before 2026-12-05)")


def one_device(sweep_dir, names) -> str:
    """The devices the finished cells `names` trained on, as a line for a report; cells under a time
    budget must share one (raises LabError naming the groups if not). Equal time on two cards is not
    equal compute (an H200 has an H100's matmul peak and 1.43x its memory bandwidth, and runs a d8 step
    faster), so a difference between such cells would measure the cards too. Cells under a token, FLOP
    or data-ratio budget train the same tokens anywhere and may mix devices (kernels differ in rounding)."""
    groups, timed = {}, []
    for name in names:
        cell = Path(sweep_dir) / "cells" / name
        groups.setdefault(json.loads((cell / "summary.json").read_text()).get("device", "unknown"), []).append(name)
        config = cell / "config.json"
        if config.is_file() and json.loads(config.read_text()).get("time_budget"):
            timed.append(name)
    if len(groups) > 1 and timed:
        raise LabError(f"{sweep_dir}: its cells trained on different devices (" + "; ".join(
            f"{k}: {', '.join(v)}" for k, v in groups.items()) + f") under a time budget ({', '.join(timed)}), "
            "and equal time on two devices is not equal compute: rerun the odd cells on the sweep's device "
            "(bench/sweep_cells.sh: DEVICE=<its name>) or move them to a sweep directory of their own")
    return "device: " + "; ".join(f"{k} ({len(v)} of {len(names)} cells)" for k, v in groups.items()) + \
        (" (under a time budget: one device)" if timed else "")


# ---------------------------------------------------------------------------------------------
# running the cells

def _command(cell_dir, cell):
    """train's command line for a cell: --resume where it has a checkpoint, else a fresh run in its directory."""
    from llmlabs import checkpoint

    base = ["-m", "llmlabs", "train"]
    return base + (["--resume", str(cell_dir)] if checkpoint.candidates(cell_dir) else
                   [*cell.argv, "--run-dir", str(cell_dir)])


def _env(gpu=None):
    """What a cell's environment adds to the runner's (or a SLURM job's): this very llmlabs first on
    PYTHONPATH, so the cells run the code the runner was started with, installed or not, and
    CUDA_VISIBLE_DEVICES for --gpus."""
    root = str(Path(__file__).resolve().parent.parent)
    env = {"PYTHONPATH": os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return env


def start_cell(args, cell_dir, env) -> subprocess.Popen:
    """Start one cell's `llmlabs train` in a process of its own, with the variables `env` adds to this
    process's, its output appended to CELL/train.log."""
    with open(Path(cell_dir) / "train.log", "a") as log:
        log.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} llmlabs sweep: {shlex.join(args)}\n")
        log.flush()
        return subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **env})


def train_cell(args, cell_dir, env) -> int:
    """A cell run to its end: what a SLURM job runs (module-level, so that submitit can pickle it)."""
    return start_cell(args, cell_dir, env).wait()


def _claim(cell_dir):
    """This runner's claim on a cell (an open, flock'd file), or None if another runner holds it."""
    f = open(Path(cell_dir) / ".claim", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def _last_line(cell_dir):
    lines = [ln for ln in (Path(cell_dir) / "train.log").read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "(no output)"


def run_sweep(spec, sweep_dir, gpus=None, max_cells=None, slurm=None, only=None) -> int:
    cells = spec.cells
    if only:
        unknown = sorted(set(only) - {c.name for c in cells})
        if unknown:
            raise LabError(f"--cells: {', '.join(unknown)} not in {spec.path} (its cells: {', '.join(c.name for c in cells)})")
        cells = [c for c in cells if c.name in only]
    pending = [c for c in cells if not is_done(sweep_dir / "cells" / c.name)]
    shape = " x ".join(f"{len(v)} {k}" for k, v in spec.grid.items()) + f" x {len(spec.seeds)} seed(s)"
    if only:
        shape = f"chosen by --cells of the spec's {len(spec.cells)}: {shape}"
    print(f"sweep {spec.name}: {len(cells)} cells ({shape}) in {sweep_dir}; {len(cells) - len(pending)} done, "
          f"{len(pending)} to run" + (f", at most {max_cells} now" if max_cells and max_cells < len(pending) else ""))
    todo = pending[:max_cells] if max_cells else pending
    if slurm:
        failed = _run_slurm(spec, sweep_dir, todo, slurm)
    else:
        failed = _run_local(sweep_dir, todo, gpus or [None], len(cells) - len(pending), len(cells))
    left = sum(not is_done(sweep_dir / "cells" / c.name) for c in cells)
    if failed:
        print(f"{len(failed)} cell(s) failed ({', '.join(failed)}): their logs are CELL/train.log; run the same "
              "command again to retry them (done cells are skipped)")
        return 1
    whole = sum(is_done(sweep_dir / "cells" / c.name) for c in spec.cells)
    print(f"{len(cells) - left} of {len(cells)} cells done" + (f" ({whole} of the sweep's {len(spec.cells)})" if only else "") +
          (f"; next: llmlabs sweep fit (or table) {spec.path}" if whole == len(spec.cells) else
           "; run the same command again to go on" if left else ""))
    return 0


def _run_local(sweep_dir, todo, slots, ended, n_total):
    """Run the cells, len(slots) at a time (one per GPU, or one on the CPU), polling their processes;
    `ended` of n_total cells were done before."""
    queue, running, failed, took = list(todo), {}, [], []
    try:
        while queue or running:
            for slot in [s for s in slots if s not in running]:
                while queue:
                    cell = queue.pop(0)
                    cell_dir = make_dir(sweep_dir / "cells" / cell.name, "--dir")
                    claim = _claim(cell_dir)
                    if claim is None or is_done(cell_dir):  # another runner has it, or finished it meanwhile
                        print(f"skip    {cell.name}: {'done by another runner' if claim else 'another runner has it'}")
                        if claim:
                            claim.close()
                        continue
                    args = _command(cell_dir, cell)
                    proc = start_cell(args, cell_dir, _env(slot))
                    where = "" if slot is None else f" on GPU {slot}"
                    print(f"start   {cell.name}{where}{' (resuming)' if '--resume' in args else ''}", flush=True)
                    running[slot] = (cell, cell_dir, proc, claim, time.time())
                    break
            time.sleep(0.2)
            for slot, (cell, cell_dir, proc, claim, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[slot]
                claim.close()
                ended += 1
                if proc.returncode == 0 and is_done(cell_dir):
                    took.append(time.time() - t0)
                    bpb = json.loads((cell_dir / "summary.json").read_text()).get("val_bpb")
                    left = len(queue) + len(running)
                    eta = sum(took) / len(took) * left / len(slots)
                    print(f"[{ended}/{n_total}] {cell.name}: val_bpb {bpb if bpb is None else f'{bpb:.4f}'}, "
                          f"{took[-1]:.0f} s" + (f" | {left} to go, ETA {_duration(eta)}" if left else ""), flush=True)
                elif proc.returncode == 130:  # train's exit on Ctrl-C, checkpoint saved: one reached the cell only
                    print(f"        {cell.name}: interrupted ({_last_line(cell_dir)})", flush=True)
                    raise KeyboardInterrupt
                else:
                    failed.append(cell.name)
                    print(f"[{ended}/{n_total}] {cell.name}: FAILED (exit {proc.returncode}): {_last_line(cell_dir)}",
                          flush=True)
    except KeyboardInterrupt:  # a terminal's Ctrl-C reached the cells too; a `kill -INT` of the runner did not
        for cell, _, proc, _, _ in running.values():
            proc.send_signal(signal.SIGINT)
        print(f"\ninterrupted: waiting for {len(running)} running cell(s) to save a checkpoint ...", flush=True)
        for cell, _, proc, _, _ in running.values():
            proc.wait()
        print("run the same command again to go on: done cells are skipped, the interrupted ones resume")
        raise SystemExit(130) from None
    return failed


def _run_slurm(spec, sweep_dir, todo, opts):
    """Submit the cells as one submitit job array, then wait, printing each as it ends. Interrupting
    the wait leaves the jobs running; a later `run` skips the cells they finish (but would submit again
    any still queued: wait for them, or scancel them, first)."""
    try:
        import submitit
    except ImportError:
        raise LabError("--slurm needs submitit: pip install 'llmlabs[sweep]' (or pip install submitit)") from None
    ex = submitit.AutoExecutor(folder=str(sweep_dir / "slurm"), cluster=opts.cluster)
    params = {"timeout_min": opts.slurm_minutes, "gpus_per_node": opts.slurm_gpus, "nodes": 1, "tasks_per_node": 1,
              "name": f"sweep-{spec.name}"}
    if opts.partition:
        params["slurm_partition"] = opts.partition
    ex.update_parameters(**params)
    jobs = []
    with ex.batch():
        for cell in todo:
            cell_dir = make_dir(sweep_dir / "cells" / cell.name, "--dir").resolve()  # the job's cwd may differ
            jobs.append((cell, cell_dir, ex.submit(train_cell, _command(cell_dir, cell), str(cell_dir), _env())))
    print(f"submitted {len(jobs)} job(s) to {opts.cluster} (job ids {', '.join(j.job_id for _, _, j in jobs)}); "
          f"submitit's logs in {sweep_dir / 'slurm'}", flush=True)
    failed = []
    for i, (cell, cell_dir, job) in enumerate(jobs, 1):
        try:
            rc = job.result()
        except KeyboardInterrupt:
            print("\ninterrupted: the submitted jobs go on; run the same command once they have ended (done cells "
                  "are skipped; one run again while its job is still queued would run twice)")
            raise SystemExit(130) from None
        except Exception as e:  # the job itself died (preempted, timed out, node failure)
            rc = f"job {job.job_id}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        if rc == 0 and is_done(cell_dir):
            print(f"[{i}/{len(jobs)}] {cell.name}: val_bpb {json.loads((cell_dir / 'summary.json').read_text()).get('val_bpb')}")
        else:
            failed.append(cell.name)
            print(f"[{i}/{len(jobs)}] {cell.name}: FAILED ({rc}): {_last_line(cell_dir)}")
    return failed


def _duration(s):
    return f"{s / 60:.1f} min" if s >= 90 else f"{s:.0f} s"


# ---------------------------------------------------------------------------------------------
# the seed table

def seed_table(spec, sweep_dir) -> int:
    """Print and write SPEC-table.md: every finished cell, then each grid point over its seeds, then
    each point against the first, paired by seed. Unfinished cells are listed as such, not dropped."""
    import statistics as st

    done = {c.name: json.loads((sweep_dir / "cells" / c.name / "summary.json").read_text())
            for c in spec.cells if is_done(sweep_dir / "cells" / c.name)}
    if not done:
        raise LabError(f"none of the {len(spec.cells)} cells in {sweep_dir} is done: run `llmlabs sweep run {spec.path}` first")
    point = lambda c: ", ".join(f"{k} {v}" for k, v in c.values.items())  # noqa: E731
    groups = {}
    for c in spec.cells:
        groups.setdefault(point(c), {})[c.seed] = done.get(c.name, {}).get("val_bpb")
    sd = lambda v: f"{st.stdev(v):.4f}" if len(v) > 1 else "-"  # noqa: E731
    lines = [f"# sweep {spec.name}: val_bpb over seeds", "", f"spec `{spec.path}` (sha256 {spec.sha256[:12]}), "
             f"{len(done)} of {len(spec.cells)} cells done", "", one_corpus(sweep_dir, done), "",
             one_device(sweep_dir, done), "",
             *[f"- hypothesis: {h}" for h in spec.hypotheses], f"- success: {spec.success}", "",
             "| cell | val_bpb | tokens (M) | tokens/s | training s |", "|---|---|---|---|---|"]
    for c in spec.cells:
        r = done.get(c.name)
        lines.append(f"| {c.name} | " + (" | ".join(_cellstat(r, k) for k in ("val_bpb", "total_tokens_M", "tok_per_sec",
                                                                              "training_seconds")) if r else "not done | | |") + " |")
    lines += ["", "| grid point | seeds done | mean | sd | min | max |", "|---|---|---|---|---|---|"]
    for name, by_seed in groups.items():
        v = [b for b in by_seed.values() if b is not None]
        lines.append(f"| {name} | {len(v)} of {len(by_seed)} | " +
                     (f"{st.mean(v):.4f} | {sd(v)} | {min(v):.4f} | {max(v):.4f} |" if v else "| | | |"))
    (first, base), *rest = groups.items()
    if rest:
        lines += ["", f"paired by seed against {first}:", "",
                  "| grid point | seeds paired | each seed's difference | mean | sd |", "|---|---|---|---|---|"]
        for name, by_seed in rest:
            d = [by_seed[k] - base[k] for k in by_seed if by_seed[k] is not None and base.get(k) is not None]
            lines.append(f"| {name} | {len(d)} | {' / '.join(f'{x:+.4f}' for x in d)} | " +
                         (f"{st.mean(d):+.4f} | {sd(d)} |" if d else " | |"))
    text = "\n".join(lines) + "\n"
    out = spec.path.with_name(spec.path.stem + "-table.md")
    out.write_text(text)
    print(text + f"\nwritten to {out}")
    return 0


def _cellstat(summary, key):
    v = summary.get(key)
    return "-" if v is None else f"{v:.4f}" if key == "val_bpb" else f"{v:,.0f}" if key == "tok_per_sec" else f"{v:g}"
