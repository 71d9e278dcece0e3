#!/usr/bin/env bash
# Fetches the CUDA runtime compiler (NVRTC, from the PyPI wheel nvidia-cuda-nvrtc) into
# .cache/nvrtc once, and prints the directory holding libnvrtc.so. NVRTC compiles the kernels in
# kernels/ without any GPU, so the tests can check every kernel compiles on machines with no CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
version=13.0.88
dir=.cache/nvrtc
lib=$dir/nvidia/cu13/lib
if [ ! -f "$lib/libnvrtc.so.13" ]; then
    mkdir -p "$dir"
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$dir" \
        "nvidia-cuda-nvrtc==$version" >&2
    python3 -m zipfile -e "$dir"/nvidia_cuda_nvrtc-"$version"-*.whl "$dir"
    rm -f "$dir"/*.whl
fi
echo "$PWD/$lib"
