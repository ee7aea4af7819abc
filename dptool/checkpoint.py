"""Checkpoints: a `torch.save`d dict with the architecture, head width, weights, recipe and data fingerprint.

Written atomically (temporary name, then rename). Loadable by `score` (surrogate), `train --resume` and
`finetune`. Only plain Python values and tensors go in, so loading uses `weights_only=True`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from .atomic import atomic_output
from .errors import InputError

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "NotACheckpointError", "save_checkpoint", "read_checkpoint",
           "load_checkpoint", "describe_mismatch", "nonfinite_tensors", "check_finite_weights",
           "check_same_options", "check_finite_resume"]

CHECKPOINT_FORMAT = "dptool-checkpoint"
CHECKPOINT_VERSION = 1
_REQUIRED = ("arch", "small_input", "num_classes", "state_dict", "epoch")


def _plain_state(state_dict: dict) -> dict:
    """Strip DistributedDataParallel's `module.` prefix and detach to CPU tensors."""
    out = {}
    for key, value in state_dict.items():
        name = key[len("module."):] if key.startswith("module.") else key
        out[name] = value.detach().cpu() if hasattr(value, "detach") else value
    return out


def save_checkpoint(path: str | os.PathLike, *, arch: str, num_classes: int, state_dict: dict, recipe: dict,
                    data_fingerprint: str | None, epoch: int, optimizer_state: dict | None = None,
                    small_input: bool = False, blurpool: bool = False, image_size: int | None = None,
                    extra: dict | None = None) -> Path:
    """Write a checkpoint atomically. `epoch` = epochs completed; `extra` holds resume state and metrics."""
    import torch

    from .models import canonical_name

    base, small = canonical_name(arch, small_input)
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "arch": base,
        "small_input": small,
        "blurpool": bool(blurpool),
        "image_size": image_size,
        "num_classes": int(num_classes),
        "state_dict": _plain_state(state_dict),
        "recipe": dict(recipe),
        "data_fingerprint": data_fingerprint,
        "epoch": int(epoch),
        "optimizer_state": optimizer_state,
        "extra": dict(extra or {}),
    }
    path = Path(path)
    with atomic_output(path) as tmp:
        try:
            with open(tmp, "wb") as f:  # a file object: a write error reaches us as the OSError it is
                torch.save(ckpt, f)
        except RuntimeError as exc:  # torch's zip writer reports a failed write as "unexpected pos ..."
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, (OSError, KeyboardInterrupt)):  # a full disk; Ctrl-C or SIGTERM mid-write
                raise cause from None
            raise
    return path


class NotACheckpointError(InputError):
    """The file is not a dptool checkpoint at all (as opposed to a damaged or newer one)."""


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint dict at `path` (tensors on the CPU), validated; no model is built."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(f"Checkpoint {path} does not exist.")
    try:
        with warnings.catch_warnings():  # torch warns when the file is a TorchScript archive; the error says it
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not our checkpoint"
        raise NotACheckpointError(f"{path} is not a dptool checkpoint ({type(exc).__name__}).") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise NotACheckpointError(f"{path} is not a dptool checkpoint (no {CHECKPOINT_FORMAT!r} format tag).")
    if int(ckpt.get("version", 0)) > CHECKPOINT_VERSION:
        raise InputError(f"{path} has checkpoint version {ckpt['version']}; this dptool reads up to "
                         f"{CHECKPOINT_VERSION}.")
    missing = [k for k in _REQUIRED if k not in ckpt]
    if missing:
        raise InputError(f"Checkpoint {path} is missing {', '.join(repr(k) for k in missing)}.")
    return ckpt


def load_checkpoint(path: str | os.PathLike, *, arch: str | None = None, num_classes: int | None = None,
                    device="cpu"):
    """Build the model a checkpoint describes and load its weights. Returns `(model, ckpt_dict)`.

    `arch` / `num_classes`, when given, must match the checkpoint; a mismatch is one `InputError` sentence.
    """
    from .models import canonical_name, create_model

    ckpt = read_checkpoint(path)
    if arch is not None:
        want = canonical_name(arch)
        have = (ckpt["arch"], bool(ckpt["small_input"]))
        if want[0] != have[0] or (want[1] and not have[1]):
            raise InputError(f"Checkpoint {path} holds a {_label(*have)}, not a {_label(*want)}.")
    if num_classes is not None and int(num_classes) != int(ckpt["num_classes"]):
        raise InputError(f"Checkpoint {path} has a {ckpt['num_classes']}-class head, not {num_classes} classes.")
    check_finite_weights(ckpt["state_dict"], f"Checkpoint {path}")
    model = create_model(ckpt["arch"], int(ckpt["num_classes"]), small_input=bool(ckpt["small_input"]),
                         blurpool=bool(ckpt.get("blurpool")), image_size=ckpt.get("image_size"))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise InputError(f"Checkpoint {path} does not fit a {ckpt['arch']}: "
                         f"{describe_mismatch(model, ckpt['state_dict'], exc)}.") from exc
    return model.to(device), ckpt


def nonfinite_tensors(state: dict) -> list[str]:
    """Names of the floating-point tensors of `state` (a state dict) holding a NaN or an infinity, in its order.

    One pass over the weights (`torch.isfinite(...).all()` per tensor), on whatever device they are."""
    import torch

    return [name for name, value in state.items()
            if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex())
            and not bool(torch.isfinite(value).all())]


def check_finite_weights(state: dict, where: str) -> None:
    """Refuse weights with a NaN or an infinity in one InputError sentence naming `where` (e.g. "Checkpoint x.pt")
    and how many tensors hold them: a model that diverged would otherwise give NaN outputs, and garbage results."""
    bad = nonfinite_tensors(state)
    if bad:
        tensors = [k for k, v in state.items() if hasattr(v, "is_floating_point") and v.is_floating_point()]
        raise InputError(f"{where} holds non-finite weights (NaN or inf) in {len(bad)} of its {len(tensors)} "
                         f"floating-point tensors (first: {bad[0]}), so its outputs would be NaN too: retrain it (e.g. "
                         "with a lower --lr) or use an earlier checkpoint.")


def check_same_options(output, changed: list[str], saved, given, *, did: str, give: str,
                       may_change: tuple[str, ...], flag=None) -> None:
    """Refuse a resume of `output` whose options `changed` from those it began with (`saved.get(name)` then,
    `getattr(given, name)` now), in one sentence naming both sets; `did` is "trained" or "finetuned", `give` what
    to give instead, `may_change` the options that may differ, `flag(name)` an option's name on the command line."""
    if not changed:
        return
    flag = flag or (lambda name: "--" + name.replace("_", "-"))

    def flags(values) -> str:
        return " ".join(f"{flag(name)} {values(name)}" for name in changed)

    free = ", ".join(may_change[:-1]) + f" and {may_change[-1]}" if len(may_change) > 1 else may_change[0]
    raise InputError(f"Cannot resume: {output} was {did} with {flags(saved.get)} but this run gives "
                     f"{flags(lambda name: getattr(given, name))}; give {give} ({free} may change).")


def check_finite_resume(state_dict: dict, optimizer_state: dict, output) -> None:
    """Refuse resuming `output` when its weights or its optimizer's moments hold a NaN or an infinity: a NaN
    momentum buffer would turn the first resumed step's weights into NaN."""
    moments = {f"optimizer.{i}.{k}": v for i, st in (optimizer_state.get("state") or {}).items()
               for k, v in st.items()}
    check_finite_weights({**state_dict, **moments}, f"Cannot resume: checkpoint {output}")


def describe_mismatch(model, state: dict, exc: Exception | None = None) -> str:
    """Why `state` does not load into `model`, in one clause: keys missing, unexpected, of another shape.

    torch's own message lists every key over many lines; this counts them and names the first of each."""
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    shapes = [k for k in want if k in state and tuple(getattr(state[k], "shape", ())) != tuple(want[k].shape)]
    parts = [f"{len(missing)} keys missing (e.g. {missing[0]})" if missing else "",
             f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})" if unexpected else "",
             f"{len(shapes)} keys of another shape (e.g. {shapes[0]}: {tuple(state[shapes[0]].shape)} in the file, "
             f"{tuple(want[shapes[0]].shape)} in the model)" if shapes else ""]
    detail = ", ".join(p for p in parts if p)
    if not detail and exc is not None:
        detail = str(exc).strip().splitlines()[-1].strip()
    return detail or "the weights do not load"


def _label(arch: str, small: bool) -> str:
    return arch + (" (small-input stem)" if small else "")
