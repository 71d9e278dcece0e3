#!/usr/bin/env python3
"""Summarizes the timeline a CUDA training pass left in FINETUNE_CUDA_TIMELINE's file.

Usage: scripts/timeline.py FILE [--layers]

Prints, for the forward pass (start to loss), the loss (its head's forward and backward) and
the backward pass (its first layer to the end): the time, the bytes copied out (device to
host) and in, the time each direction's copy streams were busy, the time both directions were
busy at once, and the rates the copies ran at. With --layers also each layer's forward and
backward time and the copies that ran while it did.
"""
import csv
import sys
from collections import defaultdict


def intervals(rows):
    """(begin, end, stream, direction, bytes) of each copy: a stream's copies run in order, so
    its n-th begin pairs with its n-th end."""
    begins = defaultdict(list)
    out = []
    for r in rows:
        if r["stream"] == "compute":
            continue
        direction, edge = r["what"].split("-")
        key = (r["stream"], direction)
        if edge == "begin":
            begins[key].append((float(r["ms"]), int(r["index"])))
        else:
            t0, size = begins[key].pop(0)
            out.append((t0, float(r["ms"]), r["stream"], direction, size))
    return out


def merged(spans, lo, hi):
    """The union of spans clipped to [lo, hi], as sorted disjoint intervals."""
    out = []
    for a, b in sorted((max(a, lo), min(b, hi)) for a, b in spans if b > lo and a < hi):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def union(spans, lo, hi):
    """Total length of the union of spans clipped to [lo, hi]."""
    return sum(b - a for a, b in merged(spans, lo, hi))


def overlap(xs, ys, lo, hi):
    """Time within [lo, hi] when some span of xs and some span of ys both run."""
    xs, ys = merged(xs, lo, hi), merged(ys, lo, hi)
    total, i, j = 0.0, 0, 0
    while i < len(xs) and j < len(ys):
        total += max(0.0, min(xs[i][1], ys[j][1]) - max(xs[i][0], ys[j][0]))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return total


def phase_line(name, lo, hi, copies):
    outs = [(a, b) for a, b, _, d, _ in copies if d == "out"]
    ins = [(a, b) for a, b, _, d, _ in copies if d == "in"]

    def moved(direction):
        # bytes of the copies of that direction, prorated to the part inside [lo, hi]
        total = 0.0
        for a, b, _, d, size in copies:
            if d == direction and b > a:
                total += size * max(0.0, min(b, hi) - max(a, lo)) / (b - a)
        return total

    o, i = moved("out"), moved("in")
    busy_o, busy_i = union(outs, lo, hi), union(ins, lo, hi)
    both = overlap(outs, ins, lo, hi)

    def rate(size, ms):  # GB/s
        return size / ms / 1e6 if ms > 0 else 0.0

    print(
        f"{name:>9} {hi - lo:8.1f} ms | out {o / 1e9:6.2f} GB busy {busy_o:7.1f} ms "
        f"({rate(o, busy_o):5.1f} GB/s) | in {i / 1e9:6.2f} GB busy {busy_i:7.1f} ms "
        f"({rate(i, busy_i):5.1f} GB/s) | both at once {both:7.1f} ms"
    )


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    rows = list(csv.DictReader(open(sys.argv[1])))
    marks = {(r["what"], int(r["index"])): float(r["ms"]) for r in rows if r["stream"] == "compute"}
    if ("end", 0) not in marks:
        sys.exit(f"{sys.argv[1]}: no whole training pass in it")
    layers = sorted(i for w, i in marks if w == "forward")
    loss, end = marks[("loss", 0)], marks[("end", 0)]
    backward0 = marks[("backward", layers[-1])]
    copies = intervals(rows)
    print(f"pass {end:.1f} ms, {len(layers)} layers, {len(copies)} copies")
    phase_line("forward", 0.0, loss, copies)
    phase_line("loss", loss, backward0, copies)
    phase_line("backward", backward0, end, copies)
    if "--layers" in sys.argv:
        fwd_end = {l: marks.get(("forward", l + 1), loss) for l in layers}
        bwd_end = {l: marks.get(("backward", l - 1), end) for l in layers}
        for l in layers:
            phase_line(f"f{l}", marks[("forward", l)], fwd_end[l], copies)
        for l in reversed(layers):
            phase_line(f"b{l}", marks[("backward", l)], bwd_end[l], copies)


if __name__ == "__main__":
    main()
