"""What torchrun's environment says about this process (set before any process group exists, read without torch),
and the torchrun command that starts a job laid out as a recorded one.

`dptool.distributed` re-exports these names.
"""

from __future__ import annotations

import os

__all__ = ["launched_by_torchrun", "launch_rank", "launch_layout", "torchrun_command", "local_rank"]


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher) set WORLD_SIZE > 1 in the environment."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_rank() -> int:
    """The RANK torchrun gave this process (0 without torchrun); valid before and after the process group."""
    return int(os.environ.get("RANK", "0"))


def launch_layout() -> dict:
    """How torchrun made up this job, as its options name it: {"nnodes": machines, "nproc_per_node": processes on
    this machine} (GROUP_WORLD_SIZE, LOCAL_WORLD_SIZE); {} without torchrun."""
    if not launched_by_torchrun():
        return {}
    return {"nnodes": int(os.environ.get("GROUP_WORLD_SIZE", "1")),
            "nproc_per_node": int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))}


def torchrun_command(world: int, layout: dict) -> str | None:
    """The torchrun that starts `world` processes as `layout` (a `launch_layout()` recorded by a run) made them up:
    `torchrun --nproc_per_node N`, with `--nnodes M` on several machines; None when the layout is not recorded or
    does not multiply up to `world`."""
    nnodes, nproc = layout.get("nnodes"), layout.get("nproc_per_node")
    if not (isinstance(nnodes, int) and isinstance(nproc, int) and nnodes * nproc == world):
        return None
    return f"torchrun {f'--nnodes {nnodes} ' if nnodes > 1 else ''}--nproc_per_node {nproc}"


def local_rank() -> int:
    """This process's rank on its machine (LOCAL_RANK from torchrun; 0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0"))
