"""Command-line pieces shared by data/prepare.py and `python -m parity_tests`.

Input errors are one line, `error: ...` naming the flag, exit status 2: a usage dump
or a traceback buries the one thing the user has to fix.
"""
from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def int_at_least(low: int):
    """An argparse type: an integer >= low, else an error naming the flag and the value."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse
