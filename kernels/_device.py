"""Where arrays live and where a kernel runs: the one dispatch point shared by every kernel.

Inputs are NumPy arrays (or anything ``numpy.asarray`` takes), CPU torch tensors, CuPy arrays or CUDA torch
tensors. :func:`on_device` looks at all of a call's arrays, rejects mixed devices with ``TypeError``, resolves
``device="auto"|"cpu"|"cuda"`` and brings each array to the chosen side: NumPy for the Numba path, CuPy for
the GPU path (zero-copy through DLPack for torch). :meth:`Placement.give_back` returns results as the kind of
array the first input was: NumPy in, NumPy out; CuPy in, CuPy out; torch in, torch out, on the same device.

CuPy and torch are never imported here: a torch tensor can only exist if torch is already in ``sys.modules``,
and CuPy is imported the first time the GPU path is taken.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from dptool.errors import DptoolError, InputError

__all__ = [
    "CudaUnavailableError",
    "KernelInputError",
    "Placement",
    "cuda_available",
    "import_cupy",
    "on_device",
]

Device = Literal["auto", "cpu", "cuda"]
_DEVICES = ("auto", "cpu", "cuda")


class KernelInputError(InputError, ValueError):
    """A kernel argument with a bad value, shape or dtype: a ``ValueError``, and an ``InputError`` (CLI)."""


class CudaUnavailableError(DptoolError, RuntimeError):
    """``device="cuda"`` was asked for on a machine without CuPy or without a usable NVIDIA GPU."""


def import_cupy() -> Any:
    """Import and return CuPy, or raise :class:`CudaUnavailableError` saying why the GPU path cannot run."""
    try:
        import cupy
    except ImportError as exc:
        raise CudaUnavailableError(
            "device='cuda' needs CuPy, which is not installed; install dptool[gpu] (cupy-cuda13x) "
            "or use device='cpu'."
        ) from exc
    try:
        available = bool(cupy.cuda.is_available())
    except Exception as exc:  # a broken driver or runtime: report it, never hide it
        raise CudaUnavailableError(f"device='cuda' was asked for but CUDA could not be queried: {exc}.") \
            from exc
    if not available:
        raise CudaUnavailableError("device='cuda' was asked for but CuPy finds no usable NVIDIA GPU; "
                                   "use device='cpu'.")
    return cupy


def cuda_available() -> bool:
    """True when CuPy imports and sees at least one GPU; never raises."""
    try:
        import_cupy()
    except CudaUnavailableError:
        return False
    return True


# ----------------------------------------------------------------------------------------- classification


def _torch_tensor_type() -> Any:
    torch = sys.modules.get("torch")
    return None if torch is None else torch.Tensor


def _cupy_ndarray_type() -> Any:
    cupy = sys.modules.get("cupy")
    return None if cupy is None else cupy.ndarray


def _kind_and_device(obj: Any, name: str) -> tuple[str, str]:
    """Return (kind, device) where kind is numpy|torch|cupy and device is "cpu" or "cuda:<ordinal>"."""
    tensor = _torch_tensor_type()
    if tensor is not None and isinstance(obj, tensor):
        if obj.device.type == "cpu":
            return "torch", "cpu"
        if obj.device.type == "cuda":
            return "torch", f"cuda:{obj.device.index or 0}"
        raise TypeError(f"{name} is a torch tensor on {obj.device}; only CPU and CUDA tensors are accepted.")
    ndarray = _cupy_ndarray_type()
    if ndarray is not None and isinstance(obj, ndarray):
        return "cupy", f"cuda:{obj.device.id}"
    if hasattr(obj, "__cuda_array_interface__"):  # e.g. a Numba device array: read it through CuPy
        return "cupy", f"cuda:{import_cupy().asarray(obj).device.id}"
    return "numpy", "cpu"


# ---------------------------------------------------------------------------------------------- placement


@dataclass(frozen=True)
class Placement:
    """Where a call computes (``target``: "cpu" or "cuda") and how its results go back to the caller."""

    target: str
    kind: str  # kind of the first input: numpy, torch or cupy
    device: str  # device of the inputs: "cpu" or "cuda:<ordinal>"

    @contextlib.contextmanager
    def gpu_context(self) -> Iterator[Any]:
        """Make the inputs' GPU (and torch's current stream, for torch inputs) current; yields CuPy."""
        cupy = import_cupy()
        on_gpu = self.device.startswith("cuda:")
        ordinal = int(self.device.split(":")[1]) if on_gpu else cupy.cuda.runtime.getDevice()
        with contextlib.ExitStack() as stack:
            stack.enter_context(cupy.cuda.Device(ordinal))
            if self.kind == "torch" and self.device != "cpu":
                torch = sys.modules["torch"]
                handle = torch.cuda.current_stream(ordinal).cuda_stream
                stack.enter_context(cupy.cuda.ExternalStream(handle, ordinal))
            yield cupy

    def give_back(self, result: Any) -> Any:
        """Return a NumPy (CPU path) or CuPy (GPU path) result as the kind and device of the first input."""
        on_gpu = not isinstance(result, np.ndarray)
        if self.device == "cpu":
            host = result.get() if on_gpu else result
            if self.kind == "torch":
                return sys.modules["torch"].from_numpy(np.ascontiguousarray(host))
            return host
        # inputs were on a GPU
        if not on_gpu:
            cupy = import_cupy()
            with cupy.cuda.Device(int(self.device.split(":")[1])):
                result = cupy.asarray(result)
        if self.kind == "torch":
            return sys.modules["torch"].from_dlpack(result)
        return result


@contextlib.contextmanager
def on_device(named: dict[str, Any], device: str) -> Iterator[tuple[Placement, dict[str, Any]]]:
    """Check that the arrays in ``named`` (None values skipped) share a device, and bring them to the target.

    Yields the :class:`Placement` and a dict of the same names holding NumPy arrays (target "cpu") or CuPy
    arrays (target "cuda"); dtypes and layout are left to the caller, and inputs are never modified. On the
    GPU path the body runs with the inputs' GPU current and, for torch inputs, on torch's current stream, so
    call :meth:`Placement.give_back` inside the ``with`` block.
    """
    if device not in _DEVICES:
        raise KernelInputError(f"device must be one of {', '.join(map(repr, _DEVICES))}, got {device!r}.")
    seen: list[tuple[str, str, str]] = []
    for name, obj in named.items():
        if obj is not None:
            kind, where = _kind_and_device(obj, name)
            seen.append((name, kind, where))
    first_name, first_kind, first_device = seen[0]
    for name, _kind, where in seen[1:]:
        if where != first_device:
            raise TypeError(f"{first_name} is on {first_device} but {name} is on {where}; "
                            "put all arrays of one call on the same device.")
    target = "cuda" if device == "cuda" or (device == "auto" and first_device != "cpu") else "cpu"
    placement = Placement(target=target, kind=first_kind, device=first_device)
    if target == "cpu":
        yield placement, {name: None if obj is None else _to_numpy(obj) for name, obj in named.items()}
        return
    import_cupy()  # one clear error if CuPy or the GPU is missing
    with placement.gpu_context():
        yield placement, {name: None if obj is None else _to_cupy(obj) for name, obj in named.items()}


def _to_numpy(obj: Any) -> np.ndarray:
    tensor = _torch_tensor_type()
    if tensor is not None and isinstance(obj, tensor):
        if obj.dtype == sys.modules["torch"].bool:  # NumPy has bools: checked as a NumPy bool array would be
            return obj.detach().cpu().numpy()
        return _plain_tensor(obj).cpu().numpy()
    ndarray = _cupy_ndarray_type()
    if ndarray is not None and isinstance(obj, ndarray):
        return obj.get()
    if hasattr(obj, "__cuda_array_interface__"):
        return import_cupy().asarray(obj).get()
    return np.asarray(obj)


def _to_cupy(obj: Any) -> Any:
    """Bring ``obj`` to the current GPU as a CuPy array: zero-copy for CUDA tensors and CuPy arrays."""
    cupy = import_cupy()
    tensor = _torch_tensor_type()
    if tensor is not None and isinstance(obj, tensor):
        is_bool = obj.dtype == sys.modules["torch"].bool
        obj = _plain_tensor(obj)  # a bool tensor crosses as uint8, and is a bool array again below
        # a CUDA tensor crosses zero-copy, ordered after torch's work on this stream
        arr = cupy.asarray(obj.numpy()) if obj.device.type == "cpu" else cupy.from_dlpack(obj)
        return arr.view(np.bool_) if is_bool else arr  # checked as a bool array, as on the CPU path
    if isinstance(obj, cupy.ndarray):
        return obj
    return cupy.asarray(obj)


def _plain_tensor(obj: Any) -> Any:
    """Detach a tensor and give it a dtype NumPy and CuPy know: bfloat16 becomes float32 (a copy), bool uint8."""
    torch = sys.modules["torch"]
    obj = obj.detach().resolve_conj().resolve_neg()
    if obj.dtype == torch.bfloat16:
        obj = obj.float()
    elif obj.dtype == torch.bool:
        obj = obj.to(torch.uint8)
    return obj
