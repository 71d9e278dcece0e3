#!/usr/bin/env bash
# Runs `finetune bench --device cuda:0` once per argument (each one configuration, e.g.
# "--model llama3-8b --seq 2048 --steps 3 --mode qlora --offload") with the binary that
# scripts/gpu_bundle.sh put in .gpu/ (or target/release), keeps each JSON under $OUT (or /tmp)
# and prints one line per run: tokens/s, peak device memory, first and last loss. Each
# configuration also runs, right after, with
# - the base binary, where the bundle holds one (`scripts/gpu_bundle.sh --base REV`);
# - each kernel-source variant in $KERNEL_VARIANTS ("NAME=PROGRAM:FILE ...", e.g.
#   "new=flash:/tmp/flash-new.cu"): the same binary reading kernels/ with PROGRAM.cu replaced by
#   FILE (FINETUNE_KERNEL_DIR), so kernel changes are timed on whole steps with no rebuild;
# and a line per extra run gives the ratios new/base and NAME/new (tokens/s, peak memory).
# Where nvidia-smi exists, each run's SM clock and power are sampled every 200 ms (into a
# temporary folder, so that $OUT holds only the JSON files: a device run brings back few files)
# and the line gives their medians over the samples drawing more than 300 W: on the
# H200 a long step runs at its 700 W cap with the clock below its maximum (bench/NOTES.md), so
# the clock says how much of a difference between leases is the GPU's own.
# A configuration whose run fails gets a line saying so, the others still run, and the script
# then exits with status 1.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.gpu/finetune
[ -x "$bin" ] || bin=target/release/finetune
# Each run: a name, a binary and a kernel directory ("" for the sources built in).
names=(new) bins=("$bin") dirs=("")
if [ -x .gpu/finetune_base ]; then
    names+=(base) bins+=(.gpu/finetune_base) dirs+=("")
fi
# The bundle's kernel cache, copied: the variants add their own programs beside it.
if [ -d .gpu/kernel-cache ]; then
    FINETUNE_KERNEL_CACHE=$(mktemp -d)
    cp -r .gpu/kernel-cache/. "$FINETUNE_KERNEL_CACHE"
    export FINETUNE_KERNEL_CACHE
fi
for variant in ${KERNEL_VARIANTS:-}; do
    name=${variant%%=*} spec=${variant#*=}
    program=${spec%%:*} file=${spec#*:}
    dir=$(mktemp -d)
    cp -r kernels/. "$dir"
    cp "$file" "$dir/$program.cu"
    names+=("$name") bins+=("$bin") dirs+=("$dir")
done
out=${OUT:-/tmp}
SAMPLES=$(mktemp -d)
export SAMPLES
# The sampler of the run in progress, stopped on any exit (left running, it would hold the
# caller's output open).
sampler=
trap '[ -z "$sampler" ] || kill "$sampler" 2>/dev/null; rm -rf "$SAMPLES"' EXIT
n=0 failed=0
for args in "$@"; do
    n=$((n + 1))
    jsons=()
    for i in "${!names[@]}"; do
        json="$out/bench-$n-${names[$i]}.json"
        smi="$SAMPLES/$(basename "$json").smi"
        if command -v nvidia-smi >/dev/null; then
            nvidia-smi --query-gpu=clocks.sm,power.draw --format=csv,noheader,nounits -i 0 \
                -lms 200 >"$smi" &
            sampler=$!
        fi
        status=0
        # shellcheck disable=SC2086 # each argument is a list of options
        env ${dirs[$i]:+FINETUNE_KERNEL_DIR="${dirs[$i]}"} "${bins[$i]}" bench --device cuda:0 \
            $args >"$json" || status=$?
        [ -z "$sampler" ] || kill "$sampler" 2>/dev/null || true
        sampler=
        if [ "$status" -ne 0 ]; then
            # The next configurations still run; the script's status says one failed.
            echo "$args ${names[$i]}: finetune bench failed (exit status $status)"
            failed=1
            continue 2
        fi
        jsons+=("${names[$i]}=$json")
    done
    python3 - "$args" "${jsons[@]}" <<'PY'
import json, os, statistics, sys
args = sys.argv[1]
runs = [(a.split("=", 1)[0], a.split("=", 1)[1]) for a in sys.argv[2:]]


def clock(path):
    """' sm MHZ MHz, W W' (medians over the samples above 300 W), or '' with no samples."""
    if not os.path.exists(path):
        return ""
    busy = []
    for line in open(path):
        try:
            mhz, watts = (float(v) for v in line.split(","))
        except ValueError:
            continue
        if watts > 300:
            busy.append((mhz, watts))
    if not busy:
        return ""
    return (f"  sm {statistics.median(m for m, _ in busy):,.0f} MHz, "
            f"{statistics.median(w for _, w in busy):.0f} W")


for name, path in runs:
    d = json.load(open(path))
    print(f"{args:<60} {name:>6} {d['tokens_per_second']:>9,.0f} tokens/s "
          f"{d['peak_device_mib']:>9,.0f} MiB  loss {d['first_loss']:.4f} -> {d['last_loss']:.4f}"
          f"{clock(os.path.join(os.environ['SAMPLES'], os.path.basename(path) + '.smi'))}")
runs = [(name, json.load(open(path))) for name, path in runs]
new = runs[0][1]
for name, d in runs[1:]:
    # new/base for the base binary, NAME/new for a kernel variant.
    a, b, label = (new, d, "new/base") if name == "base" else (d, new, f"{name}/new")
    print(f"{args:<60} {label}: tokens/s {a['tokens_per_second'] / b['tokens_per_second']:.3f}, "
          f"peak {a['peak_device_mib'] - b['peak_device_mib']:+,.0f} MiB")
PY
done
exit "$failed"
