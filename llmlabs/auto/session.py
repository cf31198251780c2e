"""A session: `llmlabs auto init --tag T` state in .auto/T/ and how a command finds it again from
wherever it is run.

    .auto/T/session.json   settings and the fingerprint taken at init
    .auto/T/results.tsv    the ledger (HMAC chain, ledger.py); secret/ledger.key its key (harness only)
    .auto/T/data-train/    the training split only (hard links): the data directory training runs get
    .auto/T/code/          the exported code each worker's runs import (gitops.export)
    .auto/T/cache/         the torch.compile / Triton caches the session's runs share
    .auto/T/runs/ logs/ agent/ and the worktrees main/, gpu<N>/
"""
import json
import os
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmlabs.auto import gitops, surface
from llmlabs.auto.ledger import Ledger, load_or_create_key
from llmlabs.auto.stats import DEFAULT_ALPHA, DEFAULT_BASELINES, MIN_BASELINES
from llmlabs.common import LabError, atomic_write_json, llmlabs_home

SESSIONS = ".auto"
# flags the runner sets itself for every run; a session may not fix them. (A token or FLOP cap may
# be fixed on top of the time budget: on a shared or CPU machine it makes runs reproducible.)
# --eval-every would need the validation split, which training runs are never given.
RUNNER_FLAGS = ("--data", "--time-budget", "--seed", "--run-dir", "--eval-split", "--resume", "--eval-every")


@dataclass
class Worker:
    name: str       # "main", "gpu<N>" or "slurm<N>"
    path: Path      # its git worktree
    branch: str
    gpu: int | None  # CUDA device index, None: whatever `llmlabs train` picks
    # slurm<N>: a submitit executor; each of the worker's runs (training and the harness's evaluation)
    # is a job of its own, on whatever node SLURM gives it (runs.train)
    executor: object | None = field(default=None, repr=False)


class Session:
    def __init__(self, path):
        self.dir = Path(path)
        cfg = json.loads((self.dir / "session.json").read_text())
        self.cfg = cfg
        self.tag, self.repo, self.base = cfg["tag"], Path(cfg["repo"]), cfg["base"]
        self.data, self.time_budget, self.timeout = cfg["data"], cfg["time_budget"], cfg["timeout"]
        self.train_args, self.alpha, self.repeat_near = cfg["train_args"], cfg["alpha"], cfg["repeat_near"]
        self.baselines, self.eval, self.compile_cache = cfg["baselines"], cfg["eval"], cfg.get("compile_cache", True)
        self.train_data, self.code_dir, self.cache = self.dir / "data-train", self.dir / "code", self.dir / "cache"
        self.ledger = Ledger(self.dir / "results.tsv", load_or_create_key(self.dir / "secret" / "ledger.key"),
                             result_root=self.dir / "runs")
        self._data = None

    def data_dir(self):
        """The full data directory (all splits), opened and verified once per process: the harness's
        evaluation reads the held-out splits from it; no training run ever sees its path mounted."""
        if self._data is None:
            from llmlabs.data.shards import DataDir

            self._data = DataDir.open(self.data)
        return self._data

    def claim_seeds(self, n: int) -> list[int]:
        """n seeds no run of the session has used, taken under the ledger lock, so parallel workers
        never pick the same one (seeds.json counts on)."""
        path = self.dir / "seeds.json"
        with self.ledger.exclusive():
            first = json.loads(path.read_text())["next"] if path.exists() else 0
            atomic_write_json(path, {"next": first + n})
        return list(range(first, first + n))

    def worker(self, name: str) -> Worker:
        if name == "main":
            return Worker("main", self.dir / "main", f"auto/{self.tag}", None)
        kind = name.rstrip("0123456789")
        if kind not in ("gpu", "slurm") or kind == name:
            raise LabError(f"unknown worker {name!r}: workers are 'main', 'gpu<N>' and 'slurm<N>'")
        return Worker(name, self.dir / name, f"auto/{self.tag}-{name}", int(name[3:]) if kind == "gpu" else None)

    def train_settings(self) -> dict:
        return {"data": self.data, "time_budget": self.time_budget, "timeout": self.timeout,
                "train_args": self.train_args}

    def check_commit(self, commit) -> str | None:
        """None when `commit` may be measured: it changes only research files against the session's
        start, and its harness, the data, the train flags and the Python environment match init.
        Else the reason, one line."""
        reason = surface.outside_surface(self.repo, self.base, commit)
        if reason:
            return reason
        harness = surface.harness_hashes(self.repo, commit)
        data_sha, env = surface.data_hash(self.data), surface.environment()
        if surface.fingerprint(harness, data_sha, self.train_settings(), env) == self.cfg["fingerprint"]:
            return None
        return surface.explain_mismatch(self.cfg["expected"], harness, data_sha, self.train_settings(), env)


def init_session(cwd, tag, *, data=None, time_budget=300.0, timeout=None, train_args="", alpha=DEFAULT_ALPHA,
                 repeat_near=1, baselines=DEFAULT_BASELINES, compile_cache=True) -> Session:
    """Branch auto/<tag> from the current commit (in a new worktree), fingerprint the harness, check
    the data. The user's branch and working tree are left exactly as they were."""
    top, repo = gitops.repo_roots(cwd)
    if repo / SESSIONS in top.parents:
        raise LabError(f"{top} is an autoresearch worktree: run `llmlabs auto init` from your own checkout")
    if not tag or "/" in tag or gitops.git(repo, "check-ref-format", "--branch", f"auto/{tag}",
                                           check=False) != f"auto/{tag}":
        raise LabError(f"--tag {tag!r} cannot name a git branch: use letters, digits, '-' or '.'")
    sdir = repo / SESSIONS / tag
    if (sdir / "session.json").exists() or gitops.git(repo, "branch", "--list", f"auto/{tag}"):
        raise LabError(f"session {tag!r} exists already ({sdir}, branch auto/{tag}): pick another --tag")
    from llmlabs.data.shards import locate

    data = locate(data) if data else llmlabs_home() / "data" / "pystdlib-v8192"
    data_sha = surface.data_hash(data)  # raises with the prepare hint when data is missing
    from llmlabs.data.shards import DataDir

    full = DataDir.open(data)  # the full check: manifest, shards, tokenizer
    if baselines < MIN_BASELINES:
        raise LabError(f"--baselines {baselines}: at least {MIN_BASELINES} baseline runs are needed before the first "
                       "decision (fewer leave sigma so uncertain that the keep rule cannot keep anything)")
    if not 0 < alpha < 0.5:
        raise LabError(f"--alpha {alpha}: the false-keep rate must be between 0 and 0.5, e.g. 0.01")
    if time_budget <= 0 or (timeout is not None and timeout <= time_budget):
        raise LabError(f"--time-budget {time_budget} / --timeout {timeout}: the budget must be positive and the "
                       "timeout longer than the budget")
    args = shlex.split(train_args)
    owned = [a for a in args if a.split("=")[0] in RUNNER_FLAGS]
    if owned:
        raise LabError(f"--train-args may not set {', '.join(owned)}: the runner sets data, budget, seed, run dir "
                       "and split itself (use init's own flags)")
    base = gitops.head(top)
    if gitops.is_dirty(top):
        print(f"note: uncommitted changes in {top} are not part of the session: it starts from commit {base[:12]}")
    settings = {"data": str(data.resolve()), "time_budget": float(time_budget),
                # default: compile/warm-up (~1 min on a GPU), evaluation and start-up on top of the budget
                "timeout": float(timeout or time_budget * 1.5 + 180), "train_args": args}
    harness, env = surface.harness_hashes(top, base), surface.environment()
    cfg = {"tag": tag, "repo": str(repo), "base": base, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
           "alpha": float(alpha), "repeat_near": int(repeat_near), "baselines": int(baselines),
           "compile_cache": bool(compile_cache), **settings,
           "eval": eval_settings(args, str(data.resolve())),
           "fingerprint": surface.fingerprint(harness, data_sha, settings, env),
           "expected": {"harness": harness, "data": data_sha, "train": settings, "env": env}}
    gitops.exclude(repo, f"/{SESSIONS}/")
    sdir.mkdir(parents=True, exist_ok=True)  # session.json, written last, marks a complete session
    load_or_create_key(sdir / "secret" / "ledger.key")
    train_only(full, sdir / "data-train")
    gitops.add_worktree(repo, sdir / "main", f"auto/{tag}", base)
    atomic_write_json(sdir / "session.json", cfg)
    return Session(sdir)


def eval_settings(train_args, data) -> dict:
    """How the harness scores every run of the session, fixed at init from the session's train flags
    (so a run cannot choose its own): rows per batch, context, target tokens, device."""
    import argparse

    from llmlabs import train
    from llmlabs.common import autodetect_device

    p = argparse.ArgumentParser()
    train.add_args(p)
    args = p.parse_args([*train_args, "--data", data])
    import torch

    device = torch.device(args.device or autodetect_device())
    cfg = train.resolve_config(args, device)
    rows = cfg["device_batch_size"]
    if "total_batch_size" in cfg:  # as setup() clamps it: a forward never holds more rows than a step
        rows = min(rows, max(1, cfg["total_batch_size"] // cfg["seq_len"]))
    return {"rows": rows, "seq_len": cfg["seq_len"], "tokens": cfg["eval_tokens"], "device": device.type}


def train_only(full, out: Path):
    """A data directory holding the training split only (hard links to the shards where the file
    system allows, copies elsewhere), with a manifest that lists no validation or test shard: the
    data directory every training run of the session is given."""
    from llmlabs.data.shards import MANIFEST, TOKENIZER_FILE

    out.mkdir(parents=True, exist_ok=True)
    m = json.loads(json.dumps(full.manifest))
    keep = {n for s in m["splits"]["train"]["shards"] for n in (s["tokens"], s["docs"])}
    for split in ("val", "test"):
        m["splits"][split] = {"documents": 0, "tokens": 0, "bytes": 0, "shards": []}
    m["files"] = {n: v for n, v in m["files"].items() if n in keep}
    for name in [*keep, TOKENIZER_FILE]:
        try:
            os.link(full.path / name, out / name)
        except OSError:
            shutil.copy2(full.path / name, out / name)
    atomic_write_json(out / MANIFEST, m)


def locate(cwd, tag=None) -> tuple[Session, str]:
    """The session (and the worker whose worktree cwd is in, else "main") for a command run in cwd:
    inside a session worktree, that one; else --tag; else the only session of the repository."""
    cwd = Path(cwd).resolve()
    _, repo = gitops.repo_roots(cwd)
    root = repo / SESSIONS
    worker = "main"
    if root in cwd.parents:
        parts = cwd.relative_to(root).parts
        if tag and tag != parts[0]:
            raise LabError(f"--tag {tag} given inside the worktree of session {parts[0]}: drop --tag or cd out")
        tag = parts[0]
        if len(parts) > 1 and parts[1].startswith("gpu") and parts[1][3:].isdigit():
            worker = parts[1]
    if tag is None:
        tags = sorted(p.parent.name for p in root.glob("*/session.json"))
        if len(tags) != 1:
            raise LabError("no autoresearch session in this repository: start one with `llmlabs auto init --tag T`"
                           if not tags else f"several sessions ({', '.join(tags)}): pass --tag")
        tag = tags[0]
    if not (root / tag / "session.json").exists():
        raise LabError(f"no session {tag!r} in {root}: start it with `llmlabs auto init --tag {tag}`")
    return Session(root / tag), worker
