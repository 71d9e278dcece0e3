"""Relative L2 difference of each variant's outputs from the first variant's, per case."""
import os
import sys

import numpy as np


def found(stem):
    """The output file saved as stem.f32 or (FLASH_BENCH_GRADS_BF16) stem.bf16, or None."""
    for ext in (".f32", ".bf16"):
        if os.path.exists(stem + ext):
            return stem + ext
    return None


def load(path):
    """Its values as f32 (bf16 bits widened)."""
    if path.endswith(".bf16"):
        bits = np.fromfile(path, dtype=np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32)
    return np.fromfile(path, dtype=np.float32)


out, names = sys.argv[1], sys.argv[2:]
base = names[0]
for tag in sorted(os.listdir(os.path.join(out, base))):
    for n in names[1:]:
        row = []
        for f in ("out", "lse", "dq", "dk", "dv"):
            files = [found(os.path.join(out, v, tag, f)) for v in (n, base)]
            if not all(files):
                row.append(f"{f} MISSING")  # a run that failed (see times.jsonl)
                continue
            a, b = (load(p) for p in files)
            # dk and dv of a launch split in parts are slabs of seq·kv_heads·head_dim values
            # (the tag: seq_heads_kv_hd_split), added up here, so that variants built with
            # other -DFLASH_BENCH_PARTS compare too.
            whole = a.size == b.size
            if f in ("dk", "dv"):
                seq, _, kv, hd = (int(x) for x in tag.split("_")[:4])
                slab = seq * kv * hd
                whole = a.size % slab == 0 and b.size % slab == 0
                if whole:
                    a, b = (x.reshape(-1, slab).sum(axis=0) for x in (a, b))
            if not whole or not np.isfinite(a).all():
                row.append(f"{f} BAD")
                continue
            rel = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
            row.append(f"{f} {rel:.1e}")
        print(f"{tag} {n}: " + ", ".join(row))
