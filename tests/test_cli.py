"""The `llmlabs` dispatcher: --version, --help without torch (instant), and a bad flag value is one
`error:` line with exit code 2, never a traceback (a flag's own check raises while argparse parses);
.ci/run runs the README's test command."""
import subprocess
import sys

from llmlabs import cli


def llmlabs(*args):
    return subprocess.run([sys.executable, "-m", "llmlabs", *args], capture_output=True, text=True, timeout=120)


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("llmlabs ")


def test_a_bad_depth_is_one_line():
    r = llmlabs("train", "--depth", "foo")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == ("llmlabs train: error: argument --depth: 'foo' is not a depth: use a "
                                                 "positive number or a preset name like d8")


def test_an_unknown_command_is_one_line(capsys):
    assert cli.main(["trian"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: unknown command 'trian'")


def test_help_imports_no_torch():
    code = "import sys; from llmlabs import cli; cli.main(['--help']); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "False" and "train" in r.stdout, r.stderr


def test_train_help_shows_the_presets(capsys):
    from llmlabs.train import CPU_PRESET, GPU_PRESET

    try:
        cli.main(["train", "--help"])
    except SystemExit as e:
        assert e.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the epilog
    assert f"CPU: --depth {CPU_PRESET['depth']}, " in out and f"GPU: --depth {GPU_PRESET['depth']}, " in out
    assert f"--tokens {CPU_PRESET['tokens']}" in out and "--time-budget 300" in out


def test_ci_runs_exactly_the_readmes_test_command():
    """README.md opens with two commands, the main job and the tests; .ci/run must run the second as
    written (CI is then what a user runs), and the first must be the plain `llmlabs train`."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    blocks = [line.strip() for line in (root / "README.md").read_text().split("## ")[0].splitlines()
              if line.startswith("    python3 -m venv .venv")]
    assert len(blocks) == 2, blocks
    assert blocks[0].endswith("&& .venv/bin/llmlabs train")
    assert blocks[1].startswith("python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 -e '.[test]'")
    ci = [line for line in (root / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == blocks[1]
