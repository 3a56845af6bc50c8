"""Compare metrics.py's set-to-set metrics with two reference implementations on the same
random feature arrays: not a test (it needs other projects' code), a tool.

  inception_score(logits, splits=10)  vs torch-fidelity 0.4.0 metric_isc.isc_featuresdict_to_metric
                                         (logits given as its 'logits_unbiased' feature; its defaults:
                                         10 splits, shuffled with RandomState(2020))
  kid(a, b, 100 subsets of 1000)      vs torch-fidelity metric_kid.kid_features_to_metric (cubic kernel,
                                         gamma 1/D, coef0 1, RandomState(2020)); also with subsets of
                                         all n samples, where the sampling order cannot matter
  precision_recall(real, fake, k=3)   vs torch-fidelity metric_prc.prc_features_to_metric(fake, real)
                                         (its input1 is the generated set, input2 the real one)
  frechet_distance(mu1, s1, mu2, s2)  vs pytorch-fid 0.3.0 fid_score.calculate_frechet_distance (scipy
                                         sqrtm) and torch-fidelity metric_fid.fid_statistics_to_metric
                                         (eigenvalues of S1 S2), at D=256 and D=2048, N=3000
The features these metrics are given with --features inception (FID's prepared as pytorch-fid
prepares images, IS's and KID's as torch-fidelity does) are held to those references by
tools/verify_inception.py; here both sides get the same arrays.
Only the references' computation functions run: their package __init__ files are bypassed and the
modules they import for image loading and feature extraction (torchvision, PIL, tqdm,
torch_fidelity.utils, pytorch_fid.inception) are replaced by empty stubs.

Get the sources without installing anything (PyPI only):
    pip download --no-deps -d /tmp/pkgs pytorch-fid==0.3.0 torch-fidelity==0.4.0
    cd /tmp/pkgs && unzip -q -o pytorch_fid-*.whl -d src && unzip -q -o torch_fidelity-*.whl -d src
Then, from the repository root: python tools/verify_metrics.py   (CPU, about a minute on 2 cores,
mostly scipy's sqrtm and numpy's eigvals at D=2048; --quick skips D=2048)
Last run (2 cores, scipy 1.17.1, torch 2.13 CPU): worst relative difference 4.4e-14. IS mean/std
1.3e-16/2.1e-15; KID 100 subsets of 1000 (D=256) mean/std 1.9e-14/3.7e-14, so the subsets are the
same (both draw the a indices, then the b indices, per subset from one RandomState(2020)); KID on
all 400 samples (D=2048) 4.4e-14; precision and recall identical (D=64 and D=2); Frechet distance
vs pytorch-fid 2.4e-14 (D=256) and 1.6e-14 (D=2048), vs torch-fidelity 3.5e-15 and 7.1e-15.
"""
import importlib
import os
import sys
import time
import types

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REF_SRC = os.environ.get("REF_SRC", "/tmp/pkgs/src")
sys.path.insert(0, REF_SRC)  # for pytorch_fid (its __init__ only sets a version string)


def stub(name, **attrs):
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m


# Modules the reference files import at load time but whose contents these checks never use.
stub("torchvision", __path__=[]).transforms = stub("torchvision.transforms")
stub("PIL", __path__=[]).Image = stub("PIL.Image")
stub("tqdm", tqdm=lambda it, **kw: it)
stub("torch_fidelity", __path__=[os.path.join(REF_SRC, "torch_fidelity")])
stub("torch_fidelity.utils", **{n: None for n in (
    "extract_featuresdict_from_input_id_cached", "create_feature_extractor", "resolve_feature_extractor",
    "resolve_feature_layer_for_metric", "get_cacheable_input_name", "cache_lookup_one_recompute_on_miss")})
stub("pytorch_fid.inception", InceptionV3=type("InceptionV3", (), {"BLOCK_INDEX_BY_DIM": {2048: 3}}))

tf_isc = importlib.import_module("torch_fidelity.metric_isc")
tf_kid = importlib.import_module("torch_fidelity.metric_kid")
tf_prc = importlib.import_module("torch_fidelity.metric_prc")
tf_fid = importlib.import_module("torch_fidelity.metric_fid")
pf = importlib.import_module("pytorch_fid.fid_score")

import metrics as ours  # noqa: E402

rows = []


def row(name, a, b, relative=True):
    """Print ours vs reference; relative=False for values that are rounding noise (abs. diff shown)."""
    diff = abs(a - b) / max(abs(a), abs(b)) if relative and a != b else abs(a - b)
    if relative:
        rows.append(diff)
    print(f"{name:42s} ours {a:<24.17g} ref {b:<24.17g} {'rel' if relative else 'abs'}.diff {diff:.2e}", flush=True)


rng = np.random.RandomState(0)
t0 = time.time()

# ---- 1. Inception Score: logits of 5000 samples over 1000 classes, some classes favoured -------------
logits = torch.from_numpy(3 * rng.randn(5000, 1000) + np.linspace(0, 2, 1000))
ref = tf_isc.isc_featuresdict_to_metric({"logits_unbiased": logits}, "logits_unbiased", verbose=False)
m, s = ours.inception_score(logits, splits=10)
row("IS mean (N=5000, 1000 classes)", m, ref[tf_isc.KEY_METRIC_ISC_MEAN])
row("IS std", s, ref[tf_isc.KEY_METRIC_ISC_STD])

# ---- 2. KID: non-negative features, the two sets differ by a small shift ----------------------------
a = torch.from_numpy(np.maximum(rng.randn(1500, 256) + 0.5, 0))
b = torch.from_numpy(np.maximum(rng.randn(1300, 256) + 0.55, 0))
ref = tf_kid.kid_features_to_metric(a, b, verbose=False)  # defaults: 100 subsets of 1000
m, s = ours.kid(a, b, subsets=100, subset_size=1000)
row("KID mean (1500 vs 1300, D=256, 100x1000)", m, ref[tf_kid.KEY_METRIC_KID_MEAN])
row("KID std", s, ref[tf_kid.KEY_METRIC_KID_STD])
a2, b2 = a[:400, :].repeat(1, 8), b[:400, :].repeat(1, 8) * 0.9  # D=2048
ref = tf_kid.kid_features_to_metric(a2, b2, kid_subsets=5, kid_subset_size=400, verbose=False)
m, s = ours.kid(a2, b2, subsets=5, subset_size=400)
row("KID mean (all 400 samples, D=2048, 5x)", m, ref[tf_kid.KEY_METRIC_KID_MEAN])
row("KID std (all samples: 0 up to rounding)", s, ref[tf_kid.KEY_METRIC_KID_STD], relative=False)

# ---- 3. Precision / recall: float32 like ours; n > 2048 so our chunking is exercised ---------------
for n_real, n_fake, d in ((3000, 2500, 64), (1000, 1200, 2)):
    real = torch.from_numpy(rng.randn(n_real, d)).float()
    fake = torch.from_numpy(1.05 * rng.randn(n_fake, d) + 0.05).float()
    ref = tf_prc.prc_features_to_metric(fake, real, verbose=False)  # input1 = generated, input2 = real
    p, r = ours.precision_recall(real, fake, k=3)
    row(f"precision ({n_real} real, {n_fake} fake, D={d})", p, ref[tf_prc.KEY_METRIC_PRECISION])
    row(f"recall    ({n_real} real, {n_fake} fake, D={d})", r, ref[tf_prc.KEY_METRIC_RECALL])

# ---- 4. Frechet distance: N=3000 ReLU features of correlated Gaussians (pool3-like) ----------------
dims = (256,) if "--quick" in sys.argv else (256, 2048)
for d in dims:
    w = rng.randn(d, d) / np.sqrt(d)
    w2 = w + 0.3 * rng.randn(d, d) / np.sqrt(d)
    f1 = np.maximum(rng.randn(3000, d) @ w + 0.3, 0)
    f2 = np.maximum(rng.randn(3000, d) @ w2 + 0.35, 0)
    st1 = tf_fid.fid_features_to_statistics(torch.from_numpy(f1))  # np.mean, np.cov
    st2 = tf_fid.fid_features_to_statistics(torch.from_numpy(f2))
    mu_o, s_o = ours.feature_stats(f1)
    print(f"feature_stats vs np.mean/np.cov at D={d}: max|diff| mu {np.abs(mu_o.numpy() - st1['mu']).max():.1e}"
          f", sigma {np.abs(s_o.numpy() - st1['sigma']).max():.1e}")
    ours_fd = ours.frechet_distance(st1["mu"], st1["sigma"], st2["mu"], st2["sigma"])
    row(f"FID D={d} vs pytorch-fid (sqrtm)", ours_fd,
        float(pf.calculate_frechet_distance(st1["mu"], st1["sigma"], st2["mu"], st2["sigma"])))
    ref_fd = tf_fid.fid_statistics_to_metric(st1, st2, verbose=False)[tf_fid.KEY_METRIC_FID]
    row(f"FID D={d} vs torch-fidelity (eigvals)", ours_fd, ref_fd)
    row(f"fid(features) D={d} vs torch-fidelity", ours.fid(f1, f2), ref_fd)  # our stats, too

print(f"\n{'':42s} worst rel.diff {max(rows):.2e}   ({time.time() - t0:.0f}s)")
