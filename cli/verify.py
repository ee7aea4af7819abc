"""`dptool verify`: read every sample of a .beton again and compare it with the digests recorded when it was written."""

from __future__ import annotations

import click

from dptool.integrity import verify_files

from ._common import CONTEXT_SETTINGS, ExistingFile, emit, json_option, show_progress

__all__ = ["command"]


def _runs(indices: list[int]) -> str:
    """Sample indices, runs of three or more consecutive ones as "first-last": a file damaged over a stretch (a bad
    copy, a zeroed range) listed 1000 indices one by one, 5 KB on one line."""
    parts, i = [], 0
    while i < len(indices):
        j = i
        while j + 1 < len(indices) and indices[j + 1] == indices[j] + 1:
            j += 1
        parts += [f"{indices[i]}-{indices[j]}"] if j - i >= 2 else [str(k) for k in indices[i:j + 1]]
        i = j + 1
    return ", ".join(parts)


def _file_lines(r: dict) -> list[str]:
    if r["intact"]:
        return [f"{r['path']}: all {r['num_samples']} samples match the {r['algorithm']} digests recorded when it "
                f"was written, and so does its fingerprint ({r['seconds']:.2f} s)."]
    lines = []
    if r["num_damaged"]:
        listed = _runs(r["damaged"])
        more = r["num_damaged"] - len(r["damaged"])
        named = f": {listed}{f' and {more} more' if more else ''}" if listed else ""  # --max-listed 0: counted only
        lines.append(f"{r['path']}: {r['num_damaged']} of {r['num_samples']} samples differ from when it was "
                     f"written{named}.")
    if not r["fingerprint_matches"]:
        lines.append(f"{r['path']}: its fingerprint differs from the one its sidecar recorded (its tables or "
                     "sampled bytes changed).")
    return lines


def _human(result: dict) -> str:
    return "\n".join(line for r in result["files"] for line in _file_lines(r))


@click.command("verify", context_settings=CONTEXT_SETTINGS)
@click.argument("paths", nargs=-1, required=True, type=ExistingFile(path_type=str))
@click.option("--max-listed", type=click.IntRange(min=0), default=1000,
              help="Damaged sample indices listed at most, per file (all are counted).")
@json_option
def command(paths, max_listed, as_json):
    """Check every sample of each .beton against the digests recorded when dptool wrote it.

    Exits 0 when every file is as written, 1 when samples (or tables) of any changed since. Every file must have
    recorded digests; that is checked before any sample is read.

    \b
    dptool verify imagenet_train_p60.beton imagenet_val_p60.beton   # after copying them to another machine
    dptool verify imagenet_train.beton --json
    """
    result = verify_files(paths, progress=show_progress(as_json), max_listed=max_listed)
    emit(result, as_json, _human)
    if not result["intact"]:
        raise click.exceptions.Exit(1)
