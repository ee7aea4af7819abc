"""The companion files of a `.beton`: its JSON sidecar (`X.beton.json`) and per-sample digests file
(`X.beton.digests.npy`), where to find them (beside the file, or beside the original a link points to), and reading,
validating and writing the sidecar. `dptool.beton` re-exports these names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from .atomic import atomic_output, check_output_path
from .errors import InputError

__all__ = [
    "SIDECAR_FORMAT",
    "SIDECAR_VERSION",
    "read_sidecar",
    "sidecar_path",
    "digests_path",
    "companions_of",
    "check_beton_output",
    "write_sidecar",
]

SIDECAR_FORMAT = "dptool-beton"
SIDECAR_VERSION = 1


def sidecar_path(beton: str | os.PathLike) -> Path:
    """The sidecar of `beton`: the same path with `.json` appended."""
    return Path(str(beton) + ".json")


def digests_path(beton: str | os.PathLike) -> Path:
    """The per-sample digests file of `beton` (`dptool.integrity`): the same path with `.digests.npy` appended."""
    return Path(str(beton) + ".digests.npy")


def companions_of(path: str | os.PathLike, companion: Callable[[Path], Path] = sidecar_path) -> Path:
    """The path whose companion files are `path`'s (by default its sidecar, and with it its digests file): `path`
    itself, or, for a symbolic link with none beside it, the first link or file along its chain of links that has
    one (a dataset linked into a project folder keeps them beside the original, itself perhaps a link)."""
    p = hop = Path(path)
    for _ in range(40):  # the kernel's limit on links followed: a loop of links ends here
        if os.path.lexists(companion(hop)):
            return hop
        if not hop.is_symlink():
            break
        target = Path(os.path.realpath(hop.parent)) / os.readlink(hop)  # relative to the folder the link is in
        hop = Path(os.path.realpath(target.parent)) / target.name  # its folder named plainly, its name kept
    return p


def check_beton_output(path: str | os.PathLike, *, force: bool, inputs: tuple = (), dry_run: bool = False) -> Path:
    """Refuse a `.beton` output, or the sidecar and digests file it brings, that exists (without `force`) or is an
    input or an input's sidecar; a path ending in `.json` is refused as a sidecar name, one ending in `.digests.npy`
    as a digests file's. `dry_run`: check without writing or removing any file (`check_output_path`'s)."""
    inputs = tuple(p for p in inputs if p is not None)
    out = check_output_path(path, force=force, inputs=inputs, dry_run=dry_run)
    if str(out).endswith(".json"):
        raise InputError(f"Output {out} looks like a sidecar; give a .beton path.")
    if str(out).endswith(".digests.npy"):  # another output's digests file (prune's -o and --val-out)
        raise InputError(f"Output {out} looks like a digests file; give a .beton path.")
    side = sidecar_path(out)
    for src in inputs:  # the sidecar replaces an existing file even with --force: never let it be an input
        if os.path.abspath(side) in (os.path.abspath(src), os.path.abspath(sidecar_path(src))) or (
                side.exists() and Path(src).exists() and side.resolve() == Path(src).resolve()):
            raise InputError(f"Output {out} would write its sidecar over {side}, which is an input or its "
                             "sidecar; choose another output path.")
    check_output_path(side, force=force, dry_run=dry_run)
    check_output_path(digests_path(out), force=force, inputs=inputs, dry_run=dry_run)
    return out


def read_sidecar(beton: str | os.PathLike) -> dict | None:
    """The sidecar dict of `beton` (found as `companions_of` says), or None when there is none (a .beton written by
    another tool)."""
    path = sidecar_path(companions_of(beton))
    if not path.exists():
        return None
    try:
        text = path.read_text()
    except OSError as exc:  # unreadable (permissions, a failing disk) is not the same as damaged
        raise InputError(f"Sidecar {path} cannot be read ({exc.strerror or exc}); make it readable, or delete it "
                         "to use the .beton without it.") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InputError(f"Sidecar {path} is not valid JSON ({exc}); delete it or re-create the .beton.") from exc
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
        raise InputError(f"Sidecar {path} is not a dptool sidecar (missing format {SIDECAR_FORMAT!r}).")
    for key, (kind, item) in _SIDECAR_TYPES.items():  # a damaged or hand-edited entry, named before it is used
        value = data.get(key)
        ok = _is_json(value, kind) and (item is None or all(_is_json(v, item) for v in value))
        if value is not None and not ok:
            want = f"a list of {_JSON_NAMES[item]}s" if item else f"{'a' if kind is str else 'an'} {_JSON_NAMES[kind]}"
            raise InputError(f"Sidecar {path} is damaged: its {key!r} is not {want}; delete it or re-create the "
                             ".beton.")
    return data


#: The type of each sidecar entry that commands read (and of its items), as `write_sidecar`'s callers write them.
_SIDECAR_TYPES = {"num_samples": (int, None), "num_classes": (int, None), "class_names": (list, str),
                  "class_counts": (list, int), "fingerprint": (str, None), "digests": (dict, None),
                  "fields": (dict, None), "writer": (dict, None), "source": (dict, None), "pruning": (dict, None),
                  "skipped": (list, dict)}
_JSON_NAMES = {int: "integer", str: "string", dict: "object"}


def _is_json(value, kind: type) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


def write_sidecar(beton: str | os.PathLike, data: dict) -> Path:
    """Write `data` as the sidecar of `beton`, atomically (inside `output_group`, renamed right after `beton`)."""
    path = sidecar_path(beton)
    payload = {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, **data}
    with atomic_output(path, companion_of=beton) as tmp:
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
    return path
