#!/usr/bin/env bash
# Runs `finetune bench --device cuda:0` once per argument (each one configuration, e.g.
# "--model llama3-8b --seq 2048 --steps 3 --mode qlora --offload") with the binary that
# scripts/gpu_bundle.sh put in .gpu/ (or target/release), keeps each configuration's results
# in one JSON file under $OUT (or /tmp: bench-N.json, N counting the arguments from 1) and
# prints one line per run: tokens/s, peak device memory, first and last loss. Each
# configuration also runs, right after, with
# - the base binary, where the bundle holds one (`scripts/gpu_bundle.sh --base REV`);
# - each kernel-source variant in $KERNEL_VARIANTS ("NAME=PROGRAM:FILE ...", e.g.
#   "new=flash:/tmp/flash-new.cu"): the same binary reading kernels/ with PROGRAM.cu replaced by
#   FILE (FINETUNE_KERNEL_DIR), so kernel changes are timed on whole steps with no rebuild;
# and a line per extra run gives the ratios new/base and NAME/new (tokens/s, peak memory).
# $NEW_ENV and $BASE_ENV ("VAR=VALUE ...") set the environment of the new binary's runs (the
# variants' too) and of the base binary's, e.g. NEW_ENV=FINETUNE_CUDA_GRAPHS=0 to time the new
# binary queued against the base recorded.
# $ROUNDS (default 1) runs the whole set that many times, the order reversed every other round
# (new, base, base, new, ...) so that a clock drifting during the runs favours neither; with
# more than one round the ratio lines give each round's ratio and their median, and a line per
# binary its median tokens/s.
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
mkdir -p "$out"
SAMPLES=$(mktemp -d)
export SAMPLES
# The sampler of the run in progress, stopped on any exit (left running, it would hold the
# caller's output open).
sampler=
trap '[ -z "$sampler" ] || kill "$sampler" 2>/dev/null; rm -rf "$SAMPLES"' EXIT
n=0 failed=0
rounds=${ROUNDS:-1}
for args in "$@"; do
    n=$((n + 1))
    runs=()
    for round in $(seq 1 "$rounds"); do
        order=("${!names[@]}")
        if [ $((round % 2)) = 0 ]; then
            order=()
            for ((i = ${#names[@]} - 1; i >= 0; i--)); do order+=("$i"); done
        fi
        for i in "${order[@]}"; do
            json="$SAMPLES/$n-$round-${names[$i]}.json"
            if command -v nvidia-smi >/dev/null; then
                nvidia-smi --query-gpu=clocks.sm,power.draw --format=csv,noheader,nounits -i 0 \
                    -lms 200 >"$json.smi" &
                sampler=$!
            fi
            run_env=${NEW_ENV:-}
            [ "${names[$i]}" != base ] || run_env=${BASE_ENV:-}
            status=0
            # shellcheck disable=SC2086 # each argument and environment is a list
            env ${dirs[$i]:+FINETUNE_KERNEL_DIR="${dirs[$i]}"} $run_env "${bins[$i]}" bench \
                --device cuda:0 $args >"$json" || status=$?
            [ -z "$sampler" ] || kill "$sampler" 2>/dev/null || true
            sampler=
            if [ "$status" -ne 0 ]; then
                # The next configurations still run; the script's status says one failed.
                echo "$args ${names[$i]}: finetune bench failed (exit status $status)"
                failed=1
                continue 3
            fi
            runs+=("${names[$i]}=$round=$json")
        done
    done
    python3 - "$args" "$out/bench-$n.json" "${runs[@]}" <<'PY'
import json, os, statistics, sys
args, out = sys.argv[1], sys.argv[2]
runs = []
for spec in sys.argv[3:]:
    name, round_, path = spec.split("=", 2)
    runs.append((name, int(round_), path, json.load(open(path))))


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


for name, round_, path, d in runs:
    print(f"{args:<60} {name:>6} {d['tokens_per_second']:>9,.0f} tokens/s "
          f"{d['peak_device_mib']:>9,.0f} MiB  loss {d['first_loss']:.4f} -> {d['last_loss']:.4f}"
          f"{clock(path + '.smi')}")
json.dump({"args": args,
           "runs": [{"name": name, "round": r, "result": d} for name, r, _, d in runs]},
          open(out, "w"), indent=1)
rounds = sorted({r for _, r, _, _ in runs})
by = {(name, r): d for name, r, _, d in runs}
names = list(dict.fromkeys(name for name, _, _, _ in runs))
if len(rounds) > 1:
    for name in names:
        tps = [by[name, r]["tokens_per_second"] for r in rounds]
        print(f"{args:<60} {name:>6} median {statistics.median(tps):,.0f} tokens/s over "
              f"{len(tps)} rounds")
for name in names[1:]:
    # new/base for the base binary, NAME/new for a kernel variant.
    a, b, label = ("new", name, "new/base") if name == "base" else (name, "new", f"{name}/new")
    ratios = [by[a, r]["tokens_per_second"] / by[b, r]["tokens_per_second"] for r in rounds]
    peak = statistics.median(by[a, r]["peak_device_mib"] - by[b, r]["peak_device_mib"]
                             for r in rounds)
    each = "" if len(rounds) == 1 else " (rounds: " + ", ".join(f"{x:.3f}" for x in ratios) + ")"
    print(f"{args:<60} {label}: tokens/s {statistics.median(ratios):.3f}{each}, "
          f"peak {peak:+,.0f} MiB")
PY
done
exit "$failed"
