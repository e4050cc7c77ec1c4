"""Command-line plumbing shared by siattn's CLIs: one-line user errors with exit code 2, validated numbers."""

from __future__ import annotations

import argparse
import math


class OneLineParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive(kind: type, minimum: float = 1):
    """An argparse type: a finite `kind` >= minimum (> 0 for floats)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        ok = math.isfinite(value) and (value > 0 if kind is float else value >= minimum)
        if not ok:
            want = "a finite number > 0" if kind is float else f"an integer >= {minimum}"
            raise argparse.ArgumentTypeError(f"{text!r} must be {want}")
        return value

    parse.__name__ = f"{kind.__name__} >= {minimum}" if kind is int else "positive float"
    return parse
