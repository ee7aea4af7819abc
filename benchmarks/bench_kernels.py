"""Kernel speed and agreement: dptool.kernels against np.bincount, faiss and torch, side by side in one run.

CPU: class histogram of 10M labels into 1000 bins (Numba vs ``np.bincount``), joint histogram, and
nearest-centroid N=100k, K=1000, D=512 float32 (Numba + BLAS vs faiss-cpu ``IndexFlatL2.search(k=1)`` vs a
blocked NumPy reference), with the number of assignments that differ from faiss and from a float64 answer.
``--gpu`` adds CuPy vs torch (``bincount``; ``cdist`` + ``argmin``) and faiss-gpu where installed.

Implementations are timed interleaved (each repeat runs every implementation once), after a warm-up that
includes Numba compilation; the best repeat counts. Prints a table and writes JSON.

    .venv/bin/python benchmarks/bench_kernels.py                     # CPU, about a minute on 2 cores
    .venv/bin/python benchmarks/bench_kernels.py --gpu --json-out benchmarks/results/kernels_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _args import parser, require_positive  # benchmarks/_args.py, beside this script

from dptool.kernels import class_histogram, joint_histogram, nearest_centroid


def best_of(fns: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None] = lambda: None) -> dict:
    """Warm each function up once, then time ``repeats`` interleaved rounds; best seconds per name."""
    for fn in fns.values():
        fn()
        sync()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def numpy_nearest(x: np.ndarray, c: np.ndarray, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """The plain NumPy way, blocked so it fits in memory: distances by the expansion, then argmin."""
    cn = (c.astype(np.float64) ** 2).sum(1).astype(np.float32)
    index = np.empty(x.shape[0], np.int64)
    dist = np.empty(x.shape[0], np.float32)
    for r0 in range(0, x.shape[0], block):
        xb = x[r0 : r0 + block]
        d = (xb * xb).sum(1)[:, None] - 2 * (xb @ c.T) + cn[None, :]
        index[r0 : r0 + block] = d.argmin(1)
        dist[r0 : r0 + block] = d[np.arange(d.shape[0]), index[r0 : r0 + block]]
    return index, dist


def exact_nearest(x: np.ndarray, c: np.ndarray, block: int = 2048) -> np.ndarray:
    """Float64 arg-min (the expansion in float64 is exact far below float32 resolution)."""
    c64 = c.astype(np.float64)
    cn = (c64**2).sum(1)
    out = np.empty(x.shape[0], np.int64)
    for r0 in range(0, x.shape[0], block):
        out[r0 : r0 + block] = (cn[None, :] - 2 * (x[r0 : r0 + block].astype(np.float64) @ c64.T)).argmin(1)
    return out


def row(group: str, impl: str, seconds: float, items: int, unit: str, baseline: str | None = None, **extra):
    return {"group": group, "impl": impl, "seconds": seconds, "throughput": items / seconds, "unit": unit,
            "baseline": baseline, **extra}


def add_ratios(rows: list[dict]) -> None:
    """speedup = baseline seconds / seconds, within a group (>1: faster than the baseline)."""
    times = {(r["group"], r["impl"]): r["seconds"] for r in rows}
    for r in rows:
        if r["baseline"]:
            r["speedup_vs_baseline"] = times[(r["group"], r["baseline"])] / r["seconds"]


# -------------------------------------------------------------------------------------------------------- CPU


def bench_cpu(args: argparse.Namespace) -> list[dict]:
    rng = np.random.default_rng(0)
    rows: list[dict] = []
    n, bins = args.labels, 1000
    labels = rng.integers(0, bins, n)
    assert np.array_equal(class_histogram(labels, bins), np.bincount(labels, minlength=bins))
    t = best_of({"numba": lambda: class_histogram(labels, bins),
                 "np.bincount": lambda: np.bincount(labels, minlength=bins)}, args.repeats)
    group = f"class_histogram N={n:,} bins={bins}"
    rows += [row(group, "numba", t["numba"], n, "labels/s", "np.bincount"),
             row(group, "np.bincount", t["np.bincount"], n, "labels/s")]

    n_b = 100
    target = rng.integers(0, n_b, n)
    assert np.array_equal(joint_histogram(labels, target, bins, n_b).ravel(),
                          np.bincount(labels * n_b + target, minlength=bins * n_b))
    t = best_of({"numba": lambda: joint_histogram(labels, target, bins, n_b),
                 "np.bincount(a*n_b+b)": lambda: np.bincount(labels * n_b + target, minlength=bins * n_b)},
                args.repeats)
    group = f"joint_histogram N={n:,} bins={bins}x{n_b}"
    rows += [row(group, "numba", t["numba"], n, "labels/s", "np.bincount(a*n_b+b)"),
             row(group, "np.bincount(a*n_b+b)", t["np.bincount(a*n_b+b)"], n, "labels/s")]

    n, k, d = args.rows, args.centroids, args.dims
    x = rng.standard_normal((n, d), dtype=np.float32)
    c = rng.standard_normal((k, d), dtype=np.float32)
    exact = exact_nearest(x, c)
    fns: dict[str, Callable[[], object]] = {"numba+blas": lambda: nearest_centroid(x, c)}
    answers = {"numba+blas": nearest_centroid(x, c)[0]}
    try:
        import faiss

        index = faiss.IndexFlatL2(d)
        index.add(c)
        fns["faiss-cpu IndexFlatL2"] = lambda: index.search(x, 1)
        answers["faiss-cpu IndexFlatL2"] = index.search(x, 1)[1][:, 0]
    except ImportError:
        print("faiss is not installed: skipping the faiss-cpu comparison")
    fns["numpy blocked"] = lambda: numpy_nearest(x, c)
    answers["numpy blocked"] = numpy_nearest(x, c)[0]
    t = best_of(fns, args.repeats)
    group = f"nearest_centroid N={n:,} K={k} D={d}"
    base = "faiss-cpu IndexFlatL2" if "faiss-cpu IndexFlatL2" in fns else "numpy blocked"
    for name in fns:
        extra = {"mismatches_vs_float64": int((answers[name] != exact).sum())}
        if name != base:
            extra[f"mismatches_vs_{base}"] = int((answers[name] != answers[base]).sum())
        rows.append(row(group, name, t[name], n, "rows/s", None if name == base else base, **extra))
    return rows


# -------------------------------------------------------------------------------------------------------- GPU


def bench_gpu(args: argparse.Namespace) -> list[dict]:
    import cupy
    import torch

    sync = cupy.cuda.runtime.deviceSynchronize
    rows: list[dict] = []
    n, bins = args.labels, 1000
    labels = cupy.random.default_rng(0).integers(0, bins, n, dtype=cupy.int64)
    labels_t = torch.from_dlpack(labels)
    assert bool((class_histogram(labels, bins) == cupy.bincount(labels, minlength=bins)).all())
    t = best_of({"cupy kernel": lambda: class_histogram(labels, bins),
                 "torch.bincount": lambda: torch.bincount(labels_t, minlength=bins),
                 "cupy.bincount": lambda: cupy.bincount(labels, minlength=bins)}, args.repeats, sync)
    group = f"GPU class_histogram N={n:,} bins={bins}"
    rows += [row(group, name, t[name], n, "labels/s", None if name == "torch.bincount" else "torch.bincount")
             for name in t]

    target = cupy.random.default_rng(1).integers(0, 100, n, dtype=cupy.int64)
    target_t = torch.from_dlpack(target)
    t = best_of({"cupy kernel": lambda: joint_histogram(labels, target, bins, 100),
                 "torch.bincount(a*n_b+b)": lambda: torch.bincount(labels_t * 100 + target_t, minlength=bins * 100)},
                args.repeats, sync)
    group = f"GPU joint_histogram N={n:,} bins={bins}x100"
    rows += [row(group, name, t[name], n, "labels/s", None if name.startswith("torch") else "torch.bincount(a*n_b+b)")
             for name in t]

    for n in sorted({args.rows, args.gpu_rows}):
        k, d = args.centroids, args.dims
        rng = np.random.default_rng(2)
        x_np = rng.standard_normal((n, d), dtype=np.float32)
        c_np = rng.standard_normal((k, d), dtype=np.float32)
        x, c = cupy.asarray(x_np), cupy.asarray(c_np)
        xt, ct = torch.from_dlpack(x), torch.from_dlpack(c)
        fns: dict[str, Callable[[], object]] = {
            "cupy gemm+argmin": lambda x=x, c=c: nearest_centroid(x, c),
            "torch cdist+argmin": lambda xt=xt, ct=ct: torch.cdist(xt, ct).argmin(1),
        }
        answers = {"cupy gemm+argmin": nearest_centroid(x, c)[0].get(),
                   "torch cdist+argmin": torch.cdist(xt, ct).argmin(1).cpu().numpy()}
        try:
            import faiss

            if hasattr(faiss, "StandardGpuResources"):
                res = faiss.StandardGpuResources()
                gpu_index = faiss.GpuIndexFlatL2(res, d)
                gpu_index.add(c_np)
                fns["faiss-gpu GpuIndexFlatL2"] = lambda gi=gpu_index, xn=x_np: gi.search(xn, 1)
                answers["faiss-gpu GpuIndexFlatL2"] = gpu_index.search(x_np, 1)[1][:, 0]
        except ImportError:
            pass
        exact = exact_nearest(x_np, c_np) if n <= args.rows else None
        t = best_of(fns, args.repeats, sync)
        group = f"GPU nearest_centroid N={n:,} K={k} D={d}"
        for name in fns:
            extra = {"mismatches_vs_torch": int((answers[name] != answers["torch cdist+argmin"]).sum())}
            if exact is not None:
                extra["mismatches_vs_float64"] = int((answers[name] != exact).sum())
            base = None if name == "torch cdist+argmin" else "torch cdist+argmin"
            rows.append(row(group, name, t[name], n, "rows/s", base, **extra))
        if "faiss-gpu GpuIndexFlatL2" in fns:
            rows[-1]["note"] = "faiss-gpu is timed from host arrays (copies included)"
    return rows


# ------------------------------------------------------------------------------------------------------ main


def print_table(rows: list[dict]) -> None:
    print(f"{'benchmark':<46} {'implementation':<26} {'best s':>9} {'throughput':>16} {'speedup':>9}  agreement")
    for r in rows:
        speed = f"{r['speedup_vs_baseline']:.2f}x" if "speedup_vs_baseline" in r else "base"
        agree = ", ".join(f"{k.removeprefix('mismatches_')}={v}" for k, v in r.items() if k.startswith("mismatches"))
        print(f"{r['group']:<46} {r['impl']:<26} {r['seconds']:>9.4f} {r['throughput']:>12.3g} {r['unit']:<3}"
              f" {speed:>9}  {agree}")


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--gpu", action="store_true", help="also run the GPU benchmarks (needs CuPy and torch)")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU benchmarks")
    ap.add_argument("--labels", type=int, default=10_000_000, help="labels per histogram")
    ap.add_argument("--rows", type=int, default=100_000, help="N for nearest-centroid")
    ap.add_argument("--gpu-rows", type=int, default=1_000_000, help="a larger N for the GPU nearest-centroid")
    ap.add_argument("--centroids", type=int, default=1000, help="K")
    ap.add_argument("--dims", type=int, default=512, help="D")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json-out", type=Path, default=Path(__file__).parent / "results" / "kernels.json")
    args = ap.parse_args()
    require_positive(ap, args, ("labels", "rows", "gpu_rows", "centroids", "dims", "repeats"))
    if args.gpu:
        import importlib.util

        import torch

        if importlib.util.find_spec("cupy") is None or not torch.cuda.is_available():
            ap.error("--gpu needs CuPy (pip install -e '.[gpu]') and a CUDA device torch can see")

    rows: list[dict] = []
    if not args.no_cpu:
        rows += bench_cpu(args)
    if args.gpu:
        rows += bench_gpu(args)
    add_ratios(rows)
    print_table(rows)
    import numba

    info = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "numba_threads": numba.get_num_threads(), "numpy": np.__version__, "numba": numba.__version__}
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({"environment": info, "args": {k: str(v) for k, v in vars(args).items()},
                                         "results": rows}, indent=2))
    print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
