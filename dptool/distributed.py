"""torch.distributed helpers: start from torchrun's environment, rank/world, all-reduce, rank-0-only output,
and the device a process runs on.

NCCL on CUDA, gloo on the CPU. Outside torchrun (no `WORLD_SIZE` in the environment) every helper behaves as a
single process of rank 0, so library code calls them unconditionally.

What torchrun's environment says (`dptool.torchrun_env`) and the once-per-job report of a failure through
torchrun's store (`dptool.rank_failures`) live in their own modules; their names are re-exported here.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from collections.abc import Iterator

from .errors import InputError
from .rank_failures import (
    FAILURE_WAIT_S,
    PeerFailed,
    _wait_for_peers_to_join,
    mark_progress,
    mark_succeeded,
    report_failure,
)
from .torchrun_env import launch_layout, launch_rank, launched_by_torchrun, local_rank, torchrun_command

__all__ = [
    "launched_by_torchrun",
    "launch_rank",
    "launch_layout",
    "torchrun_command",
    "init_from_env",
    "is_initialized",
    "rank",
    "local_rank",
    "world_size",
    "is_main",
    "barrier",
    "all_reduce_sum",
    "broadcast_object",
    "broadcast_buffers",
    "check_same_inputs",
    "cleanup",
    "distributed_session",
    "shard_rows",
    "resolve_device",
    "synchronize",
    "FAILURE_WAIT_S",
    "report_failure",
    "mark_progress",
    "mark_succeeded",
    "PeerFailed",
]


def is_initialized() -> bool:
    """True when a default process group exists."""
    if "torch" not in sys.modules:  # no group without torch; a command that never needs torch never imports it
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def init_from_env(backend: str | None = None):
    """Join the process group torchrun described (env://) and return this process's device.

    Backend: `nccl` when CUDA is available, else `gloo`. Returns `cuda:LOCAL_RANK` or `cpu`.
    Single process (no torchrun): returns `cuda` or `cpu` without creating a group.
    """
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if not launched_by_torchrun():
        return torch.device("cuda" if cuda else "cpu")
    if cuda:
        gpus = torch.cuda.device_count()
        if local_rank() >= gpus:  # torch.cuda.set_device would fail with CUDA's bare 'invalid device ordinal'
            raise InputError(f"torchrun started local rank {local_rank()} but this machine has {gpus} GPU(s) "
                             f"visible; start at most {gpus} process(es) per machine (--nproc_per_node).")
        torch.cuda.set_device(local_rank())
    if not is_initialized():
        _wait_for_peers_to_join()
        dist.init_process_group(backend=backend or ("nccl" if cuda else "gloo"), init_method="env://")
    return torch.device(f"cuda:{local_rank()}" if cuda else "cpu")


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    if not is_initialized():
        return 0
    import torch.distributed as dist

    return dist.get_rank()


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    if not is_initialized():
        return 1
    import torch.distributed as dist

    return dist.get_world_size()


def is_main() -> bool:
    """True on rank 0: the only process that writes logs and checkpoints."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op on one process)."""
    if is_initialized():
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(tensor):
    """Sum `tensor` over ranks in place and return it (unchanged on one process)."""
    if is_initialized():
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank (picklable objects; identity on one process)."""
    if not is_initialized():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_buffers(module, src: int = 0) -> None:
    """Give every rank `src`'s buffers of `module` (BatchNorm running statistics), in place; no-op on one process.

    DistributedDataParallel sends rank 0's buffers to the other ranks at the start of each forward pass, so after
    the last training step every rank holds its own batch's update of them: a model evaluated as it stands on
    each rank is then another model on each, and not the one rank 0 checkpoints."""
    if is_initialized():
        import torch.distributed as dist

        for buf in module.buffers():
            dist.broadcast(buf, src=src)


def check_same_inputs(fingerprints: dict[str, str]) -> None:
    """Refuse, on every rank alike, inputs that differ between the ranks: `fingerprints` maps each input (as the
    user named it) to its fingerprint on this rank. On several machines every rank reads its own machine's copy of
    a file, and a copy that differs (another conversion, a stale file) was trained on or scored without a word, its
    results mixed with the others' under rank 0's fingerprint. A no-op on one process."""
    if not is_initialized():
        return
    import torch.distributed as dist

    mark_progress()  # a collective: a rank refused before it (an output exists on its machine) need not wait for us
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, (os.environ.get("GROUP_RANK", "0"), fingerprints))
    _, first = gathered[0]
    for other, (machine, theirs) in enumerate(gathered):
        for name, value in first.items():
            if theirs.get(name) != value:
                raise InputError(f"{name} differs between the processes of this torchrun job: rank 0 reads one with "
                                 f"fingerprint {value}, rank {other} (on machine {machine}) one with "
                                 f"{theirs.get(name)}; give every machine the same file.")


def cleanup() -> None:
    """Leave the process group if one exists."""
    if is_initialized():
        import torch.distributed as dist

        dist.destroy_process_group()


def resolve_device(device: str):
    """`auto` -> CUDA when torch sees a GPU, else the CPU; `cuda` without a GPU is refused in one sentence."""
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"--device must be auto, cpu or cuda, got {device!r}.")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: torch sees no CUDA device here; use --device cpu (or auto).")
    return torch.device(device)


def synchronize(device) -> None:
    """Wait for the work queued on a CUDA `device` (a no-op elsewhere): kernels run asynchronously, so a timer read
    without it misses them."""
    if str(device).startswith("cuda") and "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize(device)


def shard_rows(rows):
    """This rank's share of `rows` as a NumPy array: every world-th row starting at the rank (exact: no padding,
    no duplicates), so that summing per-rank counts gives the single-process result. The dtype is kept: the
    loaders validate indices after sharding."""
    import numpy as np

    return np.asarray(rows)[rank()::world_size()]


@contextlib.contextmanager
def distributed_session(backend: str | None = None) -> Iterator:
    """`with distributed_session() as device:` joins torchrun's group (if any), which then stays until the process
    exits: torch cannot join a second group in one torchrun job (the second `init_process_group` reads the first
    group's addresses from torchrun's store, and hangs or fails), so several dptool calls in one script share it."""
    started = launched_by_torchrun() and not is_initialized()
    device = init_from_env(backend)
    if started:
        atexit.register(cleanup)
    yield device
