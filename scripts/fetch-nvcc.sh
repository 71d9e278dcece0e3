#!/usr/bin/env bash
# Fetches nvcc with what it runs and includes (the PyPI wheels nvidia-cuda-nvcc, nvidia-nvvm,
# nvidia-cuda-crt and nvidia-cuda-runtime) into .cache/nvcc once, and prints the directory holding
# the nvcc binary. With it bench/flash/flash_bench.cu builds (host and device code, any target)
# on a machine with no GPU: add -L "$bin/../lib" to link. Running the result needs a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=.cache/nvcc
bin=$dir/nvidia/cu13/bin
if [ ! -x "$bin/nvcc" ] || [ ! -x "$dir/nvidia/cu13/nvvm/bin/cicc" ]; then
    mkdir -p "$dir"
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$dir" \
        nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
        nvidia-cuda-runtime==13.0.96 >&2
    for wheel in "$dir"/*.whl; do python3 -m zipfile -e "$wheel" "$dir"; done
    rm -f "$dir"/*.whl
    # zipfile does not keep the executable bits.
    chmod +x "$bin"/* "$dir"/nvidia/cu13/nvvm/bin/*
fi
echo "$PWD/$bin"
