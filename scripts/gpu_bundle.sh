#!/usr/bin/env bash
# Builds what a GPU machine without a Rust toolchain needs into .gpu/: the release `finetune`
# binary, the release executables of the GPU tests, the multi-process C example, and the kernel
# cache for sm_90a (so the first run there compiles nothing). Run scripts/test_gpu.sh there with
# the folder beside it.
# `--base REV` also builds commit REV's `finetune` as .gpu/finetune_base (its kernels cached too),
# so that scripts/bench_gpu.sh can run each configuration with both, back to back on one GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
base=
if [ "${1:-}" = --base ]; then
    base=$(git rev-parse --verify "${2:?--base needs a commit}^{commit}")
fi
rm -rf .gpu && mkdir -p .gpu/tests .gpu/kernel-cache
cargo build --release --quiet
cp target/release/finetune target/release/libfinetune.so .gpu/
if [ -n "$base" ]; then
    tree=target/base-tree
    rm -rf "$tree" && mkdir -p "$tree"
    git archive "$base" | tar -x -C "$tree"
    CARGO_TARGET_DIR="$PWD/target/base" cargo build --release --quiet --manifest-path "$tree/Cargo.toml" \
        --bin finetune
    strip -o .gpu/finetune_base target/base/release/finetune
fi
for t in cuda_parity cuda_qlora cuda_data_parallel; do
    exe=$(cargo test --release --no-run --test "$t" --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])')
    cp "$exe" ".gpu/tests/$t"
done
cc -std=c99 -Wall -Wextra -Werror -I include examples/c/data_parallel.c -L .gpu -lfinetune \
    -Wl,-rpath,'$ORIGIN' -o .gpu/data_parallel
strip .gpu/finetune .gpu/tests/* .gpu/libfinetune.so .gpu/data_parallel
lib=$(scripts/fetch-nvrtc.sh)
for bin in .gpu/finetune .gpu/finetune_base; do
    [ -x "$bin" ] || continue
    LD_LIBRARY_PATH="$lib" FINETUNE_KERNEL_CACHE="$PWD/.gpu/kernel-cache" "$bin" kernels --arch sm_90a
done
du -sh .gpu
