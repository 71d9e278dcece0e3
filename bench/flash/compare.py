"""Relative L2 difference of each variant's outputs from the first variant's, per case."""
import os
import sys

import numpy as np

out, names = sys.argv[1], sys.argv[2:]
base = names[0]
for tag in sorted(os.listdir(os.path.join(out, base))):
    for n in names[1:]:
        row = []
        for f in ("out", "lse", "dq", "dk", "dv"):
            files = [os.path.join(out, v, tag, f + ".f32") for v in (n, base)]
            if not all(os.path.exists(p) for p in files):
                row.append(f"{f} MISSING")  # a run that failed (see times.jsonl)
                continue
            a, b = (np.fromfile(p, dtype=np.float32) for p in files)
            if a.size != b.size or not np.isfinite(a).all():
                row.append(f"{f} BAD")
                continue
            rel = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
            row.append(f"{f} {rel:.1e}")
        print(f"{tag} {n}: " + ", ".join(row))
