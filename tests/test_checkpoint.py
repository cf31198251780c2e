"""Checkpoint safety without a training run: the run directory's lock and unique temp names."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmlabs import checkpoint
from llmlabs.common import LabError

REPO = Path(__file__).resolve().parents[1]
HOLD = "import sys; from llmlabs import checkpoint; held = checkpoint.lock_run(sys.argv[1]); print('locked', flush=True); sys.stdin.read()"


def tiny_model():
    from llmlabs.config import config_for_depth
    from llmlabs.model import build_model

    return build_model(config_for_depth(1, vocab_size=64, sequence_len=16, aspect_ratio=16, head_dim=16,
                                        window_pattern="L"), "cpu")


def hold_lock(run_dir):
    """A second process that takes the run directory's lock and keeps it until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_locked_run_dir_is_refused_with_the_holders_pid(tmp_path):
    proc = hold_lock(tmp_path / "run")
    try:
        with pytest.raises(LabError, match=rf"locked by process {proc.pid}.*--run-dir") as e:
            checkpoint.lock_run(tmp_path / "run")
        assert "\n" not in str(e.value)
    finally:
        proc.kill()
        proc.wait()
    checkpoint.lock_run(tmp_path / "run").close()  # the kernel released the dead holder's lock


def test_temp_names_differ_between_processes_and_stale_temps_do_not_break_a_save(tmp_path, monkeypatch):
    ckdir = tmp_path / "run" / "checkpoints"
    names = set()
    for pid in (1111, 2222, 2222):
        monkeypatch.setattr(os, "getpid", lambda: pid)
        names.add(checkpoint._temp_dir(ckdir, 7).name)
    monkeypatch.undo()
    assert len(names) == 3 and all(n.startswith(".step_000007.") and n.endswith(".tmp") for n in names)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [ckdir / f".step_000007.{dead.pid}.deadbeef.tmp", ckdir / ".step_000007.tmp"]  # a killed save; the old name
    for d in stale:
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"\x00" * 10)
    model = tiny_model()
    path = checkpoint.save(tmp_path / "run", 7, model, torch.optim.SGD(model.parameters(), lr=0.1), {})
    assert checkpoint.load(path)["step"] == 7
    assert not any(d.exists() for d in stale)
    assert [p.name for p in ckdir.iterdir() if p.name.startswith(".step_")] == []


def test_pruning_keeps_the_newest_by_step_number(tmp_path):
    """step_1000000 sorts before step_999999 as a string; the checkpoints kept are the newest by number."""
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in (999998, 999999, 1000000):
        checkpoint.save(tmp_path / "run", step, model, opt, {})
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert kept == ["step_1000000", "step_999999"]
