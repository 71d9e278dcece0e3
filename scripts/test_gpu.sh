#!/usr/bin/env bash
# Runs the GPU tests (GPU against CPU, op by op and whole training steps; data-parallel training
# over NCCL) on a machine with an NVIDIA GPU, failing rather than skipping when no GPU is usable,
# then the multi-process C example with one rank per GPU (at most 2) and, with 2 GPUs, again with
# a rank killed after its first step (the survivor must fail within its timeout, not hang). With
# a Rust toolchain it builds them; without one it runs what scripts/gpu_bundle.sh put in .gpu/.
# Each test executable gets $TEST_TIMEOUT seconds (default 300; each takes well under a minute on
# an H200), so that a kernel that never finishes fails its tests instead of holding the machine;
# a failing executable does not stop the others, and the script then exits with status 1.
set -euo pipefail
cd "$(dirname "$0")/.."
export FINETUNE_REQUIRE_GPU=1
limit=${TEST_TIMEOUT:-300}
failed=0
run_tests() {
    echo "== $*"
    timeout "$limit" "$@" --test-threads=1 --nocapture || {
        echo "== FAILED (status $?): $*"
        failed=1
    }
}
if [ -d .gpu/tests ] && ! command -v cargo >/dev/null; then
    export FINETUNE_KERNEL_CACHE="$PWD/.gpu/kernel-cache"
    for t in .gpu/tests/*; do
        run_tests "$t"
    done
else
    tests=(cuda_parity cuda_qlora cuda_data_parallel)
    cargo test --release --no-run "${tests[@]/#/--test=}"
    for t in "${tests[@]}"; do
        run_tests cargo test --release --test "$t" --
    done
    cargo build --release --quiet
    mkdir -p target/examples
    cc -std=c99 -I include examples/c/data_parallel.c -L target/release -lfinetune \
        -Wl,-rpath,"$PWD/target/release" -o target/examples/data_parallel
fi
example=.gpu/data_parallel
[ -x "$example" ] || example=target/examples/data_parallel
gpus=$(nvidia-smi -L | wc -l)
ranks=$((gpus < 2 ? gpus : 2))
out=$(mktemp -d)
echo "== $example with $ranks rank(s)"
"$example" "$ranks" "$out/adapter"
test -f "$out/adapter/adapter_model.safetensors"
if [ "$gpus" -ge 2 ]; then
    echo "== $example with rank 1 killed after its first step"
    timeout 120 "$example" 2 "$out/adapter-killed" 1
fi
exit "$failed"
