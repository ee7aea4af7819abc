"""What the benchmark scripts share: refusing a bad argument with argparse's usage line, before any work."""

from __future__ import annotations

import argparse


def require_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, names) -> None:
    """`parser.error` (usage line, exit 2) for the first option of `names` whose value is below 1: a usage line,
    not a traceback deep in the run."""
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
