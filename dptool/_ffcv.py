"""Import FFCV without its side effects, and start it fast.

`import ffcv` sets torch (and Numba) to one thread: `import_ffcv` puts torch's count back. On FFCV 1.0.2 it also
applies three start-up patches (``DPTOOL_FFCV_PATCHES=0`` turns them off; decoded pixels are identical either way):

* FFCV builds its table of image modes (``{"jpg": 0, "raw": 1}``) as a Numba typed dict at import, which compiles
  Numba's dict code: 3.5 s of every process, on a 2-core CPU. Only Python reads the table, so it is built as a
  plain dict (`numba.typed.Dict` is `dict` while FFCV's modules are first imported, nothing else meanwhile);
* FFCV's compiled pipeline stages go to Numba's disk cache (`dptool._ffcv_cache`);
* every FFCV `Loader` builds, over all samples of its file whatever rows it reads, a dict and two dicts of sets
  (about 600 B a sample: 250 MB and 1.4 s at 400k samples, measured by `benchmarks/bench_scale.py`). Only the
  quasi-random order and FFCV's process cache read them: they are built on first use
  (`_lazy_memory_manager_tables`), so a scoring or evaluation loader keeps its two sorted arrays alone.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
import threading
from types import ModuleType

__all__ = ["import_ffcv", "patches_enabled", "restore_threads", "silence_loader_gc_noise"]

PATCHED_RELEASE = "1.0.2"  # the FFCV release whose internals the start-up patches rely on

log = logging.getLogger(__name__)


def restore_threads(n_threads: int) -> None:
    """Set torch's intra-op thread count back to `n_threads` (FFCV loaders change it)."""
    import torch

    if n_threads > 0 and torch.get_num_threads() != n_threads:
        torch.set_num_threads(n_threads)


@functools.cache
def patches_enabled() -> bool:
    """Whether the start-up patches apply: FFCV 1.0.2 is installed and ``DPTOOL_FFCV_PATCHES`` is not 0."""
    from importlib.metadata import PackageNotFoundError, version

    if os.environ.get("DPTOOL_FFCV_PATCHES", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        found = version("ffcv")
    except PackageNotFoundError:
        return False
    if found != PATCHED_RELEASE:
        log.debug("FFCV %s is not %s: started without dptool's patches", found, PATCHED_RELEASE)
    return found == PATCHED_RELEASE


def _first_import_with_plain_image_modes() -> None:
    """Import ffcv with `numba.typed.Dict` standing for `dict` (see the module docstring)."""
    import numba.typed

    had = "Dict" in vars(numba.typed)  # else numba.typed resolves it lazily, as it will again afterwards
    typed_dict = numba.typed.Dict
    numba.typed.Dict = dict
    try:
        importlib.import_module("ffcv")
    finally:
        if had:
            numba.typed.Dict = typed_dict
        else:
            del numba.typed.Dict


class _LazyTable:
    """A `MemoryManager` attribute built with its two siblings on first read, under a lock, then a plain attribute.

    A non-data descriptor: the built value goes in the instance's `__dict__` under the same name, so later reads
    (and assignments, and managers built before the patch) never come back here.
    """

    _lock = threading.Lock()

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, manager, owner=None):
        if manager is None:
            return self
        with self._lock:
            if self.name not in vars(manager):
                _build_tables(manager)
        return vars(manager)[self.name]


def _build_tables(manager) -> None:
    """FFCV 1.0.2's own construction of the tables, stored as instance attributes."""
    from collections import defaultdict

    import numpy as np

    alloc_table = manager.reader.alloc_table
    page_locations = alloc_table["ptr"] >> int(np.log2(manager.reader.page_size))
    sample_to_pages, page_to_samples = defaultdict(set), defaultdict(set)
    for sid, pid in zip(alloc_table["sample_id"], page_locations):
        sample_to_pages[sid].add(pid)
        page_to_samples[pid].add(sid)
    vars(manager).update(ptr_to_size=dict(zip(manager.ptrs, manager.sizes)), sample_to_pages=sample_to_pages,
                         page_to_samples=page_to_samples)


def _lazy_memory_manager_tables() -> None:
    """Make FFCV's `MemoryManager` build its per-sample tables when first read instead of in every constructor."""
    import numpy as np
    from ffcv.memory_managers.base import MemoryManager

    if getattr(MemoryManager, "_dptool_lazy_tables", False):
        return

    def __init__(self, reader) -> None:
        # FFCV's constructor without the tables: the sorted pointers and sizes the readers search
        self.reader = reader
        alloc_table = reader.alloc_table
        order = np.argsort(alloc_table["ptr"])
        self.ptrs = alloc_table["ptr"][order]
        self.sizes = alloc_table["size"][order]
        super(MemoryManager, self).__init__()

    MemoryManager.__init__ = __init__
    for name in ("ptr_to_size", "sample_to_pages", "page_to_samples"):
        setattr(MemoryManager, name, _LazyTable(name))
    MemoryManager._dptool_lazy_tables = True


def import_ffcv(module: str = "ffcv") -> ModuleType:
    """Import an FFCV module, keeping torch's thread count as it was before (and patched, see above)."""
    import torch

    before = torch.get_num_threads()
    if patches_enabled() and "ffcv" not in sys.modules:
        _first_import_with_plain_image_modes()
    mod = importlib.import_module(module)
    if patches_enabled():
        from ._ffcv_cache import enable_compile_cache

        enable_compile_cache()
        _lazy_memory_manager_tables()
    restore_threads(before)
    return mod


def silence_loader_gc_noise() -> None:
    """Drop the harmless numba `KeyError` printed when an FFCV Loader is garbage-collected (FFCV issue #167).

    A Ctrl-C that lands in a finalizer (Numba's run as a command's objects are freed) would be printed as
    "Exception ignored" and lost; it is raised again instead, where it stops the command (or is ignored once the
    command is over). Installed by the CLI only; every other unraisable exception still reaches the previous hook.
    """
    import signal

    previous = sys.unraisablehook
    if getattr(previous, "_dptool_filter", False):
        return

    def hook(unraisable):
        tb = unraisable.exc_traceback
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = tb.tb_frame.f_code.co_filename if tb is not None else ""
        if unraisable.exc_type is KeyError and where.endswith("numba/core/dispatcher.py"):
            return
        if unraisable.exc_type is KeyboardInterrupt:
            # delivered a moment later, once this hook has returned: tripped now, it would be raised in here
            later = threading.Timer(0.05, signal.pthread_kill, args=(threading.main_thread().ident, signal.SIGINT))
            later.daemon = True
            later.start()
            return
        previous(unraisable)

    hook._dptool_filter = True
    sys.unraisablehook = hook
