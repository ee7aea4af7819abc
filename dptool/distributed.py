"""torch.distributed helpers: start from torchrun's environment, rank/world, all-reduce, rank-0-only output,
and the device a process runs on.

NCCL on CUDA, gloo on the CPU. Outside torchrun (no `WORLD_SIZE` in the environment) every helper behaves as a
single process of rank 0, so library code calls them unconditionally.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from collections.abc import Callable, Iterator

from .errors import DptoolError, InputError

#: Seconds a failing rank waits for the other ranks of its torchrun job to fail with the same report (they reach a
#: check made before any collective at their own pace) before it prints its own, naming its rank. The environment
#: variable DPTOOL_FAILURE_WAIT_S sets it (the tests lengthen it, so that a loaded machine does not split one report).
FAILURE_WAIT_S = 15.0

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


def local_rank() -> int:
    """This process's rank on its machine (LOCAL_RANK from torchrun; 0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


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


def report_failure(report: str, show: Callable[[bool], None], *, wait_s: float | None = None) -> None:
    """Print the error that ends this process once for a torchrun job whose ranks all fail with it: `show(False)` on
    local rank 0 of each machine (once in each torchrun's output), nothing on the others; else `show(True)`, the
    error naming this rank. `report` is the text compared between the ranks. Outside torchrun: `show(False)`.

    The ranks meet in the store torchrun's agent serves before any process group exists
    (TORCHELASTIC_USE_AGENT_STORE), so this covers the checks made before the first collective. A rank waits at
    most `wait_s` seconds (FAILURE_WAIT_S) for the others to fail alike; a second, different report ends every
    rank's wait at once, and so does another rank passing a `mark_progress` this one never reached, or succeeding
    (`mark_succeeded`). A failure the others do not share, a store that cannot be asked, or a stop (SIGTERM) while
    waiting: the rank prints its own, naming itself. Every rank still exits with its error's code."""
    import time
    from datetime import timedelta

    if not launched_by_torchrun():
        show(False)
        return
    if wait_s is None:
        wait_s = _failure_wait_s()
    shared = _shared_by_every_rank(report, wait_s)
    if shared is None:
        show(True)
        return
    store, prefix = shared
    shown = f"{prefix}shown/{os.environ.get('GROUP_RANK', '0')}"  # printed once per machine: in each torchrun's output
    if local_rank() == 0:
        show(False)
        with contextlib.suppress(Exception):
            store.set(shown, "1")
            if launch_rank() == 0:
                # the store lives in this machine's torchrun agent, which ends soon after this process: a rank of
                # another machine that has not yet seen that every rank failed alike would find it gone, and print
                # its own sentence; wait (briefly) until every rank has seen it
                deadline = time.monotonic() + min(wait_s, 5.0)
                while store.add(prefix + "seen", 0) < int(os.environ["WORLD_SIZE"]) and time.monotonic() < deadline:
                    time.sleep(0.02)
        return
    try:
        store.wait([shown], timedelta(seconds=wait_s))
    except BaseException:  # local rank 0 did not print it (or this rank was stopped): print our own
        show(True)
        return
    # this machine's local rank 0 has printed it and exits; torchrun stops this rank when it sees that, so that its
    # summary names the one that printed as the first failure: wait for the stop (at most wait_s), then exit with the
    # error's code
    with contextlib.suppress(BaseException):
        time.sleep(wait_s)


def _failure_wait_s() -> float:
    """DPTOOL_FAILURE_WAIT_S where it is a number of seconds (finite, 0 or more), else FAILURE_WAIT_S: it is read
    while an error is printed, which a bad value ('15s') replaced by a ValueError traceback on every rank."""
    import math

    try:
        value = float(os.environ.get("DPTOOL_FAILURE_WAIT_S") or FAILURE_WAIT_S)
    except ValueError:
        return FAILURE_WAIT_S
    return value if math.isfinite(value) and value >= 0 else FAILURE_WAIT_S


_STAGE = [0]  # the progress marks this rank has passed (mark_progress)


def mark_progress() -> None:
    """Say that this rank passed a point every rank passes in the same order, just before a collective that a rank
    failing before that point never joins (its checks done, an epoch begun): a rank that fails before it then prints
    its error at once, naming itself, instead of waiting `FAILURE_WAIT_S` for this one to fail alike (it will not: it
    waits in that collective until the failing rank ends). A no-op outside torchrun or where its store cannot be
    asked."""
    if launched_by_torchrun():
        _STAGE[0] += 1
        _mark(f"reached/{_STAGE[0]}")


def mark_succeeded() -> None:
    """Say that this rank's command succeeded: a rank that fails afterwards (rank 0 writing what it alone writes, after
    the last collective) prints its error at once instead of waiting for this one to fail alike. A no-op outside
    torchrun or where its store cannot be asked."""
    if launched_by_torchrun():
        _mark("succeeded")


def _mark(key: str) -> None:
    """Add 1 to `key` of this run in torchrun's store; nothing where it cannot be asked."""
    with contextlib.suppress(Exception):
        found = _agent_store()
        if found is not None:
            store, prefix = found
            store.add(prefix + key, 1)


class PeerFailed(DptoolError):
    """Another process of this torchrun job failed before it joined the process group; this one stops too."""


_AGENT_STORE: list = []  # the one client of this process, or None where none could be made (asked once)


def _agent_store():
    """A client of the store torchrun's agents serve (reachable from every machine of the job), and the prefix of
    dptool's keys for this run and restart; None where torchrun serves none (another launcher set WORLD_SIZE) or it
    cannot be reached. Connected once a process: a new connection at times stalled 5 s, and an unreachable store
    would cost each later call its 30 s timeout."""
    if not _AGENT_STORE:
        _AGENT_STORE.append(None)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            from datetime import timedelta

            import torch.distributed as dist

            with contextlib.suppress(Exception):
                store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                      timeout=timedelta(seconds=30), wait_for_workers=False)
                prefix = (f"dptool/failure/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/"
                          f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/")
                _AGENT_STORE[0] = (store, prefix)
    return _AGENT_STORE[0]


def _wait_for_peers_to_join() -> None:
    """Before joining the process group, wait until every rank of the job is about to join it, and raise PeerFailed
    when one reports a failure first (`report_failure` marks it in torchrun's store).

    Without this, a rank that fails before the group (a file that one machine lacks, refused by the command line)
    leaves the others waiting in `init_process_group` for torch's 30 minutes where the job spans several torchrun
    agents: one agent stops its own processes when one fails, but the agents of other machines are not told.
    Gives up waiting (and lets `init_process_group` wait as before) when the store cannot be asked, or after
    torch's default timeout."""
    import time

    try:
        from torch.distributed.constants import default_pg_timeout

        found = _agent_store()
        if found is None:
            return
        store, prefix = found
        world, deadline = int(os.environ["WORLD_SIZE"]), time.monotonic() + default_pg_timeout.total_seconds()
        store.add(prefix + "joining", 1)
        while time.monotonic() < deadline:
            failed = store.add(prefix + "failed", 0)
            if failed:
                break
            if store.add(prefix + "joining", 0) >= world:
                return
            time.sleep(0.05)
        else:
            return
        first = store.get(prefix + "failed_rank").decode()
    except Exception:  # the store cannot be asked: join as torch would
        return
    raise PeerFailed(f"stopped before starting its work: rank {first} of this torchrun job failed first, and printed "
                     "why (on its machine, when it runs on another).")


def _shared_by_every_rank(report: str, wait_s: float):
    """(torchrun's store, the prefix of this run's keys) when every rank of the job reported `report`
    within `wait_s` seconds; None when another report came first, the wait ended, or the store failed."""
    import hashlib
    import time

    try:
        found = _agent_store()
        if found is None:
            return None
        store, prefix = found
        store.compare_set(prefix + "failed_rank", "", str(launch_rank()))  # the first rank to fail names itself
        store.add(prefix + "failed", 1)  # ranks still waiting to join the process group stop (_wait_for_peers_to_join)
        same = prefix + "same/" + hashlib.sha256(report.encode()).hexdigest()[:32]
        if store.add(same, 1) == 1:  # the first rank with this report: one more distinct report in the job
            store.add(prefix + "kinds", 1)
        world, deadline = int(os.environ["WORLD_SIZE"]), time.monotonic() + wait_s
        later = f"{prefix}reached/{_STAGE[0] + 1}"  # a rank past a mark this one never reached cannot fail alike
        # "kinds" reads 0 for a moment: the first rank with a report counts it just after `same`, and a rank failing
        # alike at once can ask in between; only a second distinct report (2) ends the wait
        while store.add(prefix + "kinds", 0) <= 1 and time.monotonic() < deadline:
            if store.add(same, 0) == world:  # every rank failed, with this report
                store.add(prefix + "seen", 1)  # rank 0 keeps the store's agent alive until every rank has seen it
                return store, prefix
            if store.add(later, 0) or store.add(prefix + "succeeded", 0):
                return None
            time.sleep(0.05)
    except BaseException:  # no store, or stopped (SIGTERM) while waiting
        return None
    return None
