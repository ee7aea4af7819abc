"""Compiled array kernels: class histograms and nearest-centroid assignment, Numba on CPU and CuPy on GPU.

Each public function takes NumPy arrays, CuPy arrays or torch tensors (CPU or CUDA), computes where the
input lives (or where ``device=`` says), and returns its result as the same kind of array on the same device.
"""

from ._device import CudaUnavailableError, KernelInputError, cuda_available
from .histogram import class_histogram, joint_histogram
from .nearest import nearest_centroid

__all__ = [
    "CudaUnavailableError",
    "KernelInputError",
    "class_histogram",
    "cuda_available",
    "joint_histogram",
    "nearest_centroid",
]
