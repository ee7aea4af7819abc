"""What every command shares: output (`emit`), progress policy, shared options and error conversion."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import click

__all__ = ["emit", "show_progress", "json_option", "force_option", "workers_option", "CONTEXT_SETTINGS"]

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "show_default": True}


def show_progress(as_json: bool) -> bool:
    """Progress bars go to stderr, and only when it is a terminal and no JSON was asked for."""
    return not as_json and sys.stderr.isatty()


def emit(result, as_json: bool, human: Callable[[object], str] | None = None) -> None:
    """Print `result`: one JSON document on stdout with --json, else `human(result)` (or its str)."""
    data = result.to_dict() if hasattr(result, "to_dict") else result
    if as_json:
        click.echo(json.dumps(data, indent=1, default=str))
    else:
        click.echo(human(result) if human else str(data))


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
force_option = click.option("--force", is_flag=True, help="Overwrite an existing output.")
workers_option = click.option(
    "--workers", type=click.IntRange(min=0), default=0, help="Worker processes; 0 = all cores."
)
