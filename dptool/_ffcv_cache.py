"""Keep FFCV's compiled pipeline stages in Numba's on-disk cache, so a new process does not recompile them.

Every FFCV `Loader` compiles its decoding stages with Numba when it is built and on its first batch: about 4 s
on a 2-core CPU for the JPEG resized-crop pipeline, paid again by every process (every `dptool score`, every
`train` run, every rank). Numba can cache compiled code on disk, but FFCV's stages defeat it twice:

* the JPEG decode and resize stages call libffcv through ctypes function pointers, which Numba refuses to cache
  ("uses dynamic globals"). Here the same C functions are called as named external symbols (the ctypes
  addresses registered under dptool-private names with llvmlite), which Numba can cache;
* the stages are closures whose closed-over values include other compiled functions. Numba keys a closure's
  cache entry on the pickle of those values, and a compiled function pickles with a random per-process id,
  so the key never matches. Here the key is built from what the values are: the code of functions (recursively,
  with their own closed-over values), the bytes of arrays, the compile options; a stage holding anything else
  is compiled as FFCV would, without a cache.

The cache lives where Numba keeps caches (``NUMBA_CACHE_DIR`` when set, else ``__pycache__`` beside FFCV's sources,
else the user's cache folder) and is invalidated by Numba when FFCV's sources change. Decoded pixels are identical with
and without it (tested). `dptool._ffcv.import_ffcv` turns it on where `patches_enabled()`: FFCV 1.0.2, the
release whose names and signatures this relies on, and ``DPTOOL_FFCV_PATCHES`` not 0.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import pickle
import types
import warnings

import numpy as np

__all__ = ["enable_compile_cache", "compile_cache_enabled"]

log = logging.getLogger(__name__)

_decided = False  # enable_compile_cache has run in this process (it decides once)
_enabled = False


class _Unkeyable(Exception):
    """A closed-over value whose identity across processes cannot be described."""


def _code_key(code: types.CodeType) -> tuple:
    """What a code object computes, without anything that changes between processes (addresses, ids)."""
    consts = tuple(_code_key(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts)
    return (code.co_name, hashlib.sha256(code.co_code).hexdigest(), consts, code.co_names)


def _value_key(obj, depth: int = 0):
    """A process-independent description of a value a compiled stage closes over (raises `_Unkeyable`)."""
    import numba
    from numba.core import types as nb_types
    from numba.core.dispatcher import Dispatcher

    if depth > 32:
        raise _Unkeyable("nested too deeply")
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, np.generic)):
        return (type(obj).__name__, repr(obj))
    if isinstance(obj, (tuple, list)):
        return (type(obj).__name__, tuple(_value_key(o, depth + 1) for o in obj))
    if isinstance(obj, np.ndarray):
        return ("ndarray", obj.dtype.str, obj.shape, hashlib.sha256(np.ascontiguousarray(obj).tobytes()).hexdigest())
    if isinstance(obj, Dispatcher):
        return ("jit", _value_key(obj.py_func, depth + 1), repr(sorted(obj.targetoptions.items())))
    if isinstance(obj, types.FunctionType):
        cells = _closure_values(obj)
        return ("function", obj.__module__, obj.__qualname__, _code_key(obj.__code__), _value_key(cells, depth + 1))
    if obj is numba.prange or obj is range:
        return ("builtin", obj.__name__)
    if isinstance(obj, nb_types.Type):  # an external C function's str is its symbol alone: add its signature
        return ("numba type", type(obj).__name__, str(obj), str(getattr(obj, "sig", "")))
    raise _Unkeyable(type(obj).__name__)


def _closure_values(func) -> tuple:
    """The values a function closes over, in the order of its free variables."""
    return tuple(c.cell_contents for c in func.__closure__ or ())


def _make_cache_classes() -> tuple[type, type]:
    """(KeyNamedCacheFile, StageCache), defined on first use so that importing this module does not import Numba."""
    from numba.core.caching import FunctionCache, IndexDataCacheFile

    class KeyNamedCacheFile(IndexDataCacheFile):
        """Numba's index + data files, with each data file named after its key.

        Numba numbers data files in the order entries arrive. Two processes adding different entries at once
        (two closures of one stage, e.g. a training and an evaluation crop) can then both pick number 1, and the
        index can end up pointing one key at the other's code. A name derived from the key cannot be shared;
        a lost index update only means one more compilation later. An unreadable entry counts as absent.
        """

        def __init__(self, cache_path, filename_base, source_stamp):
            super().__init__(cache_path, filename_base, source_stamp)
            self._filename_base = filename_base

        def load(self, key):
            try:
                return super().load(key)
            except Exception as exc:  # a damaged file (disk full, a killed copy): compile again, as if absent
                log.debug("ignoring an unreadable cache entry in %s: %s", self._cache_path, exc)
                return None

        def save(self, key, data):
            name = f"{self._filename_base}.{hashlib.sha256(repr(key).encode()).hexdigest()[:24]}.nbc"
            self._save_data(name, data)  # data first: an index entry never names a file not yet written
            overloads = self._load_index()
            if overloads.get(key) != name:
                overloads[key] = name
                self._save_index(overloads)

    class StageCache(FunctionCache):
        """Numba's function cache, keyed on `_value_key` of the closure instead of its pickle."""

        def __init__(self, py_func, closure_key: str):
            super().__init__(py_func)
            self._closure_key = closure_key
            self._cache_file = KeyNamedCacheFile(self._cache_path, self._impl.filename_base,
                                                 self._impl.locator.get_source_stamp())

        def _index_key(self, sig, codegen):
            code = hashlib.sha256(self._py_func.__code__.co_code).hexdigest()
            return (sig, codegen.magic_tuple(), (code, self._closure_key))

    return KeyNamedCacheFile, StageCache


def _external_functions() -> dict:
    """libffcv's C entry points as Numba external functions under dptool-private symbol names."""
    import ffcv.libffcv as libffcv
    import llvmlite.binding as llvm
    from numba.core import types as nb_types
    from numba.core.typing import ctypes_utils

    out = {}
    for name in ("ctypes_resize", "ctypes_imdecode", "ctypes_memcopy"):
        cfunc = getattr(libffcv, name)
        symbol = f"dptool_libffcv_{name}"
        llvm.add_symbol(symbol, ctypes.cast(cfunc, ctypes.c_void_p).value)
        out[name] = nb_types.ExternalFunction(symbol, ctypes_utils.make_function_type(cfunc).sig)
    return out


def _cacheable_libffcv(ext: dict) -> dict:
    """`resize_crop`, `imdecode` and `memcpy` of ffcv.libffcv, calling the C functions by symbol name."""
    resize_c, imdecode_c, memcpy_c = ext["ctypes_resize"], ext["ctypes_imdecode"], ext["ctypes_memcopy"]

    def resize_crop(source, start_row, end_row, start_col, end_col, destination):
        resize_c(0, source.ctypes.data, source.shape[0], source.shape[1], start_row, end_row, start_col, end_col,
                 destination.ctypes.data, destination.shape[0], destination.shape[1])

    def imdecode(source, dst, source_height, source_width, crop_height=None, crop_width=None, offset_x=0,
                 offset_y=0, scale_factor_num=1, scale_factor_denom=1, enable_crop=False, do_flip=False):
        return imdecode_c(source.ctypes.data, source.size, source_height, source_width, dst.ctypes.data,
                          crop_height, crop_width, offset_x, offset_y, scale_factor_num, scale_factor_denom,
                          enable_crop, do_flip)

    def memcpy(source, dest):
        return memcpy_c(source.ctypes.data, dest.ctypes.data, source.size * source.itemsize)

    return {"resize_crop": resize_crop, "imdecode": imdecode, "memcpy": memcpy}


def compile_cache_enabled() -> bool:
    """Whether FFCV's stages are being compiled through the on-disk cache in this process."""
    return _enabled


def enable_compile_cache() -> bool:
    """Route FFCV's stage compilation through Numba's on-disk cache; returns whether it is on.

    Decides once per process; call it only where `dptool._ffcv.patches_enabled()`. Returns False when Numba
    lacks what the patch uses (FFCV then compiles as it always did).
    """
    global _decided, _enabled
    if _decided:
        return _enabled
    _decided = True
    import ffcv.fields.bytes as ffcv_bytes
    import ffcv.fields.ndarray as ffcv_ndarray
    import ffcv.fields.rgb_image as ffcv_rgb
    import ffcv.traversal_order.quasi_random as quasi_random
    from ffcv.pipeline.compiler import Compiler
    from numba import njit
    from numba.core.errors import NumbaWarning

    try:
        replacements = _cacheable_libffcv(_external_functions())
        _, stage_cache = _make_cache_classes()
    except Exception as exc:  # an llvmlite/numba without these entry points: FFCV as it is
        log.debug("FFCV compile cache unavailable: %s", exc)
        return False

    # Numba warns once per function it cannot cache (a stage still calling libffcv through ctypes, e.g. FFCV's
    # own crop transforms); such a stage simply compiles every time, as it did before.
    warnings.filterwarnings("ignore", message="Cannot cache compiled function", category=NumbaWarning)

    def compile(cls, code, signature=None):
        """FFCV's `Compiler.compile`, with the dispatcher given a disk cache before anything is compiled."""
        if not cls.is_enabled:
            return code
        parallel = bool(getattr(code, "is_parallel", False)) and cls.num_threads > 1
        dispatcher = njit(fastmath=True, nogil=True, error_model="numpy", parallel=parallel)(code)
        try:
            key = pickle.dumps((_value_key(_closure_values(code)), sorted(dispatcher.targetoptions.items())))
            dispatcher._cache = stage_cache(code, hashlib.sha256(key).hexdigest())
        except (_Unkeyable, RuntimeError) as exc:  # RuntimeError: Numba finds no place for this function's cache
            log.debug("compiling %s without a cache: %s", getattr(code, "__qualname__", code), exc)
        if signature is not None:  # what njit(signature) does: compile now, then no other signature
            dispatcher.compile(signature)
            dispatcher.disable_compile()
        return dispatcher

    Compiler.compile = classmethod(compile)
    for module in (ffcv_rgb, ffcv_ndarray, ffcv_bytes):
        for name, func in replacements.items():
            if hasattr(module, name):
                setattr(module, name, func)
    # the quasi-random order's sampler is a plain module-level njit function: Numba can cache it as it is
    try:
        quasi_random.generate_order_inner.enable_caching()
    except RuntimeError as exc:  # no writable place for the cache
        log.debug("quasi-random order sampler compiled without a cache: %s", exc)
    _enabled = True
    return True
