"""What a file dptool wrote holds: a `.beton`, a scores file or a checkpoint, told apart by their contents.

`describe(path)` returns a plain-JSON dict with a ``kind`` ("beton", "scores" or "checkpoint") and that kind's
summary; `dptool info` prints it. Nothing is written, and no model is built.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np

from .errors import InputError

__all__ = ["describe", "summarize_scores", "summarize_checkpoint"]

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
# state-dict entries that are buffers, not parameters, in dptool's models (BatchNorm statistics, BlurPool's filter)
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked", "blur_filter")


def describe(path: str | os.PathLike) -> dict:
    """Summary of the `.beton`, scores file or dptool checkpoint at `path`, with its ``kind``."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p} does not exist." if not p.exists() else f"{p} is not a file.")
    with open(p, "rb") as f:
        head = f.read(64)
    if head.startswith(_ZIP_MAGIC) and _is_torch_archive(p):
        return summarize_checkpoint(p)
    if head.lstrip()[:1] == b"{":
        return _describe_json(p)
    if head.startswith(b"\x93NUMPY") and p.name.endswith(".beton.digests.npy"):
        beton = p.with_name(p.name[: -len(".digests.npy")])
        raise InputError(f"{p} is the digests file of {beton}; run `dptool info {beton}` or `dptool verify {beton}`.")
    from .beton import NotABetonError, companions_of, digests_path, summarize

    try:
        summary = {"kind": "beton", **summarize(p)}
    except NotABetonError as exc:
        raise InputError(f"{p} is not a .beton, a dptool scores file or a dptool checkpoint.") from exc
    record = summary["digests"]  # the sidecar's record; shown as the state of the file it describes
    if isinstance(record, dict):
        owner = companions_of(p)
        summary["digests"] = _companion_state(owner, digests_path(owner).name, record.get("sha256"),
                                              "verify refuses it")
    return summary


def _is_torch_archive(p: Path) -> bool:
    """Whether the zip file at `p` is a `torch.save` archive (an `.npz` is a zip too)."""
    try:
        with zipfile.ZipFile(p) as z:
            return any(name.endswith("/data.pkl") or name == "data.pkl" for name in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _describe_json(p: Path) -> dict:
    """A scores file; anything else in JSON is named (a sidecar points at its `.beton`)."""
    from .scores import SCORES_FORMAT

    try:
        doc = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        if _is_run_log(p):
            raise InputError(f"{p} is the JSON-lines log of a `train` or `finetune` run; run `dptool info` on its "
                             "checkpoint.") from exc
        raise InputError(f"{p} is not valid JSON ({exc}).") from exc
    if isinstance(doc, dict) and doc.get("format") == SCORES_FORMAT:
        return summarize_scores(p)
    beton = Path(str(p)[: -len(".json")]) if p.name.endswith(".json") else None
    if beton is not None and beton.suffix == ".beton":
        raise InputError(f"{p} is the sidecar of {beton}; run `dptool info {beton}`.")
    raise InputError(f"{p} is JSON but not a dptool scores file; info reads .beton files, scores files and "
                     "dptool checkpoints.")


def _is_run_log(p: Path) -> bool:
    """Whether `p` starts like dptool's JSON-lines training log (a first line {"event": "config", ...})."""
    try:
        with open(p, encoding="utf-8") as f:
            first = json.loads(f.readline())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(first, dict) and first.get("event") == "config"


def summarize_scores(path: str | os.PathLike, top: int = 10) -> dict:
    """A scores file: method, level, provenance, the `top` groups, zero-score count, and the state of the assignment
    and centroids files beside it."""
    from .scores import companion_path, read_scores, score_summary

    p = Path(path)
    s = read_scores(p)
    owner = {n: companion_path(p, n) for n in (s.assignment, s.centroids) if n}  # as prune and score find them
    return {
        "kind": "scores", "path": str(p), **score_summary(s, top), "params": s.params, "surrogate": s.surrogate,
        "source": s.source, "target": s.target, "created": s.created,
        "assignment": _companion_state(owner.get(s.assignment, p), s.assignment, s.assignment_sha256,
                                       "prune refuses it"),
        "centroids": _companion_state(owner.get(s.centroids, p), s.centroids, s.centroids_sha256,
                                      "--centroids-from refuses it"),
    }


def _companion_state(owner: Path, name: str | None, sha256: str | None, refused: str) -> dict | None:
    """Path and state (present, unchanged, replaced, missing, unreadable) of the file `name` beside `owner` (a scores
    file's assignment or centroids, a .beton's digests), against the `sha256` recorded for it."""
    from .scores import fingerprint_file

    if name is None:
        return None
    path = owner.with_name(name)
    state = "missing"
    if path.is_file():
        try:
            state = ("present" if not sha256 else "present, unchanged" if fingerprint_file(path) == sha256
                     else f"replaced since; {refused}")
        except OSError as exc:
            state = f"unreadable ({exc.strerror or type(exc).__name__})"
    return {"path": str(path), "state": state}


def summarize_checkpoint(path: str | os.PathLike) -> dict:
    """A dptool checkpoint: the model, what it was trained on and with what recipe, its last and best metrics."""
    from .checkpoint import read_checkpoint

    p = Path(path)
    ckpt = read_checkpoint(p)
    recipe = ckpt.get("recipe") or {}
    extra = ckpt.get("extra") or {}
    history = extra.get("history") or []
    state = ckpt.get("state_dict") or {}
    params = sum(int(np.prod(tuple(v.shape))) for k, v in state.items()
                 if hasattr(v, "shape") and not k.endswith(_BUFFERS))
    out = {
        "kind": "checkpoint", "path": str(p), "run": "finetune" if "finetune" in recipe else "train",
        "arch": ckpt["arch"], "small_input": bool(ckpt.get("small_input")), "blurpool": bool(ckpt.get("blurpool")),
        "image_size": ckpt.get("image_size"), "num_classes": int(ckpt["num_classes"]), "parameters": params,
        "epochs_done": int(ckpt["epoch"]), "resumable": ckpt.get("optimizer_state") is not None,
        "data": extra.get("data"), "data_fingerprint": ckpt.get("data_fingerprint"),
        "pretrained": (extra.get("summary") or {}).get("checkpoint"),
        "kept_classes": None if extra.get("kept_classes") is None else len(extra["kept_classes"]),
        "best_val_top1": extra.get("best_val_top1"), "last_epoch": history[-1] if history else None,
        "finetune_summary": extra.get("summary"), "recipe": recipe,
    }
    return out
