"""Hugging Face hub corpora: which files make each corpus, and a resumable parallel downloader
(`fetch` takes one file from any URL the same way: the CORE bundle, llmlabs/core_eval.py).

Plain HTTPS against `{HF_ENDPOINT}/datasets/{repo}/resolve/main/{file}` (HF_ENDPOINT points at a
mirror), so no hub client library is needed; the corpora are public, so no token is sent. A file is
written as `<name>.tmp` and renamed when complete: a present `<name>` is never re-downloaded, a
`<name>.tmp` left by an interrupted run is continued with an HTTP Range request, and failures are
retried with exponential backoff.
"""
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, wait, FIRST_EXCEPTION
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

from tqdm import tqdm

from llmlabs.common import LabError

DOWNLOAD_THREADS = 8
CHUNK = 1 << 20


@dataclass(frozen=True)
class HubCorpus:
    repo: str
    files: tuple[str, ...]    # in the order --shards takes them
    default_shards: int
    doc_separator: str | None = None  # text files holding many documents; None: parquet with a `text` column


HUB_CORPORA = {
    # The pre-shuffled ClimbMix (arXiv:2504.13161) shards that nanochat and autoresearch train on;
    # shard_06542 is the last one.
    "climbmix": HubCorpus("karpathy/climbmix-400b-shuffle",
                          tuple(f"shard_{i:05d}.parquet" for i in range(6543)), default_shards=10),
    # The 10B-token sample of FineWeb-Edu (arXiv:2406.17557): 14 parquet files of about 2 GB.
    "fineweb-edu": HubCorpus("HuggingFaceFW/fineweb-edu",
                             tuple(f"sample/10BT/{i:03d}_00000.parquet" for i in range(14)), default_shards=1),
    # TinyStories (arXiv:2305.07759), the GPT-4 generated V2 set: stories separated by <|endoftext|>.
    # We split by document hash ourselves, so both files are just text; --shards 1 takes the 2 GB train file.
    "tinystories": HubCorpus("roneneldan/TinyStories",
                             ("TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-valid.txt"),
                             default_shards=2, doc_separator="<|endoftext|>"),
}


# the corpora's advice for fetch's error lines: (what to check on a 4xx, how to reach another copy)
HF_ADVICE = ("the corpus name, --shards and HF_ENDPOINT", "set HF_ENDPOINT to a mirror")


def hub_url(repo: str, file: str) -> str:
    """The file's URL, percent-escaped (UTF-8) but for the '/'s: a dataset's image paths hold spaces and
    non-ASCII names, which http.client refuses to send raw."""
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    return f"{endpoint}/" + urllib.parse.quote(f"datasets/{repo}/resolve/main/{file}")


def download(repo: str, files, dest_dir, *, threads: int = DOWNLOAD_THREADS, retries: int = 5,
             backoff: float = 1.0, advice: tuple[str, str] = HF_ADVICE) -> list[Path]:
    """Fetch `files` of dataset `repo` into dest_dir (same relative paths); returns the local paths.
    `advice`: as for `fetch` (a caption dataset's files are named by --files, not --shards)."""
    dest_dir = Path(dest_dir)
    paths = [dest_dir / f for f in files]
    todo = [(hub_url(repo, f), p) for f, p in zip(files, paths) if not p.exists()]
    if not todo:
        return paths
    stop = threading.Event()
    bar = tqdm(desc=f"download {repo} ({len(todo)} files)", unit="B", unit_scale=True, unit_divisor=1024)
    pool = ThreadPoolExecutor(max(1, min(threads, len(todo))))
    try:
        futures = [pool.submit(_fetch, url, path, bar, stop, retries, backoff, advice) for url, path in todo]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for f in done:
            f.result()  # re-raise the first failure here, in the caller's thread
    finally:
        stop.set()  # on an error or Ctrl-C the other threads stop at their next chunk
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return paths


def fetch(url: str, path, advice: tuple[str, str], *, retries: int = 5, backoff: float = 1.0) -> Path:
    """One file from any URL into `path`, resumed and retried as the corpora are. `advice`: what to check
    when the server refuses the file, and how to reach another copy (the two hints of the error lines)."""
    path = Path(path)
    if not path.exists():
        with tqdm(desc=f"download {path.name}", unit="B", unit_scale=True, unit_divisor=1024) as bar:
            _fetch(url, path, bar, threading.Event(), retries, backoff, advice)
    return path


def _fetch(url: str, path: Path, bar, stop: threading.Event, retries: int, backoff: float, advice: tuple[str, str]):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    error, name = None, urllib.parse.unquote(url)  # error lines show the path as the user wrote it
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        have = tmp.stat().st_size if tmp.exists() else 0
        headers = {"User-Agent": "llmlabs"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as resp:
                if have and resp.status == 206:  # the server continues where the .tmp file ends
                    total, mode = int(resp.headers["Content-Range"].rsplit("/", 1)[1]), "ab"
                else:  # a full response: start over
                    length = resp.headers.get("Content-Length")
                    total, mode = (int(length) if length else None), "wb"
                with open(tmp, mode) as f:
                    while chunk := resp.read(CHUNK):
                        if stop.is_set():
                            return
                        f.write(chunk)
                        bar.update(len(chunk))
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # nothing left after the .tmp's end: it may already be complete
                total = e.headers.get("Content-Range", "").rsplit("/", 1)[-1]
                if total.isdigit() and int(total) == have:
                    os.replace(tmp, path)
                    return
                tmp.unlink()
                error = e
                continue
            if e.code in (401, 403, 404):
                raise LabError(f"{name}: HTTP {e.code} {e.reason}: check {advice[0]}") from None
            error = e
            continue
        except (urllib.error.URLError, OSError, HTTPException) as e:  # refused, reset, timed out, cut short
            error = e
            continue
        size = tmp.stat().st_size
        if total is not None and size != total:
            error = f"got {size} of {total} bytes"
            continue
        os.replace(tmp, path)
        return
    raise LabError(f"downloading {name} failed {retries + 1} times (last: {error}): check the network or "
                   f"{advice[1]}, then re-run; finished files are kept and {tmp.name} is resumed")
