"""Every flag of every command, given a bad value, is one `error:` line and exit code 2, never a traceback.

The table is built from the parsers themselves: a flag added later without a bad-value case here
fails test_every_flag_has_a_bad_value_case. Typed flags are refused while argparse parses (flags.py);
free-text flags (paths, patterns, names) are checked when the command runs, each case below."""
import argparse
import importlib
import re

import pytest

from llmlabs import cli, flags
from llmlabs.evaluate import _tasks
from llmlabs.sweep import cell_list, gpu_list

# a value each checked type refuses
BAD = {int: "x1", float: "one", flags.positive_int: "0", flags.positive_float: "-1", flags.count: "-1",
       flags.nonnegative: "-0.5", flags.fraction: "1.5", flags.depth: "0",
       flags.layers: "1:x", _tasks: ",", gpu_list: "0,x", cell_list: ","}
# free-text flags whose every value is legal: what they take
FREE = {
    ("sample", "--prompt"): "any text",
    ("auto run", "--message"): "any text (the commit message)",
    ("auto loop", "--model"): "the agent API's model name: the API refuses an unknown one",
}


def options():
    """(command words, action) for every option that takes a value, and every positional."""
    def walk(words, parser):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub, sp in a.choices.items():
                    yield from walk([*words, sub], sp)
            elif not isinstance(a, argparse._HelpAction) and a.nargs != 0:
                yield words, a

    for name, (module, _) in cli.COMMANDS.items():
        p = argparse.ArgumentParser()
        importlib.import_module(module).add_args(p)
        yield from walk([name], p)


def name_of(a):
    return a.option_strings[-1] if a.option_strings else a.dest


PARSED = [(w, a) for w, a in options() if a.choices or a.type in BAD]


@pytest.mark.parametrize("words,action", PARSED, ids=[f"{' '.join(w)} {name_of(a)}" for w, a in PARSED])
def test_a_bad_typed_value_is_refused_while_parsing(words, action, capsys):
    bad = "nope" if action.choices else BAD[action.type]
    argv = [*words, *([action.option_strings[-1], bad] if action.option_strings else [bad])]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith(f"llmlabs {' '.join(words)}: error: argument {name_of(action)}")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """What the free-text cases need: a data directory, a trained run, a file where a directory is
    expected, and a git checkout of the lab with an autoresearch session (no runs)."""
    from conftest import prepared_stdlib
    from test_auto_sessions import copy_lab

    tmp = tmp_path_factory.mktemp("flags")
    data = prepared_stdlib(tmp, 20, 300, 0.2, 0.2)
    run = tmp / "run"
    assert cli.main(["train", "--data", str(data), "--run-dir", str(run), "--tokens", "1024", "--depth", "1",
                     "--aspect-ratio", "32", "--head-dim", "16", "--seq-len", "64", "--device-batch-size", "4",
                     "--total-batch-size", "256", "--eval-tokens", "256", "--device", "cpu", "--eval-split", "none"]) == 0
    (tmp / "file").write_text("not a directory")
    (tmp / "spec.toml").write_text('[sweep]\nname = "f"\nhypotheses = ["h"]\nsuccess = "s"\n[grid]\ndepth = [1]\n')
    repo = copy_lab(tmp / "lab")
    mp = pytest.MonkeyPatch()
    mp.setenv("LLMLABS_HOME", str(tmp / "home"))
    mp.chdir(repo)
    assert cli.main(["auto", "init", "--tag", "s", "--data", str(data), "--time-budget", "2",
                     "--train-args", "--depth 1 --device cpu"]) == 0
    yield {"data": str(data), "run": str(run), "file": str(tmp / "file"), "tmp": str(tmp)}
    mp.undo()


# (argv with {data} {run} {file} {tmp}, the flag it exercises, what the error says)
RUNTIME = [
    (["auto", "baseline", "--partition", "gpu"], ("auto baseline", "--partition"), "are for --slurm N: add it"),
    (["auto", "loop", "--agent", "true", "--partition", "gpu"], ("auto loop", "--partition"), "are for --slurm N"),
    (["auto", "confirm", "--partition", "gpu"], ("auto confirm", "--partition"), "are for --slurm N: add it"),
    (["auto", "promote", "--partition", "gpu"], ("auto promote", "--partition"), "are for --slurm N: add it"),
    (["auto", "baseline", "--gpus", "0", "--slurm", "1"], ("auto baseline", "--gpus"), "--gpus and --slurm both say"),
    (["prepare", "climbmx", "--out", "{tmp}/a"], ("prepare", "source"), "unknown source 'climbmx'"),
    (["prepare", "pystdlib", "--out", "{file}"], ("prepare", "--out"), r"--out .*file is a file: give a directory"),
    (["prepare", "pystdlib", "--out", "{file}/x"], ("prepare", "--out"), "cannot make that directory"),
    (["prepare", "pystdlib", "--glob", "nomatch*", "--out", "{tmp}/b"], ("prepare", "--glob"), "matching --glob"),
    (["prepare", "pystdlib", "--image-size", "32", "--out", "{tmp}/c"], ("prepare", "--image-size"),
     "--image-size applies to caption sources"),
    (["prepare", "pystdlib", "--files", "a.parquet", "--out", "{tmp}/e"], ("prepare", "--files"),
     "--files, --image-column and --caption-column apply to hub:OWNER/NAME"),
    (["prepare", "hub:o/n", "--files", "../a.parquet", "--out", "{tmp}/e"], ("prepare", "--files"),
     "--files '../a.parquet': give relative paths"),
    (["prepare", "shapes", "--image-column", "img", "--out", "{tmp}/e"], ("prepare", "--image-column"),
     "apply to hub:OWNER/NAME caption datasets, not to 'shapes'"),
    (["prepare", "{tmp}", "--caption-column", "text", "--out", "{tmp}/e"], ("prepare", "--caption-column"),
     "apply to hub:OWNER/NAME caption datasets"),
    (["prepare", "pystdlib", "--text", "pystdlib", "--out", "{tmp}/t"], ("prepare", "--text"),
     "--text mixes text documents into a caption source, and 'pystdlib' is text: drop --text"),
    (["prepare", "hub:o", "--files", "a.parquet", "--out", "{tmp}/e"], ("prepare", "source"),
     "'hub:o' is not a hub dataset: write hub:OWNER/NAME"),
    (["train", "--data", "{tmp}/none"], ("train", "--data"), "is not a data directory: it does not exist"),
    (["train", "--data", "{data}", "--vision", "tiny"], ("train", "--vision"), "holds text only: prepare them with"),
    (["train", "--data", "{data}", "--window-pattern", "SXL"], ("train", "--window-pattern"), "letters S and L"),
    (["train", "--data", "{data}", "--run-dir", "{file}"], ("train", "--run-dir"), "cannot make that directory"),
    (["train", "--data", "{data}", "--device", "tpu"], ("train", "--device"), "unknown device 'tpu'"),
    (["train", "--resume", "{tmp}/none"], ("train", "--resume"), "no config.json there"),
    (["train", "--data", "{data}", "--depth", "4", "--moe-experts", "4", "--moe-layers", "9:"], ("train", "--moe-layers"),
     "moe_layers='9:' names none of the 4 layers"),
    (["train", "--data", "{data}", "--eval-core-every", "1"], ("train", "--eval-core-every"),
     "no CORE bundle in .*: run `llmlabs prepare core`"),
    (["eval", "{tmp}/none"], ("eval", "run"), "has no checkpoint"),
    (["eval", "{run}", "--tasks", "core"], ("eval", "--tasks"), "no CORE bundle in .*: run `llmlabs prepare core`"),
    (["eval", "{run}", "--tasks", "hellaswag", "--include-path", "{tmp}/none"], ("eval", "--include-path"),
     "--include-path .*none is not a folder"),
    (["eval", "{run}", "--data", "{tmp}/none"], ("eval", "--data"), "is not a data directory"),
    (["eval", "{run}", "--device", "tpu"], ("eval", "--device"), "unknown device 'tpu'"),
    (["sample", "{tmp}/none"], ("sample", "run"), "has no checkpoint"),
    (["sample", "{run}", "--device", "tpu"], ("sample", "--device"), "unknown device 'tpu'"),
    (["sample", "{run}", "--image", "{tmp}/none.png"], ("sample", "--image"), "is a text run: drop --image"),
    (["sample", "{run}", "--prompts-file", "{tmp}/none"], ("sample", "--prompts-file"), "none: cannot read it"),
    (["sample", "{run}", "--prompts-file", "{tmp}"], ("sample", "--prompts-file"), "cannot read it \\(IsADirectoryError"),
    (["sweep", "run", "{tmp}/none.toml"], ("sweep run", "spec"), r"spec .*none.toml: cannot read it"),
    (["sweep", "run", "{tmp}/spec.toml", "--dir", "{file}"], ("sweep run", "--dir"), "cannot make that directory"),
    (["sweep", "run", "{tmp}/spec.toml", "--partition", "gpu"], ("sweep run", "--partition"), "--partition is for --slurm"),
    (["sweep", "fit", "{file}"], ("sweep fit", "spec"), r"spec .*file is not valid TOML"),
    (["sweep", "fit", "{tmp}/spec.toml", "--dir", "{tmp}/none"], ("sweep fit", "--dir"), r"none holds no sweep"),
    (["sweep", "table", "{tmp}/none.toml"], ("sweep table", "spec"), r"spec .*none.toml: cannot read it"),
    (["sweep", "table", "{tmp}/spec.toml", "--dir", "{tmp}/none"], ("sweep table", "--dir"), r"none holds no sweep"),
    (["auto", "init", "--tag", "a/b"], ("auto init", "--tag"), "cannot name a git branch"),
    (["auto", "init", "--tag", "t2", "--data", "{tmp}/none"], ("auto init", "--data"), r"none.*llmlabs prepare"),
    (["auto", "init", "--tag", "t3", "--data", "{data}", "--train-args", "--seed 3"], ("auto init", "--train-args"), "may not set --seed"),
    (["auto", "baseline", "--tag", "nope"], ("auto baseline", "--tag"), "no session 'nope'"),
    (["auto", "baseline", "--gpus", "x"], ("auto baseline", "--gpus"), "--gpus 'x': give GPU indices"),
    (["auto", "run", "--tag", "nope", "-m", "x"], ("auto run", "--tag"), "no session 'nope'"),
    (["auto", "loop", "--tag", "nope", "--agent", "true"], ("auto loop", "--tag"), "no session 'nope'"),
    (["auto", "loop", "--agent", ""], ("auto loop", "--agent"), "--agent is empty"),
    (["auto", "loop", "--agent", "true", "--agent-rw", "{tmp}/none"], ("auto loop", "--agent-rw"), "no such file"),
    (["auto", "loop", "--agent", "openai:http://127.0.0.1:9", "--model", "m", "--key-env", "sk-proj-abc"],
     ("auto loop", "--key-env"), "not a key: got 11 characters starting 'sk-'"),
    (["auto", "loop", "--agent", "true", "--gpus", "0,0"], ("auto loop", "--gpus"), "each GPU once"),
    (["auto", "confirm", "--tag", "nope"], ("auto confirm", "--tag"), "no session 'nope'"),
    (["auto", "confirm", "--gpus", "-1"], ("auto confirm", "--gpus"), "indices >= 0"),
    (["auto", "promote", "--tag", "nope"], ("auto promote", "--tag"), "no session 'nope'"),
    (["auto", "promote", "--gpus", "0,x"], ("auto promote", "--gpus"), "--gpus '0,x': give GPU indices"),
    (["auto", "promote", "--out", "{file}"], ("auto promote", "--out"), "cannot make that directory"),
    (["auto", "report", "--tag", "nope"], ("auto report", "--tag"), "no session 'nope'"),
    (["auto", "report", "--out", "{file}"], ("auto report", "--out"), "cannot make that directory"),
]


@pytest.mark.parametrize("argv,flag,said", RUNTIME, ids=[" ".join(f) for _, f, _ in RUNTIME])
def test_a_bad_free_text_value_is_one_error_line(world, argv, flag, said, capsys):
    capsys.readouterr()
    assert cli.main([a.format(**world) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and re.search(said, err[0]), err


def test_every_flag_has_a_bad_value_case():
    covered = {(" ".join(w), name_of(a)) for w, a in PARSED} | {f for _, f, _ in RUNTIME} | set(FREE)
    every = {(" ".join(w), name_of(a)) for w, a in options()}
    assert every - covered == set(), "flags with no bad-value case: add one to RUNTIME (or FREE, saying why)"
