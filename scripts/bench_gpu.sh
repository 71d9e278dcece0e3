#!/usr/bin/env bash
# Runs `finetune bench --device cuda:0` once per argument (each one configuration, e.g.
# "--model llama3-8b --seq 2048 --steps 3 --mode qlora --offload") with the binary that
# scripts/gpu_bundle.sh put in .gpu/ (or target/release), keeps each JSON under $OUT (or /tmp)
# and prints one line per run: tokens/s, peak device memory, first and last loss.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.gpu/finetune
[ -x "$bin" ] || bin=target/release/finetune
[ -d .gpu/kernel-cache ] && export FINETUNE_KERNEL_CACHE="$PWD/.gpu/kernel-cache"
out=${OUT:-/tmp}
n=0
for args in "$@"; do
    n=$((n + 1))
    # shellcheck disable=SC2086 # each argument is a list of options
    "$bin" bench --device cuda:0 $args >"$out/bench-$n.json"
    python3 - "$args" "$out/bench-$n.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[2]))
print(f"{sys.argv[1]:<60} {d['tokens_per_second']:>9,.0f} tokens/s "
      f"{d['peak_device_mib']:>9,.0f} MiB  loss {d['first_loss']:.4f} -> {d['last_loss']:.4f}")
PY
done
