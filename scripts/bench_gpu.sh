#!/usr/bin/env bash
# Runs `finetune bench --device cuda:0` once per argument (each one configuration, e.g.
# "--model llama3-8b --seq 2048 --steps 3 --mode qlora --offload") with the binary that
# scripts/gpu_bundle.sh put in .gpu/ (or target/release), keeps each JSON under $OUT (or /tmp)
# and prints one line per run: tokens/s, peak device memory, first and last loss. Where the
# bundle holds a base binary (`scripts/gpu_bundle.sh --base REV`), each configuration runs with
# the base right after, and a third line gives the ratios (new / base).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.gpu/finetune
[ -x "$bin" ] || bin=target/release/finetune
bins=("$bin")
[ -x .gpu/finetune_base ] && bins+=(.gpu/finetune_base)
[ -d .gpu/kernel-cache ] && export FINETUNE_KERNEL_CACHE="$PWD/.gpu/kernel-cache"
out=${OUT:-/tmp}
n=0
for args in "$@"; do
    n=$((n + 1))
    jsons=()
    for b in "${bins[@]}"; do
        json="$out/bench-$n-$(basename "$b").json"
        # shellcheck disable=SC2086 # each argument is a list of options
        "$b" bench --device cuda:0 $args >"$json"
        jsons+=("$json")
    done
    python3 - "$args" "${jsons[@]}" <<'PY'
import json, sys
args, runs = sys.argv[1], [json.load(open(p)) for p in sys.argv[2:]]
for name, d in zip(["", "base"], runs):
    print(f"{args:<60} {name:>4} {d['tokens_per_second']:>9,.0f} tokens/s "
          f"{d['peak_device_mib']:>9,.0f} MiB  loss {d['first_loss']:.4f} -> {d['last_loss']:.4f}")
if len(runs) == 2:
    new, base = runs
    print(f"{args:<60} new/base: tokens/s {new['tokens_per_second'] / base['tokens_per_second']:.3f}, "
          f"peak {new['peak_device_mib'] - base['peak_device_mib']:+,.0f} MiB")
PY
done
