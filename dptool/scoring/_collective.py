"""The collectives scoring needs on NumPy arrays, over `dptool.distributed`: all-reduce, broadcast, gather.

All are no-ops on one process. With NCCL arrays travel through the current CUDA device; with gloo (CPU, and
the tests) through CPU tensors. Integer reductions are exact, so histograms summed over ranks equal the
single-process histograms bit for bit.
"""

from __future__ import annotations

import numpy as np

from ..distributed import all_reduce_sum, broadcast_object, rank, world_size

__all__ = ["all_reduce", "broadcast", "gather_interleaved"]


def _comm_device():
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce(array: np.ndarray, op: str = "sum") -> np.ndarray:
    """Reduce `array` over all ranks (`op`: sum, min or max); every rank gets the result (same dtype)."""
    if world_size() == 1:
        return array
    import torch
    import torch.distributed as dist

    t = torch.from_numpy(np.ascontiguousarray(array)).to(_comm_device())
    if op == "sum":
        all_reduce_sum(t)
    else:
        dist.all_reduce(t, op={"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return t.cpu().numpy()


def broadcast(array: np.ndarray | None, src: int = 0) -> np.ndarray:
    """Rank `src`'s `array` on every rank."""
    return broadcast_object(array, src=src)


def gather_interleaved(rows: np.ndarray, total: int) -> np.ndarray | None:
    """Reassemble per-rank shards ``x[rank::world]`` of a (total, D) float32 array on rank 0 (None elsewhere)."""
    world = world_size()
    if world == 1:
        return rows
    import torch
    import torch.distributed as dist

    me = rank()
    most = -(-total // world)
    buf = np.zeros((most, rows.shape[1]), dtype=np.float32)
    buf[: len(rows)] = rows
    t = torch.from_numpy(buf).to(_comm_device())
    parts = [torch.empty_like(t) for _ in range(world)] if me == 0 else None
    dist.gather(t, gather_list=parts, dst=0)
    if me != 0:
        return None
    out = np.empty((total, rows.shape[1]), dtype=np.float32)
    for r, part in enumerate(parts):
        out[r::world] = part.cpu().numpy()[: len(range(r, total, world))]
    return out
