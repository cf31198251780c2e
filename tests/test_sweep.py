"""llmlabs sweep: the spec's checks, preregistration, a sweep interrupted and resumed, and the
scaling-law fit on data whose parameters are known."""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from llmlabs import cli, scaling_fit, sweep
from llmlabs.common import LabError

REPO = Path(__file__).resolve().parents[1]

# Chinchilla's fit (Hoffmann et al., arXiv 2203.15556, eq. 10)
TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
TINY = ("--aspect-ratio 32 --head-dim 16 --seq-len 64 --device-batch-size 4 --total-batch-size 256 "
        "--eval-tokens 256 --device cpu")


def spec_text(sweep=None, grid=None, drop=()):
    """A spec's TOML (JSON values are TOML values for the strings, numbers and lists used here)."""
    sw = {"name": "t", "hypotheses": ["loss falls with D"], "success": "every cell below unigram", **(sweep or {})}
    grid = {"depth": [1], "tokens": [512.0, 1024.0]} if grid is None else grid
    return "\n".join(["[sweep]", *[f"{k} = {json.dumps(v)}" for k, v in sw.items() if k not in drop],
                      "[grid]", *[f"{k} = {json.dumps(v)}" for k, v in grid.items()]]) + "\n"


def write(tmp_path, text, name="spec.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def synthetic(seed, noise=0.005):
    """30 runs on a 6 x 5 grid of N and D from the law, with lognormal noise of `noise` (0.5%)."""
    N, D = (x.ravel() for x in np.meshgrid(np.geomspace(1e7, 1e9, 6), np.geomspace(3e8, 3e10, 5)))
    return N, D, scaling_fit.law(N, D, TRUE) * np.exp(np.random.default_rng(seed).normal(0, noise, N.size))


def test_fit_recovers_known_parameters_and_the_bootstrap_covers_them():
    """A draw of 30 noisy runs: the fit lands near the truth and each 5-95% interval (and that of
    D_opt/N_opt at 1e21 FLOPs) holds the true value. A 90% interval misses now and then, so this checks
    recovery on one draw, not the coverage rate: over 40 draws (bench/results/sweep_fit_coverage.md)
    each parameter's interval held the truth in 90-98% of them, all five at once in 85%."""
    N, D, L = synthetic(seed=1)
    p = scaling_fit.fit(N, D, L)
    assert abs(p["E"] / TRUE["E"] - 1) < 0.05 and abs(p["alpha"] - TRUE["alpha"]) < 0.03 \
        and abs(p["beta"] - TRUE["beta"]) < 0.03
    assert abs(np.log(p["A"] / TRUE["A"])) < 0.3 and abs(np.log(p["B"] / TRUE["B"])) < 0.3
    intervals = scaling_fit.bootstrap(N, D, L, samples=40, budgets=[1e21])
    for k in scaling_fit.PARAMS:
        assert intervals[k][0] <= TRUE[k] <= intervals[k][1], (k, intervals[k], TRUE[k])
    ratio = scaling_fit.compute_optimal(TRUE, 1e21)[2]
    assert intervals["ratio@1e+21"][0] <= ratio <= intervals["ratio@1e+21"][1]


def test_warnings_name_a_floor_the_cells_do_not_determine():
    # the point fit's E, or only its interval, near 0 (a CPU sweep had E 1.05 with a 5-95% interval
    # from 2e-13): each is said; a determined floor is not
    L = np.array([1.5, 2.0, 3.0])
    p = dict(TRUE, E=1.05)
    said = lambda p, e: " ".join(scaling_fit.warnings(p, L, {"E": e}, budgets=()))
    assert said(p, (0.9, 1.2)) == ""
    assert "E's 5-95% interval reaches ~0 (2e-13 .. 1.38)" in said(p, (2e-13, 1.38))
    assert "E fitted ~0" in said(dict(p, E=1e-9), (2e-13, 1.38)) and "interval" not in said(dict(p, E=1e-9), (2e-13, 1.38))


def test_compute_optimal_is_the_minimum_of_the_law_at_fixed_compute():
    C = 1e21
    n_opt, d_opt, ratio = scaling_fit.compute_optimal(TRUE, C)
    assert np.isclose(6 * n_opt * d_opt, C) and np.isclose(ratio, d_opt / n_opt)
    grid = np.geomspace(n_opt / 10, n_opt * 10, 2001)
    assert np.isclose(grid[np.argmin(scaling_fit.law(grid, C / (6 * grid), TRUE))], n_opt, rtol=0.01)


def test_cells_are_train_runs_named_by_their_grid_values(tmp_path):
    s = sweep.load_spec(write(tmp_path, spec_text({"seeds": [0, 3], "train_args": ["--data", "x"]},
                                                  {"depth": [1, 2], "tokens": [1e6], "no_compile": [True]})))
    assert [c.name for c in s.cells] == ["d1_tok1e06_no-compile_s0", "d1_tok1e06_no-compile_s3",
                                         "d2_tok1e06_no-compile_s0", "d2_tok1e06_no-compile_s3"]
    assert s.cells[1].argv == ["--data", "x", "--depth", "1", "--tokens", "1000000.0", "--no-compile", "--seed", "3"]


BAD_SPECS = [
    (spec_text(grid={"depht": [1, 2]}), r"\[grid\] depht: not a flag of `llmlabs train`"),
    (spec_text(grid={}), r"no \[grid\], or an empty one"),
    (spec_text(grid={"tokens": []}), r"\[grid\] tokens must be a non-empty list"),
    (spec_text(drop=("hypotheses",)), r"hypotheses must be a non-empty list"),
    (spec_text({"hypotheses": [""]}), r"hypotheses must be a non-empty list"),
    (spec_text(drop=("success",)), r"success must say, before any run"),
    (spec_text({"name": "a/b"}), r"name must be a non-empty string"),
    (spec_text({"seeds": [0, 0]}), r"seeds must be a non-empty list of distinct integers"),
    (spec_text({"colour": "red"}), r"\[sweep\] has unknown key\(s\) colour"),
    (spec_text({"train_args": "--seed 3"}), r"train_args may not set --seed"),
    (spec_text({"train_args": "--run-dir x"}), r"train_args may not set --run-dir"),
    (spec_text({"train_args": "--depth 2"}), r"\[grid\] depth is also set in train_args"),
    (spec_text({"train_args": "--tok 5"}), r"cell d1_tok512_s0: unrecognized arguments: --tok 5"),
    (spec_text(grid={"depth": [0]}), r"cell d0_s0: argument --depth: '0' is not a depth"),
    (spec_text(grid={"tokens": ["many"]}), r"argument --tokens: 'many' is not a number"),
    (spec_text(grid={"no_compile": [1]}), r"no_compile: true/false only"),
    (spec_text(grid={"tokens": [1.0, 1.0]}), r"tokens repeats a value"),
    ("[sweep\nname = 1", r"is not valid TOML"),
    (spec_text() + "[extra]\n", r"unknown table\(s\) extra"),
]


@pytest.mark.parametrize("text,said", BAD_SPECS, ids=[s for _, s in BAD_SPECS])
def test_a_bad_spec_is_one_error_line(tmp_path, text, said):
    with pytest.raises(LabError) as e:
        sweep.load_spec(write(tmp_path, text))
    assert re.search(said, str(e.value)) and "\n" not in str(e.value), str(e.value)


def test_a_changed_spec_is_refused_on_its_sweep_dir(tmp_path, capsys):
    """Preregistration: once a sweep directory exists, run and fit accept only the spec it started with."""
    path = write(tmp_path, spec_text())
    sweep.open_sweep(sweep.load_spec(path), tmp_path / "sw")
    path.write_text(spec_text({"success": "whatever came out"}))
    for cmd in ("run", "fit"):
        capsys.readouterr()
        assert cli.main(["sweep", cmd, str(path), "--dir", str(tmp_path / "sw")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is not the spec" in err[0] and "new spec with another [sweep] name" in err[0]
    path.write_text(spec_text())  # the original again: accepted
    assert sweep.open_sweep(sweep.load_spec(path), tmp_path / "sw") == tmp_path / "sw"


def test_sweep_fit_writes_table_and_plots_next_to_the_spec(tmp_path, capsys):
    """The fit command on 12 cells of an isoFLOP grid (depth x target_flops, D = C / 6N) whose losses
    are the law's; the run directories are faked: summary.json and the point cache a finished cell has."""
    path = write(tmp_path, spec_text(grid={"depth": [1, 2, 3, 4], "target_flops": [1e19, 1e20, 1e21]}))
    s = sweep.load_spec(path)
    sweep_dir = sweep.open_sweep(s, tmp_path / "sw")
    for cell in s.cells:
        n = 4e7 * 3 ** cell.values["depth"]
        d = cell.values["target_flops"] / (6 * n)
        cell_dir = sweep_dir / "cells" / cell.name
        cell_dir.mkdir()
        loss = float(scaling_fit.law(n, d, TRUE))
        (cell_dir / "summary.json").write_text(json.dumps({"val_bpb": loss}))
        (cell_dir / "point.json").write_text(json.dumps({"N": n, "D": d, "loss": loss}))
    assert cli.main(["sweep", "fit", str(path), "--dir", str(sweep_dir), "--bootstrap", "5"]) == 0
    out = capsys.readouterr().out
    assert "D_opt/N_opt" in out and "warning" not in out
    res = json.loads((tmp_path / "spec-fit.json").read_text())
    for k in scaling_fit.PARAMS:
        assert np.isclose(res["params"][k], TRUE[k], rtol=0.02), (k, res["params"][k])
    table = (tmp_path / "spec-fit.md").read_text()
    assert "loss falls with D" in table and "| d4_flops1e21_s0 |" in table and "D_opt/N_opt" in table
    assert "data: no cell records a data_id (run before 2026-12-05)." in table
    assert (tmp_path / "spec-curves.png").stat().st_size > 1000 and (tmp_path / "spec-predicted.png").exists()


def test_fit_needs_enough_finished_cells(tmp_path, capsys):
    path = write(tmp_path, spec_text())
    sweep.open_sweep(sweep.load_spec(path), tmp_path / "sw")
    assert cli.main(["sweep", "fit", str(path), "--dir", str(tmp_path / "sw")]) == 2
    assert "0 of 2 cells are done; the fit needs at least 6" in capsys.readouterr().err


def test_a_half_done_sweep_resumes(tmp_path, capsys):
    """Three real cells. The first run starts two (--max-cells), side by side (--gpus); the second then loses its
    summary.json, as if killed in its final evaluation. The second run skips the first cell, resumes the
    second from its checkpoint (`train --resume`) and runs the third. It goes through submitit's local
    executor where submitit is installed (the test extra has it), so the SLURM path runs real cells too."""
    from conftest import prepared_stdlib

    data = prepared_stdlib(tmp_path / "corpus", 20, 300, 0.2, 0.2)
    path = write(tmp_path, spec_text({"train_args": f"--data {data} --depth 1 {TINY}"},
                                     {"tokens": [256.0, 512.0, 768.0]}))
    cells = tmp_path / "sw" / "cells"
    first, second, third = (cells / f"tok{n}_s0" for n in (256, 512, 768))
    # --gpus on a CPU machine: the cells still run on the CPU (--device cpu), two at a time, one per slot
    assert cli.main(["sweep", "run", str(path), "--dir", str(tmp_path / "sw"), "--max-cells", "2", "--gpus", "0,1"]) == 0
    out = capsys.readouterr().out
    assert "0 done, 3 to run, at most 2 now" in out and "tok256_s0 on GPU 0" in out and "tok512_s0 on GPU 1" in out
    assert (first / "summary.json").exists() and (second / "summary.json").exists() and not third.exists()
    stamp = (first / "summary.json").stat().st_mtime_ns
    second_bpb = json.loads((second / "summary.json").read_text())["val_bpb"]
    (second / "summary.json").unlink()
    slurm = ["--slurm", "--cluster", "local"] if _has_submitit() else []
    assert cli.main(["sweep", "run", str(path), "--dir", str(tmp_path / "sw"), *slurm]) == 0
    out = capsys.readouterr().out
    assert "1 done, 2 to run" in out and "3 of 3 cells done" in out
    assert (first / "summary.json").stat().st_mtime_ns == stamp
    assert (first / "train.log").read_text().count("== ") == 1
    log = (second / "train.log").read_text()
    assert log.count("== ") == 2 and "train --resume" in log and "resumed" in log
    assert json.loads((second / "summary.json").read_text())["val_bpb"] == second_bpb
    assert (third / "summary.json").exists() and (third / "train.log").read_text().count("== ") == 1


def test_a_cell_another_runner_holds_is_left_to_it(tmp_path, capsys):
    """Runners on one sweep directory share it as a queue: a claimed cell is skipped, not run twice."""
    path = write(tmp_path, spec_text())
    s = sweep.load_spec(path)
    cells = sweep.open_sweep(s, tmp_path / "sw") / "cells"
    (cells / "d1_tok512_s0").mkdir()
    (cells / "d1_tok512_s0" / "summary.json").write_text("{}")
    (cells / "d1_tok1024_s0").mkdir()
    held = sweep._claim(cells / "d1_tok1024_s0")  # as another runner would hold it
    assert cli.main(["sweep", "run", str(path), "--dir", str(tmp_path / "sw")]) == 0
    out = capsys.readouterr().out
    assert "skip    d1_tok1024_s0: another runner has it" in out and "1 of 2 cells done" in out
    assert not (cells / "d1_tok1024_s0" / "train.log").exists()
    held.close()


def test_cells_runs_only_the_named_cells_and_refuses_unknown_names(tmp_path, capsys):
    """--cells: one machine runs its share of a sweep by name (one real, tiny cell here); a name the
    spec does not make is one error line listing the names it does."""
    from conftest import prepared_stdlib

    data = prepared_stdlib(tmp_path / "corpus", 20, 300, 0.2, 0.2)
    path = write(tmp_path, spec_text({"train_args": f"--data {data} --depth 1 {TINY}", "seeds": [0, 1]},
                                     {"tokens": [256.0, 512.0]}))
    cells = tmp_path / "sw" / "cells"
    assert cli.main(["sweep", "run", str(path), "--dir", str(tmp_path / "sw"), "--cells", "tok512_s1"]) == 0
    out = capsys.readouterr().out
    assert "1 cells (chosen by --cells of the spec's 4" in out and "1 of 1 cells done (1 of the sweep's 4)" in out
    assert [p.name for p in cells.iterdir() if (p / "summary.json").exists()] == ["tok512_s1"]
    assert json.loads((cells / "tok512_s1" / "config.json").read_text())["seed"] == 1
    assert cli.main(["sweep", "run", str(path), "--dir", str(tmp_path / "sw"), "--cells", "tok512_s1,tok9_s0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--cells: tok9_s0 not in" in err[0] and "tok256_s0, tok256_s1, tok512_s0, tok512_s1" in err[0]


def test_table_gives_each_points_seeds_and_the_paired_differences(tmp_path, capsys):
    """Two arms x 3 seeds with known val_bpb, one cell unfinished: means and sample standard deviations
    against the statistics module, differences paired by seed (the unfinished seed left out)."""
    import statistics as st

    path = write(tmp_path, spec_text({"seeds": [0, 1, 2]}, {"fp8": ["none", "tensorwise"]}))
    s = sweep.load_spec(path)
    sweep_dir = sweep.open_sweep(s, tmp_path / "sw")
    bpb = {"fp8none_s0": 1.0406, "fp8none_s1": 0.8042, "fp8none_s2": 0.7961, "fp8tensorwise_s0": 1.0405,
           "fp8tensorwise_s1": 0.8030}  # fp8tensorwise_s2 not done
    for name, v in bpb.items():
        (sweep_dir / "cells" / name).mkdir()
        (sweep_dir / "cells" / name / "summary.json").write_text(json.dumps(
            {"val_bpb": v, "total_tokens_M": 33.55, "tok_per_sec": 123456.7, "training_seconds": 47.5}))
    assert cli.main(["sweep", "table", str(path), "--dir", str(sweep_dir)]) == 0
    table = (tmp_path / "spec-table.md").read_text()
    assert table in capsys.readouterr().out and "5 of 6 cells done" in table and "loss falls with D" in table
    assert "data: no cell records a data_id (run before 2026-12-05)" in table
    assert "| fp8tensorwise_s2 | not done |" in table and "| fp8none_s1 | 0.8042 | 33.55 | 123,457 | 47.5 |" in table
    base = [1.0406, 0.8042, 0.7961]
    assert f"| fp8 none | 3 of 3 | {st.mean(base):.4f} | {st.stdev(base):.4f} | 0.7961 | 1.0406 |" in table
    assert f"| fp8 tensorwise | 2 of 3 | {st.mean([1.0405, 0.8030]):.4f} | {st.stdev([1.0405, 0.8030]):.4f} |" in table
    d = [1.0405 - 1.0406, 0.8030 - 0.8042]
    assert f"| fp8 tensorwise | 2 | -0.0001 / -0.0012 | {st.mean(d):+.4f} | {st.stdev(d):.4f} |" in table
    empty = write(tmp_path, spec_text({"name": "u"}), "empty.toml")
    sweep.open_sweep(sweep.load_spec(empty), tmp_path / "sw2")
    assert cli.main(["sweep", "table", str(empty), "--dir", str(tmp_path / "sw2")]) == 2
    assert "none of the 2 cells in" in capsys.readouterr().err


def test_the_device_cells_script_refuses_another_corpus_and_records_its_own(tmp_path):
    """bench/sweep_cells.sh, which runs a sweep's cells on a lent GPU machine: it prepares pysrc (here a
    small stand-in, cached under LLMLABS_HOME with the settings `prepare pysrc` checks), records its
    data_id and tokenizer, refuses to run any cell when DATA_ID or TOKENIZER names another corpus or
    DEVICE another card, else runs the cell and packs its records, whose summary holds that data_id."""
    from conftest import prepared_stdlib
    from llmlabs.data import prepare
    from llmlabs.data.shards import DataDir
    from llmlabs.data.sources import resolve_source

    pysrc = tmp_path / "home" / "data" / "pysrc-v8192"
    shutil.copytree(prepared_stdlib(tmp_path / "corpus", 20, 300, 0.2, 0.2), pysrc)
    manifest = json.loads((pysrc / "manifest.json").read_text())
    manifest["settings"] = {**resolve_source("pysrc").settings, "vocab_size": 8192, "val_frac": prepare.VAL_FRAC,
                            "test_frac": prepare.TEST_FRAC, "tokenizer_chars": prepare.TOKENIZER_CHARS}
    (pysrc / "manifest.json").write_text(json.dumps(manifest))
    data_id, tok = DataDir.open(pysrc).data_id, DataDir.open(pysrc).tokenizer.hash
    spec = write(tmp_path, spec_text({"train_args": f"--data pysrc --depth 1 {TINY}"}, {"tokens": [256.0]}))
    env = {**os.environ, "LLMLABS_HOME": str(tmp_path / "home"), "SWEEP_DIR": str(tmp_path / "sw"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # python3: this interpreter

    def script(out, **want):
        out.mkdir()
        return subprocess.run(["bash", str(REPO / "bench" / "sweep_cells.sh"), str(spec), "tok256_s0", str(out)],
                              cwd=REPO, env={**env, **want}, capture_output=True, text=True, timeout=600)

    other = "0" * 16 if not data_id.startswith("0") else "1" * 16
    for i, want in enumerate(({"DATA_ID": other}, {"DATA_ID": data_id, "TOKENIZER": other[:12]})):
        r = script(tmp_path / f"o{i}", **want)
        assert r.returncode == 1, r.stdout + r.stderr
        assert f"refused: pysrc here is data_id {data_id}, tokenizer {tok[:12]}, not the sweep's " in r.stdout
        assert not (tmp_path / "sw").exists() and not (tmp_path / f"o{i}" / "cells.tgz").exists()
    # the script names the card as torch does (the test ran on an H100 too, 2026-12-06, where "cpu" was wrong)
    here = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    r = script(tmp_path / "o2", DEVICE="B300")  # another card: refused before pysrc is even prepared
    assert r.returncode == 1 and f"refused: this machine's device is {here}, not the sweep's B300" in r.stdout, r.stdout
    assert "prepared" not in (tmp_path / "o2" / "run.log").read_text() and not (tmp_path / "sw").exists()
    r = script(tmp_path / "ok", DATA_ID=data_id, TOKENIZER=tok[:12], DEVICE=here)
    assert r.returncode == 0 and "tok256_s0: val_bpb" in r.stdout, r.stdout + r.stderr
    log = (tmp_path / "ok" / "run.log").read_text()
    assert "already prepared" in log and f"data_id {data_id} tokenizer {tok}\n" in log and f"| {here} | torch " in log
    with tarfile.open(tmp_path / "ok" / "cells.tgz") as t:
        assert json.load(t.extractfile("cells/tok256_s0/summary.json"))["data_id"] == data_id


def _tokenizer(extra: bytes):
    """A valid tokenizer: the 256 byte tokens, one merge `extra` and the special block."""
    from llmlabs.data.tokenizer import SPECIAL_NAMES, SPLIT_PATTERN, Tokenizer

    ranks = [bytes([b]) for b in range(256)] + [extra]
    return Tokenizer(SPLIT_PATTERN, ranks, {n: len(ranks) + i for i, n in enumerate(SPECIAL_NAMES)})


def test_table_and_fit_refuse_cells_that_read_different_data(tmp_path, capsys):
    """Cells of one sweep run on two machines can read two corpora (pysrc follows the installed packages):
    `table` and `fit` refuse to pool them, by the tokenizer each run directory holds and by the summary's
    data_id, and name the groups (in the spec's cell order) in one line; one corpus is named in the header."""
    path = write(tmp_path, spec_text({"seeds": [0, 1]}, {"fp8": ["none", "tensorwise"]}))
    s = sweep.load_spec(path)
    sweep_dir = sweep.open_sweep(s, tmp_path / "sw")
    tok_a, tok_b = _tokenizer(b"ab"), _tokenizer(b"cd")
    assert tok_a.hash != tok_b.hash

    def cell(name, tok, data_id=None):
        d = sweep_dir / "cells" / name
        d.mkdir(exist_ok=True)
        tok.save(d / "tokenizer.json")
        (d / "summary.json").write_text(json.dumps({"val_bpb": 1.0, **({"data_id": data_id} if data_id else {})}))

    cell("fp8none_s0", tok_a)  # run before summaries recorded a data_id: its tokenizer still speaks
    cell("fp8tensorwise_s0", tok_a, "0123456789abcdef")
    assert cli.main(["sweep", "table", str(path), "--dir", str(sweep_dir)]) == 0
    assert (f"data: tokenizer {tok_a.hash[:12]} in 2 of 2 cells; data_id 0123456789abcdef in the 1 that record one"
            in (tmp_path / "spec-table.md").read_text())
    for bad, said in ((("fp8none_s1", tok_b, None), f"tokenizer {tok_a.hash[:12]}: fp8none_s0, fp8tensorwise_s0; "
                                                    f"tokenizer {tok_b.hash[:12]}: fp8none_s1"),
                      (("fp8none_s1", tok_a, "fedcba9876543210"), "data_id fedcba9876543210: fp8none_s1; "
                                                                  "data_id 0123456789abcdef: fp8tensorwise_s0")):
        cell(*bad)
        for cmd in ("table", "fit"):
            capsys.readouterr()
            assert cli.main(["sweep", cmd, str(path), "--dir", str(sweep_dir)]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "its cells read different data (" + said + ")" in err[0], err
            assert "rerun the odd cells on the sweep's data" in err[0]


def test_table_refuses_cells_of_two_devices_under_a_time_budget_only(tmp_path, capsys):
    """Equal time on an H100 and on an H200 is not equal compute: `table` refuses to pool time-budgeted
    cells of two devices, naming the groups; token-budgeted cells (the same tokens anywhere) may mix
    devices, and the header names each device with its count."""
    path = write(tmp_path, spec_text({"seeds": [0, 1]}, {"fp8": ["none", "tensorwise"]}))
    s = sweep.load_spec(path)
    sweep_dir = sweep.open_sweep(s, tmp_path / "sw")
    tok = _tokenizer(b"ab")

    def cells(budget, devices):
        for name, device in zip(("fp8none_s0", "fp8tensorwise_s0", "fp8none_s1"), devices):
            d = sweep_dir / "cells" / name
            d.mkdir(exist_ok=True)
            tok.save(d / "tokenizer.json")
            (d / "summary.json").write_text(json.dumps({"val_bpb": 1.0, "device": device}))
            (d / "config.json").write_text(json.dumps({"depth": 1, **budget}))

    def table():
        capsys.readouterr()
        rc = cli.main(["sweep", "table", str(path), "--dir", str(sweep_dir)])
        return rc, capsys.readouterr()

    cells({"time_budget": 300.0}, ["NVIDIA H200"] * 3)
    rc, _ = table()
    assert rc == 0 and ("device: NVIDIA H200 (3 of 3 cells) (under a time budget: one device)"
                        in (tmp_path / "spec-table.md").read_text())
    cells({"time_budget": 300.0}, ["NVIDIA H200", "NVIDIA H100 80GB HBM3", "NVIDIA H200"])
    rc, out = table()
    err = out.err.strip().splitlines()
    assert rc == 2 and len(err) == 1, out
    assert ("its cells trained on different devices (NVIDIA H200: fp8none_s0, fp8none_s1; NVIDIA H100 80GB HBM3: "
            "fp8tensorwise_s0) under a time budget (fp8none_s0, fp8none_s1, fp8tensorwise_s0)") in err[0]
    assert "DEVICE=" in err[0]
    cells({"tokens": 5e5}, ["NVIDIA H200", "NVIDIA H100 80GB HBM3", "NVIDIA H200"])
    rc, _ = table()
    assert rc == 0 and ("device: NVIDIA H200 (2 of 3 cells); NVIDIA H100 80GB HBM3 (1 of 3 cells)\n"
                        in (tmp_path / "spec-table.md").read_text())


def test_slurm_without_submitit_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit raises ImportError
    path = write(tmp_path, spec_text())
    assert cli.main(["sweep", "run", str(path), "--dir", str(tmp_path / "sw"), "--slurm"]) == 2
    assert "--slurm needs submitit: pip install 'llmlabs[sweep]'" in capsys.readouterr().err


def _has_submitit():
    try:
        import submitit  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("spec", sorted((REPO / "bench" / "specs").glob("*.toml")), ids=lambda p: p.name)
def test_the_benchmark_specs_load_and_every_cell_parses(spec, monkeypatch):
    # the preregistered specs the GPU sessions run (bench/specs/): a typo there would surface only on
    # a lent machine; every cell's flags must also make a model config (the GPU's checks lifted)
    from llmlabs import fp8, train

    monkeypatch.setattr(fp8, "unsupported", lambda device: None)

    s = sweep.load_spec(spec)
    assert s.cells and s.hypotheses and s.success
    p = argparse.ArgumentParser()
    train.add_args(p)
    for cell in s.cells:
        argv = list(cell.argv)
        if "--data" in argv:  # the corpus is prepared on the machine that runs the cell
            del argv[argv.index("--data"):argv.index("--data") + 2]
        args = p.parse_args(argv + ["--device", "cpu"])
        train._model_config(train.resolve_config(args, torch.device("cpu")), vocab_size=8192)
