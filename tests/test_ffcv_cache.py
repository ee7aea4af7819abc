"""dptool's start-up patches of FFCV (plain-dict image modes, compile cache, per-sample tables built on first use):
same pixels and training order as plain FFCV, and a second process compiles none of FFCV's stages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import make_beton

from dptool._ffcv_cache import _Unkeyable, _value_key

# Decodes a JPEG .beton through the inference and evaluation loaders in a fresh process; saves the pixels and
# labels, and reports which functions Numba compiled (its "numba:compile" event fires for compilations, not for
# loads from the cache).
DECODE = textwrap.dedent("""
    import json, sys
    import numpy as np
    from numba.core import event
    from dptool import _ffcv_cache
    from dptool._ffcv import import_ffcv
    from dptool.loaders import eval_loader, inference_loader, train_loader

    modes = import_ffcv("ffcv.fields.rgb_image").IMAGE_MODES

    compiled = []
    class Listener(event.Listener):
        def on_start(self, ev):
            func = ev.data["dispatcher"].py_func
            compiled.append(f"{func.__module__}:{func.__qualname__}")
        def on_end(self, ev):
            pass
    event.register("numba:compile", Listener())
    xs, ys, tables_built = [], [], []
    for make in (inference_loader, eval_loader):  # whole-short-side and 224/256 centre crops
        loader = make(sys.argv[1], batch_size=16, res=24, workers=2)
        for x, y in loader:
            xs.append(x.numpy()); ys.append(y.numpy())
        tables_built.append("page_to_samples" in vars(loader.loader.memory_manager))
    # quasi-random order reads FFCV's page table: built on first use when patched, in the constructor when not
    for x, y in train_loader(sys.argv[1], batch_size=6, res=24, workers=2, seed=1):
        xs.append(x.numpy()); ys.append(y.numpy())
    np.savez(sys.argv[2], x=np.concatenate(xs), y=np.concatenate(ys))
    print(json.dumps({"enabled": _ffcv_cache.compile_cache_enabled(), "compiled": compiled,
                      "modes": dict(modes), "modes_type": type(modes).__name__, "tables_built": tables_built}))
""")


def _decode(beton, out, cache_dir, enabled: bool) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir), DPTOOL_FFCV_PATCHES="1" if enabled else "0")
    done = subprocess.run([sys.executable, "-c", DECODE, str(beton), str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_cached_stages_decode_the_same_pixels_and_are_not_recompiled(tmp_path):
    beton = make_beton(tmp_path, "jpeg", n_classes=3, per_class=12, size=40, write_mode="jpg")
    cache = tmp_path / "numba-cache"

    cold = _decode(beton, tmp_path / "cold.npz", cache, enabled=True)
    assert cold["enabled"] and cold["modes_type"] == "dict"
    assert cold["tables_built"] == [False, False]  # file-order loaders never read FFCV's per-sample tables
    assert any("decode" in name for name in cold["compiled"])  # the JPEG stage was compiled, then saved
    assert list(cache.rglob("*decode*.nbi")), "no cache index written for the decode stage"

    warm = _decode(beton, tmp_path / "warm.npz", cache, enabled=True)
    stages = [n for n in warm["compiled"] if n.startswith(("ffcv.", "dptool._ffcv_cache:"))]
    assert stages == [], f"recompiled although cached: {stages}"

    plain = _decode(beton, tmp_path / "plain.npz", tmp_path / "unused-cache", enabled=False)
    assert not plain["enabled"] and plain["modes_type"] == "Dict"  # FFCV as released: a Numba typed dict
    assert plain["tables_built"] == [True, True]
    assert cold["modes"] == plain["modes"] == {"jpg": 0, "raw": 1}
    assert any("decode" in name for name in plain["compiled"])
    ref = np.load(tmp_path / "plain.npz")
    assert len(ref["y"]) == 3 * 36  # two file-order passes and a training epoch (same order, same crops)
    for run in ("cold", "warm"):
        got = np.load(tmp_path / f"{run}.npz")
        np.testing.assert_array_equal(got["x"], ref["x"])
        np.testing.assert_array_equal(got["y"], ref["y"])


def test_value_key_describes_contents_not_identity():
    from numba import njit

    def outer(arr):
        def inner(i):
            return arr[i]

        return inner

    def plain(i):
        return i

    assert _value_key(outer(np.arange(3))) == _value_key(outer(np.arange(3)))
    assert _value_key(outer(np.arange(3))) != _value_key(outer(np.arange(4)))
    assert _value_key(outer(np.arange(3))) != _value_key(outer(np.arange(3.0)))
    # two dispatchers of one function (each with its own random id) are the same; other options are not
    assert _value_key(njit(plain)) == _value_key(njit(plain))
    assert _value_key(njit(plain)) != _value_key(njit(parallel=True)(plain))
    assert _value_key((1, "a", None)) != _value_key((1, "b", None))
    with pytest.raises(_Unkeyable):
        _value_key(object())


def _interleaved_saves(cache_file_class, folder, keys: dict) -> dict:
    """Process one saves keys["train"]; right after its first write (index or data), process two saves
    keys["eval"] whole; then one finishes. Both read the index before either wrote. Returns what a third loads."""
    one, two = (cache_file_class(str(folder), "rgb_image.decode-185.py311", "stamp") for _ in range(2))
    one._load_index = two._load_index = lambda: {}
    writes = []

    def after_first_write(method):
        def wrapped(*args):
            method(*args)
            writes.append(method.__name__)
            if len(writes) == 1:
                two.save(keys["eval"], "code of eval")
        return wrapped

    one._save_index, one._save_data = after_first_write(one._save_index), after_first_write(one._save_data)
    one.save(keys["train"], "code of train")
    reader = cache_file_class(str(folder), "rgb_image.decode-185.py311", "stamp")
    return {name: reader.load(key) for name, key in keys.items()}


def test_entries_saved_at_once_by_two_processes_never_load_each_others_code(tmp_path):
    from numba.core.caching import IndexDataCacheFile

    from dptool._ffcv_cache import _make_cache_classes

    key_named, _ = _make_cache_classes()
    keys = {"train": ("sig", "cpu", ("code", "closure A")), "eval": ("sig", "cpu", ("code", "closure B"))}
    (tmp_path / "dptool").mkdir()
    (tmp_path / "numba").mkdir()
    loaded = _interleaved_saves(key_named, tmp_path / "dptool", keys)
    assert all(code in (None, f"code of {name}") for name, code in loaded.items()), loaded
    assert any(code is not None for code in loaded.values())  # a lost entry is only compiled again later
    # numba's numbered data files, under the same interleaving: the eval key loads the training stage's code
    numbered = _interleaved_saves(IndexDataCacheFile, tmp_path / "numba", keys)
    assert numbered["eval"] == "code of train"


def test_an_unreadable_entry_counts_as_absent(tmp_path):
    from dptool._ffcv_cache import _make_cache_classes

    key_named, _ = _make_cache_classes()
    cache = key_named(str(tmp_path), "rgb_image.decode-185.py311", "stamp")
    cache.save(("sig", "cpu", ("code", "closure")), {"code": b"\x00" * 64})
    assert cache.load(("sig", "cpu", ("code", "closure"))) == {"code": b"\x00" * 64}
    (data,) = tmp_path.glob("*.nbc")
    data.write_bytes(data.read_bytes()[:10])  # truncated
    assert cache.load(("sig", "cpu", ("code", "closure"))) is None


def test_lazy_tables_are_ffcvs_built_once_and_assignable(tiny_beton, monkeypatch):
    """Read from two threads at once, the tables are built once; they hold what FFCV's constructor built
    (each sample on the pages its allocation rows point into); an assignment replaces them as on plain FFCV."""
    import threading
    import time

    import dptool._ffcv
    from dptool.beton import open_beton
    from dptool.loaders import eval_loader

    builds = []
    build = dptool._ffcv._build_tables

    def slow_build(manager):  # a window in which a second reader would start its own build, were there no lock
        builds.append(manager)
        time.sleep(0.2)
        build(manager)

    monkeypatch.setattr(dptool._ffcv, "_build_tables", slow_build)
    mm = eval_loader(tiny_beton, batch_size=16, res=16, workers=1).loader.memory_manager
    assert "page_to_samples" not in vars(mm)
    got = [None, None]
    readers = [threading.Thread(target=lambda i=i: got.__setitem__(i, mm.page_to_samples)) for i in range(2)]
    for t in readers:
        t.start()
    for t in readers:
        t.join()
    assert len(builds) == 1 and got[0] is got[1] is mm.page_to_samples
    beton = open_beton(tiny_beton)
    alloc = beton.alloc_table
    pages = alloc["ptr"] >> int(np.log2(beton.page_size))
    assert {int(p): {int(x) for x in s} for p, s in mm.page_to_samples.items()} == {
        int(p): {int(x) for x in alloc["sample_id"][pages == p]} for p in np.unique(pages)}
    assert all(mm.ptr_to_size[p] == z for p, z in zip(alloc["ptr"], alloc["size"]))
    mm.page_to_samples = {}
    assert mm.page_to_samples == {}


UNRAISABLE = textwrap.dedent("""
    import gc, time
    from dptool._ffcv import silence_loader_gc_noise

    silence_loader_gc_noise()

    class Finalized:
        def __init__(self, exc):
            self.exc = exc
        def __del__(self):
            raise self.exc

    Finalized(ValueError("shown"))  # any other exception in a finalizer is still printed
    gc.collect()
    try:
        Finalized(KeyboardInterrupt())  # a Ctrl-C landing in a finalizer
        time.sleep(60)  # ends at the interrupt, 0.05 s later; long, since a loaded machine can start the timer late
        print("interrupt lost")
    except KeyboardInterrupt:
        print("interrupt delivered")
""")


def test_a_ctrl_c_in_a_finalizer_stops_the_command_instead_of_printing():
    done = subprocess.run([sys.executable, "-c", UNRAISABLE], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "interrupt delivered", done.stdout + done.stderr
    assert "ValueError: shown" in done.stderr and "KeyboardInterrupt" not in done.stderr
