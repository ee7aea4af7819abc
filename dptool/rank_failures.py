"""Report the error that ends a torchrun job's ranks once, through the store torchrun's agents serve: a failing rank
waits briefly for the others to fail alike, and a rank that has not yet joined the process group stops when one
fails (`PeerFailed`) instead of waiting for torch's 30 minutes; a rank marks the points it passes and its success
(`mark_progress`, `mark_succeeded`), so that one failing alone does not wait for the others. Outside torchrun, a
plain single-process report.

`dptool.distributed` re-exports the public names, and calls `mark_progress` and `_wait_for_peers_to_join` itself.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
from collections.abc import Callable

from .errors import DptoolError
from .torchrun_env import launch_rank, launched_by_torchrun, local_rank

__all__ = ["FAILURE_WAIT_S", "report_failure", "mark_progress", "mark_succeeded", "PeerFailed"]

#: Seconds a failing rank waits for the other ranks of its torchrun job to fail with the same report (they reach a
#: check made before any collective at their own pace) before it prints its own, naming its rank. The environment
#: variable DPTOOL_FAILURE_WAIT_S sets it (the tests lengthen it, so that a loaded machine does not split one report).
FAILURE_WAIT_S = 15.0


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
                atexit.register(_release_agent_store)
    return _AGENT_STORE[0]


def _release_agent_store() -> None:
    """Drop the store client before the interpreter's teardown (at exit, after the process group is left: atexit runs
    the handlers registered later first). Left to module teardown, a rank ended by SIGABRT ('terminate called without
    an active exception') in 11 of 20 two-rank runs on a loaded machine here, its work done: torchrun reported the job
    failed."""
    _AGENT_STORE[:] = [None]
    gc.collect()


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
