"""FFCV loader pipelines: shapes, dtypes, normalisation, crops, subsets, threads and bad input."""

from __future__ import annotations

import gc
import os
import threading

import numpy as np
import pytest
import torch

from dptool.convert import WriterParams, convert
from dptool.errors import DptoolError, InputError
from dptool.loaders import IMAGENET_MEAN, IMAGENET_STD, eval_loader, inference_loader, train_loader
from dptool.synthetic import write_npz

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba #167


@pytest.fixture(autouse=True)
def _collect_loaders():
    """Collect dropped FFCV loaders inside the test, where numba #167's finalizer noise is filtered."""
    yield
    gc.collect()


def _denormalise(x: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return (x * std + mean).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _file_order(n: int, seed: int = 0) -> np.ndarray:
    """Row i of a converted file holds source sample order[i] (convert shuffles with this permutation)."""
    return np.random.default_rng(seed).permutation(n)


def test_train_loader_batches(tiny_beton):
    threads = torch.get_num_threads()
    loader = train_loader(tiny_beton, batch_size=32, res=24, workers=2, seed=1, channels_last=True)
    assert len(loader) == 5 and loader.resolution == 24
    seen = []
    for x, y in loader:
        assert x.shape == (32, 3, 24, 24) and x.dtype == torch.float32
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert y.shape == (32,) and y.dtype == torch.int64
        assert torch.get_num_threads() == threads
        seen.append(y)
    labels = torch.cat(seen).numpy()
    assert np.array_equal(np.bincount(labels, minlength=4), [40, 40, 40, 40])  # each sample once per epoch
    assert torch.get_num_threads() == threads
    loader.set_resolution(16)  # progressive resizing: next epoch at the new size, same compiled code
    it = iter(loader)
    x, _ = next(it)
    assert x.shape == (32, 3, 16, 16)
    it.close()  # an epoch left early: its prefetch thread is stopped and joined, not left running
    assert not [t for t in threading.enumerate() if type(t).__name__ == "EpochIterator"]
    it = iter(loader)
    next(it), next(it)  # the 3 batches left fill FFCV's queue: its end-of-epoch marker then waits for room
    it.close()
    assert not [t for t in threading.enumerate() if type(t).__name__ == "EpochIterator"]


def _epochs(loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """All images and labels of `n` epochs, one (images, labels) pair per epoch."""
    out = []
    for _ in range(n):
        xs, ys = zip(*loader)
        out.append((torch.cat(xs), torch.cat(ys)))
    return out


def test_train_augmentation_repeats_for_a_seed(tiny_beton):
    """Crops, flips and order are a function of the seed and the epoch alone: not of threads, timing, or the
    epochs drawn before (a resumed run starts its loader at a later epoch)."""
    one = _epochs(train_loader(tiny_beton, batch_size=32, res=20, workers=1, seed=3), 2)
    resumed = train_loader(tiny_beton, batch_size=32, res=20, workers=2, seed=3)
    resumed.loader.next_epoch = 1
    (x, y), = _epochs(resumed, 1)
    assert torch.equal(x, one[1][0]) and torch.equal(y, one[1][1])
    assert not torch.equal(one[0][0], one[1][0])  # epochs differ (order, and the crops that follow it)
    other = _epochs(train_loader(tiny_beton, batch_size=32, res=20, workers=2, seed=4), 1)
    assert not torch.equal(other[0][0], one[0][0])


def test_seeds_do_not_replay_each_other_and_batches_of_one_vary(tiny_beton):
    """Random order seeds epoch e with seed + e (FFCV, torch's DistributedSampler): unspread, seed 1's epoch 0
    would be seed 0's epoch 1, crops included. A batch of one image must still be cropped anew each epoch."""
    rows = np.arange(150)
    zero = _epochs(train_loader(tiny_beton, batch_size=30, res=16, workers=2, seed=0, indices=rows), 2)
    (x, y), = _epochs(train_loader(tiny_beton, batch_size=30, res=16, workers=2, seed=1, indices=rows), 1)
    assert not torch.equal(y, zero[1][1]) and not torch.equal(x, zero[1][0])
    single = _epochs(train_loader(tiny_beton, batch_size=1, res=16, workers=1, indices=[5]), 3)
    assert not (torch.equal(single[0][0], single[1][0]) and torch.equal(single[1][0], single[2][0]))


def test_train_flip_mirrors_about_half(tiny_beton, tiny_arrays):
    """With a crop of the whole (square) image, each training image is its stored image or that image mirrored,
    every sample comes once per epoch, and about half are mirrored."""
    images = tiny_arrays[0].astype(int)
    loader = train_loader(tiny_beton, batch_size=32, res=32, workers=2, seed=0, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    got = _denormalise(_epochs(loader, 1)[0][0]).astype(int)
    seen, mirrored = [], 0
    for image in got:
        plain = np.abs(images - image).max(axis=(1, 2, 3))
        flipped = np.abs(images[:, :, ::-1] - image).max(axis=(1, 2, 3))
        assert min(plain.min(), flipped.min()) <= 1  # float round-trip only
        is_mirror = flipped.min() < plain.min()
        mirrored += is_mirror
        seen.append(int(flipped.argmin() if is_mirror else plain.argmin()))
    assert sorted(seen) == list(range(len(images)))
    assert 50 <= mirrored <= 110  # Binomial(160, 0.5): mean 80, sd 6.3


def test_inference_loader_is_the_stored_image(tiny_beton, tiny_arrays):
    """At the stored resolution the centre square crop of a square image is the image itself."""
    images, labels = tiny_arrays
    order = _file_order(len(labels))
    xs, ys = zip(*inference_loader(tiny_beton, batch_size=64, res=32, workers=2))
    got, got_labels = _denormalise(torch.cat(xs)), torch.cat(ys).numpy()
    assert np.array_equal(got_labels, labels[order])
    assert np.abs(got.astype(int) - images[order].astype(int)).max() <= 1  # float round-trip only


def test_inference_crop_of_sides_one_pixel_apart_is_the_centre_every_time(tmp_path):
    """A 25x24 image: FFCV's random-resized crop at scale 1 picks row offset 0 or 1 at random; scoring must not."""
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, size=(32, 25, 24, 3), dtype=np.uint8)
    npz = write_npz(tmp_path / "tall.npz", images, np.arange(32) % 2, ["a", "b"])
    out = tmp_path / "tall.beton"
    convert(npz, out, params=WriterParams(max_resolution=25, write_mode="raw", num_workers=1, shuffle_seed=None))
    unit = dict(mean=(0, 0, 0), std=(1 / 255, 1 / 255, 1 / 255))
    for _ in range(2):
        x = torch.cat([x for x, _ in inference_loader(out, batch_size=8, res=24, workers=2, **unit)])
        got = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        assert np.array_equal(got, images[:, 0:24])  # offset (25 - 24) // 2, as the eval centre crop


def test_inference_crop_of_wide_images_and_indices(tmp_path):
    """A 24x40 image yields its centre 24x24 square; `indices` picks exactly those rows, in order."""
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(6, 24, 40, 3), dtype=np.uint8)
    labels = np.arange(6) % 2
    npz = write_npz(tmp_path / "wide.npz", images, labels, ["a", "b"])
    out = tmp_path / "wide.beton"
    convert(npz, out, params=WriterParams(max_resolution=40, write_mode="raw", num_workers=1, shuffle_seed=None))
    loader = inference_loader(out, batch_size=4, res=24, workers=1, indices=[5, 1, 2],
                              mean=(0, 0, 0), std=(1 / 255, 1 / 255, 1 / 255))
    xs, ys = zip(*loader)
    x = torch.cat(xs)
    assert torch.cat(ys).tolist() == [1, 1, 0]
    got = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(got, images[[5, 1, 2], :, 8:32])


def test_eval_loader_subset_and_short_last_batch(tiny_beton, tiny_arrays):
    _, labels = tiny_arrays
    file_labels = labels[_file_order(len(labels))]
    keep = np.flatnonzero(file_labels != 2)
    loader = eval_loader(tiny_beton, batch_size=50, res=32, workers=2, indices=keep)
    ys = [y for _, y in loader]
    assert [len(y) for y in ys] == [50, 50, 20]
    assert np.array_equal(torch.cat(ys).numpy(), file_labels[keep])


def test_bad_input(tmp_path, tiny_beton):
    with pytest.raises(InputError, match="does not exist"):
        train_loader(tmp_path / "missing.beton", batch_size=8, res=32)
    (tmp_path / "junk.beton").write_bytes(b"not a beton" * 10)
    with pytest.raises(InputError, match="not a .beton"):
        eval_loader(tmp_path / "junk.beton", batch_size=8, res=32)
    with pytest.raises(InputError, match="larger than the 160 samples"):
        train_loader(tiny_beton, batch_size=161, res=32)
    with pytest.raises(InputError, match=r"must lie in \[0, 160\)"):
        eval_loader(tiny_beton, batch_size=8, res=32, indices=[0, 160])


def _ffcv_pipeline_loader(path, extra_image_ops):
    """dptool's FfcvLoader around an FFCV Loader whose image pipeline ends with `extra_image_ops` (FFCV's public
    Loader/Operation API), so that what FFCV's epoch thread does can be chosen by a test."""
    from dptool._ffcv import import_ffcv
    from dptool.loaders import FfcvLoader

    threads = torch.get_num_threads()
    loader_mod = import_ffcv("ffcv.loader")
    transforms = import_ffcv("ffcv.transforms")
    rgb = import_ffcv("ffcv.fields.rgb_image")
    ints = import_ffcv("ffcv.fields.decoders")
    decoder = rgb.CenterCropRGBImageDecoder((16, 16), ratio=1.0)
    image_ops = [decoder, transforms.ToTensor(), *extra_image_ops, transforms.ToTorchImage(channels_last=True)]
    loader = loader_mod.Loader(str(path), batch_size=32, num_workers=2, order=loader_mod.OrderOption.SEQUENTIAL,
                               os_cache=True, pipelines={"image": image_ops, "label": [ints.IntDecoder(),
                                                                                      transforms.ToTensor()]})
    return FfcvLoader(loader, decoder, device="cpu", mean=IMAGENET_MEAN, std=IMAGENET_STD, threads=threads,
                      path=path)


def test_loader_under_inference_mode_with_a_device_copy(tiny_beton):
    """FFCV's ToDevice copies into buffers from its own thread: iterating inside torch.inference_mode() (as scoring
    does) must not make those buffers inference tensors. On a CUDA host this was a hang: FFCV's thread died on
    "Inplace update to inference tensor outside InferenceMode" and the loader waited for it forever."""
    transforms = pytest.importorskip("ffcv.transforms")
    loader = _ffcv_pipeline_loader(tiny_beton, [transforms.ToDevice(torch.device("cpu"), non_blocking=False)])
    with torch.inference_mode():
        labels = torch.cat([y for _, y in loader])
    assert np.array_equal(np.bincount(labels.numpy(), minlength=4), [40, 40, 40, 40])


def _fail_on_second_batch():
    """A plain-Python FFCV operation (FFCV's public Operation interface) that raises on the epoch's second batch."""
    from ffcv.pipeline.operation import Operation

    class FailOnSecondBatch(Operation):
        def generate_code(self):
            calls = []

            def fail(images, _dst):
                calls.append(1)
                if len(calls) == 2:
                    raise ValueError("planted failure in the second batch")
                return images

            return fail

        def declare_state_and_memory(self, previous_state):
            return previous_state, None

    return FailOnSecondBatch()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_loader_thread_error_is_an_error_not_a_hang(tiny_beton):
    loader = _ffcv_pipeline_loader(tiny_beton, [_fail_on_second_batch()])
    with pytest.raises(DptoolError, match=r"FFCV's loading thread for .*tiny.*stopped before the end of the epoch"):
        for _ in loader:
            pass


def test_a_file_replaced_after_it_was_opened_is_refused(tiny_beton, tmp_path):
    """FM reads its source twice, each pass through a new FFCV loader that opens the path again: a file renamed over
    it between the passes (a `convert --force` of the same output) was read with the first file's labels and
    fingerprint; with the same labels in the same order, its images were scored silently. Refused instead."""
    import os
    import shutil

    from dptool.beton import open_beton

    path = tmp_path / "a.beton"
    shutil.copy(tiny_beton, path)
    beton = open_beton(path)
    assert len(inference_loader(beton, batch_size=8, res=16, workers=1)) == 20  # unchanged: read as opened
    shutil.copy(tiny_beton, tmp_path / ".new")  # the same labels: only the file's identity tells them apart
    os.replace(tmp_path / ".new", path)
    with pytest.raises(InputError, match="replaced or modified while this run was reading it"):
        inference_loader(beton, batch_size=8, res=16, workers=1)
    beton = open_beton(path)
    with open(path, "r+b") as f:  # rewritten in place
        f.seek(0, 2)
        f.write(b"\0")
    with pytest.raises(InputError, match="replaced or modified"):
        train_loader(beton, batch_size=8, res=16, workers=1)


def test_workers_beyond_numbas_thread_limit_are_refused_in_one_sentence(tiny_beton, tmp_path):
    """FFCV sets Numba's thread count to --workers: one more than Numba allows ended train, score, finetune and
    bench loader with 'internal error: ValueError: The number of threads must be between 1 and 2' (exit 1)."""
    import numba
    from click.testing import CliRunner

    from dptool.cli.main import cli

    too_many = int(numba.config.NUMBA_NUM_THREADS) + 1
    result = CliRunner().invoke(cli, ["train", str(tiny_beton), "-o", str(tmp_path / "a.pt"), "--arch",
                                      "resnet_tiny", "--epochs", "1", "--batch-size", "32", "--min-res", "16",
                                      "--max-res", "16", "--workers", str(too_many)])
    assert result.exit_code == 2 and "internal error" not in result.output, result.output
    assert f"--workers {too_many} is more than the {too_many - 1} CPU(s)" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs more CPUs than the restricted set of one")
def test_the_default_workers_are_the_cpus_the_process_may_run_on(tiny_beton, tmp_path):
    """Under taskset, a cgroup cpuset or a Slurm allocation, Numba allows as many threads as the process may run on
    (NUMBA_NUM_THREADS, set here to stand for a one-CPU set): --workers 0 counted every core of the machine
    (os.cpu_count()) and every loader stopped with that ValueError."""
    import subprocess
    import sys

    out = tmp_path / "a.pt"
    done = subprocess.run([sys.executable, "-m", "dptool", "train", str(tiny_beton), "-o", str(out), "--arch",
                           "resnet_tiny", "--epochs", "1", "--batch-size", "32", "--min-res", "16", "--max-res",
                           "16"], env={**os.environ, "NUMBA_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and out.exists(), done.stderr


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2,
                    reason="needs a CPU affinity mask to narrow to one CPU")
def test_a_process_on_one_cpu_exits_after_forking_workers(tmp_path):
    """Pinned to one CPU (taskset -c 0, a one-CPU cpuset or Slurm allocation), convert wrote its file, printed its
    summary and then hung for ever at interpreter exit: Numba's TBB layer deadlocks in its unload after a fork
    there (Debian's libtbb 2021.8). dptool picks Numba's workqueue layer on one CPU unless the user chose a layer."""
    import subprocess
    import sys

    from dptool.synthetic import separable_images, write_image_folder

    images, labels = separable_images(3, 6, 16, seed=0)
    write_image_folder(tmp_path / "src", images, labels, ["a", "b", "c"])
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    script = (f"import os, sys; os.sched_setaffinity(0, {{min(os.sched_getaffinity(0))}}); "
              f"from dptool.cli.main import main; sys.argv = ['dptool', 'convert', {str(tmp_path / 'src')!r}, "
              f"{str(tmp_path / 'a.beton')!r}, '--max-res', '16']; main()")
    try:
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("convert pinned to one CPU did not exit within 120 s")
    assert done.returncode == 0 and (tmp_path / "a.beton").exists(), done.stderr
