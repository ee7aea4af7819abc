"""The GPU kernels' CUDA source compiles with NVRTC, every template instance in use, on a machine without a GPU.

NVRTC is the compiler CuPy uses at run time; its library comes with torch's CUDA wheels (nvidia-cuda-nvrtc). This
runs no kernel (tests/test_kernels_gpu.py does that on a GPU): it catches a source that would not compile, or a
name expression that names no instance, before anyone reaches a GPU. Skipped where libnvrtc is not installed.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sysconfig

import pytest

from dptool.kernels._cuda_source import OPTIONS, SOURCE, hist_names

ARCHS = ("compute_80", "compute_90")  # A100 and H100/H200, the GPUs the project's numbers come from


def _nvrtc() -> ctypes.CDLL:
    site = sysconfig.get_paths()["purelib"]
    def find(pattern: str) -> list[str]:
        return sorted(glob.glob(os.path.join(site, "nvidia", "**", pattern), recursive=True))

    found, builtins = find("libnvrtc.so.*"), find("libnvrtc-builtins.so.*")
    if not found or not builtins:
        pytest.skip("libnvrtc (nvidia-cuda-nvrtc) is not installed")
    ctypes.CDLL(builtins[0], mode=ctypes.RTLD_GLOBAL)  # NVRTC opens it by name, and its folder is not searched
    lib = ctypes.CDLL(found[0])
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


def _check(lib, status: int) -> None:
    assert status == 0, lib.nvrtcGetErrorString(status).decode()


def _compile(lib, arch: str, names: list[str]) -> tuple[int, str, dict[str, str]]:
    """Compile SOURCE for `arch`: the status, the log, and each name expression's lowered (mangled) name."""
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), SOURCE.encode(), b"dptool_kernels.cu", 0, None, None))
    try:
        for name in names:
            _check(lib, lib.nvrtcAddNameExpression(prog, name.encode()))
        opts = [o.encode() for o in (*OPTIONS, f"--gpu-architecture={arch}")]
        status = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        _check(lib, lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)))
        log = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetProgramLog(prog, log))
        lowered = {}
        if status == 0:
            for name in names:
                out = ctypes.c_char_p()
                _check(lib, lib.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(out)))
                lowered[name] = out.value.decode()
        return status, log.value.decode(errors="replace"), lowered
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_source_compiles_every_kernel_in_use(arch):
    lib = _nvrtc()
    names = hist_names()  # argmin_tile is extern "C": found by its plain name
    status, log, lowered = _compile(lib, arch, names)
    assert status == 0, log
    assert "warning" not in log.lower(), log
    assert len(names) == 12 and set(lowered) == set(names)
    assert len(set(lowered.values())) == len(names)  # each expression is its own instance
    assert all(v.startswith("_Z") and "hist" in v for v in lowered.values())


def test_a_broken_source_is_reported():
    # the check above can fail: NVRTC rejects a name expression that names no instance of the template
    lib = _nvrtc()
    status, log, _ = _compile(lib, ARCHS[0], ["hist<float, true, true, true, true>"])
    assert status != 0 and "hist" in log
