"""dptool.kernels on an NVIDIA GPU (CuPy), against the same NumPy references as test_kernels.py.

Skipped as a whole where CuPy is missing or sees no GPU. Checks the CuPy kernels, zero-copy torch CUDA
tensors (results on the tensor's device, as tensors), the device override and mixed-device errors.
"""

from __future__ import annotations

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")
if not cupy.cuda.is_available():
    pytest.skip("CuPy sees no NVIDIA GPU", allow_module_level=True)

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from naive import naive_class_histogram, naive_joint_histogram, naive_nearest_centroid  # noqa: E402
from test_kernels import LABEL_DTYPES, SETTINGS, check_nearest, feature_cases  # noqa: E402

from dptool.kernels import _cuda, class_histogram, joint_histogram, nearest_centroid  # noqa: E402

pytestmark = pytest.mark.gpu


def _torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA support here")
    return torch


# ------------------------------------------------------------------------------------------------ histograms


@SETTINGS
@given(
    dtype=st.sampled_from(LABEL_DTYPES),
    n=st.integers(0, 5000),
    n_classes=st.integers(1, 300),
    weighted=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_class_histogram_gpu_matches_reference(dtype, n, n_classes, weighted, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, min(n_classes, int(np.iinfo(dtype).max) + 1), n).astype(dtype)
    weights = rng.standard_normal(n) if weighted else None
    got = class_histogram(cupy.asarray(labels), n_classes, weights=None if weights is None else cupy.asarray(weights))
    assert isinstance(got, cupy.ndarray)
    want = naive_class_histogram(labels, n_classes, weights)
    if weighted:
        assert got.dtype == np.float64
        np.testing.assert_allclose(got.get(), want, rtol=1e-9, atol=1e-9)
    else:
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got.get(), want)


@pytest.mark.parametrize("n_classes", [1000, 12288, 12289, 50_000])  # shared-memory and global-atomic variants
@pytest.mark.parametrize("weighted", [False, True])
def test_class_histogram_gpu_large(n_classes, weighted):
    rng = np.random.default_rng(n_classes)
    labels = rng.integers(0, n_classes, 3_000_000)
    weights = rng.random(labels.shape[0]) if weighted else None
    got = class_histogram(cupy.asarray(labels), n_classes, weights=None if weights is None else cupy.asarray(weights))
    want = np.bincount(labels, weights, minlength=n_classes)
    if weighted:
        np.testing.assert_allclose(got.get(), want, rtol=1e-9)
    else:
        np.testing.assert_array_equal(got.get(), want)


@pytest.mark.parametrize(("n_a", "n_b"), [(40, 30), (1000, 1000)])
def test_joint_histogram_gpu(n_a, n_b):
    rng = np.random.default_rng(n_a)
    a, b = rng.integers(0, n_a, 2_000_000), rng.integers(0, n_b, 2_000_000).astype(np.int32)
    got = joint_histogram(cupy.asarray(a), cupy.asarray(b), n_a, n_b)
    assert isinstance(got, cupy.ndarray) and got.shape == (n_a, n_b) and got.dtype == np.int64
    np.testing.assert_array_equal(got.get(), naive_joint_histogram(a, b, n_a, n_b))


def test_histogram_gpu_errors_and_empty():
    with pytest.raises(ValueError, match=r"got 7\."):
        class_histogram(cupy.asarray([0, 7, 1]), 5)
    with pytest.raises(ValueError, match=r"got -2\."):
        class_histogram(cupy.asarray([0, -2], dtype=cupy.int8), 5)
    with pytest.raises(ValueError, match=r"b must be in .* got 3\."):
        joint_histogram(cupy.asarray([1]), cupy.asarray([3]), 2, 3)
    with pytest.raises(ValueError, match="integer dtype"):
        class_histogram(cupy.zeros(3, cupy.float32), 2)
    assert class_histogram(cupy.zeros(0, cupy.int64), 4).get().tolist() == [0] * 4
    assert joint_histogram(cupy.zeros(0, cupy.int32), cupy.zeros(0, cupy.int32), 2, 2).get().tolist() == [[0, 0]] * 2


# ------------------------------------------------------------------------------------------ nearest_centroid


@SETTINGS
@given(case=feature_cases(max_rows=2000), metric=st.sampled_from(["l2", "cosine"]))
def test_nearest_centroid_gpu_matches_reference(case, metric):
    x, c = case
    xg = cupy.asarray(x)  # keeps F order; strided inputs arrive contiguous (covered below)
    index, dist = nearest_centroid(xg, cupy.asarray(c), metric=metric)
    assert isinstance(index, cupy.ndarray) and isinstance(dist, cupy.ndarray)
    check_nearest(x, c, metric, index.get(), dist.get())


def test_nearest_centroid_gpu_strided_and_dtypes():
    rng = np.random.default_rng(1)
    x = rng.integers(-50, 50, (3000, 24)).astype(np.float32) / 4
    c = rng.integers(-50, 50, (37, 24)).astype(np.float32) / 4
    want_index, want_dist = nearest_centroid(x, c)  # integer-valued data: CPU and GPU are both exact
    wide = cupy.asarray(np.repeat(x, 2, axis=1))
    for xg in (wide[:, ::2], cupy.asfortranarray(cupy.asarray(x)), cupy.asarray(x, cupy.float16),
               cupy.asarray(x, cupy.float64)):
        before = xg.copy()
        index, dist = nearest_centroid(xg, cupy.asarray(c, xg.dtype))
        np.testing.assert_array_equal(index.get(), want_index)
        np.testing.assert_array_equal(dist.get(), want_dist)
        assert bool((xg == before).all())


def test_nearest_centroid_gpu_ties_and_column_tiles(monkeypatch):
    rng = np.random.default_rng(2)
    base = rng.integers(-3, 4, (11, 6)).astype(np.float32)
    c = np.concatenate([base, base, base])
    x = rng.integers(-3, 4, (5000, 6)).astype(np.float32)
    ref, ref_dist = naive_nearest_centroid(x, base)
    for tiled in (False, True):
        if tiled:  # 10 rows x 6 centroids per tile: ties must survive across column tiles
            monkeypatch.setattr(_cuda, "_TILE_ELEMS", 64)
            monkeypatch.setattr(_cuda, "_MAX_COLS", 4)
        index, dist = nearest_centroid(cupy.asarray(x), cupy.asarray(c))
        np.testing.assert_array_equal(index.get(), ref)
        np.testing.assert_array_equal(dist.get(), ref_dist.astype(np.float32))


def test_nearest_centroid_gpu_large_agrees_with_cpu():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((400_000, 64), dtype=np.float32)
    c = rng.standard_normal((1000, 64), dtype=np.float32)
    gi, gd = nearest_centroid(cupy.asarray(x), cupy.asarray(c))
    ci, cd = nearest_centroid(x, c)
    mismatched = np.flatnonzero(gi.get() != ci)
    assert mismatched.size <= 20
    check_nearest(x[mismatched], c, "l2", gi.get()[mismatched], gd.get()[mismatched])
    np.testing.assert_allclose(gd.get(), cd, rtol=1e-4, atol=1e-3)


def test_nearest_centroid_gpu_errors_and_empty():
    x = cupy.zeros((9000, 4), cupy.float32)
    x[8765, 2] = cupy.nan
    with pytest.raises(ValueError, match="x must be finite, got nan at index 2 in row 8765"):
        nearest_centroid(x, cupy.ones((3, 4), cupy.float32))
    with pytest.raises(ValueError, match="same number of columns"):
        nearest_centroid(cupy.zeros((3, 4)), cupy.zeros((3, 5)))
    index, dist = nearest_centroid(cupy.zeros((0, 4)), cupy.ones((3, 4)))
    assert index.shape == dist.shape == (0,) and index.dtype == np.int64 and dist.dtype == np.float32


# ------------------------------------------------------------------------------------- devices and torch


def test_torch_cuda_tensors_zero_copy_and_back_as_tensors():
    torch = _torch_cuda()
    labels = torch.randint(0, 10, (100_000,), device="cuda")
    counts = class_histogram(labels, 10)
    assert isinstance(counts, torch.Tensor) and counts.device == labels.device and counts.dtype == torch.int64
    assert counts.cpu().tolist() == torch.bincount(labels, minlength=10).cpu().tolist()
    x = torch.randn(20_000, 32, device="cuda")
    c = torch.randn(100, 32, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # x and c were made on the default stream
    with torch.cuda.stream(stream):  # kernels run on torch's current stream
        index, dist = nearest_centroid(x, c)
    stream.synchronize()
    assert isinstance(index, torch.Tensor) and index.is_cuda and dist.dtype == torch.float32
    check_nearest(x.cpu().numpy(), c.cpu().numpy(), "l2", index.cpu().numpy(), dist.cpu().numpy())
    joint = joint_histogram(labels, labels % 3, 10, 3)
    assert joint.is_cuda and int(joint.sum()) == labels.numel()


def test_torch_bool_tensors_refused_on_the_gpu_as_on_the_cpu():
    torch = _torch_cuda()
    flags = torch.tensor([True, False, True])
    for where in ("cpu", "cuda"):
        with pytest.raises(ValueError, match="labels must have an integer dtype, got bool"):
            class_histogram(flags.to(where), 2, device="cuda")
        with pytest.raises(ValueError, match="weights must have a real numeric dtype, got bool"):
            class_histogram(torch.tensor([0, 1, 1], device=where), 2, weights=flags.to(where), device="cuda")


def test_device_override_and_mixed_devices():
    labels = np.array([0, 1, 1, 3])
    assert isinstance(class_histogram(labels, 4, device="cuda"), np.ndarray)  # NumPy in, NumPy out
    on_gpu = class_histogram(cupy.asarray(labels), 4, device="cpu")
    assert isinstance(on_gpu, cupy.ndarray) and on_gpu.get().tolist() == [1, 2, 0, 1]
    with pytest.raises(TypeError, match="same device"):
        class_histogram(cupy.asarray(labels), 4, weights=np.ones(4))
    with pytest.raises(TypeError, match="same device"):
        nearest_centroid(np.zeros((3, 2), np.float32), cupy.zeros((1, 2), cupy.float32))
    torch = _torch_cuda()
    mixed = joint_histogram(torch.as_tensor(labels, device="cuda"), cupy.asarray(labels), 4, 4)
    assert isinstance(mixed, torch.Tensor) and int(mixed.trace()) == 4  # torch and CuPy on one GPU: fine
