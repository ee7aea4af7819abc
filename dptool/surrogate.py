"""The surrogate model that scoring runs: loaded from any of four sources and put in eval mode.

* a dptool checkpoint (``--model rn18.pt``): architecture, head width and weights from the file;
* a TorchScript file (``--model rn18.ts``), told apart from a checkpoint by the ``code/`` folder of its archive;
* a registered architecture plus a state-dict file (``--arch resnet18 --weights rn18.pth``); the head width is
  read from the state dict, and the authors' ``{"state_dicts": {"network": ...}}`` layout is accepted too, as
  are self-supervised checkpoints: the backbone is found under its prefix (MoCo's ``encoder_q.``, ...), and
  weights without a classifier give a backbone-only surrogate, which serves FM but not LM or EL2N;
* any ``torch.nn.Module`` from a factory (``--model-factory package.module:function``), called with no
  arguments (timm models or a user's own), optionally followed by ``--weights``.

Features for FM are the input of the final classifier (found by `dptool.models.feature_layer`) or of the
module named by ``--feature-layer``, read with a forward pre-hook. TorchScript modules take no hooks: they
serve LM and EL2N, and FM only if they export a ``forward_features`` method.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError

__all__ = ["Surrogate", "load_surrogate", "read_state_dict", "select_backbone", "model_from_weights",
           "default_resolution", "weights_fingerprint"]

log = logging.getLogger(__name__)

_STATE_KEYS = ("state_dict", "model", "model_state", "network", "teacher")  # DINO evaluates its teacher
# where one checkpoint holds two copies of the backbone, the one its authors evaluate: MoCo v1/v2's query encoder
# (beside the momentum `encoder_k`), MoCo v3's `base_encoder` (beside `momentum_encoder`)
_EVALUATED_ENCODERS = ("encoder_q", "base_encoder")
_HEAD_MODULES = ("fc", "heads")
_RES_KEYS = ("eval_res", "val_res", "res", "end_res", "final_res", "max_res")


@dataclass(frozen=True, eq=False)
class Surrogate:
    """A loaded surrogate: the module (eval mode, on `device`), where it came from, and its training recipe.

    `identity` is the plain-JSON description written into the scores file (kind, path, arch, file hash,
    data fingerprint of a dptool checkpoint, and `weights`, the `weights_fingerprint` of the loaded module).
    `feature_name` is the module whose input is the feature. `has_classifier` is False for a backbone loaded from
    weights without a classifier (its output is the feature, not class scores).
    """

    model: object
    identity: dict
    scripted: bool = False
    recipe: dict = field(default_factory=dict)
    feature_name: str | None = None
    has_classifier: bool = True

    def default_feature_name(self) -> str | None:
        """The name of the module FM hooks when no `feature_name` is given (None when there is none to find)."""
        if self.scripted:
            return None
        from .models import feature_layer

        try:
            default = feature_layer(self.model)
        except InputError:
            return None
        return next((name for name, module in self.model.named_modules() if module is default), None)

    def feature_module(self):
        """The module whose input is the penultimate feature; InputError when there is none to hook."""
        if self.scripted:
            raise InputError("A TorchScript surrogate takes no forward hooks, so FM cannot read its features; "
                             "load it as --arch/--weights or --model-factory instead.")
        if self.feature_name is not None:
            modules = dict(self.model.named_modules())
            if self.feature_name not in modules:
                names = [n for n in modules if n][-8:]
                raise InputError(f"--feature-layer {self.feature_name!r} is not a module of the surrogate; "
                                 f"its last modules are: {', '.join(names)}.")
            return modules[self.feature_name]
        from .models import feature_layer

        try:
            return feature_layer(self.model)
        except InputError as exc:
            raise InputError(f"{exc} Name the classifier module with --feature-layer.") from exc


def default_resolution(recipe: dict, fallback: int = 224) -> int:
    """The evaluation resolution a dptool checkpoint's recipe records, else `fallback`."""
    for key in _RES_KEYS:
        value = recipe.get(key) if isinstance(recipe, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 1:
            return int(value)
    return fallback


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in name for name in z.namelist()[:2000])


def _strip_prefix(state: dict) -> dict:
    """Drop the `module.` prefix of DistributedDataParallel (and torch.compile's `_orig_mod.`)."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def read_state_dict(path: str | os.PathLike) -> dict:
    """A plain state dict from `path`: a bare state dict, or one nested under state_dict/model/network/teacher keys.

    Loaded with torch's weights-only unpickler (a weights file cannot run code), which also admits the
    `argparse.Namespace` of training arguments that DINO's and other scripts save beside the weights.
    """
    import argparse

    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(f"Weights file {path} does not exist.")
    try:
        allowed = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5; before, a Namespace is refused
        with allowed([argparse.Namespace]) if allowed is not None else contextlib.nullcontext():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a state dict"
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if unsafe:
            raise InputError(f"Weights file {path} holds an object of type {unsafe.group(1)}, which dptool does not "
                             "unpickle (it loads tensors and plain data only, so that a file cannot run code); save "
                             "the state dict alone with torch.save.") from exc
        raise InputError(f"Weights file {path} is not a torch state dict ({type(exc).__name__}).") from exc
    for _ in range(3):  # {"state_dicts": {"network": {...}}} is the authors' layout
        if not isinstance(obj, dict) or all(hasattr(v, "shape") for v in obj.values()):
            break
        nested = obj.get("state_dicts", obj)
        key = next((k for k in _STATE_KEYS if isinstance(nested.get(k), dict)), None)
        if key is None:
            break
        obj = nested[key]
    if not isinstance(obj, dict) or not obj or not all(hasattr(v, "shape") for v in obj.values()):
        raise InputError(f"Weights file {path} holds no state dict (a dict of tensors, possibly under "
                         f"one of the keys {', '.join(_STATE_KEYS)}).")
    return _strip_prefix(obj)


def _head_width(state: dict) -> int | None:
    for key in ("fc.weight", "heads.head.weight", "head.weight", "classifier.weight"):
        if key in state and len(state[key].shape) == 2:
            return int(state[key].shape[0])
    return None


def select_backbone(state: dict, model, where: str, prefix: str | None = None) -> tuple[dict, str]:
    """The entries of `state` that belong to `model`, with the prefix they sit under removed; and that prefix.

    Self-supervised checkpoints keep the backbone under a prefix (MoCo v1/v2 `encoder_q.`, MoCo v3
    `base_encoder.`, `backbone.`), beside a momentum copy, projection heads, prototypes or a queue. Without
    `prefix` it is the one under which every entry of `model` outside its head is found: none when the file is
    a plain state dict, else the only such prefix, else the evaluated encoder of MoCo's pair; where no prefix
    holds them all (a backbone of another depth), the one holding most, so that the refusal names what differs.
    Entries under it whose first name is no module of `model` (SwAV's `prototypes`, `projection_head`) are left
    out; any other mismatch is left for `load_state_dict` to report.
    """
    names = list(model.state_dict())
    # BatchNorm's `num_batches_tracked` is left out of the search: files saved without it load all the same
    backbone = [k for k in names if k.split(".")[0] not in _HEAD_MODULES and not k.endswith(".num_batches_tracked")]
    if prefix is not None:
        prefix = prefix if prefix.endswith(".") or not prefix else prefix + "."
        as_read = next(iter(_strip_prefix({prefix: None})))  # the entries were read without DDP's `module.`
        if not any(k.startswith(prefix) for k in state) and any(k.startswith(as_read) for k in state):
            prefix = as_read
        if not any(k.startswith(prefix) for k in state):
            tops = sorted({k.split(".")[0] + ("." if "." in k else "") for k in state})
            listed = f"{', '.join(tops[:8])}{' ...' if len(tops) > 8 else ''}"
            raise InputError(f"--weights-prefix {prefix} matches no entry of weights {where}; its entries start "
                             f"with {listed}{'' if listed.endswith('.') else '.'}")
    elif backbone and not all(k in state for k in backbone):
        anchor = backbone[0]
        found = sorted({k[:-len(anchor)] for k in state if k.endswith("." + anchor)})
        full = [p for p in found if all(p + k in state for k in backbone)]
        evaluated = [p for p in full if p.rstrip(".").split(".")[-1] in _EVALUATED_ENCODERS]
        if len(full) == 1 or len(evaluated) == 1:
            prefix = full[0] if len(full) == 1 else evaluated[0]
        elif len(full) > 1:
            raise InputError(f"Weights {where} hold {len(full)} copies of the {type(model).__name__} backbone, "
                             f"under {', '.join(full)}; choose one with --weights-prefix.")
        elif found:  # no copy is whole (another depth): the closest one, so that its real mismatch is told
            cover = {p: sum(p + k in state for k in backbone) for p in found}
            top = [p for p in found if cover[p] == max(cover.values())]
            evaluated = [p for p in top if p.rstrip(".").split(".")[-1] in _EVALUATED_ENCODERS]
            if cover[top[0]] > sum(k in state for k in backbone) and (len(top) == 1 or len(evaluated) == 1):
                prefix = top[0] if len(top) == 1 else evaluated[0]
    prefix = prefix or ""
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    modules = {name for name, _ in model.named_children()}
    foreign = sorted({k.split(".")[0] for k in state if k not in names and k.split(".")[0] not in modules})
    if foreign:
        log.info("weights %s: left out %s (no module of %s)", where, ", ".join(foreign), type(model).__name__)
    return {k: v for k, v in state.items() if k.split(".")[0] not in foreign}, prefix


def model_from_weights(arch: str, weights: str | os.PathLike, *, weights_prefix: str | None = None,
                       checkpoint_hint: str = "pass it as --model"):
    """Registered architecture `arch` with the weights of the file `weights`: a state dict, or a self-supervised
    checkpoint whose backbone `select_backbone` finds. Returns (model, classifier width, prefix); a file without a
    classifier gives width None and a model whose classifier is an `nn.Identity` (it returns the feature).
    `checkpoint_hint` ends the refusal of a dptool checkpoint that does not fit `arch` (how the command reads it)."""
    from .models import canonical_name, create_model, drop_head, vit_image_size, vit_state_from_timm

    raw = read_state_dict(weights)
    if canonical_name(arch)[0].startswith("vit"):  # DINO's and timm's ViTs name their entries timm's way
        raw = vit_state_from_timm(raw)
    net = create_model(arch, 1)  # its entry names find the backbone; the head is sized once that is known
    state, prefix = select_backbone(raw, net, str(weights), weights_prefix)
    width = _head_width(state)
    size = vit_image_size(state)  # a ViT is built for the image size its position embeddings were made for
    if width is None:  # a self-supervised backbone: its projection head (if any) is no classifier
        state = {k: v for k, v in state.items() if k.split(".")[0] not in _HEAD_MODULES}
        net = create_model(arch, 1, image_size=size) if size else net
        drop_head(net)
    else:
        net = create_model(arch, width, image_size=size)
    _load_weights(net, state, str(weights), checkpoint_hint)
    return net, width, prefix


def _load_weights(model, state: dict, where: str, checkpoint_hint: str = "pass it as --model") -> None:
    from .checkpoint import describe_mismatch, read_checkpoint

    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        hint = ""
        try:
            read_checkpoint(where)
            hint = f"; {where} is a dptool checkpoint, which knows its own architecture: {checkpoint_hint}"
        except Exception:  # noqa: BLE001 - not a dptool checkpoint: no hint
            pass
        raise InputError(f"Weights {where} do not fit the {type(model).__name__} model: "
                         f"{describe_mismatch(model, state, exc)}{hint}.") from exc


def _from_factory(spec: str):
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"--model-factory must look like package.module:function, got {spec!r}.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"--model-factory: cannot import {module_name!r} ({exc}).") from exc
    except Exception as exc:  # the user's module failed as it ran: its error, not an internal one of dptool's
        raise InputError(f"--model-factory: cannot import {module_name!r} ({type(exc).__name__}: {exc}; rerun "
                         "with --debug for its traceback).") from exc
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise InputError(f"--model-factory: {module_name} has no callable {attr!r}.")
    if any(p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
           for p in _parameters(fn)):
        raise InputError(f"--model-factory {spec} needs arguments; give a function that takes none.")
    try:
        model = fn()
    except Exception as exc:  # the user's function failed: its error, not an internal one of dptool's
        raise InputError(f"--model-factory {spec} raised {type(exc).__name__}: {exc} (rerun with --debug for its "
                         "traceback).") from exc
    import torch.nn as nn

    if not isinstance(model, nn.Module):
        raise InputError(f"--model-factory {spec} returned a {type(model).__name__}, not a torch.nn.Module.")
    return model


def _parameters(fn) -> list:
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return []


def weights_fingerprint(module) -> str:
    """``blake2b:<hex>`` of a module's state dict: every entry's name, dtype, shape and bytes, in name order.

    Two training runs that end with the same weights write checkpoints whose bytes (and so `sha256`) differ,
    since a checkpoint also records each epoch's duration; this fingerprint is the same for both.
    """
    import hashlib

    import torch

    h = hashlib.blake2b(digest_size=16)
    for name, value in sorted(module.state_dict().items()):
        h.update(f"{name}\0".encode())
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous().reshape(-1)
            h.update(f"{t.dtype}{tuple(value.shape)}\0".encode())
            h.update(t.view(torch.uint8).numpy())  # the bytes, read in place
        else:  # extra state a module chose to keep in its state dict
            h.update(repr(value).encode())
    return "blake2b:" + h.hexdigest()


def load_surrogate(*, model: str | os.PathLike | None = None, arch: str | None = None,
                   weights: str | os.PathLike | None = None, factory: str | None = None,
                   feature_layer: str | None = None, weights_prefix: str | None = None, device="cpu") -> Surrogate:
    """Load the surrogate from exactly one of `model` (checkpoint or TorchScript), `arch`, `factory`.

    `weights` is a state-dict file for `arch` (required) or `factory` (optional); `weights_prefix` names the part
    of it that holds the backbone when the file holds several (see `select_backbone`). The module
    is moved to `device`, put in eval mode and its gradients switched off. Every problem is one InputError sentence.
    """
    import torch

    from .scores import fingerprint_file

    given = [name for name, v in (("--model", model), ("--arch", arch), ("--model-factory", factory)) if v]
    if len(given) != 1:
        raise InputError("Give the surrogate as exactly one of --model, --arch (with --weights) or "
                         f"--model-factory, got {' and '.join(given) if given else 'none'}.")
    if weights is not None and model is not None:
        raise InputError("--weights goes with --arch or --model-factory; a --model file has its own weights.")
    if weights_prefix is not None and weights is None:
        raise InputError("--weights-prefix goes with --weights (for --arch or --model-factory).")
    recipe: dict = {}
    scripted = False
    has_classifier = True
    if model is not None:
        path = Path(model)
        if not path.is_file():
            raise InputError(f"Surrogate {path} does not exist.")
        if _is_torchscript(path):
            try:
                with warnings.catch_warnings():  # torch 2.x marks TorchScript deprecated; it still loads
                    warnings.simplefilter("ignore", FutureWarning)
                    net = torch.jit.load(str(path), map_location="cpu")
            except Exception as exc:  # noqa: BLE001 - a damaged archive is the user's to fix
                raise InputError(f"TorchScript file {path} cannot be loaded ({type(exc).__name__}: {exc}).") from exc
            scripted = True
            where = f"TorchScript file {path}"
            identity = {"kind": "torchscript", "path": str(path.resolve()), "arch": type(net).__name__}
        else:
            from .checkpoint import load_checkpoint

            net, ckpt = load_checkpoint(path)  # refuses non-finite weights itself
            where = None
            recipe = dict(ckpt.get("recipe") or {})
            history = (ckpt.get("extra") or {}).get("history") or []
            if history and isinstance(history[-1], dict) and "val_top1" not in history[-1]:
                recipe.pop("val_res", None)  # trained without --val: its val_res is an unused default (256)
            identity = {"kind": "checkpoint", "path": str(path.resolve()), "arch": ckpt["arch"],
                        "small_input": bool(ckpt.get("small_input")), "num_classes": int(ckpt["num_classes"]),
                        "data_fingerprint": ckpt.get("data_fingerprint"), "epoch": ckpt.get("epoch")}
        identity["sha256"] = fingerprint_file(path)
    elif arch is not None:
        if weights is None:
            raise InputError(f"--arch {arch} needs --weights, a state-dict file of that architecture.")
        from .models import canonical_name

        net, width, prefix = model_from_weights(arch, weights, weights_prefix=weights_prefix)
        has_classifier = width is not None
        where = f"Weights file {weights}"
        base, small = canonical_name(arch)
        identity = {"kind": "state_dict", "path": str(Path(weights).resolve()), "arch": base,
                    "small_input": small, "num_classes": width, "sha256": fingerprint_file(weights)}
        if prefix:
            identity["weights_prefix"] = prefix
    else:
        net = _from_factory(str(factory))
        where = f"The model of --model-factory {factory}"
        identity = {"kind": "factory", "factory": str(factory), "arch": type(net).__name__}
        if weights is not None:  # a self-supervised checkpoint's backbone is found as for --arch
            state, prefix = select_backbone(read_state_dict(weights), net, str(weights), weights_prefix)
            _load_weights(net, state, str(weights))
            where = f"Weights file {weights} (for --model-factory {factory})"
            identity.update(path=str(Path(weights).resolve()), sha256=fingerprint_file(weights))
            if prefix:
                identity["weights_prefix"] = prefix
    if where is not None:
        from .checkpoint import check_finite_weights

        check_finite_weights(net.state_dict(), where)
    identity["weights"] = weights_fingerprint(net)
    net = net.to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    if feature_layer is not None:
        identity["feature_layer"] = feature_layer
    log.info("surrogate: %s", identity)
    return Surrogate(model=net, identity=identity, scripted=scripted, recipe=recipe, feature_name=feature_layer,
                     has_classifier=has_classifier)
