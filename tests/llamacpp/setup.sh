#!/usr/bin/env bash
# Installs llama.cpp for the interop tests: node-llama-cpp 3.21.1 from npm with its prebuilt
# linux-x64 llama.cpp libraries (nothing is compiled, nothing else is downloaded). Idempotent. Without
# npm it says so and exits 0: tests/gguf_llamacpp.rs then skips with a message.
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v npm >/dev/null || ! command -v node >/dev/null; then
    echo "tests/llamacpp: npm or node not found; the llama.cpp interop tests will be skipped" >&2
    exit 0
fi
if [ ! -f node_modules/node-llama-cpp/package.json ]; then
    # Only the prebuilt CPU build for linux-x64 (a direct dependency); the postinstall step,
    # which would try to download or build llama.cpp, is skipped.
    NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm ci --ignore-scripts --omit=optional --no-audit --no-fund --loglevel=error
fi
