#!/usr/bin/env bash
# Runs the GPU tests (GPU against CPU, op by op and whole training steps) on a machine with an
# NVIDIA GPU, failing rather than skipping when no GPU is usable. With a Rust toolchain it builds
# them; without one it runs the executables that scripts/gpu_bundle.sh put in .gpu/.
set -euo pipefail
cd "$(dirname "$0")/.."
export FINETUNE_REQUIRE_GPU=1
if [ -d .gpu/tests ] && ! command -v cargo >/dev/null; then
    export FINETUNE_KERNEL_CACHE="$PWD/.gpu/kernel-cache"
    for t in .gpu/tests/*; do
        echo "== $t"
        "$t" --test-threads=1 --nocapture
    done
else
    for t in cuda_parity cuda_qlora; do
        cargo test --release --test "$t" -- --test-threads=1 --nocapture
    done
fi
