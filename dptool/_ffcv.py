"""Import FFCV without its side effect: `import ffcv` sets torch (and Numba) to one thread."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["import_ffcv", "restore_threads", "silence_loader_gc_noise"]


def restore_threads(n_threads: int) -> None:
    """Set torch's intra-op thread count back to `n_threads` (FFCV loaders change it)."""
    import torch

    if n_threads > 0 and torch.get_num_threads() != n_threads:
        torch.set_num_threads(n_threads)


def import_ffcv(module: str = "ffcv") -> ModuleType:
    """Import an FFCV module, keeping torch's thread count as it was before.

    The first call also puts FFCV's compiled stages in Numba's disk cache (see `dptool._ffcv_cache`).
    """
    import torch

    from ._ffcv_cache import enable_compile_cache

    before = torch.get_num_threads()
    mod = importlib.import_module(module)
    enable_compile_cache()
    restore_threads(before)
    return mod


def silence_loader_gc_noise() -> None:
    """Drop the harmless numba `KeyError` printed when an FFCV Loader is garbage-collected (FFCV issue #167).

    Installed by the CLI only; every other unraisable exception still reaches the previous hook.
    """
    import sys

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
        previous(unraisable)

    hook._dptool_filter = True
    sys.unraisablehook = hook
