"""The research surface (the one list of what an agent may edit) and the harness fingerprint.

The surface is an allowlist: an experiment's commit may differ from the session's starting commit
only in the files of RESEARCH_SURFACE, each a regular file. Any other difference (a changed harness
file, an added sitecustomize.py, usercustomize.py, *.pth, conftest.py or package, a deleted file, a
symlink) makes the run `invalid`, with the file named, before anything is trained (`outside_surface`).
And what runs is exactly the commit: its llmlabs/ package is exported from git into a fresh directory
(gitops.export), so an ignored or untracked file in the worktree is never imported.

Everything tracked under llmlabs/ that is not on the surface, plus pyproject.toml, is harness: data,
tokenizer, the val_bpb definition, the training loop and its budget, checkpoints, the kernels, and
this runner itself. `llmlabs auto init` also fingerprints it together with the prepared data (its
manifest), the train flags of the session and the Python environment (`environment`: interpreter,
torch, and every .pth / sitecustomize / usercustomize file of its site directories, which Python
runs at start-up); a run whose fingerprint differs is recorded `invalid`, never as a result.
"""
import hashlib
import json
import site
import subprocess
import sys
from pathlib import Path

from llmlabs.common import LabError

# What an experimenter (human or agent) is meant to change: the model's shape and the depth dial
# (config.py), the hyperparameter knobs (scaling.hyperparams_for), the model, attention, the
# optimizer, MoE and FP8. Paths are relative to the repository root.
RESEARCH_SURFACE = (
    "llmlabs/config.py",
    "llmlabs/scaling.py",
    "llmlabs/model.py",
    "llmlabs/attention.py",
    "llmlabs/optim.py",
    "llmlabs/moe.py",
    "llmlabs/fp8.py",
)
HARNESS_ROOTS = ("llmlabs", "pyproject.toml")


def is_research_file(path: str) -> bool:
    return path in RESEARCH_SURFACE


def outside_surface(repo, base, commit) -> str | None:
    """None when `commit` differs from `base` only in research files that are regular files; else
    one line naming the first file that breaks the rule."""
    out = subprocess.run(["git", "diff", "--no-renames", "--name-status", "-z", base, commit], cwd=repo,
                         capture_output=True, text=True)
    if out.returncode:
        raise LabError(f"cannot compare commit {commit} with {base} in {repo}: {out.stderr.strip()}")
    fields = out.stdout.split("\0")
    changes = list(zip(fields[0::2], fields[1::2]))
    allowed = ", ".join(RESEARCH_SURFACE)
    for status, path in changes:
        if status.startswith("D"):
            return f"{path} deleted: an experiment may delete no file (it may change only {allowed})"
        if not is_research_file(path):
            what = "added" if status.startswith("A") else "changed"
            return f"{path} {what} outside the research surface (an experiment may change only {allowed})"
    changed = [path for _, path in changes]
    if changed:
        tree = subprocess.run(["git", "ls-tree", "-z", commit, "--", *changed], cwd=repo, capture_output=True,
                              text=True).stdout
        for entry in filter(None, tree.split("\0")):
            meta, path = entry.split("\t", 1)
            if meta.split()[0] != "100644":
                return f"{path} is not a regular file in commit {commit[:12]} (git mode {meta.split()[0]}): " \
                       "research files must be plain files, not links or executables"
    return None


def harness_hashes(repo, commit="HEAD") -> dict[str, str]:
    """{path: git blob id} of every harness file in `commit`."""
    out = subprocess.run(["git", "ls-tree", "-r", "-z", "--full-tree", commit, "--", *HARNESS_ROOTS], cwd=repo,
                         capture_output=True, text=True)
    if out.returncode:
        raise LabError(f"cannot list the files of commit {commit} in {repo}: {out.stderr.strip()}")
    hashes = {}
    for entry in filter(None, out.stdout.split("\0")):
        meta, path = entry.split("\t", 1)
        if not is_research_file(path):
            hashes[path] = meta.split()[2]
    return hashes


def data_hash(data_dir) -> str:
    """sha256 of the data directory's manifest, which lists every shard's checksum and the tokenizer
    hash: a re-prepared or swapped data directory changes it."""
    manifest = Path(data_dir) / "manifest.json"
    if not manifest.exists():
        raise LabError(f"{data_dir} is not a prepared data directory (no manifest.json): run "
                       "`llmlabs prepare` first and pass its output directory with --data")
    return hashlib.sha256(manifest.read_bytes()).hexdigest()


def environment() -> dict:
    """What Python runs before any of the lab's code: the interpreter, torch's version, and the
    sha256 of every start-up file (*.pth, sitecustomize.py, usercustomize.py) in the site
    directories. A .pth dropped into site-packages between two experiments changes it."""
    import torch

    files = {}
    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    for d in map(Path, dirs):
        if d.is_dir():
            for f in sorted([*d.glob("*.pth"), d / "sitecustomize.py", d / "usercustomize.py"]):
                if f.is_file():
                    files[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return {"python": sys.executable, "version": sys.version, "torch": torch.__version__, "startup_files": files}


def fingerprint(harness: dict, data_sha: str, train: dict, env: dict) -> str:
    blob = json.dumps({"harness": harness, "data": data_sha, "train": train, "env": env}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def explain_mismatch(expected: dict, harness: dict, data_sha: str, train: dict, env: dict) -> str:
    """One line saying what differs from the fingerprint taken at init."""
    changed = sorted(p for p in expected["harness"].keys() | harness.keys()
                     if expected["harness"].get(p) != harness.get(p))
    parts = []
    if changed:
        more = f" (+{len(changed) - 3} more)" if len(changed) > 3 else ""
        parts.append("harness files changed: " + ", ".join(changed[:3]) + more)
    if data_sha != expected["data"]:
        parts.append("the data directory's manifest changed")
    if train != expected["train"]:
        parts.append("the session's train flags changed")
    if env != expected["env"]:
        files = sorted(set(env["startup_files"].items()) ^ set(expected["env"]["startup_files"].items()))
        parts.append("the Python environment changed" + (f" (start-up file {files[0][0]})" if files else
                                                          " (interpreter or torch version)"))
    return "; ".join(parts) or "fingerprint differs"
