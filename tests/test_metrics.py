"""metrics.py against closed forms, second computation paths and constructed cases."""
import json
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import data
import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_cov(d, g, rank=None):
    a = torch.randn(d, rank or d, generator=g, dtype=torch.float64)
    return a @ a.T / (rank or d)


# ---- Frechet distance --------------------------------------------------------------------

def test_frechet_identical_statistics_is_zero():
    g = torch.Generator().manual_seed(0)
    mu, s = torch.randn(64, generator=g, dtype=torch.float64), random_cov(64, g)
    assert abs(metrics.frechet_distance(mu, s, mu, s)) < 1e-8


def test_frechet_closed_form_for_commuting_gaussians():
    # S1 = Q D1 Q', S2 = Q D2 Q' share eigenvectors: tr(S1 + S2 - 2 (S1 S2)^1/2) = sum (sqrt d1 - sqrt d2)^2
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    d1, d2 = torch.rand(32, generator=g, dtype=torch.float64) * 3, torch.rand(32, generator=g, dtype=torch.float64)
    mu1, mu2 = torch.randn(32, generator=g, dtype=torch.float64), torch.randn(32, generator=g, dtype=torch.float64)
    want = float((mu1 - mu2).square().sum() + (d1.sqrt() - d2.sqrt()).square().sum())
    got = metrics.frechet_distance(mu1, q * d1 @ q.T, mu2, q * d2 @ q.T)
    assert got == pytest.approx(want, rel=1e-9)
    # one dimension: (m1 - m2)^2 + (s1 - s2)^2
    assert metrics.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9 + 1, rel=1e-12)


def test_frechet_general_case_matches_eigenvalues_of_the_product():
    # A second path: tr sqrt(S1 S2) is the sum of square roots of the (real, non-negative)
    # eigenvalues of the non-symmetric product S1 S2.
    g = torch.Generator().manual_seed(2)
    s1, s2 = random_cov(48, g), random_cov(48, g)
    mu1, mu2 = torch.zeros(48, dtype=torch.float64), torch.ones(48, dtype=torch.float64)
    tr_sqrt = torch.linalg.eigvals(s1 @ s2).real.clamp(min=0).sqrt().sum()
    want = float(48 + s1.trace() + s2.trace() - 2 * tr_sqrt)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)


def test_frechet_is_symmetric_and_finite_when_near_singular():
    g = torch.Generator().manual_seed(3)
    s1, s2 = random_cov(64, g, rank=5), random_cov(64, g, rank=3)  # rank-deficient
    mu1, mu2 = torch.randn(64, generator=g, dtype=torch.float64), torch.randn(64, generator=g, dtype=torch.float64)
    ab, ba = metrics.frechet_distance(mu1, s1, mu2, s2), metrics.frechet_distance(mu2, s2, mu1, s1)
    assert math.isfinite(ab) and ab > 0
    assert ab == pytest.approx(ba, rel=1e-9)


def test_fid_warns_with_fewer_samples_than_dimensions():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(20, 64, generator=g), torch.randn(20, 64, generator=g)
    with pytest.warns(UserWarning, match="fewer|more samples"):
        assert math.isfinite(metrics.fid(a, b))


def test_fid_of_two_samples_of_one_gaussian_is_small_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(5000, 8, generator=g), torch.randn(5000, 8, generator=g)
    assert metrics.fid(a, b) < 0.02
    assert metrics.fid(a, b + 1) == pytest.approx(8, rel=0.02)  # the mean term, ||1||^2 = 8


# ---- Inception Score, KID, precision/recall, memorization, modes ---------------------------

def test_inception_score_of_balanced_one_hot_classes_is_k():
    k = 10
    logits = 80.0 * torch.eye(k).repeat(100, 1)  # 1000 confident predictions, 100 per class
    mean, std = metrics.inception_score(logits, splits=1)
    assert mean == pytest.approx(k, rel=1e-9) and std == 0
    mean, _ = metrics.inception_score(logits, splits=10)  # shuffled splits are nearly balanced
    assert 9.0 < mean <= k + 1e-9


def test_inception_score_of_identical_predictions_is_one():
    logits = torch.randn(1, 7).repeat(500, 1)
    mean, std = metrics.inception_score(logits, splits=5)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0, abs=1e-12)


def test_kid_near_zero_for_one_distribution_and_positive_for_two():
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(1500, 16, generator=g), torch.randn(1500, 16, generator=g)
    same, same_std = metrics.kid(a, b, subsets=20, subset_size=500)
    diff, _ = metrics.kid(a, b + 0.5, subsets=20, subset_size=500)
    assert abs(same) < 3 * same_std + 1e-3
    assert diff > 20 * abs(same) and diff > 0.01


def test_kid_unbiased_estimator_against_a_direct_sum():
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randn(30, 4, generator=g, dtype=torch.float64) + 1
    k = lambda u, v: (u @ v / 4 + 1) ** 3
    m = 30
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2
    mean, std = metrics.kid(x, y, subsets=3, subset_size=30)  # a subset of all 30 is a permutation
    assert mean == pytest.approx(float(xx + yy - 2 * xy), rel=1e-9) and std < 1e-9


def clusters(n, centers, g):
    k = torch.randint(0, len(centers), (n,), generator=g)
    return centers[k] + 0.1 * torch.randn(n, centers.shape[1], generator=g)


def test_precision_recall_one_for_identical_sets_and_recall_falls_without_a_mode():
    g = torch.Generator().manual_seed(8)
    centers = torch.tensor([[0.0, 0], [5, 0], [0, 5], [5, 5]])
    real = clusters(2000, centers, g)
    assert metrics.precision_recall(real, real.clone()) == (1.0, 1.0)
    fake = clusters(2000, centers[:3], g)  # the fourth mode is never generated
    p, r = metrics.precision_recall(real, fake)
    assert p > 0.95 and 0.65 < r < 0.82
    fake = torch.cat([clusters(1500, centers, g), 20 + torch.randn(500, 2, generator=g)])  # 25% junk
    p, r = metrics.precision_recall(real, fake)
    assert 0.65 < p < 0.82 and r > 0.95


def test_memorization_flags_copies_not_fresh_samples():
    g = torch.Generator().manual_seed(9)
    train = torch.randn(3000, 16, generator=g)
    copies = train[:200] + 1e-3 * torch.randn(200, 16, generator=g)
    fresh = torch.randn(200, 16, generator=g)
    assert metrics.memorization(copies, train) == 1.0
    assert metrics.memorization(fresh, train) < 0.05


def test_mode_coverage_full_on_exact_samples_and_drops_with_modes():
    split = data.load("grid25")["train"]
    x, _ = split.batch(5000, torch.Generator().manual_seed(0))
    modes, hq = metrics.mode_coverage(x, split.centers, split.std)
    assert modes == 25 and hq > 0.97  # P(r < 3 sigma) in 2D is 1 - exp(-4.5) = 0.989
    keep = (x[:, 0] < 3)  # drop the five modes at x = 4
    assert metrics.mode_coverage(x[keep], split.centers, split.std)[0] == 20
    modes, hq = metrics.mode_coverage(x * 1.5, split.centers, split.std)  # spread off the modes
    assert hq < 0.2


def test_mode_balance_sees_a_mode_held_by_a_handful():
    split = data.load("grid25")["train"]
    x, _ = split.batch(5000, torch.Generator().manual_seed(0))
    assert metrics.mode_balance(x, split.centers, split.std) > 0.7  # 200 a mode, give or take sqrt(200)
    nearest = torch.cdist(x, split.centers).argmin(1)
    thin = x[(nearest != 0) | (torch.arange(len(x)) % 40 == 0)]  # mode 0 keeps about 5 of its 200
    assert metrics.mode_coverage(thin, split.centers, split.std)[0] == 25
    assert metrics.mode_balance(thin, split.centers, split.std) < 0.1


def test_uniform_model_over_256_levels_scores_8_bits_per_dim():
    # A model that puts probability 1/256 on each level of each subpixel: its nll is the
    # cross-entropy of all-zero logits, summed over the image's dimensions.
    g = torch.Generator().manual_seed(10)
    levels = torch.randint(0, 256, (16, 3, 8, 8), generator=g)
    logits = torch.zeros(16, 256, 3, 8, 8)
    nll = torch.nn.functional.cross_entropy(logits, levels, reduction="none").flatten(1).sum(1)
    assert metrics.bits_per_dim(nll, 3 * 8 * 8) == pytest.approx(8.0, rel=1e-6)


# ---- InceptionV3 ---------------------------------------------------------------------------

def test_inception_state_dict_equals_the_standard_files_list():
    # The list of pt_inception-2015-12-05-6726825d.pth (pytorch-fid's FID weights):
    # 566 entries, checked against pytorch-fid's fid_inception_v3() when it was written.
    want = {}
    for line in open(os.path.join(os.path.dirname(__file__), "fid_inception_keys.txt")):
        name, shape = line.split()
        want[name] = tuple(int(s) for s in shape.strip("()").split(",") if s)
    net = metrics.InceptionV3()
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert got == want
    assert net.fc.out_features == 1008 and net.Conv2d_1a_3x3.bn.eps == 1e-3


def test_inception_forward_shapes_and_gray_equals_repeated_rgb():
    torch.manual_seed(0)
    net = metrics.InceptionV3()
    for m in net.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2)
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        f1, l1 = net(x)
        f3, l3 = net(x.repeat(1, 3, 1, 1))
    assert f1.shape == (2, 2048) and l1.shape == (2, 1008)
    assert torch.equal(f1, f3) and torch.equal(l1, l3)
    assert (f1 >= 0).all()  # pool3 averages ReLU outputs


def test_inception_offline_error_names_file_url_and_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(metrics, "INCEPTION_URL", "http://127.0.0.1:9/pt_inception-2015-12-05-6726825d.pth")
    with pytest.raises(metrics.MetricsError) as e:
        metrics.load_inception()
    msg = str(e.value)
    assert "\n" not in msg and "pt_inception-2015-12-05-6726825d.pth" in msg
    assert "http://127.0.0.1:9/" in msg and str(tmp_path / "hub" / "checkpoints") in msg


# ---- the classifier and the command line ---------------------------------------------------

def test_classifier_reaches_98_percent_on_digits(shared_data):
    splits = data.load("digits", data_dir=shared_data)
    net, acc = metrics.get_classifier("digits", splits, shared_data, log=lambda m: None)
    assert acc >= 0.98
    assert metrics.classifier_accuracy(net, splits["val"]) == pytest.approx(acc)  # the cached figure is true
    net2, acc2 = metrics.get_classifier("digits", splits, shared_data)  # from the cache
    assert acc2 == acc and all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                                   net2.state_dict().values()))


def run_metrics(*argv, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "metrics.py"), *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def rows(stdout):
    return {m.group(1).strip(): float(m.group(2)) for m in
            (__import__("re").match(r"\s+(.+?)\s{2,}(-?[\d.]+)$", l) for l in stdout.splitlines()) if m}


def test_cli_real_vs_fake_near_zero_for_the_same_data_and_larger_for_damaged(shared_data, tmp_path):
    r = run_metrics("--real", "digits", "--fake", "digits", "--n", "1000", "--data-dir", shared_data)
    assert r.returncode == 0, r.stderr
    same = rows(r.stdout)
    assert "classifier" in r.stdout  # the report names its feature network
    # the digits val split, blurred and with a dropped digit: a worse "model"
    val = data.load("digits", data_dir=shared_data)["val"]
    keep = val.labels != 3
    imgs = val.images[keep][:1000].float()
    imgs = torch.nn.functional.avg_pool2d(imgs, 3, 1, 1).round().to(torch.uint8)
    np.save(tmp_path / "fake.npy", imgs.numpy())
    r = run_metrics("--real", "digits", "--fake", str(tmp_path / "fake.npy"), "--n", "1000",
                    "--data-dir", shared_data, "--json", str(tmp_path / "m.json"))
    assert r.returncode == 0, r.stderr
    worse = rows(r.stdout)
    assert same["FID"] < 0.2 * worse["FID"]
    assert worse["recall"] < same["recall"] and same["IS"] > worse["IS"]
    assert json.load(open(tmp_path / "m.json"))["FID"] == pytest.approx(worse["FID"], rel=1e-3)


def test_cli_bad_input_is_one_line(tmp_path, shared_data):
    np.save(tmp_path / "f.npy", np.zeros((4, 8, 8), np.float32))
    for argv in (["--real", "digits"], ["--real", "nope", "--fake", "digits"],
                 ["--real", "digits", "--fake", str(tmp_path / "f.npy")],
                 ["--ckpt", str(tmp_path / "missing.pt")]):
        r = run_metrics(*argv, "--data-dir", shared_data)
        assert r.returncode == 2, (argv, r.stderr)
        assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
