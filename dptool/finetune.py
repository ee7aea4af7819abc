"""Transfer a pretrained checkpoint to a target task: linear probe (`lp`) or full finetune (`ff`).

LP: the backbone is frozen and in eval mode (BatchNorm statistics fixed), the training images get the
deterministic centre square crop, and a fresh head with the target's classes is trained. Because nothing that
feeds the head changes, the penultimate features are extracted once and the head is trained on them (exactly
the same computation, epochs cost microseconds). FF: all weights train, random-resized crop + flip.
Defaults follow DP4TL's protocol (LP: Adam 0.01, 50 epochs, cosine; FF: Adam 1e-4, 200 epochs, cosine; SGD
0.1/5e-4 when `optimizer="sgd"`). Reported: final-epoch test top-1 and best-over-epochs test top-1 (what the
paper reports, selected on the test set); with `val_fraction`, also test top-1 at the best validation epoch.

With an output checkpoint, the run is checkpointed at the end of an epoch once `checkpoint_every` seconds of epochs
have passed since the last checkpoint (0: every epoch), with what `resume` needs to continue it bit-identically on
the CPU: the weights (head included), the optimizer's, scheduler's and grad scaler's state, and LP's sample-order
generator (FF's order and crops are functions of the seed and the epoch). LP re-extracts its features on resume
(in eval mode: the same on the CPU). The finished run's checkpoint keeps none of that state. The LP and FF
training loops themselves are `dptool.finetune_loops`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .atomic import check_output_path, output_group
from .beton import check_same_classes, fingerprint, open_beton
from .errors import InputError, check_number, check_seed
from .finetune_loops import _full_finetune, _linear_probe, _optimizer
from .runlog import JsonLog
from .steps import resolve_precision

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "split_indices", "CHECKPOINT_EVERY_S"]

log = logging.getLogger(__name__)

#: Seconds of epochs between two checkpoints of a run (`--checkpoint-every`): writing one takes 0.15 s for a
#: ResNet-50 and 0.5 s for a ViT-B/16 here, and an LP epoch on extracted features takes milliseconds
CHECKPOINT_EVERY_S = 60.0

# what a resumed run must share with the checkpoint's: the rest of its trajectory depends on them (the cosine
# schedule's length too: --epochs may not change)
_RESUME_FIXED = ("mode", "epochs", "batch_size", "optimizer", "lr", "weight_decay", "momentum", "label_smoothing",
                 "res", "val_fraction", "seed")


@dataclass(frozen=True)
class FinetuneConfig:
    """Every finetuning choice; None means the mode's DP4TL default (see `resolved`)."""

    mode: str = "lp"  # lp | ff
    epochs: int | None = None  # lp 50, ff 200
    batch_size: int = 128
    optimizer: str | None = None  # adam (default) | sgd
    lr: float | None = None  # lp 0.01; ff adam 1e-4, sgd 0.1
    weight_decay: float | None = None  # adam 0, sgd 5e-4
    momentum: float = 0.9
    label_smoothing: float = 0.0
    res: int = 224
    test_batch_size: int = 256
    val_fraction: float = 0.0
    workers: int = 0
    precision: str = "auto"
    seed: int = 0

    def resolved(self) -> FinetuneConfig:
        """The config with every None replaced by the mode's default, validated."""
        if self.mode not in ("lp", "ff"):
            raise InputError(f"--mode must be lp or ff, got {self.mode!r}.")
        opt = self.optimizer or "adam"
        if opt not in ("adam", "sgd"):
            raise InputError(f"--optimizer must be adam or sgd, got {opt!r}.")
        lr = self.lr if self.lr is not None else (0.01 if self.mode == "lp" else (1e-4 if opt == "adam" else 0.1))
        wd = self.weight_decay if self.weight_decay is not None else (0.0 if opt == "adam" else 5e-4)
        epochs = self.epochs if self.epochs is not None else (50 if self.mode == "lp" else 200)
        out = replace(self, optimizer=opt, lr=lr, weight_decay=wd, epochs=epochs)
        if out.epochs < 1:
            raise InputError(f"--epochs must be at least 1, got {out.epochs}.")
        if not 0.0 <= out.val_fraction < 1.0:
            raise InputError(f"--val-fraction must be in [0, 1), got {out.val_fraction}.")
        if out.batch_size < 1:
            raise InputError(f"--batch-size must be positive, got {out.batch_size}.")
        if out.test_batch_size < 1:
            raise InputError(f"test_batch_size must be positive, got {out.test_batch_size}.")
        check_seed("--seed", out.seed)
        check_number("--lr", out.lr, low=0, low_open=True)
        check_number("--weight-decay", out.weight_decay, low=0)
        check_number("--momentum", out.momentum, low=0, high=1)
        check_number("--label-smoothing", out.label_smoothing, low=0, high=1, high_open=True)
        if out.res < 8 or out.workers < 0:
            raise InputError(f"--res must be at least 8 and --workers >= 0, got {out.res} and {out.workers}.")
        if out.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise InputError(f"--precision must be auto, fp32, bf16 or fp16, got {out.precision!r}.")
        return out


@dataclass
class FinetuneResult:
    """Final-epoch and best-over-epochs test top-1 (and validation-selected when a split was held out)."""

    mode: str
    checkpoint: str
    target_classes: int
    train_images: int
    val_images: int
    test_images: int
    epochs: int
    final_test_top1: float
    best_test_top1: float
    best_test_epoch: int
    best_val_top1: float | None = None
    test_top1_at_best_val: float | None = None
    best_val_epoch: int | None = None
    start_epoch: int = 0  # the epoch this run started at: > 0 when it resumed a stopped one
    output: str | None = None
    log: str | None = None
    seconds: float = 0.0  # this run's, from a resume on
    config: dict = field(default_factory=dict)
    history: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain-JSON form for `--json`."""
        return asdict(self)


def split_indices(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) row indices: `fraction` of each class held out (at least one sample of a class of two or
    more), never a whole class."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(fraction * len(rows))) if fraction > 0 else 0
        if fraction > 0 and len(rows) > 1:
            k = max(k, 1)
        k = min(k, len(rows) - 1)  # a class is never held out whole: training must see it
        val.append(rows[:k])
        train.append(rows[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _pretrained(path, arch: str | None, weights_prefix: str | None, device):
    """The model to transfer and a checkpoint-like dict of what is known of it (arch, small_input, recipe, ...)."""
    from .checkpoint import NotACheckpointError, check_finite_weights, load_checkpoint
    from .models import canonical_name
    from .surrogate import model_from_weights

    if arch is None:
        if weights_prefix is not None:
            raise InputError("--weights-prefix goes with --arch, which reads CHECKPOINT as a weights file.")
        try:
            return load_checkpoint(path, device=device)
        except NotACheckpointError as exc:
            raise InputError(f"{str(exc).rstrip('.')}; to finetune a state dict or a self-supervised checkpoint "
                             "(MoCo, DINO, SwAV), name its architecture with --arch.") from exc
    if not Path(path).is_file():
        raise InputError(f"Weights file {path} does not exist.")
    model, _, prefix = model_from_weights(arch, path, weights_prefix=weights_prefix,
                                          checkpoint_hint="drop --arch")
    check_finite_weights(model.state_dict(), f"Weights file {path}")  # as load_checkpoint and score refuse them
    base, small = canonical_name(arch)
    return model.to(device), {"arch": base, "small_input": small, "blurpool": False,
                              "image_size": getattr(model, "image_size", None),
                              "recipe": {"weights": str(path), "weights_prefix": prefix}, "data_fingerprint": None}


def _check_lr(cfg: FinetuneConfig) -> None:
    """Refuse an --lr the optimizer cannot compute with (its step overflows float32: Adam divides it by its bias
    correction), in one sentence before any work; found by one step of the optimizer on a one-element tensor."""
    import torch

    p = torch.zeros(1, requires_grad=True)
    p.grad = torch.ones(1)
    try:
        _optimizer([p], cfg).step()
    except RuntimeError as exc:
        if "overflow" not in str(exc):
            raise
        raise InputError(f"--lr {cfg.lr:g} is beyond what {cfg.optimizer}'s step can compute in float32; give a "
                         "smaller --lr.") from None


def _check_test_file(train_b, test_b, train_data, test_data) -> str:
    """Refuse a test file with labels or class names the training file lacks; warn when it holds the training
    samples themselves. Returns the training file's fingerprint (computed here for that comparison)."""
    num_classes = train_b.num_classes
    if test_b.num_samples and int(test_b.labels.max()) >= num_classes:
        raise InputError(f"Test file {test_data} has label {int(test_b.labels.max())}, beyond the {num_classes} "
                         f"classes of {train_data}.")
    check_same_classes(train_b, test_b, "Test file", "test")
    train_fp = fingerprint(train_b)
    if os.path.samefile(train_b.path, test_b.path) or train_fp == fingerprint(test_b):
        log.warning("the test file %s holds the training file's samples: its top-1 measures fit, not transfer",
                    test_data)
    return train_fp


def _resume_state(output: Path, cfg: FinetuneConfig, train_data, train_fp: str, test_data, test_fp: str,
                  checkpoint, source_fp: str) -> dict:
    """The checkpoint of a stopped finetune at `output`, after checking it continues this run: the same training and
    test data, pretrained weights and recipe (`_RESUME_FIXED`), and finite weights and optimizer state."""
    from .checkpoint import check_finite_resume, check_same_options, read_checkpoint

    if not output.exists():
        raise InputError(f"Cannot resume: checkpoint {output} does not exist (run without --resume first).")
    saved = read_checkpoint(output)
    recipe = (saved.get("recipe") or {}).get("finetune")
    extra = saved.get("extra") or {}
    if recipe is None:
        raise InputError(f"Cannot resume: {output} was not written by dptool finetune (dptool train --resume "
                         "continues a training run).")
    state = extra.get("resume")
    if state is None:
        raise InputError(f"Cannot resume: {output} holds a finished finetune of {saved['epoch']} epochs; there is "
                         "nothing left to run (a new run: drop --resume and give --force or another -o).")
    if saved.get("data_fingerprint") != train_fp:
        raise InputError(f"Cannot resume: {output} was finetuned on {extra.get('data') or 'another file'} with "
                         f"fingerprint {saved.get('data_fingerprint')}, but {train_data} has {train_fp}; resume on the "
                         "training file it began with.")
    if state.get("test_fingerprint") != test_fp:
        raise InputError(f"Cannot resume: {output} was tested on {state.get('test') or 'another file'} with "
                         f"fingerprint {state.get('test_fingerprint')}, but {test_data} has {test_fp}; resume with the "
                         "test file it began with, so that every epoch's test top-1 is of one file.")
    if state.get("source_fingerprint") != source_fp:
        raise InputError(f"Cannot resume: {output} was finetuned from {state.get('source') or 'other weights'}, "
                         f"whose weights differ from {checkpoint}'s; give the checkpoint it began from.")
    # LP extracts the training images' features in batches of --test-batch-size: on the CPU another batch gives
    # features that differ in their last bits, and the resumed head would not end as an uninterrupted run's
    lp = cfg.mode == "lp"
    fixed = _RESUME_FIXED + (("test_batch_size",) if lp else ())
    changed = [name for name in fixed if recipe.get(name) != getattr(cfg, name)]
    why = (", since the linear probe extracts its features in batches of --test-batch-size"
           if "test_batch_size" in changed else "")
    check_same_options(output, changed, recipe, cfg, did="finetuned", give="the options it began with" + why,
                       may_change=("--workers", "--precision") if lp else ("--test-batch-size", "--workers",
                                                                          "--precision"))
    check_finite_resume(saved["state_dict"], state["optimizer"], output)
    return saved


def finetune(checkpoint: str | os.PathLike, train_data: str | os.PathLike, test_data: str | os.PathLike, *,
             config: FinetuneConfig = FinetuneConfig(), output: str | os.PathLike | None = None,
             log_path: str | os.PathLike | None = None, force: bool = False, progress: bool = False,
             device=None, arch: str | None = None, weights_prefix: str | None = None, resume: bool = False,
             checkpoint_every: float = CHECKPOINT_EVERY_S) -> FinetuneResult:
    """Transfer `checkpoint` to the target (`train_data`, `test_data`) by LP or FF; one process.

    `checkpoint` is a dptool checkpoint, or with `arch` a weights file of that architecture: a state dict or a
    self-supervised checkpoint (MoCo, DINO, SwAV: see `dptool.surrogate.select_backbone`, `weights_prefix`).
    `output` (optional) receives the finetuned checkpoint, also during the run once `checkpoint_every` seconds of
    epochs have passed since the last (0: after every epoch); `resume` continues the stopped run that wrote it.
    `log_path` (default: beside `output`) receives a JSON-lines log.
    """
    import torch

    from .checkpoint import save_checkpoint
    from .distributed import launched_by_torchrun
    from .loaders import eval_loader, inference_loader, train_loader
    from .models import replace_head, resize_vit
    from .surrogate import weights_fingerprint

    if launched_by_torchrun():  # every rank would run the whole job and write the same files
        raise InputError("finetune runs in one process (target sets are small); run it without torchrun.")
    cfg = config.resolved()
    if cfg.optimizer == "adam" and cfg.momentum != FinetuneConfig.momentum:  # as score names the options unread
        log.warning("--momentum %g is SGD's; --optimizer adam does not read it (its betas are 0.9, 0.999)",
                    cfg.momentum)
    _check_lr(cfg)
    check_number("--checkpoint-every", checkpoint_every, low=0)
    if resume and output is None:
        raise InputError("--resume continues the run whose checkpoint -o names; give -o.")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = resolve_precision(device, cfg.precision)
    if cfg.precision not in ("auto", precision):  # as score names it
        log.warning("--precision %s applies to CUDA; on %s finetuning runs in %s", cfg.precision, device, precision)
    if output is not None:
        output = check_output_path(output, force=True, inputs=(checkpoint, train_data, test_data))
        if output.exists() and not (force or resume):
            raise InputError(f"Output {output} already exists; pass --force to overwrite it, or --resume to continue "
                             "the stopped finetune that wrote it.")
        log_path = log_path or Path(output).with_suffix(".jsonl")
    if log_path is not None:
        if output is not None and os.path.realpath(log_path) == os.path.realpath(output):  # linked folders too
            raise InputError(f"The log would be written over the checkpoint {output}; give -o a .pt name or --log "
                             "another path.")
        log_path = check_output_path(log_path, force=force or resume,
                                     inputs=(checkpoint, train_data, test_data, output))
    train_b, test_b = open_beton(train_data), open_beton(test_data)
    num_classes = train_b.num_classes
    train_fp = _check_test_file(train_b, test_b, train_data, test_data)
    test_fp = fingerprint(test_b) if output is not None else None
    tr_idx, va_idx = split_indices(train_b.labels, cfg.val_fraction, cfg.seed)
    if cfg.val_fraction > 0 and not len(va_idx):
        raise InputError(f"--val-fraction {cfg.val_fraction} holds out no image of {train_data}: every class has "
                         "a single training image, and a class is never held out whole; drop --val-fraction.")
    model, ckpt = _pretrained(checkpoint, arch, weights_prefix, device)
    source_fp = weights_fingerprint(model) if output is not None else None  # what a resume must begin from too
    saved = (_resume_state(output, cfg, train_data, train_fp, test_data, test_fp, checkpoint, source_fp)
             if resume else None)
    image_size = ckpt.get("image_size")
    if str(ckpt["arch"]).startswith("vit"):  # its position embeddings fix its input size: resampled to --res
        image_size = image_size or 224
        if cfg.res != image_size:
            resize_vit(model, cfg.res)
            log.warning("%s is a %s for %d px images; its position embeddings are resampled (bicubic) to --res %d",
                        checkpoint, ckpt["arch"], image_size, cfg.res)
            image_size = cfg.res
    torch.manual_seed(cfg.seed)
    head = replace_head(model, num_classes)
    start = None
    if saved is not None:
        try:
            model.load_state_dict(saved["state_dict"])
        except RuntimeError as exc:
            from .checkpoint import describe_mismatch

            raise InputError(f"Cannot resume: {output} does not fit the model built from {checkpoint}: "
                             f"{describe_mismatch(model, saved['state_dict'], exc)}.") from exc
        start = {**saved["extra"]["resume"], "epoch": int(saved["epoch"])}
    start_epoch = start["epoch"] if start else 0
    head_line = {"config": asdict(cfg), "checkpoint": str(checkpoint), "arch": ckpt["arch"],
                 "source_fingerprint": ckpt.get("data_fingerprint"), "train": str(train_data), "test": str(test_data),
                 "num_classes": num_classes, "device": str(device), "precision": precision}
    if saved is not None:  # the epochs it redoes are dropped from the log, the records before kept
        jlog = JsonLog.resume(log_path, start_epoch, history=saved["extra"].get("history", []))
        jlog.write({"event": "resume", **head_line, "start_epoch": start_epoch})
    else:  # held until the first checkpoint: a run stopped before it leaves no log to block a rerun
        jlog = JsonLog(log_path, hold=True)
        jlog.write({"event": "config", **head_line})
    recipe = {"finetune": asdict(cfg), "source_recipe": ckpt.get("recipe")}
    history: list[dict] = list(saved["extra"].get("history", [])) if saved else []
    unsaved = [0.0]  # seconds of epochs since the last checkpoint

    def write_checkpoint(extra: dict) -> None:
        save_checkpoint(output, arch=ckpt["arch"], num_classes=num_classes, state_dict=model.state_dict(),
                        recipe=recipe, data_fingerprint=train_fp, epoch=len(history),
                        small_input=bool(ckpt["small_input"]), blurpool=bool(ckpt.get("blurpool")),
                        image_size=image_size, extra={"history": history, "data": str(train_data), **extra})

    def on_epoch(record: dict, state) -> None:
        history.append(record)
        unsaved[0] += record["epoch_time_s"] + record.get("test_time_s", 0.0)
        if output is None or record["epoch"] + 1 == cfg.epochs or unsaved[0] < checkpoint_every:
            jlog.write(record)  # the last epoch's checkpoint is written with the summary
            return
        with output_group():  # this epoch's log and checkpoint are placed together; a failure leaves the last pair
            jlog.write(record)
            write_checkpoint({"resume": {**state(), "source": str(checkpoint), "source_fingerprint": source_fp,
                                         "test": str(test_data), "test_fingerprint": test_fp}})
            jlog.release()  # from the first checkpoint on, the log is written as it grows
        unsaved[0] = 0.0

    kw = {"batch_size": cfg.test_batch_size, "res": cfg.res, "workers": cfg.workers, "device": device}
    test_loader = eval_loader(test_data, **kw)
    val_loader = eval_loader(train_data, indices=va_idx, **kw) if len(va_idx) else None
    started = time.perf_counter()
    if cfg.mode == "lp":
        train_rows = inference_loader(train_data, indices=tr_idx, **kw)
        _linear_probe(model, head, train_rows, test_loader, val_loader, cfg, device, precision, progress, start,
                      on_epoch)
    else:
        # every training image each epoch, as DP4TL's loader (drop_last=False); only a last batch of a single
        # image is dropped, since BatchNorm in training mode cannot normalise one sample with a 1x1 feature map
        loader = train_loader(train_data, batch_size=cfg.batch_size, res=cfg.res, workers=cfg.workers, device=device,
                              seed=cfg.seed, indices=tr_idx if len(va_idx) else None,
                              drop_last=len(tr_idx) % cfg.batch_size == 1)
        _full_finetune(model, loader, test_loader, val_loader, cfg, device, precision, progress, start, on_epoch)

    tests = [h["test_top1"] for h in history]
    best = int(np.argmax(tests))
    result = FinetuneResult(
        mode=cfg.mode, checkpoint=str(checkpoint), target_classes=num_classes, train_images=len(tr_idx),
        val_images=len(va_idx), test_images=test_b.num_samples, epochs=cfg.epochs, final_test_top1=tests[-1],
        best_test_top1=tests[best], best_test_epoch=best, start_epoch=start_epoch,
        output=str(output) if output else None, log=str(log_path) if log_path else None,
        seconds=time.perf_counter() - started, config=asdict(cfg), history=history,
    )
    if len(va_idx):
        vals = [h["val_top1"] for h in history]
        bv = int(np.argmax(vals))
        result.best_val_top1, result.best_val_epoch, result.test_top1_at_best_val = vals[bv], bv, tests[bv]
    summary = {k: v for k, v in result.to_dict().items() if k not in ("history", "config")}
    with output_group():  # the checkpoint and the log are placed together: a summary in the log means it completed
        jlog.write({"event": "summary", **summary})
        if output is not None:  # the finished run's checkpoint keeps no resume state: there is nothing to continue
            write_checkpoint({"summary": summary})
        jlog.release()
    return result
