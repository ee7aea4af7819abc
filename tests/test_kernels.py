"""dptool.kernels on the CPU (Numba) against the float64 NumPy references in naive.py.

Histograms must match exactly. Nearest-centroid must match except on rows whose best and chosen centroids
are closer than float32 rounding of the expansion ‖x‖² − 2x·c + ‖c‖² can tell apart (see `nearest_tolerance`).
The helpers at the top are reused by test_kernels_gpu.py.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from naive import naive_class_histogram, naive_distances, naive_joint_histogram, naive_nearest_centroid

from dptool.errors import DptoolError, InputError
from dptool.kernels import (
    CudaUnavailableError,
    KernelInputError,
    class_histogram,
    cuda_available,
    joint_histogram,
    nearest_centroid,
)
from dptool.kernels import nearest as nearest_module

LABEL_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]
FEATURE_DTYPES = [np.float16, np.float32, np.float64]
EPS32 = float(np.finfo(np.float32).eps)
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------ shared helpers and data


def nearest_tolerance(x: np.ndarray, c: np.ndarray, metric: str) -> np.ndarray:
    """Per-row bound on the float32 error of a distance, from the error bound of a length-D dot product.

    L2: |error| <= 4 (D + 2) eps32 (‖x‖ + max ‖c‖)²; cosine (unit vectors): 4 (D + 2) eps32. Used both to
    accept a different arg-min (the reference gap must be within it) and to compare distances.
    """
    d = x.shape[1]
    if metric == "cosine":
        return np.full(x.shape[0], 4.0 * (d + 2) * EPS32)
    xn = np.linalg.norm(np.asarray(x, np.float64), axis=1)
    cn = np.linalg.norm(np.asarray(c, np.float64), axis=1).max(initial=0.0)
    return 4.0 * (d + 2) * EPS32 * (xn + cn) ** 2 + 1e-30


def check_nearest(x, c, metric, index, dist) -> int:
    """Assert (index, dist) is a correct nearest-centroid answer for NumPy x, c; return the mismatch count."""
    index, dist = np.asarray(index), np.asarray(dist)
    assert index.dtype == np.int64 and dist.dtype == np.float32
    assert index.shape == dist.shape == (x.shape[0],)
    ref_index, ref_dist = naive_nearest_centroid(x, c, metric)
    tol = nearest_tolerance(x, c, metric)
    chosen = ref_dist.copy()
    rows = np.flatnonzero(index != ref_index)
    if rows.size:
        assert ((index[rows] >= 0) & (index[rows] < c.shape[0])).all()
        chosen[rows] = naive_distances(x[rows], c, metric)[np.arange(rows.size), index[rows]]
        gap = chosen[rows] - ref_dist[rows]
        assert (gap <= tol[rows]).all(), f"rows {rows[gap > tol[rows]][:5]} chose a clearly farther centroid"
    np.testing.assert_array_less(np.abs(dist.astype(np.float64) - chosen), tol + 1e-6 * np.abs(chosen))
    return int(rows.size)


@st.composite
def feature_cases(draw, max_rows: int = 300):
    """(x, c) pairs of varied shapes, dtypes, layouts and scales, with exact ties in the integer cases."""
    n = draw(st.integers(0, max_rows))
    k = draw(st.integers(1, 40))
    d = draw(st.integers(0, 24))
    dtype = draw(st.sampled_from(FEATURE_DTYPES))
    kind = draw(st.sampled_from(["normal", "integer", "duplicates"]))
    layout = draw(st.sampled_from(["C", "F", "strided"]))
    scale = draw(st.sampled_from([1e-2, 1.0, 30.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "normal":
        x, c = rng.standard_normal((n, d)) * scale, rng.standard_normal((k, d)) * scale
    else:
        x, c = rng.integers(-3, 4, (n, d)).astype(np.float64), rng.integers(-3, 4, (k, d)).astype(np.float64)
    if kind == "duplicates":
        c = c[rng.integers(0, k, k)]
        if n:
            x[: n // 2] = c[rng.integers(0, k, n // 2)]
    x, c = x.astype(dtype), c.astype(dtype)
    if layout == "F":
        x = np.asfortranarray(x)
    elif layout == "strided":
        wide = np.zeros((n, 2 * d), dtype)
        wide[:, ::2] = x
        x = wide[:, ::2]
    return x, c


# --------------------------------------------------------------------------------------------- class_histogram


@SETTINGS
@given(
    dtype=st.sampled_from(LABEL_DTYPES),
    n=st.integers(0, 3000),
    n_classes=st.integers(1, 300),
    weight_dtype=st.sampled_from([None, np.float32, np.float64, np.int32]),
    seed=st.integers(0, 2**32 - 1),
)
def test_class_histogram_matches_reference(dtype, n, n_classes, weight_dtype, seed):
    rng = np.random.default_rng(seed)
    top = min(n_classes, int(np.iinfo(dtype).max) + 1)
    labels = rng.integers(0, top, n).astype(dtype)
    weights = None if weight_dtype is None else (rng.standard_normal(n) * 10).astype(weight_dtype)
    got = class_histogram(labels, n_classes, weights=weights)
    want = naive_class_histogram(labels, n_classes, weights)
    if weights is None:
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, want)
    else:
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-9)


def test_class_histogram_many_chunks_exact():
    labels = np.random.default_rng(1).integers(0, 1000, 300_000).astype(np.int32)
    np.testing.assert_array_equal(class_histogram(labels, 1000), naive_class_histogram(labels, 1000))
    np.testing.assert_array_equal(class_histogram(labels, 1000), np.bincount(labels, minlength=1000))


def test_class_histogram_empty_and_zero_classes():
    assert class_histogram(np.zeros(0, np.int64), 5).tolist() == [0] * 5
    assert class_histogram([], 3).dtype == np.int64
    assert class_histogram(np.zeros(0, np.int32), 0).shape == (0,)
    assert class_histogram(np.zeros(0, np.int8), 2, weights=np.zeros(0)).dtype == np.float64


# --------------------------------------------------------------------------------------------- joint_histogram


@SETTINGS
@given(
    dtypes=st.tuples(st.sampled_from(LABEL_DTYPES), st.sampled_from(LABEL_DTYPES)),
    n=st.integers(0, 3000),
    n_a=st.integers(1, 120),
    n_b=st.integers(1, 60),
    seed=st.integers(0, 2**32 - 1),
)
def test_joint_histogram_matches_reference(dtypes, n, n_a, n_b, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, n_a, n).astype(dtypes[0])
    b = rng.integers(0, n_b, n).astype(dtypes[1])
    got = joint_histogram(a, b, n_a, n_b)
    assert got.dtype == np.int64 and got.shape == (n_a, n_b)
    np.testing.assert_array_equal(got, naive_joint_histogram(a, b, n_a, n_b))


def test_joint_histogram_large_exact():
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 1000, 300_000), rng.integers(0, 102, 300_000).astype(np.int16)
    np.testing.assert_array_equal(joint_histogram(a, b, 1000, 102), naive_joint_histogram(a, b, 1000, 102))


def test_joint_histogram_empty():
    assert joint_histogram(np.zeros(0, np.int64), np.zeros(0, np.int64), 2, 3).tolist() == [[0] * 3] * 2


# -------------------------------------------------------------------------------------------- nearest_centroid


@SETTINGS
@given(case=feature_cases(), metric=st.sampled_from(["l2", "cosine"]), block_rows=st.sampled_from([7, 64, 2048]))
def test_nearest_centroid_matches_reference(case, metric, block_rows):
    x, c = case
    index, dist = nearest_centroid(x, c, metric=metric, block_rows=block_rows)
    check_nearest(x, c, metric, index, dist)


def test_nearest_centroid_ties_go_to_smallest_index():
    rng = np.random.default_rng(3)
    base = rng.integers(-4, 5, (6, 5)).astype(np.float32)
    c = np.concatenate([base, base, base])  # each centroid appears three times, the first copy at j < 6
    x = np.concatenate([base, rng.integers(-4, 5, (500, 5)).astype(np.float32)])
    index, _ = nearest_centroid(x, c)
    np.testing.assert_array_equal(index, naive_nearest_centroid(x, base)[0])  # integer data: L2 is exact
    index, dist = nearest_centroid(x, c, metric="cosine")  # copies normalise identically: still exact ties
    assert (index < 6).all()
    check_nearest(x, c, "cosine", index, dist)
    index, dist = nearest_centroid(base, c)
    np.testing.assert_array_equal(index, np.arange(6))
    np.testing.assert_array_equal(dist, 0)


def test_nearest_centroid_ties_across_column_tiles(monkeypatch):
    monkeypatch.setattr(nearest_module, "_TILE_ELEMS", 64)  # 16 rows x 4 centroids per tile
    rng = np.random.default_rng(4)
    base = rng.integers(-3, 4, (11, 6)).astype(np.float32)
    c = np.concatenate([base, base])
    x = rng.integers(-3, 4, (100, 6)).astype(np.float32)
    index, dist = nearest_centroid(x, c, block_rows=16)
    ref, ref_dist = naive_nearest_centroid(x, base)
    np.testing.assert_array_equal(index, ref)
    np.testing.assert_array_equal(dist, ref_dist.astype(np.float32))


def test_nearest_centroid_cosine_values():
    x = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0], [-3.0, 0.0]], np.float32)
    c = np.array([[0.0, 5.0], [2.0, 0.0]], np.float32)
    index, dist = nearest_centroid(x, c, metric="cosine")
    assert index.tolist() == [1, 0, 0, 0]  # the zero row is at distance 1 from both: smallest index
    np.testing.assert_allclose(dist, [0.0, 0.0, 1.0, 1.0], atol=1e-6)


def test_nearest_centroid_many_blocks_bounded_memory():
    """200k rows x 8 dims in 4096-row blocks: the traced peak stays far below the N x K distance matrix."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((200_000, 8), dtype=np.float32)
    c = rng.standard_normal((64, 8), dtype=np.float32)
    nearest_centroid(x[:10], c)  # compile outside the trace
    tracemalloc.start()
    try:
        index, dist = nearest_centroid(x, c, block_rows=4096)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    outputs = index.nbytes + dist.nbytes
    assert peak - outputs < 4 << 20, f"peak {peak} bytes beyond the outputs: not bounded by the block"
    assert peak < x.shape[0] * c.shape[0] * 4 / 4
    assert check_nearest(x, c, "l2", index, dist) <= 10


def test_nearest_centroid_empty_inputs():
    for x, c in [(np.zeros((0, 4), np.float32), np.ones((3, 4), np.float32)), (np.zeros((0, 4)), np.zeros((0, 4)))]:
        index, dist = nearest_centroid(x, c)
        assert index.shape == dist.shape == (0,)
        assert index.dtype == np.int64 and dist.dtype == np.float32


@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.int32])
def test_nearest_centroid_coerces_dtype_and_layout(dtype):
    rng = np.random.default_rng(6)
    x32 = rng.integers(-50, 50, (300, 12)).astype(np.float32) / 4  # exact in float16 too
    c32 = rng.integers(-50, 50, (9, 12)).astype(np.float32) / 4
    if dtype is np.int32:
        x32, c32 = np.round(x32), np.round(c32)
    want = nearest_centroid(x32, c32)
    for x in (x32.astype(dtype), np.asfortranarray(x32.astype(dtype)), np.repeat(x32.astype(dtype), 2, 1)[:, ::2]):
        got = nearest_centroid(x, c32.astype(dtype))
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


# -------------------------------------------------------------------------------------- contracts and errors


def test_inputs_are_never_modified():
    rng = np.random.default_rng(7)
    labels, other = rng.integers(0, 10, 1000), rng.integers(0, 4, 1000).astype(np.int8)
    weights = rng.standard_normal(1000).astype(np.float32)
    x, c = rng.standard_normal((200, 5), dtype=np.float32), rng.standard_normal((7, 5), dtype=np.float32)
    before = [a.copy() for a in (labels, other, weights, x, c)]
    class_histogram(labels, 10, weights=weights)
    joint_histogram(labels, other, 10, 4)
    for metric in ("l2", "cosine"):
        nearest_centroid(x, c, metric=metric)
    for old, new in zip(before, (labels, other, weights, x, c), strict=True):
        np.testing.assert_array_equal(old, new)


def test_torch_cpu_tensors_in_and_out():
    torch = pytest.importorskip("torch")
    labels = torch.tensor([0, 2, 2, 1, 2])
    counts = class_histogram(labels, 4)
    assert isinstance(counts, torch.Tensor) and counts.dtype == torch.int64 and counts.tolist() == [1, 1, 3, 0]
    joint = joint_histogram(labels, torch.tensor([1, 1, 0, 0, 1], dtype=torch.int32), 3, 2)
    assert joint.tolist() == [[0, 1], [1, 0], [1, 2]]
    x = torch.randn(50, 3, dtype=torch.float64)
    c = torch.randn(4, 3)
    index, dist = nearest_centroid(x, c)
    assert isinstance(index, torch.Tensor) and index.dtype == torch.int64 and dist.dtype == torch.float32
    check_nearest(x.numpy(), c.numpy(), "l2", index.numpy(), dist.numpy())
    xb, cb = x.to(torch.bfloat16), c.to(torch.bfloat16).requires_grad_()  # model outputs: bf16, with grad
    index, dist = nearest_centroid(xb, cb, metric="cosine")
    check_nearest(xb.float().numpy(), cb.detach().float().numpy(), "cosine", index.numpy(), dist.numpy())
    with pytest.raises(ValueError, match="labels must have an integer dtype, got bool"):  # as a NumPy bool array
        class_histogram(torch.tensor([True, False]), 2)


def test_errors_are_value_errors_and_input_errors():
    assert issubclass(KernelInputError, ValueError) and issubclass(KernelInputError, InputError)
    assert issubclass(CudaUnavailableError, RuntimeError) and issubclass(CudaUnavailableError, DptoolError)


@pytest.mark.parametrize("dtype", LABEL_DTYPES)
def test_labels_out_of_range(dtype):
    with pytest.raises(ValueError, match=r"labels must be in \[0, n_classes\) = \[0, 5\), got 5\."):
        class_histogram(np.array([0, 5, 1], dtype), 5)
    with pytest.raises(ValueError, match=r"got 5\."):
        class_histogram(np.array([0, 5, 1], dtype), 5, weights=np.ones(3))
    if np.issubdtype(dtype, np.signedinteger):
        with pytest.raises(ValueError, match=r"got -1\."):
            class_histogram(np.array([0, -1], dtype), 5)
    with pytest.raises(ValueError, match=r"a must be in \[0, n_a\) = \[0, 2\), got 2\."):
        joint_histogram(np.array([2], dtype), np.array([0], dtype), 2, 3)
    with pytest.raises(ValueError, match=r"b must be in \[0, n_b\) = \[0, 3\), got 3\."):
        joint_histogram(np.array([1], dtype), np.array([3], dtype), 2, 3)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: class_histogram(np.array([0.0, 1.0]), 2), "labels must have an integer dtype, got float64"),
        (lambda: class_histogram(np.zeros((2, 2), np.int64), 2), r"labels must be 1-D"),
        (lambda: class_histogram(np.zeros(3, np.int64), -1), "n_classes must be a non-negative integer, got -1"),
        (lambda: class_histogram(np.zeros(3, np.int64), 2.5), "n_classes must be a non-negative integer, got 2.5"),
        (lambda: class_histogram(np.zeros(3, np.int64), True), "n_classes must be a non-negative integer"),
        (lambda: class_histogram(np.zeros(3, np.int64), 2, weights=np.ones(2)), r"weights must have shape \(3,\)"),
        (lambda: class_histogram(np.zeros(2, np.int64), 2, weights=np.array([1.0, np.nan])), "weights must be finite"),
        (lambda: class_histogram(np.zeros(2, np.int64), 2, device="gpu"), "device must be one of"),
        (lambda: joint_histogram(np.zeros(3, np.int64), np.zeros(2, np.int64), 2, 2), "same length, got 3 and 2"),
        (lambda: joint_histogram(np.zeros(3, np.int64), np.zeros(3), 2, 2), "b must have an integer dtype"),
        (lambda: joint_histogram(np.array([1]), np.array([0]), 2**32, 2**32),  # segfaulted before the check
         r"n_a x n_b = 18446744073709551616 bins is more than the 2147483648"),
        (lambda: class_histogram(np.array([1]), 2**63), r"n_classes = 9223372036854775808 bins is more than"),
        (lambda: class_histogram(np.array([0, 2**63 + 5], np.uint64), 4),
         "labels must be class indices, got 9223372036854775813"),
        (lambda: nearest_centroid(np.zeros(4), np.zeros((2, 4))), r"x must be 2-D .* got shape \(4,\)"),
        (lambda: nearest_centroid(np.zeros((3, 4)), np.zeros((2, 2, 4))), r"centroids must be 2-D"),
        (lambda: nearest_centroid(np.zeros((3, 4)), np.zeros((2, 5))), "same number of columns, got 4 and 5"),
        (lambda: nearest_centroid(np.zeros((3, 4)), np.zeros((0, 4))), "at least one row"),
        (lambda: nearest_centroid(np.zeros((3, 4)), np.zeros((2, 4)), metric="ip"), "metric must be one of"),
        (lambda: nearest_centroid(np.zeros((3, 4)), np.zeros((2, 4)), block_rows=0), "block_rows must be"),
        (lambda: nearest_centroid(np.zeros((3, 4), complex), np.zeros((2, 4))), "x must have a real numeric"),
        (lambda: nearest_centroid(_with(np.zeros((9, 4)), 7, 2, np.nan), np.zeros((2, 4))),
         r"x must be finite, got nan at index 2 in row 7"),
        (lambda: nearest_centroid(np.zeros((9, 4)), _with(np.zeros((2, 4)), 1, 0, -np.inf)),
         r"centroids must be finite, got -inf at index 0 in row 1"),
        (lambda: nearest_centroid(_with(np.zeros((9, 4)), 3, 0, 1e30), np.zeros((2, 4))),
         r"x row 3 is too large"),
        (lambda: nearest_centroid(_with(np.zeros((9, 4)), 3, 0, 1e300), np.zeros((2, 4))),
         r"x row 3 is too large"),
    ],
)
def test_bad_arguments_raise_one_sentence_value_errors(call, message):
    with pytest.raises(ValueError, match=message) as info:
        call()
    text = str(info.value)
    assert text.endswith(".") and "\n" not in text


def _with(array: np.ndarray, row: int, col: int, value: float) -> np.ndarray:
    array[row, col] = value
    return array


def test_nan_found_in_a_later_block():
    x = np.zeros((5000, 3), np.float32)
    x[4321, 1] = np.nan
    with pytest.raises(ValueError, match="in row 4321"):
        nearest_centroid(x, np.ones((2, 3), np.float32), block_rows=1000)


@pytest.mark.skipif(cuda_available(), reason="a GPU is present: device='cuda' works here")
def test_cuda_request_without_gpu_is_one_clear_error():
    for call in (
        lambda: class_histogram(np.zeros(3, np.int64), 2, device="cuda"),
        lambda: joint_histogram(np.zeros(3, np.int64), np.zeros(3, np.int64), 2, 2, device="cuda"),
        lambda: nearest_centroid(np.zeros((3, 2)), np.zeros((1, 2)), device="cuda"),
    ):
        with pytest.raises(CudaUnavailableError, match="device='cuda'") as info:
            call()
        assert isinstance(info.value, RuntimeError) and "\n" not in str(info.value)


def test_unsupported_torch_device_is_a_type_error():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="only CPU and CUDA"):
        class_histogram(torch.zeros(3, dtype=torch.int64, device="meta"), 2)
