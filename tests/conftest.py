"""Shared fixtures: a seeded multilingual text corpus and one data directory prepared from it."""
import importlib.util
import random
import struct
import sysconfig
import zlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# ASCII words, accented Latin, CJK, Hangul, emoji (incl. ZWJ sequences) and symbols, plus a seeded lexicon
# of made-up words: BPE learns tokens inside multi-byte characters from this, which the tokenizer tests need.
_BASE = ("the data loader packs every document into rows and the model reads them def return import "
         "naïve café Größe façade 東京 数据 加载器 模型 训练 こんにちは 世界 세계 한국어 🙂 🚀 👩‍💻 🇫🇷 ∑ λ → "
         "x = 3.14159 0x1F 2024 print(x) {'a': [1, 2]}").split()
_rng = random.Random(99)
_SYLLABLES = [c + v for c in "bcdfghklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ä", "é", "ou")]
WORDS = tuple(_BASE) + tuple("".join(_rng.choices(_SYLLABLES, k=_rng.randint(1, 4))) for _ in range(400)) + \
    tuple("".join(chr(_rng.randint(0x4E00, 0x4FFF)) for _ in range(_rng.randint(1, 3))) for _ in range(150)) + \
    tuple(chr(_rng.randint(0x1F600, 0x1F64F)) + chr(_rng.randint(0x1F680, 0x1F6C5)) for _ in range(40))


def bench_script(name: str):
    """bench/NAME.py imported as a module (bench/ is scripts, not a package), for tests of its functions."""
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_text(rng: random.Random, n_words: int) -> str:
    # Zipf-like word choice so there are frequent pairs to merge
    words = [WORDS[min(int(rng.paretovariate(0.6)) - 1, len(WORDS) - 1)] if rng.random() < 0.5 else rng.choice(WORDS)
             for _ in range(n_words)]
    return "".join(w + ("\n" if rng.random() < 0.1 else " ") for w in words).strip()


@pytest.fixture(autouse=True)
def _restore_tf32():
    """compute_init turns TF32 on for CUDA training; a test that trains must not leave it on for the next
    test in the same worker, whose float32 reference tolerances assume full float32 matmuls (a 2026-12-04
    H200 suite failed a float32 loss-kernel test at 4e-3 after a training test on its worker)."""
    import torch
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A folder of 240 documents (.txt/.md/.py, 5 to 800 words) plus two exact duplicates and an
    empty file; returns (folder, {relative name: text})."""
    rng = random.Random(1234)
    root = tmp_path_factory.mktemp("corpus")
    docs = {}
    for i in range(240):
        name = f"{['notes', 'docs/sub', 'code'][i % 3]}/doc{i:03d}{['.txt', '.md', '.py'][i % 3]}"
        docs[name] = random_text(rng, rng.randint(5, 800))
    docs["dup_a.txt"] = docs["dup_b.txt"] = docs["notes/doc000.txt"]
    for name, text in docs.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    (root / "empty.txt").write_text("   \n")
    return root, docs


@pytest.fixture(scope="session")
def data_dir(corpus, tmp_path_factory):
    from llmlabs.data.prepare import prepare
    root, _ = corpus
    return prepare(str(root), out=tmp_path_factory.mktemp("data") / "corpus", vocab_size=600,
                   val_frac=0.15, test_frac=0.1, workers=2)


def png_with_size(path, width, height):
    """A PNG whose header claims width x height (a decompression bomb needs no more than that)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))


def stdlib_folder(tmp_root: Path, files: int) -> Path:
    """A folder holding copies of the first `files` .py files of this Python's standard library."""
    src = tmp_root / "src"
    src.mkdir(parents=True)
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:files]:
        (src / f.name).write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
    return src


def prepared_stdlib(tmp_root: Path, files: int, vocab_size: int, val_frac: float, test_frac: float) -> Path:
    """A data directory prepared from the first `files` .py files of this Python's standard library
    (real source, no download): the autoresearch tests' corpus."""
    from llmlabs.data.prepare import prepare

    src = stdlib_folder(tmp_root, files)
    return prepare(str(src), out=tmp_root / "data", vocab_size=vocab_size, val_frac=val_frac, test_frac=test_frac)


def prepared_shapes(tmp_root: Path, val_frac: float, text: str | None = None) -> Path:
    """A small `shapes` caption directory: 200 images of 16 px, vocab 300, no test split; with
    `text`, a text source nested at text/ (`prepare --text`)."""
    from llmlabs.data import captions
    from llmlabs.data.prepare import prepare

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(captions, "SHAPES_IMAGES", 200)
        return prepare("shapes", tmp_root / "shapes", 300, image_size=16, val_frac=val_frac, test_frac=0.0, text=text)


def sigint_after(steps: int):
    """A train.train_step that sends this process a real SIGINT after its `steps`-th call, as Ctrl-C
    would: patch it over train.train_step to interrupt a run mid-way."""
    import os
    import signal

    from llmlabs import train

    real_step, calls = train.train_step, []

    def step(*a, **k):
        out = real_step(*a, **k)
        calls.append(1)
        if len(calls) == steps:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    return step
