"""Every flag of every command, given a bad value, is one `error:` line and exit code 2, never a traceback.

The table is built from the parsers themselves: a flag added later without a bad-value case here
fails test_every_flag_has_a_bad_value_case. Typed flags are refused while argparse parses (flags.py);
free-text flags (paths, patterns, names) are checked when the command runs, each case below."""
import argparse
import importlib
import json
import subprocess
import sys

import pytest

from llmlabs import cli, flags
from llmlabs.train import _depth

# a value each checked type refuses
BAD = {int: "x1", float: "one", flags.positive_int: "0", flags.positive_float: "-1", flags.count: "-1",
       flags.nonnegative: "-0.5", flags.fraction: "1.5", _depth: "0"}
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
