"""What every command shares: output (`emit`), progress policy, the scores table and shared options.

Library errors become exit codes in one place, `dptool.cli.main`."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable

import click

__all__ = ["emit", "show_progress", "group_noun", "score_table", "json_option", "force_option", "workers_option",
           "precision_option", "CONTEXT_SETTINGS", "Group", "ExistingFile", "counted"]

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "show_default": True}


class Group(click.Group):
    """A group whose command list gives each command's whole first sentence, wrapped, where Click cuts it to the
    terminal's width ("Convert an image dataset on disk to an FFCV .beton with a...")."""

    def format_commands(self, ctx, formatter):
        """The "Commands:" section: each command's `short_help`, else the first paragraph of its help, whole."""
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.short_help or " ".join((cmd.help or "").strip().split("\n\n")[0].split())))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


class ExistingFile(click.Path):
    """`click.Path(exists=True, dir_okay=False)` that, for a missing .beton an interrupted conversion left partial
    beside it, says so and how to finish it (`convert --resume`) rather than only that it does not exist."""

    def __init__(self, **kwargs):
        super().__init__(exists=True, dir_okay=False, **kwargs)

    def convert(self, value, param, ctx):
        """The path, checked as `click.Path` checks it, with the interrupted conversion named where there is one."""
        import os

        from dptool.writer_progress import missing_file_message, partial_paths

        if isinstance(value, (str, os.PathLike)) and not os.path.lexists(value) and partial_paths(value)[0].is_file():
            self.fail(missing_file_message(value), param, ctx)
        return super().convert(value, param, ctx)


def show_progress(as_json: bool) -> bool:
    """Progress bars go to stderr, and only when it is a terminal and no JSON was asked for."""
    return not as_json and sys.stderr.isatty()


def emit(result, as_json: bool, human: Callable[[object], str] | None = None) -> None:
    """Print `result`: one JSON document on stdout with --json, else `human(result)` (or its str)."""
    data = result.to_dict() if hasattr(result, "to_dict") else result
    if as_json:
        click.echo(json.dumps(_finite(data), indent=1, default=str, allow_nan=False))
    else:
        text = human(result) if human else str(data)
        try:
            click.echo(text)
        except UnicodeEncodeError:  # a file or folder name that is not UTF-8 (Python holds its bytes as surrogates)
            click.echo(text.encode("utf-8", "surrogateescape"))  # its bytes, as ls prints them


def _finite(data):
    """`data` with every NaN or infinite float replaced by None: json.dumps writes them as NaN and Infinity, which
    are not JSON (jq and JSON.parse refuse the document), and a hand-edited log or sidecar can hold them."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


def counted(n, plural: str) -> str:
    """`n` and the noun, singular for one: counted(1, "classes") is "1 class", counted(3, "images") "3 images"."""
    if n != 1:
        return f"{n} {plural}"
    return f"{n} {plural[:-2] if plural.endswith(('sses', 'ches', 'shes')) else plural[:-1]}"


def group_noun(level: str) -> str:
    """What the groups of a scores file are, in words: "source classes" (level "class") or "clusters"."""
    return "source classes" if level == "class" else "clusters"


def score_table(s: dict) -> list[str]:
    """Lines of a scores summary (`dptool.scores.score_summary`): the top groups with the scores file's ranks (0 for
    the group kept first, as the plot's axis and list count them), then the zero-score count."""
    noun = group_noun(s["level"])
    lines = [f"top {len(s['top'])} {noun} (rank 0 = kept first):",
             f"  {'rank':>4} {'id':>6} {'score':>12} {'tie-break':>12}  name"]
    lines += [f"  {t['rank']:>4} {t['id']:>6} {t['score']:>12.6g} {t['tiebreak']:>12.6g}  {t['name']}"
              for t in s["top"]]
    lines.append(f"{s['zero_score_groups']} of {counted(s['groups'], noun)} scored zero; ties broken by "
                 f"{s['tie_break']}")
    return lines


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
force_option = click.option("--force", is_flag=True, help="Overwrite an existing output.")
workers_option = click.option(
    "--workers", type=click.IntRange(min=0), default=0,
    help="FFCV decoding threads; 0 = every CPU this process may run on.",
)


def precision_option(what: str = "Autocast on CUDA", auto: str = "bf16 on Ampere or newer GPUs, else fp16"):
    """The --precision option of a command that runs a model; `what` opens its help line, `auto` says what auto is on
    CUDA."""
    return click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
                        help=f"{what} (auto: {auto}; fp32 on the CPU).")
