#!/usr/bin/env bash
# GPU checks for dptool in one command: GPU tests, then GPU benchmarks, printing the numbers.
#
#   bash benchmarks/gpu_check.sh            # from the repository root or anywhere; about 5-8 minutes
#
# Each step has its own time limit, and no step runs past GPU_CHECK_BUDGET_S seconds from the start (default
# 540: the whole check, summary included, fits a 10-minute slot on a lent machine); a step the budget leaves
# no time for is skipped and named. Outputs in benchmarks/results (or GPU_CHECK_RESULTS) are overwritten (they are
# kept in git). On a lent machine whose files come back only from one folder (e.g. $OUT), point GPU_CHECK_RESULTS
# there: results written into the checkout are lost with the machine, and a command killed at its limit never
# reaches a `cp` after it.
#
# Needs an NVIDIA GPU with its driver, dptool set up (make setup: .venv with torch, numba, ...), and CuPy.
# The machine may have no network: if `import cupy` fails, CuPy is installed from wheels in ./wheels
# (or $DPTOOL_WHEELS), which you fetch beforehand on a machine with network and the same Python version:
#
#   .venv/bin/pip download cupy-cuda13x -d wheels/        # brings its dependencies (cuda-pathfinder, ...)
#
# CUDA libraries come from the nvidia-* wheels that torch installs (or a system CUDA 13 toolkit).
# On a machine whose python3 already holds torch, numba and CuPy but not dptool (no .venv, no network):
#   DPTOOL_WHEELS=wheels PYTHON=python3 bash benchmarks/gpu_check.sh   # installs this checkout into it with
#   --no-deps first, and FFCV and faiss-cpu from wheels/ (made by benchmarks/gpu_wheels.sh)
# Environment: PYTHON (default .venv/bin/python, else python3), DPTOOL_WHEELS (default wheels),
# GPU_CHECK_BUDGET_S (default 540; 0 = no overall limit), GPU_CHECK_RESULTS (default benchmarks/results).
# Exit status: 0 all passed, 1 a check failed, 2 could not run (the reason is printed).
# Later issues append their sections (e.g. training benchmarks) at the end, each as a `section` block.

set -u -o pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
WHEELS="${DPTOOL_WHEELS:-wheels}"
BUDGET="${GPU_CHECK_BUDGET_S:-540}"
STATUS=0
RESULTS="${GPU_CHECK_RESULTS:-benchmarks/results}"
mkdir -p "$RESULTS"

section() { printf '\n===== %s (at %ds) =====\n' "$*" "$SECONDS"; }
cannot_run() { printf '\ngpu_check: cannot run: %s\n' "$*" >&2; exit 2; }
skip_cupy() { printf '\ngpu_check: skipping the CuPy kernel checks: %s\n' "$*" >&2; CUPY_OK=0; STATUS=2; }
CUPY_OK=1
SKIPPED=254  # what step returns when the budget left it no time: the command never ran
step() {  # step TIMEOUT_S COMMAND...: run, report failure or timeout, carry on with the next step
    local limit="$1"; shift
    if [ "$BUDGET" -gt 0 ]; then  # never past the overall budget: the summary at the end always prints
        local left=$((BUDGET - SECONDS))
        if [ "$left" -lt 20 ]; then
            echo "gpu_check: SKIPPED, the ${BUDGET}s budget is spent (raise GPU_CHECK_BUDGET_S): $*" >&2
            [ "$STATUS" -eq 1 ] || STATUS=2
            return "$SKIPPED"
        fi
        [ "$limit" -le "$left" ] || limit=$left
    fi
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "gpu_check: TIMED OUT after ${limit}s: $*" >&2; STATUS=1
    elif [ "$rc" -ne 0 ]; then
        echo "gpu_check: FAILED (exit $rc): $*" >&2; STATUS=1
    fi
    return "$rc"
}

# ------------------------------------------------------------------------------------------ environment
section "environment"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
        || cannot_run "nvidia-smi is present but cannot talk to the driver (is the GPU visible in this container?)"
else
    echo "nvidia-smi not found; relying on CuPy to find the GPU"
fi
if ! "$PY" -c "import dptool.kernels" >/dev/null 2>&1 && "$PY" -c "import torch, numba" >/dev/null 2>&1; then
    # a machine whose own Python already has torch, numba (and CuPy), e.g. a lent GPU machine without network;
    # its Python may be newer than the 3.10-3.11 dptool is tested on: the GPU checks need only its pure-Python code
    echo "dptool is not installed in $PY: installing this checkout into it (editable, no dependencies, no network)"
    "$PY" -m pip install --quiet --no-deps --no-build-isolation --no-index --ignore-requires-python -e . \
        || cannot_run "pip could not install this checkout into $PY (it needs setuptools >= 64 there)"
fi
"$PY" -c "import dptool.kernels, torch, numba" \
    || cannot_run "$PY cannot import dptool.kernels, torch and numba; run 'make setup' (or set PYTHON)"
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| torch sees CUDA:', torch.cuda.is_available())"

# FFCV is an sdist that compiles against libturbojpeg and OpenCV, and faiss-cpu is not on every image: a machine
# without network gets both from wheels in $WHEELS, made beforehand for its Python on a machine with network by
#   bash benchmarks/gpu_wheels.sh python3.12 wheels   (FFCV with OpenCV and libturbojpeg bundled; faiss-cpu)
install_from_wheels() {  # MODULE WHEEL_NAME PIP_NAME: install PIP_NAME from $WHEELS if MODULE does not import
    "$PY" -c "import $1" >/dev/null 2>&1 && return 0
    ls "$WHEELS"/"$2"-*.whl >/dev/null 2>&1 || return 0
    echo "$1 missing: installing $3 from $WHEELS/ (no network, no dependencies)"
    "$PY" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" "$3" \
        || echo "gpu_check: pip could not install $3 from $WHEELS/" >&2
}
install_from_wheels ffcv ffcv ffcv
install_from_wheels faiss faiss_cpu faiss-cpu
"$PY" -c "import importlib.metadata as m, ffcv, faiss; print('ffcv', m.version('ffcv'), '| faiss', faiss.__version__, \
'| faiss GPUs:', faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0)" \
    || echo "gpu_check: ffcv or faiss does not import (see above); the sections that need them will say so" >&2

# ------------------------------------------------------------------------------------------------ CuPy
section "cupy"
if ! "$PY" -c "import cupy" >/dev/null 2>&1; then
    if ls "$WHEELS"/cupy_cuda*.whl >/dev/null 2>&1; then
        echo "CuPy missing: installing from $WHEELS/ (no network)"
        "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" cupy-cuda13x \
            || skip_cupy "pip could not install CuPy from $WHEELS/ (missing dependency wheels? see pip's message)"
    else
        skip_cupy "CuPy is not installed and $WHEELS/ holds no cupy_cuda*.whl; on a machine with network run \
'$PY -m pip download cupy-cuda13x -d $WHEELS/' and copy $WHEELS/ here"
    fi
fi
if [ "$CUPY_OK" -eq 1 ] && ! "$PY" - <<'EOF'
import sys
import cupy
try:
    ok = cupy.cuda.is_available()
    if ok:
        props = cupy.cuda.runtime.getDeviceProperties(0)
        print(f"cupy {cupy.__version__} | {props['name'].decode()} | CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}"
              f" | driver {cupy.cuda.runtime.driverGetVersion()}")
        cupy.arange(4).sum().item()  # a real launch: fails here if the libraries or driver do not fit
except Exception as exc:
    print(f"CuPy error: {exc}", file=sys.stderr)
    ok = False
else:
    if not ok:
        print("cupy.cuda.is_available() is False: no GPU visible, or the driver is too old for this CuPy",
              file=sys.stderr)
sys.exit(0 if ok else 1)
EOF
then
    skip_cupy "CuPy is installed but cannot use a GPU (see the line above)"
fi

# ------------------------------------------------------------------------------------------- kernels
if [ "$CUPY_OK" -eq 1 ]; then
section "kernels: GPU tests (tests/test_kernels_gpu.py)"
step 150 "$PY" -m pytest tests/test_kernels_gpu.py -q -rs -p no:cacheprovider -o faulthandler_timeout=60

section "kernels: benchmarks, CPU and GPU (benchmarks/bench_kernels.py --gpu)"
step 120 "$PY" benchmarks/bench_kernels.py --gpu --repeats 3 --json-out "$RESULTS/kernels_gpu.json"
fi

# ------------------------------------------------------------------------------ FFCV training path
section "ffcv"
FFCV_OK=1
if "$PY" -c "import ffcv" 2>/tmp/dptool_ffcv_err; then
    echo "ffcv imports"
else
    echo "gpu_check: cannot run the training sections: ffcv does not import here ($(tail -1 /tmp/dptool_ffcv_err 2>/dev/null))." \
         "Bring a wheel built for this Python in $WHEELS/ (see the environment section)." >&2
    STATUS=2
    FFCV_OK=0
fi
if [ "$FFCV_OK" -eq 1 ]; then
    section "dptool's FFCV start-up patches on this machine's Numba (tests/test_ffcv_cache.py)"
    step 240 "$PY" -m pytest tests/test_ffcv_cache.py -q -rs -p no:cacheprovider -o faulthandler_timeout=60
    rc=$?
    if [ "$rc" -ne 0 ] && [ "$rc" -ne "$SKIPPED" ]; then  # skipped for time: it did not fail
        echo "gpu_check: the FFCV patches failed here: the remaining sections run with DPTOOL_FFCV_PATCHES=0" >&2
        export DPTOOL_FFCV_PATCHES=0
    fi
fi

if [ "$FFCV_OK" -eq 1 ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: cannot run the training sections: torch sees no CUDA device." >&2
    STATUS=2
    FFCV_OK=0
fi
if [ "$FFCV_OK" -eq 1 ]; then
    section "loaders on CUDA: batches equal the CPU's on a busy GPU, epochs left early (tests/test_loaders_gpu.py)"
    step 90 "$PY" -m pytest tests/test_loaders_gpu.py -q -rs -p no:cacheprovider -o faulthandler_timeout=60

    section "scoring on CUDA: LM and FM against the CPU references (tests/test_score_gpu.py)"
    step 150 "$PY" -m pytest tests/test_score_gpu.py -q -rs -p no:cacheprovider -o faulthandler_timeout=60

    section "pruned pretraining: dptool bench pretrain, full vs 60%-pruned, ResNet-18 and ResNet-50 at 160 px"
    WORK=$(mktemp -d)
    step 120 "$PY" - "$WORK" <<'PYEOF'
import sys
from dptool.convert import WriterParams, convert
from dptool.prune import prune
from dptool.scoring.pipeline import score_files
from dptool.synthetic import mini_imagenet, write_npz

work = sys.argv[1]
images, labels, names = mini_imagenet(per_class=40, target_train_per_class=1, target_test_per_class=1, size=192)["source"]
write_npz(f"{work}/src.npz", images, labels, names)
convert(f"{work}/src.npz", f"{work}/full.beton", params=WriterParams(max_resolution=192, write_mode="jpg"))
score_files(f"{work}/random.json", method="random", source=f"{work}/full.beton")
prune(f"{work}/full.beton", f"{work}/random.json", f"{work}/p60.beton", ratio=0.6)
print("generated 4000 images at 192 px and a 60%-pruned copy")
PYEOF
    for arch in resnet18 resnet50; do
        step 120 "$PY" -m dptool bench pretrain "$WORK/full.beton" "$WORK/p60.beton" --arch "$arch" --res 160 \
            --batch-size 256 --steps 20 --rounds 2 --json-out "$RESULTS/bench_pretrain_gpu_$arch.json" --force
    done
    section "data path on CUDA: dptool bench loader, with and without a ResNet-18 step"
    step 90 "$PY" -m dptool bench loader "$WORK/full.beton" --res 160 --batch-size 256 --arch resnet18 \
        --device cuda --max-batches 30 --json-out "$RESULTS/bench_loader_gpu.json" --force
    rm -rf "$WORK"

    section "training throughput: FFCV vs torchvision ImageFolder on CUDA (benchmarks/bench_train.py)"
    step 150 "$PY" benchmarks/bench_train.py --device cuda --images 4000 --shapes 160:128 --batch-size 256 \
        --train-steps 10 --arch resnet18 resnet50 --json-out "$RESULTS/train_gpu.json"
fi

# ------------------------------------------------------------------------------- later sections go here

section "done"
case "$STATUS" in
    0) echo "gpu_check: all steps passed" ;;
    2) echo "gpu_check: some sections could not run (reasons above)" ;;
    *) echo "gpu_check: some steps FAILED" ;;
esac
exit "$STATUS"
