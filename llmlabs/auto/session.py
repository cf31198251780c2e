"""A session: `llmlabs auto init --tag T` state in .auto/T/ (session.json, results.tsv, runs/, logs/,
agent/, the worktrees) and how a command finds it again from wherever it is run."""
import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from llmlabs.auto import gitops, surface
from llmlabs.auto.ledger import Ledger
from llmlabs.common import LabError, atomic_write_json, llmlabs_home

SESSIONS = ".auto"
# flags the runner sets itself for every run; a session may not fix them. (A token or FLOP cap may
# be fixed on top of the time budget: on a shared or CPU machine it makes runs reproducible.)
RUNNER_FLAGS = ("--data", "--time-budget", "--seed", "--run-dir", "--eval-split", "--resume")


@dataclass
class Worker:
    name: str       # "main" or "gpu<N>"
    path: Path      # its git worktree
    branch: str
    gpu: int | None  # CUDA device index, None: whatever `llmlabs train` picks


class Session:
    def __init__(self, path):
        self.dir = Path(path)
        cfg = json.loads((self.dir / "session.json").read_text())
        self.cfg = cfg
        self.tag, self.repo, self.base = cfg["tag"], Path(cfg["repo"]), cfg["base"]
        self.data, self.time_budget, self.timeout = cfg["data"], cfg["time_budget"], cfg["timeout"]
        self.train_args, self.k, self.repeat_near = cfg["train_args"], cfg["k"], cfg["repeat_near"]
        self.ledger = Ledger(self.dir / "results.tsv")

    def worker(self, name: str) -> Worker:
        if name == "main":
            return Worker("main", self.dir / "main", f"auto/{self.tag}", None)
        if not (name.startswith("gpu") and name[3:].isdigit()):
            raise LabError(f"unknown worker {name!r}: workers are 'main' and 'gpu<N>'")
        return Worker(name, self.dir / name, f"auto/{self.tag}-{name}", int(name[3:]))

    def train_settings(self) -> dict:
        return {"data": self.data, "time_budget": self.time_budget, "timeout": self.timeout,
                "train_args": self.train_args}

    def check_fingerprint(self, wt, commit) -> str | None:
        """None when `commit`'s harness, the data and the train flags match init; else the reason."""
        harness = surface.harness_hashes(wt, commit)
        data_sha = surface.data_hash(self.data)
        if surface.fingerprint(harness, data_sha, self.train_settings()) == self.cfg["fingerprint"]:
            return None
        return surface.explain_mismatch(self.cfg["expected"], harness, data_sha, self.train_settings())


def init_session(cwd, tag, *, data=None, time_budget=300.0, timeout=None, train_args="", k=2.0,
                 repeat_near=1) -> Session:
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
    data = Path(data) if data else llmlabs_home() / "data" / "pystdlib-v8192"
    data_sha = surface.data_hash(data)  # raises with the prepare hint when data is missing
    from llmlabs.data.shards import DataDir

    DataDir.open(data)  # the full check: manifest, shards, tokenizer
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
    harness = surface.harness_hashes(top, base)
    cfg = {"tag": tag, "repo": str(repo), "base": base, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
           "k": float(k), "repeat_near": int(repeat_near), **settings,
           "fingerprint": surface.fingerprint(harness, data_sha, settings),
           "expected": {"harness": harness, "data": data_sha, "train": settings}}
    gitops.exclude(repo, f"/{SESSIONS}/")
    sdir.mkdir(parents=True, exist_ok=True)  # session.json, written last, marks a complete session
    gitops.add_worktree(repo, sdir / "main", f"auto/{tag}", base)
    atomic_write_json(sdir / "session.json", cfg)
    return Session(sdir)


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
