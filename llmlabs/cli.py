"""`llmlabs <command>`: a thin dispatcher. Each command's module defines add_args(parser) and
run(args); the module is imported only when its command runs, so `llmlabs prepare` never imports
the model and `--help` is instant."""
import argparse
import importlib
import sys

from llmlabs.errors import LabError

COMMANDS = {
    "prepare": ("llmlabs.data.prepare", "build a data directory: tokenizer + token shards; or `prepare core`, the CORE eval "
                                        "bundle (the only step that may use the network)"),
    "train": ("llmlabs.train", "train a GPT and report val_bpb"),
    "eval": ("llmlabs.evaluate", "score a run's checkpoints: val_bpb, offline tasks, CORE, lm-eval tasks"),
    "sample": ("llmlabs.engine", "generate text from a run's checkpoint"),
    "sweep": ("llmlabs.sweep", "preregistered sweeps: run a spec's grid of train runs, fit L(N, D) to them"),
    "auto": ("llmlabs.auto.cli", "autoresearch: agent-driven fixed-budget experiments"),
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--version"]:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"llmlabs {version('llmlabs')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            print("llmlabs (not installed: run from source)")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: llmlabs <command> [options]   (llmlabs --version)\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}: pick one of {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        return 0
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"llmlabs {name}", description=COMMANDS[name][1])
    module.add_args(parser)
    try:  # a LabError while parsing or running is one line, not a traceback (argparse says its own errors)
        args = parser.parse_args(argv[1:])
        return module.run(args) or 0
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
