"""argparse types that check a flag's value as it is parsed, so a bad value is argparse's one
`error: argument --flag: ...` line (exit 2) instead of a traceback from deep inside a run."""
import argparse
import re


def _number(kind, ok, what):
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not {'an integer' if kind is int else 'a number'}") from None
        if v != v or not ok(v):  # v != v: NaN
            raise argparse.ArgumentTypeError(f"{s} is not {what}")
        return v
    parse.__name__ = what.replace(" ", "_")  # what argparse names in its own messages
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
positive_float = _number(float, lambda v: 0 < v < float("inf"), "a positive number")
count = _number(int, lambda v: v >= 0, "an integer >= 0")
nonnegative = _number(float, lambda v: 0 <= v < float("inf"), "a number >= 0")
fraction = _number(float, lambda v: 0 <= v <= 1, "a fraction between 0 and 1")


def layers(s):
    """--moe-layers: a slice like 1: or ::2, or indices like 2,5 (checked here, resolved by GPTConfig)."""
    if not re.fullmatch(r"-?\d*(:-?\d*){1,2}|-?\d+(,-?\d+)*", s.replace(" ", "")):
        raise argparse.ArgumentTypeError(f"{s!r} names no layers: use a slice like 1: or ::2, or indices like 2,5")
    return s


def depth(s):
    """--depth: a positive number, or a preset name like d8."""
    try:
        depth = int(s[1:] if s.lower().startswith("d") else s)
    except ValueError:
        depth = 0
    if depth < 1:
        raise argparse.ArgumentTypeError(f"{s!r} is not a depth: use a positive number or a preset name like d8")
    return depth
