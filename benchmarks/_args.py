"""What the benchmark scripts share: `--help` with every default, and refusing a bad argument with argparse's usage
line, before any work."""

from __future__ import annotations

import argparse
import re


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, which also shows the default of an option given no help text (argparse
    shows it only after a help text)."""

    def _format_action(self, action):
        if not action.help and action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action):
        if action.default is None or action.default is False:  # None: the help says what no value means; False: a flag
            return action.help
        return super()._get_help_string(action)


def parser(doc: str) -> argparse.ArgumentParser:
    """The parser of a benchmark script: its docstring's first line as description, defaults in `--help`."""
    return argparse.ArgumentParser(description=doc.splitlines()[0], formatter_class=Formatter)


def require_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, names) -> None:
    """`parser.error` (usage line, exit 2) for the first option of `names` whose value is below 1: a usage line,
    not a traceback deep in the run."""
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")


def require_archs(parser: argparse.ArgumentParser, archs) -> None:
    """`parser.error` for an architecture dptool does not know, before data is generated for it."""
    from dptool.models import list_models

    unknown = [a for a in archs if a not in list_models()]
    if unknown:
        parser.error(f"--arch {unknown[0]!r} is not an architecture; choose from {', '.join(list_models())}")


def require_device(parser: argparse.ArgumentParser, device: str) -> None:
    """`parser.error` for a --device other than cpu or cuda[:N], or cuda where torch sees no GPU."""
    import torch

    if device != "cpu" and not re.fullmatch(r"cuda(:[0-9]+)?", device):
        parser.error(f"--device must be cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}: torch sees no CUDA device here; use --device cpu")
