"""What a file dptool wrote holds: a `.beton`, a scores file, a checkpoint or a run's log, told apart by contents.

`describe(path)` returns a plain-JSON dict with a ``kind`` ("beton", "scores", "checkpoint" or "run_log") and that
kind's summary; `dptool info` prints it. No model is built; with `plot`, a run's curves are drawn (the only output).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np

from .atomic import check_plot_path
from .errors import InputError
from .runlog import is_run_log, plot_run, read_run_log, run_from_history

__all__ = ["describe", "summarize_scores", "summarize_checkpoint"]

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
# state-dict entries that are buffers, not parameters, in dptool's models (BatchNorm statistics, BlurPool's filter)
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked", "blur_filter")


def describe(path: str | os.PathLike, *, plot: str | os.PathLike | None = None, force: bool = False) -> dict:
    """Summary of the `.beton`, scores file, dptool checkpoint or train/finetune log at `path`, with its ``kind``.

    With `plot`, a PNG of the run's curves (`dptool.runlog.plot_run`) for a log, or for a checkpoint from the
    per-epoch history it holds; refused for other files, over an existing file without `force`, and over `path`.
    """
    p = Path(path)
    if not p.is_file():
        if p.is_dir():
            raise InputError(f"{p} is a folder; info reads .beton files, dptool scores files, checkpoints and train "
                             "or finetune logs.")
        if not p.exists():
            from .writer_progress import missing_file_message

            raise InputError(missing_file_message(p))
        raise InputError(f"{p} is not a file.")
    if plot is None:
        return _describe(p)
    check_plot_path(plot, force=force, inputs=(p,))  # before reading: a refusal costs nothing
    with open(p, "rb") as f:
        checkpoint = f.read(4).startswith(_ZIP_MAGIC) and _is_torch_archive(p)
    if checkpoint:  # read once, for both the summary and the curves
        from .checkpoint import read_checkpoint

        ckpt = read_checkpoint(p)
        summary, run = _checkpoint_summary(p, ckpt), _checkpoint_run(p, ckpt)
    else:
        summary = run = _describe(p)
        if summary["kind"] != "run_log":
            raise InputError(f"--plot draws the curves of a train or finetune run, from its log or checkpoint; {p} "
                             f"is a {_KIND_NAMES[summary['kind']]}.")
    return {**summary, "plot": str(plot_run(run, plot, force=force))}


_KIND_NAMES = {"beton": ".beton", "scores": "scores file", "checkpoint": "checkpoint", "run_log": "log"}


def _checkpoint_run(p: Path, ckpt: dict) -> dict:
    """What `plot_run` draws of the checkpoint `ckpt` at `p`: the per-epoch history `train` and `finetune` save."""
    extra = ckpt.get("extra") or {}
    history = extra.get("history") if isinstance(extra.get("history"), list) else []
    run = _run_kind(ckpt.get("recipe") or {})
    recipe = (ckpt.get("recipe") or {}).get("finetune", ckpt.get("recipe") or {})
    if not any(isinstance(h, dict) and isinstance(h.get("epoch"), int) for h in history):
        raise InputError(f"{p} records no per-epoch metrics (the checkpoints of dptool train and finetune do), so "
                         "--plot has nothing to draw from it; give --plot the run's JSON-lines log, if it has one.")
    return run_from_history([h for h in history if isinstance(h, dict)], path=p, run=run, arch=ckpt["arch"],
                            data=extra.get("data"), epochs_planned=recipe.get("epochs"),
                            mode=recipe.get("mode") if run == "finetune" else None)


def _run_kind(recipe: dict) -> str:
    """Which command wrote a checkpoint with this `recipe`: "finetune" or "train"."""
    return "finetune" if "finetune" in recipe else "train"


def _describe(p: Path) -> dict:
    """Summary of the existing file `p`, told apart by its first bytes."""
    with open(p, "rb") as f:
        head = f.read(64)
    if head.startswith(_ZIP_MAGIC) and _is_torch_archive(p):
        return summarize_checkpoint(p)
    if head.lstrip()[:1] == b"{":
        return _describe_json(p)
    if head.startswith(b"\x93NUMPY") and p.name.endswith(".beton.digests.npy"):
        beton = p.with_name(p.name[: -len(".digests.npy")])
        raise InputError(f"{p} is the digests file of {beton}; run `dptool info {beton}` or `dptool verify {beton}`.")
    from .beton import NotABetonError, summarize
    from .sidecar import companions_of, digests_path

    try:
        summary = {"kind": "beton", **summarize(p)}
    except NotABetonError as exc:
        from .writer_progress import interrupted_conversion_message

        if (partial := interrupted_conversion_message(p)) is not None:
            raise InputError(partial) from exc
        raise InputError(f"{p} is {'empty' if not head else 'not a .beton'}; info reads .beton files, dptool scores "
                         "files, checkpoints and train or finetune logs.") from exc
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
        if is_run_log(p):  # JSON lines, not one document
            return read_run_log(p)
        if _first_line_is_object(p):
            raise InputError(f"{p} holds JSON lines but is not a dptool train or finetune log (its first line is no "
                             '{"event": "config", ...} record); info reads .beton files, dptool scores files, '
                             "checkpoints and train or finetune logs.") from exc
        raise InputError(f"{p} is not valid JSON ({exc}).") from exc
    if isinstance(doc, dict) and doc.get("format") == SCORES_FORMAT:
        return summarize_scores(p)
    if is_run_log(p):  # a log of one line: a resume under another --log, before its first epoch
        return read_run_log(p)
    beton = Path(str(p)[: -len(".json")]) if p.name.endswith(".json") else None
    if beton is not None and beton.suffix == ".beton":
        raise InputError(f"{p} is the sidecar of {beton}; run `dptool info {beton}`.")
    raise InputError(f"{p} is JSON but not a dptool scores file; info reads .beton files, scores files, dptool "
                     "checkpoints and train or finetune logs.")


def _first_line_is_object(p: Path) -> bool:
    """Whether the first line of `p` is a JSON object by itself (JSON lines, not a document spread over lines)."""
    try:
        with open(p, "rb") as f:
            return isinstance(json.loads(f.readline()), dict)
    except (OSError, UnicodeDecodeError, ValueError):
        return False


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
    return _checkpoint_summary(p, read_checkpoint(p))


def _nonfinite(state: dict, optimizer_state) -> tuple[list[str], list[str]]:
    """The weights and the optimizer's moments holding a NaN or an infinity, the moments named as
    `checkpoint.check_finite_resume` names them: score and finetune refuse such weights, and --resume either."""
    from .checkpoint import nonfinite_tensors

    moments = {f"optimizer.{i}.{k}": v for i, st in ((optimizer_state or {}).get("state") or {}).items()
               for k, v in (st.items() if isinstance(st, dict) else ())}
    return nonfinite_tensors(state), nonfinite_tensors(moments)


def _checkpoint_summary(p: Path, ckpt: dict) -> dict:
    """`summarize_checkpoint` of the checkpoint `ckpt`, read from `p`."""
    recipe = ckpt.get("recipe") or {}
    extra = ckpt.get("extra") or {}
    history = extra.get("history") or []
    state = ckpt.get("state_dict") or {}
    params = sum(int(np.prod(tuple(v.shape))) for k, v in state.items()
                 if hasattr(v, "shape") and not k.endswith(_BUFFERS))
    run = _run_kind(recipe)
    # a stopped finetune's checkpoint (written for `finetune --resume`) keeps its state and source in extra.resume
    resume = extra.get("resume") if run == "finetune" and isinstance(extra.get("resume"), dict) else {}
    weights, moments = _nonfinite(state, ckpt.get("optimizer_state") or resume.get("optimizer"))
    out = {
        "kind": "checkpoint", "path": str(p), "run": run,
        "arch": ckpt["arch"], "small_input": bool(ckpt.get("small_input")), "blurpool": bool(ckpt.get("blurpool")),
        "image_size": ckpt.get("image_size"), "num_classes": int(ckpt["num_classes"]), "parameters": params,
        "epochs_done": int(ckpt["epoch"]),
        "resumable": (ckpt.get("optimizer_state") is not None or bool(resume)) and not (weights or moments),
        "nonfinite_weights": weights, "nonfinite_moments": moments,
        "data": extra.get("data"), "data_fingerprint": ckpt.get("data_fingerprint"),
        "pretrained": (extra.get("summary") or {}).get("checkpoint") or resume.get("source"),
        "kept_classes": None if extra.get("kept_classes") is None else len(extra["kept_classes"]),
        "best_val_top1": extra.get("best_val_top1"), "last_epoch": history[-1] if history else None,
        "finetune_summary": extra.get("summary"), "recipe": recipe,
    }
    return out
