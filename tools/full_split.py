"""Certify one 05 configuration on the whole test/val split (sound mode, the 05 settings), into data/cache/.

Usage: OMP_NUM_THREADS=1 .venv/bin/python tools/full_split.py DATASET PATCH [PATCH ...]
Same cache keys as 05_certification in the paper profile, so 05 re-renders these rows from the cache.
"""

import sys

import torch

from scalecert import experiments as E

if __name__ == "__main__":
    torch.set_num_threads(1)
    dataset, patches = sys.argv[1], [float(p) for p in sys.argv[2:]]
    ck = E.model_name(dataset, 1, E.DEFAULT_RATE[dataset])
    for p in patches:
        df = E.certify_cached(dataset, ck, p, per_class=None, tau=E.DEFAULT_TAU[dataset])
        print(
            f"{dataset} {ck} patch {p}%: {len(df)} images, certified {100 * df.certified.mean():.2f}%, "
            f"clean {100 * df.clean_correct.mean():.2f}%",
            flush=True,
        )
