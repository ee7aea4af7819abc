"""Import FFCV without its side effect: `import ffcv` sets torch (and Numba) to one thread."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["import_ffcv", "restore_threads"]


def restore_threads(n_threads: int) -> None:
    """Set torch's intra-op thread count back to `n_threads` (FFCV loaders change it)."""
    import torch

    if n_threads > 0 and torch.get_num_threads() != n_threads:
        torch.set_num_threads(n_threads)


def import_ffcv(module: str = "ffcv") -> ModuleType:
    """Import an FFCV module, keeping torch's thread count as it was before."""
    import torch

    before = torch.get_num_threads()
    mod = importlib.import_module(module)
    restore_threads(before)
    return mod
