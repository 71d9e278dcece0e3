#!/usr/bin/env bash
# On a GPU machine with nvcc: builds flash_bench.cu against each variant of kernels/flash.cu given
# as NAME=FILE[:NVCC_OPTIONS] (FILE absolute or relative to the repository; options such as -DX or
# -arch=sm_90 for the mma.sync kernels, -DFLASH_BENCH_PARTS=P to split every dK/dV case P ways,
# -DFLASH_BENCH_GRADS_BF16 for the gradients written as bf16 product inputs, dq and dk turned back;
# kernel choices flash.cu lets a build set: -DFLASH_WS_STEP=1, -DFLASH_FWD_Q_IN_REGISTERS=0,
# -DFLASH_DKDV_SHARE_P=0; sm_90a by default), runs every case with
# each, and prints the timings (JSON lines, also in OUTDIR/times.jsonl), the registers and spills
# ptxas reports, and each variant's relative L2 difference from the first one's outputs.
# Usage: bench/flash/run.sh OUTDIR base=/tmp/flash-head.cu new=kernels/flash.cu ...
# (git show HEAD:kernels/flash.cu > /tmp/flash-head.cu gives the committed kernels as a base;
# sources whose gradient kernels take float* dq, dk, dv, from before the gradients' pitch and
# angles arguments, do not build with this harness.)
set -uo pipefail
out=$1; shift
here=$(cd "$(dirname "$0")" && pwd); root=$(cd "$here/../.." && pwd)
mkdir -p "$out"
names=()
build() {
    local name=$1 file=$2 defs=$3
    [[ $file == /* ]] || file=$root/$file
    # sm_90a (the warpgroup kernels) unless the defines name another -arch.
    local arch=-arch=sm_90a
    [[ $defs == *-arch=* && $defs != *-arch=sm_90a* ]] && arch=-DFLASH_BENCH_MMA_SYNC
    ( cd "$root" && nvcc -O3 -std=c++17 $arch -I kernels -DFLASH_SRC="\"$file\"" $defs \
        -Xptxas -v "$here/flash_bench.cu" -o "$out/bench_$name" ) > "$out/ptxas_$name.txt" 2>&1
}
for spec in "$@"; do
    name=${spec%%=*}; rest=${spec#*=}; file=${rest%%:*}; defs=""
    [[ $rest == *:* ]] && defs=${rest#*:}
    build "$name" "$file" "$defs" &
    names+=("$name")
done
wait
built=()
for name in "${names[@]}"; do
    if [ ! -x "$out/bench_$name" ]; then
        echo "build $name failed"; tail -20 "$out/ptxas_$name.txt"; continue
    fi
    # One line per kernel entry: its registers and spill stores.
    awk -v name="$name" '
        /Compiling entry function/ { match($0, /flash_[a-z0-9_]+/); k = substr($0, RSTART, RLENGTH); sp = "?" }
        /spill stores/ && k != "" { match($0, /[0-9]+ bytes spill stores/); sp = substr($0, RSTART, RLENGTH) }
        /Used [0-9]+ registers/ && k != "" {
            match($0, /Used [0-9]+ registers/)
            printf "%s %s: %s, %s\n", name, k, substr($0, RSTART, RLENGTH), sp; k = ""
        }' "$out/ptxas_$name.txt"
    built+=("$name")
done
names=("${built[@]}")
: > "$out/times.jsonl"  # this run's timings only
cases=("2048 32 8 128 0 20" "8192 32 8 128 0 8" "2048 32 8 128 700 10" "2048 32 8 64 0 20" "4096 28 4 128 0 10" "300 4 4 64 0 5" "130 4 1 128 50 5" "1000 8 2 128 999 5" "2048 16 16 256 0 10" "8192 16 16 256 0 4" "2048 16 4 256 1500 5")
for c in "${cases[@]}"; do
    tag=$(echo "$c" | cut -d' ' -f1-5 | tr ' ' _)
    for n in "${names[@]}"; do
        mkdir -p "$out/$n/$tag"
        echo -n "$n " >> "$out/times.jsonl"
        # A kernel that never finishes fails its case (a minute each; the longest take seconds).
        timeout 60 "$out/bench_$n" $c "$out/$n/$tag" >> "$out/times.jsonl" 2>&1 || echo "run $n $tag failed" >> "$out/times.jsonl"
    done
done
cat "$out/times.jsonl"
python3 "$here/compare.py" "$out" "${names[@]}"
