#!/usr/bin/env bash
# The main job: builds the library and CLI, then fine-tunes a model and prints its answers
# before and after training.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --quiet
./target/release/finetune demo --out runs/demo
