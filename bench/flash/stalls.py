"""Summarizes an Nsight Compute report of the flash kernels: per kernel (its first launch), the
SM throughput (ncu's "highest-utilized pipeline", the tensor pipe here), the tensor pipe's
active cycles, the issue slots' use, and the largest stall reasons in cycles per issued
instruction. On the GPU machine (nvcc, Nsight Compute; the
clocks left as they are), with the harness built as run.sh builds it (add -lineinfo):

    nvcc -O3 -std=c++17 -arch=sm_90a -I kernels -DFLASH_SRC='"'$PWD/kernels/flash.cu'"' \
        -lineinfo bench/flash/flash_bench.cu -o /tmp/fb
    mkdir -p /tmp/fb-out
    ncu --clock-control none --set full -k regex:flash_ --launch-count 6 -o /tmp/flash \
        /tmp/fb 8192 32 8 128 0 1 /tmp/fb-out
    ncu --import /tmp/flash.ncu-rep --page raw --csv > raw.csv
    python3 bench/flash/stalls.py raw.csv [--top 8]
"""

import argparse
import csv

STALL = "smsp__average_warps_issue_stalled_"
SHOWN = {  # ncu's "highest-utilized pipeline" figure is the SM throughput (the tensor pipe here)
    "SM throughput %": "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "tensor cycles %": "TPC.TriageCompute.sm__pipe_tensor_cycles_active_realtime.avg"
    ".pct_of_peak_sustained_elapsed",
    "issue active %": "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "cycles per issue": "smsp__average_warp_latency_per_inst_issued.ratio",
}


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("csv")
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    with open(args.csv, newline="") as f:
        rows = list(csv.reader(f))
    header, data = rows[0], rows[2:]  # row 1 holds the units
    col = {name: i for i, name in enumerate(header)}
    seen = set()
    for row in data:
        kernel = row[col["Kernel Name"]]
        if kernel in seen:
            continue
        seen.add(kernel)
        print(kernel)
        for label, metric in SHOWN.items():
            if metric in col and number(row[col[metric]]) is not None:
                print(f"  {label:<20} {number(row[col[metric]]):8.2f}")
        stalls = []
        for name, i in col.items():
            if name.startswith(STALL) and name.endswith("_per_issue_active.ratio"):
                value = number(row[i])
                if value is not None:
                    stalls.append((value, name[len(STALL):-len("_per_issue_active.ratio")]))
        for value, reason in sorted(stalls, reverse=True)[: args.top]:
            print(f"  stall {reason:<22} {value:6.3f}")


if __name__ == "__main__":
    main()
