#!/usr/bin/env bash
# Runs every test of the project: formatting, lints, the Rust unit and integration tests (which
# also compile and run the C example against the built libfinetune.so), then the examples in C,
# C++, Go, Node.js and C# and the Go, Node and C# bindings' tests (scripts/test_bindings.sh). GPU
# tests skip, saying so, where no GPU exists.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --quiet 2>&1 | tee /tmp/finetune-test.log
# cargo test has built libfinetune.so (target/debug/deps) and the CLI the bindings' tests use.
bash scripts/test_bindings.sh debug
