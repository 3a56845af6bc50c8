"""
Benchmarks: measured on this machine, in this process, each beside its baseline.

    python bench.py frechet [--dim 2048] [--repeats 3]

frechet: metrics.frechet_distance (two symmetric eigendecompositions, float64) against
the route pytorch-fid takes (scipy.linalg.sqrtm of the non-symmetric product S1 S2),
on the covariances of random features, with the relative difference of the two
distances. The scipy side runs only where scipy is installed (it is not a dependency).
"""
import argparse
import json
import sys
import time

import numpy as np
import torch

import metrics


def timed(fn, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def scipy_frechet(mu1, s1, mu2, s2):
    """The sqrtm route: tr((S1 S2)^1/2) from scipy's (complex) matrix square root."""
    from scipy import linalg
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # what pytorch-fid does for a singular product
        off = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    covmean = covmean.real
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def bench_frechet(dim, repeats):
    g = torch.Generator().manual_seed(0)
    # features like pool3's: non-negative, correlated, more samples than dimensions
    mix = torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim ** 0.5
    a = (torch.randn(2 * dim + 1000, dim, generator=g, dtype=torch.float64) @ mix).relu()
    b = (torch.randn(2 * dim + 1000, dim, generator=g, dtype=torch.float64) @ mix * 1.1 + 0.05).relu()
    mu1, s1 = metrics.feature_stats(a)
    mu2, s2 = metrics.feature_stats(b)
    ours_s, ours = timed(lambda: metrics.frechet_distance(mu1, s1, mu2, s2), repeats)
    row = {"dim": dim, "threads": torch.get_num_threads(), "ours_s": ours_s, "ours": ours}
    try:
        import scipy
    except ImportError:
        row["scipy"] = "not installed (pip install scipy to compare)"
        return row
    args = [t.numpy() for t in (mu1, s1, mu2, s2)]
    ref_s, ref = timed(lambda: scipy_frechet(*args), 1 if dim >= 1024 else repeats)
    row.update(scipy_version=scipy.__version__, scipy_s=ref_s, scipy=ref,
               speedup=ref_s / ours_s, rel_diff=abs(ours - ref) / abs(ref))
    return row


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.strip().split("\n\n")[0])
    p.add_argument("what", choices=["frechet"], help="what to measure")
    p.add_argument("--dim", type=int, default=2048, help="feature dimension (default: %(default)s, pool3's)")
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs (default: %(default)s)")
    p.add_argument("--json", default="", help="also write the figures here")
    args = p.parse_args(argv)
    if args.dim < 2 or args.repeats < 1:
        p.error("--dim must be at least 2 and --repeats at least 1")
    row = bench_frechet(args.dim, args.repeats)
    for k, v in row.items():
        print(f"{k:<14} {v:.6g}" if isinstance(v, float) else f"{k:<14} {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
