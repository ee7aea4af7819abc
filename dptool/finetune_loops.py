"""The training loops of `dptool.finetune`: the linear probe (the head alone, on features extracted once) and the
full finetune (every weight), each calling back after every epoch with its record and what a resume needs, and
stopping a run whose training loss is no longer finite.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from .errors import DptoolError
from .steps import autocast, evaluate, grad_scaler, train_step

if TYPE_CHECKING:
    from .finetune import FinetuneConfig

__all__: list[str] = []  # the loops are finetune's; nothing here is public


def _schedule(optimizer, total_steps: int):
    import torch

    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))


def _optimizer(params, cfg: FinetuneConfig):
    import torch

    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _features(model, loader, device, precision: str, progress: bool = False, desc: str = "features"):
    """Penultimate features (N, D) float32 and labels (N,) of every batch of `loader`, model in eval mode."""
    import torch
    from tqdm import tqdm

    from .features import feature_hook
    from .models import feature_layer

    feats, labels = [], []
    model.eval()
    with feature_hook(feature_layer(model)) as slot, torch.no_grad(), autocast(device, precision):
        for x, y in tqdm(loader, total=len(loader), desc=desc, unit="batch", disable=not progress, leave=False):
            model(x)
            feats.append(slot[0].float())
            labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def _top1(head, feats, labels, batch: int) -> float:
    import torch

    with torch.no_grad():
        hits = sum(int(head(feats[i:i + batch]).argmax(1).eq(labels[i:i + batch]).sum())
                   for i in range(0, len(labels), batch))
    return hits / max(len(labels), 1)


def _check_loss(train_loss: float, epoch: int, cfg: FinetuneConfig) -> None:
    """Stop a run whose training loss is no longer finite: every later epoch would train on NaN weights. Read once
    per epoch (the epoch's summed loss), so it adds no synchronisation per step."""
    if not np.isfinite(train_loss):  # a failure of the run, exit 1, as train's TrainingDiverged
        raise DptoolError(f"The training loss became {train_loss} in epoch {epoch + 1} of {cfg.epochs} "
                         f"({cfg.mode}, {cfg.optimizer} at --lr {cfg.lr:g}); lower --lr.")


def _linear_probe(model, head, train_rows, test_loader, val_loader, cfg: FinetuneConfig, device, precision: str,
                  progress: bool, start: dict | None, on_epoch) -> None:
    """Train `head` alone on the frozen backbone's features, extracted once (`train_rows` in deterministic
    preprocessing, the test and validation loaders); `on_epoch(record, state)` after each epoch, `state()` giving
    what a resume needs. `start` (a resume): the epoch to start at and that state."""
    import torch
    from tqdm import tqdm

    for p in model.parameters():
        p.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(True)
    ftr, ytr = _features(model, train_rows, device, precision, progress, "features: train")
    fte, yte = _features(model, test_loader, device, precision, progress, "features: test")
    fva, yva = (_features(model, val_loader, device, precision, progress, "features: val") if val_loader
                else (None, None))
    optimizer = _optimizer(head.parameters(), cfg)
    steps = -(-len(ytr) // cfg.batch_size)
    sched = _schedule(optimizer, cfg.epochs * steps)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    first = 0
    if start is not None:
        optimizer.load_state_dict(start["optimizer"])
        sched.load_state_dict(start["scheduler"])
        gen.set_state(start["generator"])
        first = start["epoch"]
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    def state() -> dict:
        return {"optimizer": optimizer.state_dict(), "scheduler": sched.state_dict(), "generator": gen.get_state()}

    for epoch in tqdm(range(first, cfg.epochs), desc="linear probe", unit="epoch", disable=not progress,
                      initial=first, total=cfg.epochs):
        t0 = time.perf_counter()
        order = torch.randperm(len(ytr), generator=gen).to(device)
        total = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync per step
        for i in range(steps):
            rows = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            loss = criterion(head(ftr[rows]), ytr[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sched.step()
            total += loss.detach().double() * len(rows)
        train_loss = float(total) / len(ytr)
        _check_loss(train_loss, epoch, cfg)
        rec = {"event": "epoch", "epoch": epoch, "train_loss": train_loss,
               "test_top1": _top1(head, fte, yte, cfg.test_batch_size), "epoch_time_s": time.perf_counter() - t0}
        if fva is not None:
            rec["val_top1"] = _top1(head, fva, yva, cfg.test_batch_size)
        on_epoch(rec, state)


def _full_finetune(model, loader, test_loader, val_loader, cfg: FinetuneConfig, device, precision: str,
                   progress: bool, start: dict | None, on_epoch) -> None:
    """Train every weight on `loader` (random-resized crop + flip), evaluating on the test and validation loaders
    after each epoch; `on_epoch(record, state)` after each, as `_linear_probe`."""
    import torch
    from tqdm import tqdm

    optimizer = _optimizer(model.parameters(), cfg)
    sched = _schedule(optimizer, cfg.epochs * len(loader))
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    scaler = grad_scaler(precision)
    first = 0
    if start is not None:
        optimizer.load_state_dict(start["optimizer"])
        sched.load_state_dict(start["scheduler"])
        if start.get("scaler"):
            scaler.load_state_dict(start["scaler"])
        first = start["epoch"]
    loader.loader.next_epoch = first  # FFCV's epoch counter drives the order and the seeded crops

    def state() -> dict:
        return {"optimizer": optimizer.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict()}

    for epoch in tqdm(range(first, cfg.epochs), desc="finetune", unit="epoch", disable=not progress, initial=first,
                      total=cfg.epochs):
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed * 1000 + epoch)  # whatever a model draws in training mode: a function of the epoch
        model.train()
        total, n = torch.zeros((), dtype=torch.float64, device=device), 0  # summed on the device: no sync
        for x, y in tqdm(loader, total=len(loader), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                         disable=not progress, leave=False):
            _, loss = train_step(model, optimizer, scaler, criterion, x, y, device, precision)
            sched.step()
            total += loss.detach().double() * len(y)
            n += len(y)
        train_loss = float(total) / max(n, 1)  # waits for the last step, so the time below is the epoch's
        train_s = time.perf_counter() - t0
        _check_loss(train_loss, epoch, cfg)
        rec = {"event": "epoch", "epoch": epoch, "train_loss": train_loss, "epoch_time_s": train_s,
               "images_per_s": n / max(train_s, 1e-9)}
        t1 = time.perf_counter()
        rec["test_top1"] = evaluate(model, test_loader, device, precision)["val_top1"]
        rec["test_time_s"] = time.perf_counter() - t1
        if val_loader is not None:
            rec["val_top1"] = evaluate(model, val_loader, device, precision)["val_top1"]
        on_epoch(rec, state)
