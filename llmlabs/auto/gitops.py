"""Git isolation: every experiment lives on an auto branch in its own worktree, so the user's branch
and checkout are never touched, and each worker (one per GPU) edits its own copy of the code.

Layout under the repository's main checkout (`.auto/` is added to .git/info/exclude):
    .auto/<tag>/main      worktree on branch auto/<tag>        (`run`, `loop` without --gpus)
    .auto/<tag>/gpu<N>    worktree on branch auto/<tag>-gpu<N> (`loop --gpus`; git refuses one branch
                          in two worktrees, hence a branch per worker)
All worktrees share one object store, so any worker can reset to a commit another worker kept.
"""
import shutil
import subprocess
import tarfile
from pathlib import Path

from llmlabs.common import LabError

# Commits made by the harness: no user hooks (a linter hook must not veto an experiment) and an
# identity that works on a fresh machine where git has none configured.
_IDENTITY = ["-c", "user.name=llmlabs auto", "-c", "user.email=auto@llmlabs.invalid"]


def git(cwd, *args, check=True) -> str:
    r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if check and r.returncode:
        msg = (r.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise LabError(f"`git {' '.join(args)}` failed in {cwd}: {msg}")
    return r.stdout.strip()


def repo_roots(cwd) -> tuple[Path, Path]:
    """(top level of the checkout containing cwd, top level of the repository's main checkout)."""
    r = subprocess.run(["git", "rev-parse", "--show-toplevel", "--path-format=absolute", "--git-common-dir"],
                       cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        raise LabError(f"{cwd} is not inside a git repository: run `llmlabs auto` from a clone of the lab")
    top, common = r.stdout.split("\n")[:2]
    common = Path(common)
    if common.name != ".git":
        raise LabError(f"{common}: a bare or unusual git layout; run from a normal clone")
    return Path(top), common.parent


def head(wt) -> str:
    return git(wt, "rev-parse", "HEAD")


def resolve(wt, rev) -> str:
    return git(wt, "rev-parse", "--verify", f"{rev}^{{commit}}")


def short(wt, rev) -> str:
    return git(wt, "rev-parse", "--short=12", rev)


def is_dirty(wt) -> bool:
    return bool(git(wt, "status", "--porcelain"))


def commit_all(wt, message) -> bool:
    """Commit every change in the worktree (new files too; .gitignore respected). False if none."""
    if not is_dirty(wt):
        return False
    git(wt, "add", "-A")
    git(wt, *_identity(wt), "commit", "-q", "--no-verify", "-m", message)
    return True


def _identity(wt):
    return [] if git(wt, "config", "user.email", check=False) else _IDENTITY


def reset_to(wt, commit):
    """Make the worktree exactly `commit`: branch moved, edits and stray new files gone."""
    git(wt, "reset", "-q", "--hard", commit)
    git(wt, "clean", "-fdq")


def export(repo, commit, dest, paths=("llmlabs",)):
    """Exactly the files of `commit` under `paths`, written into a fresh `dest` (git archive): what a
    run imports, with no untracked or ignored file of any worktree beside it."""
    dest = Path(dest)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    proc = subprocess.Popen(["git", "archive", "--format=tar", commit, "--", *paths], cwd=repo,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
        tar.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    if proc.wait():
        raise LabError(f"`git archive {commit}` failed in {repo}: {proc.stderr.read().decode().strip()}")
    return dest


def add_worktree(repo, path, branch, commit):
    path = Path(path)
    if path.exists():
        if git(path, "rev-parse", "--abbrev-ref", "HEAD", check=False) != branch:
            raise LabError(f"{path} exists but is not the worktree of branch {branch}: move it away")
        return
    git(repo, "worktree", "prune")  # forget worktrees whose directory was deleted by hand
    git(repo, "worktree", "add", "-q", "-B", branch, str(path), commit)


def add_detached(repo, path, commit):
    """A worktree of `commit` without a branch (to measure a commit unchanged)."""
    git(repo, "worktree", "prune")
    git(repo, "worktree", "add", "-q", "--detach", str(path), commit)


def remove_worktree(repo, path):
    git(repo, "worktree", "remove", "--force", str(path), check=False)


def exclude(repo, pattern):
    """Add a pattern to .git/info/exclude (a local ignore that changes no tracked file)."""
    path = Path(repo) / ".git" / "info" / "exclude"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = path.read_text().splitlines() if path.exists() else []
    if pattern not in lines:
        path.write_text("\n".join(lines + [pattern]) + "\n")
