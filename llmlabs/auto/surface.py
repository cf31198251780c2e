"""The research surface (the one list of what an agent may edit) and the harness fingerprint.

Everything tracked under llmlabs/ that is not on the surface, plus pyproject.toml, is harness: data,
tokenizer, the val_bpb definition, the training loop and its budget, checkpoints, and this runner
itself. `llmlabs auto init` fingerprints it together with the prepared data (its manifest) and the
train flags of the session; a run whose fingerprint differs is recorded `invalid`, never as a result.
File hashes come from the git tree of the commit under test, not from the working directory, so
what is checked is exactly what is trained.
"""
import hashlib
import json
import subprocess
from pathlib import Path

from llmlabs.common import LabError

# What an experimenter (human or agent) is meant to change: the hyperparameter knobs
# (config.hyperparams_for and the depth dial), the model, attention, the optimizer, and MoE / FP8
# once they exist. Paths are relative to the repository root.
RESEARCH_SURFACE = (
    "llmlabs/config.py",
    "llmlabs/model.py",
    "llmlabs/attention.py",
    "llmlabs/optim.py",
    "llmlabs/moe.py",
    "llmlabs/fp8.py",
)
HARNESS_ROOTS = ("llmlabs", "pyproject.toml")


def is_research_file(path: str) -> bool:
    return path in RESEARCH_SURFACE


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


def fingerprint(harness: dict, data_sha: str, train: dict) -> str:
    blob = json.dumps({"harness": harness, "data": data_sha, "train": train}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def explain_mismatch(expected: dict, harness: dict, data_sha: str, train: dict) -> str:
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
    return "; ".join(parts) or "fingerprint differs"
