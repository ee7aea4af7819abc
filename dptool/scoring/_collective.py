"""The few collectives scoring needs, on NumPy arrays: all-reduce, broadcast, and an interleaved gather.

All are no-ops on one process. With the NCCL backend arrays travel through the current CUDA device; with gloo
(CPU, and the tests) through CPU tensors. Integer reductions are exact, so histograms summed over ranks equal
the single-process histograms bit for bit.
"""

from __future__ import annotations

import numpy as np

from ..features import rank_world

__all__ = ["all_reduce", "broadcast", "gather_interleaved"]


def _comm_device():
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce(array: np.ndarray, op: str = "sum") -> np.ndarray:
    """Reduce `array` over all ranks (`op`: sum, min or max); every rank gets the result (same dtype)."""
    _, world = rank_world()
    if world == 1:
        return array
    import torch
    import torch.distributed as dist

    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    t = torch.from_numpy(np.ascontiguousarray(array)).to(_comm_device())
    dist.all_reduce(t, op=ops[op])
    return t.cpu().numpy()


def broadcast(array: np.ndarray | None, *, shape: tuple, dtype, src: int = 0) -> np.ndarray:
    """Rank `src`'s `array` (of `shape` and `dtype`) on every rank."""
    rank, world = rank_world()
    if world == 1:
        return array
    import torch
    import torch.distributed as dist

    buf = np.ascontiguousarray(array, dtype=dtype) if rank == src else np.empty(shape, dtype=dtype)
    t = torch.from_numpy(buf).to(_comm_device())
    dist.broadcast(t, src=src)
    return t.cpu().numpy()


def gather_interleaved(rows: np.ndarray, total: int) -> np.ndarray | None:
    """Reassemble per-rank shards ``x[rank::world]`` of a (total, D) array on rank 0 (None elsewhere)."""
    rank, world = rank_world()
    if world == 1:
        return rows
    import torch
    import torch.distributed as dist

    width = rows.shape[1]
    most = -(-total // world)
    buf = np.zeros((most, width), dtype=np.float32)
    buf[: len(rows)] = rows
    t = torch.from_numpy(buf).to(_comm_device())
    parts = [torch.empty_like(t) for _ in range(world)] if rank == 0 else None
    dist.gather(t, gather_list=parts, dst=0)
    if rank != 0:
        return None
    out = np.empty((total, width), dtype=np.float32)
    for r, part in enumerate(parts):
        n = len(range(r, total, world))
        out[r::world] = part.cpu().numpy()[:n]
    return out
