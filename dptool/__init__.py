"""dptool: dataset pruning for transfer learning (LM/FM of arXiv 2310.08782) on FFCV `.beton` files."""

from .errors import DptoolError, InputError

__all__ = ["DptoolError", "InputError", "__version__"]
__version__ = "0.1.0"
