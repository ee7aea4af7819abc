"""dptool: dataset pruning for transfer learning (LM/FM of arXiv 2310.08782) on FFCV `.beton` files.

Each command is one library call (the README's "From Python" runs them all): `dptool.convert.convert`,
`dptool.train.train`, `dptool.scoring.score_files`, `dptool.prune.prune`, `dptool.finetune.finetune`,
`dptool.info.describe`, `dptool.integrity.verify`, `dptool.demo.run_demo`; tiny data from `dptool.synthetic`.
"""

import os

# FFCV decodes in threads of the training process while torch's OpenMP pool runs the model. With OpenMP's
# default spin-waiting, idle torch threads burn the cores the decoders need (or that other processes hold):
# measured here, a 2-thread ResNet step went from 0.08 s to 1.7 s under contention. Passive waiting avoids it.
# It must be set before torch starts its pool; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Numba's TBB threading layer (its default where libtbb is installed, as FFCV's Debian build dependencies bring it)
# deadlocks in its unload at interpreter exit after a fork when the process may run on one CPU only (taskset -c 0, a
# one-CPU cpuset or Slurm allocation; seen with Debian's libtbb 2021.8, the unload_tbb() deadlock of numba issue
# #10556): convert, and bench loader's DataLoader, finished their work and never exited. One CPU has no parallel
# work to share, and Numba's workqueue layer exits. Set before Numba is imported; a layer the user set wins.
if "NUMBA_THREADING_LAYER" not in os.environ and hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) == 1:
    os.environ["NUMBA_THREADING_LAYER"] = "workqueue"

from .errors import DptoolError, InputError  # noqa: E402

__all__ = ["DptoolError", "InputError", "__version__"]
__version__ = "0.1.0"
