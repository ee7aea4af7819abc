"""What `dptool train --resume` checks before it continues a checkpoint: the same model, data and recipe (the
options the rest of the run's trajectory depends on, the epoch its learning rate peaked at, the number of processes),
finite weights and moments; under torchrun, read and checked by rank 0 and sent to the other ranks."""

from __future__ import annotations

import math
from pathlib import Path

from . import distributed as dist
from .errors import InputError
from .recipe import RECIPES, TrainConfig

__all__ = ["resume_state"]


# what a resumed run must share with the checkpoint's: the rest of its trajectory depends on them
# (and the epoch of the learning rate's peak as the run followed it: `_check_peak_epoch`)
_RESUME_FIXED = ("optimizer", "schedule", "batch_size", "lr", "momentum", "weight_decay", "label_smoothing",
                 "min_res", "max_res", "start_ramp", "end_ramp", "res_step", "seed")
# what checkpoints written before a field was recorded followed
_BEFORE_FIELD = {"optimizer": "sgd", "schedule": "ramp"}


def _flag(name: str) -> str:
    """The command-line option of a `TrainConfig` field (`res_step` has none)."""
    return name if name == "res_step" else "--" + name.replace("_", "-")


def _check_peak_epoch(output: Path, recipe: dict, config: TrainConfig) -> None:
    """Refuse a resume whose learning rate would peak at another epoch than the checkpoint's run did: --lr-peak-epoch
    is capped at half of --epochs, so raising --epochs may move the peak of a run whose warm-up was capped, and a run
    resumed after it would warm up again (its learning rate falling back and rising to a second peak)."""
    if recipe.get("lr_peak_epoch") is None:
        return
    was = recipe.get("effective_lr_peak_epoch")
    if was is None:  # written before it was recorded
        was = min(float(recipe["lr_peak_epoch"]), float(recipe.get("epochs") or math.inf) / 2)
    now = config.peak_epoch()
    if float(was) == now:
        return
    capped = (f" (--lr-peak-epoch {recipe['lr_peak_epoch']:g} capped at half of --epochs {recipe.get('epochs')})"
              if float(was) < float(recipe["lr_peak_epoch"]) else "")
    also = (f" (--lr-peak-epoch {config.lr_peak_epoch:g} capped at half of --epochs {config.epochs})"
            if now < config.lr_peak_epoch else f" (--lr-peak-epoch {config.lr_peak_epoch:g})")
    keep = f"--lr-peak-epoch {float(was):g} (--warmup-epochs)"
    if float(was) > config.epochs / 2:  # fewer epochs than the checkpoint planned cap any peak below it
        keep = f"--epochs {math.ceil(2 * float(was))} or more with {keep}"
    raise InputError(f"Cannot resume: {output} was trained with its learning rate peaking at epoch {float(was):g}"
                     f"{capped}, but this run's would peak at epoch {now:g}{also}; give {keep} to keep its warm-up.")


def _resume_state(output: Path, config: TrainConfig, data: Path, data_fp: str, num_classes: int,
                  known: set[str]) -> dict:
    """The checkpoint to resume from, after checking it continues this run (`known`: the data's fingerprints)."""
    from .checkpoint import check_finite_resume, check_same_options, read_checkpoint
    from .models import canonical_name

    if not output.exists():
        raise InputError(f"Cannot resume: checkpoint {output} does not exist (run without --resume first).")
    ckpt = read_checkpoint(output)
    if "finetune" in (ckpt.get("recipe") or {}):
        raise InputError(f"Cannot resume: {output} was written by dptool finetune; `dptool finetune ... -o {output} "
                         "--resume` continues a stopped finetune, and train --resume continues a train checkpoint.")
    want = canonical_name(config.arch, config.small_input)
    if (ckpt["arch"], bool(ckpt["small_input"])) != want or bool(ckpt.get("blurpool")) != config.blurpool:
        def onoff(flag) -> str:
            return "on" if flag else "off"

        raise InputError(f"Cannot resume: {output} holds a {ckpt['arch']} with small input "
                         f"{onoff(ckpt['small_input'])} and blurpool {onoff(ckpt.get('blurpool'))}, but this run asks "
                         f"for a {want[0]} with small input {onoff(want[1])} and blurpool {onoff(config.blurpool)}; "
                         "give the --arch, --small-input and --blurpool it was trained with.")
    if ckpt.get("data_fingerprint") not in known or int(ckpt["num_classes"]) != num_classes:
        trained_on = (ckpt.get("extra") or {}).get("data") or "another file"
        raise InputError(f"Cannot resume: {output} was trained on {trained_on} with fingerprint "
                         f"{ckpt.get('data_fingerprint')} ({ckpt['num_classes']} classes), but {data} has "
                         f"{data_fp} ({num_classes} classes); resume on the data it was trained on.")
    if ckpt.get("optimizer_state") is None:
        raise InputError(f"Cannot resume: {output} holds no optimizer state (dptool finetune writes such "
                         "checkpoints); only a checkpoint of dptool train can be resumed.")
    if int(ckpt["epoch"]) >= config.epochs:
        raise InputError(f"Cannot resume: {output} already holds {ckpt['epoch']} epochs; raise --epochs above that.")
    recipe = {**_BEFORE_FIELD, **(ckpt.get("recipe") or {})} if ckpt.get("recipe") else {}
    # a ramp left to its default (None) follows --epochs, which may change
    changed = [name for name in _RESUME_FIXED
               if recipe.get(name) is not None and recipe[name] != getattr(config, name)]
    preset = next((f" (--recipe {name} sets them)" for name, values in RECIPES.items()
                   if changed and set(changed) <= set(values) and all(values[k] == recipe[k] for k in changed)), "")
    check_same_options(output, changed, recipe, config, did="trained", give=f"the options it was trained with{preset}",
                       may_change=("--epochs", "--val", "--val-res", "--val-batch-size", "--workers", "--precision"),
                       flag=_flag)
    _check_peak_epoch(output, recipe, config)
    was, world = recipe.get("world_size"), dist.world_size()
    if was is not None and int(was) != world:  # the effective batch, and the peak learning rate scaled by it
        if int(was) > 1:  # the world size matters, not its split: say how it ran where the checkpoint records it
            command = dist.torchrun_command(int(was), recipe) or f"torchrun with --nnodes x --nproc_per_node = {was}"
            how = f"with {was} processes in all, as it ran ({command})"
        else:
            how = "as it ran (one process, without torchrun)"
        raise InputError(f"Cannot resume: {output} was trained by {was} process{'es' if int(was) > 1 else ''} "
                         f"(effective batch {recipe.get('effective_batch_size')}), but this run has {world} "
                         f"(effective batch {config.batch_size * world}); resume it {how}.")
    check_finite_resume(ckpt["state_dict"], ckpt["optimizer_state"], output)
    return ckpt


def resume_state(output: Path, config: TrainConfig, data: Path, data_fp: str, num_classes: int,
                 known: set[str]) -> dict:
    """`_resume_state` read and checked by rank 0 and sent to the other ranks: rank 0 wrote the checkpoint, so the
    other machines of a torchrun job need not see it (no shared file system), and no rank continues from another
    copy of it. A refusal is raised on every rank alike."""
    if dist.world_size() == 1:
        return _resume_state(output, config, data, data_fp, num_classes, known)
    ckpt = refusal = None
    if dist.is_main():
        try:
            ckpt = _resume_state(output, config, data, data_fp, num_classes, known)
        except InputError as exc:
            refusal = str(exc)
    ckpt, refusal = dist.broadcast_object((ckpt, refusal))
    if refusal is not None:
        raise InputError(refusal)
    return ckpt
