"""The hub path against a real HTTP server on 127.0.0.1 (never the network): it serves parquet and text
files the test wrote, honours Range requests, and can be told to fail or to ignore Range."""
import random
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import random_text
from llmlabs.common import LabError
from llmlabs.data.hub import HUB_CORPORA, download, hub_url
from llmlabs.data.prepare import prepare
from llmlabs.data.shards import SPLITS, DataDir


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        rng = self.headers.get("Range")
        srv.requests.append((self.path, rng))
        if srv.fail_next.get(self.path, 0) > 0:
            srv.fail_next[self.path] -= 1
            self.send_error(503, "try again")
            return
        data = srv.files.get(urllib.parse.unquote(self.path))  # as a real server decodes %XX; requests stay raw
        if data is None:
            self.send_error(404, "no such file")
            return
        start = int(rng[len("bytes="):].split("-")[0]) if rng and not srv.ignore_range else 0
        if start >= len(data) and rng and not srv.ignore_range:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.end_headers()
            return
        body = data[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        srv.bytes_sent += len(body)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.files, server.requests, server.fail_next, server.ignore_range, server.bytes_sent = {}, [], {}, False, 0
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("LLMLABS_HOME", str(tmp_path / "home"))
    yield server
    server.shutdown()
    server.server_close()


def serve(server, repo: str, file: str, data: bytes):
    server.files[f"/datasets/{repo}/resolve/main/{file}"] = data


def parquet_bytes(texts, tmp_path, name="x.parquet") -> bytes:
    p = tmp_path / name
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), p, row_group_size=50)
    return p.read_bytes()


def test_hub_url_and_endpoint(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert hub_url("karpathy/climbmix-400b-shuffle", "shard_00000.parquet") == \
        "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main/shard_00000.parquet"
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example/")
    assert hub_url("a/b", "sample/10BT/000_00000.parquet") == "https://mirror.example/datasets/a/b/resolve/main/sample/10BT/000_00000.parquet"
    assert HUB_CORPORA["fineweb-edu"].files[0] == "sample/10BT/000_00000.parquet"
    # a dataset's image paths: spaces and non-ASCII percent-escaped (UTF-8), the '/'s kept
    assert hub_url("a/b", "images/sub/été 2.png") == \
        "https://mirror.example/datasets/a/b/resolve/main/images/sub/%C3%A9t%C3%A9%202.png"


def test_download_resume_skip_retry(hub, tmp_path):
    blobs = {f"f{i}.bin": random.Random(i).randbytes(300_000 + i) for i in range(3)}
    for name, data in blobs.items():
        serve(hub, "o/r", name, data)
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "f0.bin.tmp").write_bytes(blobs["f0.bin"][:123_457])  # an interrupted earlier run
    hub.fail_next["/datasets/o/r/resolve/main/f1.bin"] = 2  # flaky server: two 503s, then fine
    paths = download("o/r", list(blobs), dest, backoff=0.01)
    assert [p.read_bytes() for p in paths] == list(blobs.values())
    assert not list(dest.glob("*.tmp"))
    assert ("/datasets/o/r/resolve/main/f0.bin", "bytes=123457-") in hub.requests
    assert hub.bytes_sent == sum(map(len, blobs.values())) - 123_457  # only the missing part was sent again
    assert sum(p == "/datasets/o/r/resolve/main/f1.bin" for p, _ in hub.requests) == 3
    n = len(hub.requests)
    download("o/r", list(blobs), dest)  # complete files are not fetched again
    assert len(hub.requests) == n


def test_download_complete_tmp_and_range_ignored(hub, tmp_path):
    data = random.Random(5).randbytes(50_000)
    serve(hub, "o/r", "a.bin", data)
    serve(hub, "o/r", "b.bin", data[::-1])
    (tmp_path / "a.bin.tmp").write_bytes(data)  # finished but never renamed: the server answers 416
    (tmp_path / "b.bin.tmp").write_bytes(b"stale partial bytes")
    hub.ignore_range = True  # b: a server without Range support sends everything again
    download("o/r", ["a.bin"], tmp_path)
    download("o/r", ["b.bin"], tmp_path)
    assert (tmp_path / "a.bin").read_bytes() == data and (tmp_path / "b.bin").read_bytes() == data[::-1]


def test_download_errors(hub, tmp_path):
    with pytest.raises(LabError, match="HTTP 404.*check the corpus name, --shards and HF_ENDPOINT"):
        download("o/r", ["missing.parquet"], tmp_path)
    serve(hub, "o/r", "down.bin", b"x" * 10)
    hub.fail_next["/datasets/o/r/resolve/main/down.bin"] = 10
    with pytest.raises(LabError, match="down.bin failed 3 times .*HTTP Error 503.*HF_ENDPOINT"):
        download("o/r", ["down.bin"], tmp_path, retries=2, backoff=0.01)


def test_prepare_climbmix_from_local_hub(hub, tmp_path):
    rng = random.Random(42)
    shards = [[random_text(rng, rng.randint(5, 300)) for _ in range(120)] for _ in range(3)]
    shards[1][7] = shards[0][3]  # a duplicate across shards
    repo = HUB_CORPORA["climbmix"].repo
    for i, texts in enumerate(shards):
        serve(hub, repo, f"shard_{i:05d}.parquet", parquet_bytes(texts, tmp_path, f"{i}.parquet"))
    out = prepare("climbmix", shards=2, vocab_size=500, val_frac=0.1, test_frac=0.05)
    assert out == tmp_path / "home" / "data" / "climbmix-v500"
    local = tmp_path / "home" / "hub" / repo
    assert sorted(p.name for p in local.iterdir()) == ["shard_00000.parquet", "shard_00001.parquet"]
    assert (local / "shard_00001.parquet").read_bytes() == hub.files[f"/datasets/{repo}/resolve/main/shard_00001.parquet"]
    d = DataDir.open(out)
    assert sum(d.num_documents(s) for s in SPLITS) == 239 and d.manifest["stats"]["duplicates"] == 1
    assert sum(d.manifest["splits"][s]["bytes"] for s in SPLITS) == \
        sum(len(t.encode()) for t in set(shards[0] + shards[1]))
    n = len(hub.requests)
    assert prepare("climbmix", shards=2, vocab_size=500, val_frac=0.1, test_frac=0.05) == out
    assert len(hub.requests) == n  # cached: no network at all


def test_prepare_tinystories_from_local_hub(hub, tmp_path):
    rng = random.Random(8)
    stories = [random_text(rng, rng.randint(20, 200)) for _ in range(150)]
    corpus = HUB_CORPORA["tinystories"]
    serve(hub, corpus.repo, corpus.files[0], "\n<|endoftext|>\n".join(stories[:120]).encode())
    serve(hub, corpus.repo, corpus.files[1], "\n<|endoftext|>\n".join(stories[120:]).encode())
    d = DataDir.open(prepare("tinystories", out=tmp_path / "ts", vocab_size=400, val_frac=0.1, test_frac=0.05))
    assert sum(d.num_documents(s) for s in SPLITS) == len(set(stories))


def test_hub_bad_shard_count(hub):
    with pytest.raises(LabError, match="--shards 20 is out of range for fineweb-edu: it has 14 files"):
        prepare("fineweb-edu", shards=20)
    with pytest.raises(LabError, match="--glob applies to local folders"):
        prepare("climbmix", glob="*.parquet")
