"""The step that `train`, `finetune` and `bench` share: autocast at a precision, the fp16 grad scaler, one
optimizer step, and top-1/top-5 evaluation over a loader (summed over the ranks under torchrun); and the recipe's
optimizer, which `train` trains with and `bench` measures."""

from __future__ import annotations

import contextlib

from . import distributed as dist
from .errors import InputError

__all__ = ["autocast", "grad_scaler", "make_optimizer", "train_step", "resolve_precision", "evaluate"]


def autocast(device, precision: str):
    """Autocast context for `precision` on `device` (fp32 or a CPU: no autocast)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(device, precision))
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def grad_scaler(precision: str):
    """The grad scaler of a training loop: active for fp16 (whose small gradients underflow), a pass-through
    otherwise."""
    import torch

    return torch.amp.GradScaler("cuda", enabled=precision == "fp16")


def make_optimizer(config, params, lr: float):
    """`config.optimizer` (a `TrainConfig`'s) over `params`, weight decay on every parameter (as DP4TL, biases and
    norms included): SGD with `momentum`, or AdamW with betas (`momentum`, 0.999) and its decoupled decay."""
    import torch

    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(config.momentum, 0.999), weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)


def train_step(model, optimizer, scaler, criterion, x, y, device, precision: str):
    """One optimizer step on the batch (`x`, `y`): forward under autocast at `precision`, backward through
    `scaler` (`grad_scaler`); returns the logits and the loss. `train`, `finetune` and `bench` all step this way."""
    with autocast(device, precision):
        try:
            logits = model(x)
        except ValueError as exc:  # torch's BatchNorm, on a batch of one image whose feature map is 1x1
            if "Expected more than 1 value per channel when training" not in str(exc):
                raise
            raise InputError(f"A batch of {len(x)} image at {x.shape[-1]} px leaves the model's BatchNorm one value "
                             "per channel, which it cannot train on; give --batch-size 2 or more (or a higher "
                             "resolution).") from None
        loss = criterion(logits, y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return logits, loss


def resolve_precision(device, precision: str) -> str:
    """`auto` -> bf16 on a CUDA device that computes it natively (Ampere, compute capability 8, or later; else
    fp16), fp32 on the CPU."""
    import torch

    if torch.device(device).type != "cuda":
        return "fp32"
    if precision == "auto":
        # not torch.cuda.is_bf16_supported(): recent torch also says yes where bf16 is only emulated (V100, T4),
        # where bf16 autocast is many times slower than fp16
        native = bool(torch.version.hip) or torch.cuda.get_device_capability(torch.device(device))[0] >= 8
        return "bf16" if native else "fp16"
    return precision


def evaluate(model, loader, device, precision: str, *, kept=None) -> dict:
    """Top-1/top-5 of `model` over `loader`, summed over ranks, every rank with rank 0's buffers (the model rank 0
    checkpoints). With `kept` (bool (C,) tensor), `val_*` counts only images whose label is a kept class and
    `val_*_all` every image."""
    import torch

    model = getattr(model, "module", model)  # evaluate the plain module under DDP: no buffer sync per batch
    dist.broadcast_buffers(model)  # ...but rank 0's BatchNorm statistics on every rank: the model it checkpoints
    model.eval()
    sums = torch.zeros(6, dtype=torch.float64, device=device)  # top1, top5, n (kept), top1, top5, n (all)
    seen = 0  # counted on the host: a tensor made from a Python number per batch would be a blocking copy
    with torch.no_grad(), autocast(device, precision):
        for x, y in loader:
            seen += len(y)
            logits = model(x)
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit1 = top[:, 0].eq(y)
            hit5 = top.eq(y[:, None]).any(dim=1)
            mask = kept[y] if kept is not None else torch.ones_like(hit1)
            sums[:5] += torch.stack([(hit1 & mask).sum(), (hit5 & mask).sum(), mask.sum(),
                                     hit1.sum(), hit5.sum()]).double()
    sums[5] = seen
    dist.all_reduce_sum(sums)
    s = sums.tolist()
    out = {"val_top1": s[0] / max(s[2], 1), "val_top5": s[1] / max(s[2], 1), "val_images": int(s[2])}
    if kept is not None:
        out.update({"val_top1_all": s[3] / max(s[5], 1), "val_top5_all": s[4] / max(s[5], 1),
                    "val_images_all": int(s[5])})
    return out
