"""metrics.py against closed forms, second computation paths and constructed cases."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from tolerances import U32, U64

import cli  # noqa: E402
import data
import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# A sum of n terms, in any order, is off by at most (n - 1) u times the sum of the terms'
# magnitudes (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., 4.2); the
# bounds below add up such terms, so that they hold whatever order a CPU sums in.


def random_cov(d, g, rank=None):
    a = torch.randn(d, rank or d, generator=g, dtype=torch.float64)
    return a @ a.T / (rank or d)


def norm2(s):
    return float(torch.linalg.matrix_norm(torch.as_tensor(s, dtype=torch.float64), 2))


def tr_sqrt_error(lams, delta):
    """Bound on the error of sum_i sqrt(l_i) over eigenvalues l_i >= 0 each known within
    delta, from |sqrt(l + e) - sqrt(l)| <= min(sqrt|e|, |e| / sqrt(l)). lams are themselves
    within delta of the l_i, so each l_i is taken as low as lams - delta."""
    lo = (torch.as_tensor(lams, dtype=torch.float64) - delta).clamp(min=0)
    return float(torch.minimum(torch.full_like(lo, math.sqrt(delta)), delta / lo.sqrt()).sum())


def product_eigenvalues(s1, s2):
    """The eigenvalues of S1^1/2 S2 S1^1/2 (those of S1 S2), in float64, within the delta
    of frechet_rounding: only to size the bounds."""
    w, v = torch.linalg.eigh(torch.as_tensor(s1, dtype=torch.float64))
    b = v * w.clamp(min=0).sqrt()
    m = b.T @ torch.as_tensor(s2, dtype=torch.float64) @ b
    return torch.linalg.eigvalsh((m + m.T) / 2)


def frechet_rounding(mu1, s1, mu2, s2, inputs=0.0):
    """A bound on the float64 rounding of frechet_distance. tr (S1 S2)^1/2 is the sum of the
    square roots of the eigenvalues of M = B' S2 B, B B' = S1. eigh(S1) and eigvalsh(M) are
    backward stable (LAPACK: a perturbation of norm p(d) u ||A||, p(d) taken as d), and
    forming B' S2 B sums d terms twice, so each eigenvalue of M is off by at most
    4 d u ||S1|| ||S2|| (Weyl), and by 2 inputs ||S1|| ||S2|| more where S1, S2 are
    themselves within inputs * ||S|| (in norm) of the matrices the reference means.
    The traces, the mean term and the final sum are sums of d terms: (d + 4) u of their
    magnitudes, and d inputs ||S|| for the traces."""
    d, n1, n2 = len(s1), norm2(s1), norm2(s2)
    delta = (4 * d * U64 + 2 * inputs) * n1 * n2
    lams = product_eigenvalues(s1, s2)
    tr = float(torch.as_tensor(s1).trace() + torch.as_tensor(s2).trace())
    mean = float((torch.as_tensor(mu1) - torch.as_tensor(mu2)).square().sum())
    return (2 * tr_sqrt_error(lams, delta) + d * inputs * (n1 + n2)
            + (d + 4) * U64 * (mean + tr + 2 * float(lams.clamp(min=0).sqrt().sum())))


# ---- Frechet distance --------------------------------------------------------------------

def test_frechet_identical_statistics_is_zero():
    g = torch.Generator().manual_seed(0)
    mu, s = torch.randn(64, generator=g, dtype=torch.float64), random_cov(64, g)
    # 0 in exact arithmetic; the rounding bound derived in frechet_rounding
    assert abs(metrics.frechet_distance(mu, s, mu, s)) <= frechet_rounding(mu, s, mu, s)


def test_frechet_closed_form_for_commuting_gaussians():
    # S1 = Q D1 Q', S2 = Q D2 Q' share eigenvectors: tr(S1 + S2 - 2 (S1 S2)^1/2) = sum (sqrt d1 - sqrt d2)^2
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    d1, d2 = torch.rand(32, generator=g, dtype=torch.float64) * 3, torch.rand(32, generator=g, dtype=torch.float64)
    mu1, mu2 = torch.randn(32, generator=g, dtype=torch.float64), torch.randn(32, generator=g, dtype=torch.float64)
    mean = float((mu1 - mu2).square().sum())
    want = mean + float((d1.sqrt() - d2.sqrt()).square().sum())
    s1, s2 = q * d1 @ q.T, q * d2 @ q.T
    # The inputs: q is orthogonal within 32 u (QR) and each product sums 32 terms, so S1, S2
    # are within 4 * 32 u ||S|| of Q D Q' for an orthogonal Q. The closed form's own
    # rounding: each term within 4 u of (sqrt d1 + sqrt d2)^2, and sums of 32 terms.
    tol = frechet_rounding(mu1, s1, mu2, s2, inputs=4 * 32 * U64) + \
        (32 + 8) * U64 * (mean + float((d1.sqrt() + d2.sqrt()).square().sum()))
    assert abs(metrics.frechet_distance(mu1, s1, mu2, s2) - want) <= tol
    # one dimension: (m1 - m2)^2 + (s1 - s2)^2, every step exact in binary64 (small integers,
    # the square roots of 4 and 36, which IEEE sqrt returns exactly)
    assert metrics.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == 9 + 1


def test_frechet_general_case_matches_eigenvalues_of_the_product():
    # A second path: tr sqrt(S1 S2) is the sum of square roots of the (real, non-negative)
    # eigenvalues of the non-symmetric product S1 S2.
    g = torch.Generator().manual_seed(2)
    s1, s2 = random_cov(48, g), random_cov(48, g)
    mu1, mu2 = torch.zeros(48, dtype=torch.float64), torch.ones(48, dtype=torch.float64)
    lams = torch.linalg.eigvals(s1 @ s2).real
    want = float(48 + s1.trace() + s2.trace() - 2 * lams.clamp(min=0).sqrt().sum())
    # The second path's rounding: the product and the non-symmetric eigensolver are off by
    # 48 u ||S1|| ||S2|| each (backward stable), which moves an eigenvalue by up to the
    # condition number of the eigenvectors of S1 S2 = S1^1/2 (Q L Q') S1^-1/2 times that:
    # kappa(S1^1/2) = sqrt(kappa(S1)).
    w = torch.linalg.eigvalsh(s1)
    delta_ref = 2 * 48 * U64 * math.sqrt(float(w[-1] / w[0])) * norm2(s1) * norm2(s2)
    tol = frechet_rounding(mu1, s1, mu2, s2) + 2 * tr_sqrt_error(product_eigenvalues(s1, s2), delta_ref) + \
        (48 + 4) * U64 * (48 + float(s1.trace() + s2.trace()))
    assert abs(metrics.frechet_distance(mu1, s1, mu2, s2) - want) <= tol


def test_frechet_is_symmetric_and_finite_when_near_singular():
    g = torch.Generator().manual_seed(3)
    s1, s2 = random_cov(64, g, rank=5), random_cov(64, g, rank=3)  # rank-deficient
    mu1, mu2 = torch.randn(64, generator=g, dtype=torch.float64), torch.randn(64, generator=g, dtype=torch.float64)
    ab, ba = metrics.frechet_distance(mu1, s1, mu2, s2), metrics.frechet_distance(mu2, s2, mu1, s1)
    assert math.isfinite(ab) and ab > 0
    # equal in exact arithmetic; each within its rounding bound (the ~60 zero eigenvalues of
    # M each cost up to sqrt(delta): the bound is loose here, and honest)
    assert abs(ab - ba) <= frechet_rounding(mu1, s1, mu2, s2) + frechet_rounding(mu2, s2, mu1, s1)


def test_frechet_of_singular_covariances_in_one_plane_against_the_2x2_closed_form():
    # S_i = U C_i U' with U [64, 2] orthonormal: both of rank 2, in one plane, with 62 zero
    # eigenvalues whose rounding frechet_distance must clamp (else a sqrt of a negative).
    # In U's basis the problem is 2x2, where for the eigenvalues l1, l2 of C1^1/2 C2 C1^1/2,
    # (sqrt l1 + sqrt l2)^2 = l1 + l2 + 2 sqrt(l1 l2) = tr(C1 C2) + 2 sqrt(det C1 det C2).
    g = torch.Generator().manual_seed(11)
    d = 64
    u, _ = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64))
    c1 = random_cov(2, g) + 0.1 * torch.eye(2, dtype=torch.float64)  # C_i >= 0.1 I: det well-conditioned
    c2 = random_cov(2, g) + 0.1 * torch.eye(2, dtype=torch.float64)
    assert not torch.allclose(c1 @ c2, c2 @ c1)  # (not the commuting case)
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    s1, s2 = u @ c1 @ u.T, u @ c2 @ u.T
    c1l, c2l = c1.tolist(), c2.tolist()
    det1 = c1l[0][0] * c1l[1][1] - c1l[0][1] * c1l[1][0]
    det2 = c2l[0][0] * c2l[1][1] - c2l[0][1] * c2l[1][0]
    tr12 = sum(c1l[i][j] * c2l[j][i] for i in range(2) for j in range(2))
    tr_sqrt = math.sqrt(tr12 + 2 * math.sqrt(det1 * det2))
    mean = float((mu1 - mu2).square().sum())
    want = mean + (c1l[0][0] + c1l[1][1]) + (c2l[0][0] + c2l[1][1]) - 2 * tr_sqrt
    # Inputs: U orthonormal within d u (QR), each product two sums of 2 terms: S_i within
    # (d + 8) u ||S_i|| of U C_i U'. The 2x2 closed form: a few roundings of terms no larger
    # than (||C1|| + ||C2||)^2 / 0.01 (the dets are at least 0.01), and the mean's d terms.
    tol = frechet_rounding(mu1, s1, mu2, s2, inputs=(d + 8) * U64) + \
        (d + 16) * U64 * (mean + (norm2(c1) + norm2(c2)) ** 2 / 0.01)
    got = metrics.frechet_distance(mu1, s1, mu2, s2)
    assert abs(got - want) <= tol, (got, want, tol)


def test_fid_warns_with_fewer_samples_than_dimensions():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(20, 64, generator=g), torch.randn(20, 64, generator=g)
    with pytest.warns(UserWarning, match="fewer|more samples"):
        assert math.isfinite(metrics.fid(a, b))


def test_fid_of_two_samples_of_one_gaussian_is_small_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(5000, 8, generator=g), torch.randn(5000, 8, generator=g)
    # Two samples of N(0, I_8), n = 5000 each: E FID = 2d/n (means) + d(d+1)/(2n) (covariances,
    # (1/4) E ||S1 - S2||_F^2) = 0.0104, sd about 0.002: 0.02 is 4.8 sd above.
    same = metrics.fid(a, b)
    assert same < 0.02
    # Shifting one set by 1 moves the mean term only, covariances unchanged: exactly
    # FID + ||1||^2 - 2 sum(mean a - mean b) = FID + 8 - 2 sum(...) in exact arithmetic.
    b1 = b.double() + 1  # exact: fp32 values plus 1 fit in binary64
    diff = float((a.double().mean(0) - b.double().mean(0)).sum())
    # Rounding: the means and covariances sum 5000 terms of magnitude up to (1 + max|b|)^2,
    # and each of the 8 eigenvalues near 1 moves the trace terms by as much (S near I, so
    # the square roots are well-conditioned); the two FIDs' own frechet_rounding is below that.
    tol = 2 * (5000 + 8 + 8) * U64 * (1 + float(b.abs().max())) ** 2 * 8
    assert abs(metrics.fid(a, b1) - (same + 8 - 2 * diff)) <= tol


# ---- Inception Score, KID, precision/recall, memorization, modes ---------------------------

def test_inception_score_of_balanced_one_hot_classes_is_k():
    k = 10
    logits = 80.0 * torch.eye(k).repeat(100, 1)  # 1000 confident predictions, 100 per class
    mean, std = metrics.inception_score(logits, splits=1)
    # float64: log p(y) sums n = 1000 terms (n u of log n), the mean KL sums 1000 more, and
    # exp turns that absolute error of its argument into a relative one
    assert mean == pytest.approx(k, rel=(2 * 1000 + 8) * U64 * math.log(1000)) and std == 0
    mean, _ = metrics.inception_score(logits, splits=10)  # shuffled splits are nearly balanced
    # each split's score is exp(H) of its 100 samples' class shares (E H ~ log 10 - 9/200: 9.56);
    # never above k, but for the rounding above (100 terms a split)
    assert 9.0 < mean <= k * (1 + (2 * 100 + 8) * U64 * math.log(1000))


def test_inception_score_of_identical_predictions_is_one():
    logits = torch.randn(1, 7).repeat(500, 1)
    mean, std = metrics.inception_score(logits, splits=5)
    # KL(p || p) = 0: p(y) of a split (100 rows) is off by (100 + 4) u of |log p| + log 100,
    # and the KL sums 7 such terms, weighted by p; exp(x) - 1 ~ x, and std is at most that
    logp = torch.log_softmax(logits[0].double(), 0)
    tol = 2 * (100 + 7 + 8) * U64 * (float(logp.abs().max()) + math.log(100))
    assert mean == pytest.approx(1.0, abs=tol) and std == pytest.approx(0, abs=tol)


def test_inception_score_splits_are_the_documented_shuffle_and_cut():
    # As the docstring says: numpy's RandomState(2020) permutation, then `splits` contiguous
    # parts [n i // splits, n (i + 1) // splits), each scored exp(mean_x KL(p(y|x) || p(y)))
    # with p(y) the part's mean prediction; (mean, numpy std) over parts. n = 103: parts
    # of 10 and 11. Written out with Python floats.
    g = torch.Generator().manual_seed(13)
    n, K, splits = 103, 6, 10
    logits = 2 * torch.randn(n, K, generator=g, dtype=torch.float64)
    perm = np.random.RandomState(2020).permutation(n)
    rows = logits.tolist()
    scores, bound = [], 0.0
    for i in range(splits):
        part = [rows[j] for j in perm[n * i // splits:n * (i + 1) // splits]]
        probs = []
        for r in part:
            e = [math.exp(v - max(r)) for v in r]
            probs.append([v / sum(e) for v in e])
        L = len(part)
        py = [sum(p[y] for p in probs) / L for y in range(K)]
        kl = sum(sum(p[y] * math.log(p[y] / py[y]) for y in range(K)) for p in probs) / L
        scores.append(math.exp(kl))
        # Either computation's rounding of the mean KL: log p(y|x) within (K + 4) u of
        # |logits| + |logsumexp|, log p(y) within (L + 4) u of |log p| + log L, the mean KL's
        # sums (L u of its terms' magnitudes); exp makes it relative. Twice: both sides.
        lp = [[math.log(v) for v in p] for p in probs]
        xmax = max(abs(v) for r in part for v in r)
        lpmax = max(abs(v) for r in lp for v in r)
        mag = sum(sum(p[y] * (abs(lp[x][y]) + abs(math.log(py[y]))) for y in range(K))
                  for x, p in enumerate(probs)) / L
        e_kl = U64 * ((K + 4) * (2 * xmax + math.log(K)) + (L + 4) * (lpmax + math.log(L)) + (L + 4) * mag)
        bound = max(bound, 2 * math.exp(kl) * e_kl)
    mean, std = metrics.inception_score(logits, splits)
    assert len(set(scores)) == splits  # the parts differ: a wrong cut or shuffle shows
    # the mean of the parts' scores, and their std, move by at most the largest part's error
    assert abs(mean - np.mean(scores)) <= bound and abs(std - np.std(scores)) <= bound, (mean, std, bound)


def test_kid_near_zero_for_one_distribution_and_positive_for_two():
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(1500, 16, generator=g), torch.randn(1500, 16, generator=g)
    same, same_std = metrics.kid(a, b, subsets=20, subset_size=500)
    diff, diff_std = metrics.kid(a, b + 0.5, subsets=20, subset_size=500)
    # The mean over 20 subsets has an sd at most a subset's (they overlap), estimated by
    # the std over subsets: 4 of them. Unbiased, so 0 for one distribution; for N(0, I)
    # against N(mu, I) with k = (x.y / d + 1)^3, the Gaussian moments give (m = |mu|^2)
    # 3/d + 3m/d + 3(m^2 + 2m + d)/d^2 + (m^3 + 6m^2 + 3md + 6m)/d^3 - 6(m + d)/d^2.
    d, m = 16, 16 * 0.5 ** 2
    population = 3 / d + 3 * m / d + 3 * (m * m + 2 * m + d) / d ** 2 + \
        (m ** 3 + 6 * m * m + 3 * m * d + 6 * m) / d ** 3 - 6 * (m + d) / d ** 2  # 1.0293
    assert abs(same) < 4 * same_std
    assert diff == pytest.approx(population, abs=4 * diff_std)


def kernel_magnitudes(p, q):
    """Upper bounds on |k(p_i, q_j)| = |(p_i . q_j / D + 1)^3|, by Cauchy-Schwarz."""
    return (p.norm(dim=1)[:, None] * q.norm(dim=1)[None] / p.shape[1] + 1) ** 3


def kid_rounding(x, y):
    """A bound on the float64 rounding of one subset's unbiased MMD^2 (kid's, or a loop's):
    each kernel value within 3 (D + 4) u of its magnitude (a D-term dot product, cubed),
    then sums of m^2 terms and a few more roundings."""
    m, D = len(x), x.shape[1]
    mags = (kernel_magnitudes(x, x).sum() + kernel_magnitudes(y, y).sum()) / (m * (m - 1)) + \
        2 * kernel_magnitudes(x, y).sum() / m ** 2
    return (m * m + 3 * (D + 4) + 8) * U64 * float(mags)


def test_kid_unbiased_estimator_against_a_direct_sum():
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randn(30, 4, generator=g, dtype=torch.float64) + 1
    k = lambda u, v: (u @ v / 4 + 1) ** 3
    m = 30
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2
    mean, std = metrics.kid(x, y, subsets=3, subset_size=30)  # a subset of all 30 is a permutation
    tol = 2 * kid_rounding(x, y)  # kid's rounding and the loops'; std over 3 equal values is within it
    assert abs(mean - float(xx + yy - 2 * xy)) <= tol and std <= tol


def test_kid_subsets_are_drawn_as_documented():
    # Subsets of 10 from sets of 40 and 37: for each subset, numpy's RandomState(seed) draws
    # a's indices, then b's, each choice(len, m, replace=False); each subset's unbiased
    # MMD^2 by explicit loops over Python floats; (mean, numpy std) over the subsets.
    g = torch.Generator().manual_seed(12)
    a = torch.randn(40, 3, generator=g, dtype=torch.float64)
    b = 1.5 * torch.randn(37, 3, generator=g, dtype=torch.float64) + 0.3
    m, subsets, seed = 10, 6, 7
    k = lambda u, v: (sum(ui * vi for ui, vi in zip(u, v)) / 3 + 1) ** 3
    rng = np.random.RandomState(seed)
    vals, bound = [], 0.0
    for _ in range(subsets):
        ia, ib = rng.choice(40, m, replace=False), rng.choice(37, m, replace=False)
        x, y = a[torch.from_numpy(ia)], b[torch.from_numpy(ib)]
        xl, yl = x.tolist(), y.tolist()
        xx = sum(k(xl[i], xl[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        yy = sum(k(yl[i], yl[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        xy = sum(k(xl[i], yl[j]) for i in range(m) for j in range(m)) / m ** 2
        vals.append(xx + yy - 2 * xy)
        bound = max(bound, 2 * kid_rounding(x, y))  # kid's rounding and the loops'
    mean, std = metrics.kid(a, b, subsets=subsets, subset_size=m, seed=seed)
    assert np.std(vals) > 100 * bound  # the subsets differ: other draws would show
    # the mean and std over subsets move by at most the largest subset's error
    assert abs(mean - np.mean(vals)) <= bound and abs(std - np.std(vals)) <= bound, (mean, std, bound)


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
    # recall misses the fourth mode's real points: a share 0.25, binomial sd 0.01 of 2000
    # (minus a few at the other modes' rims, outside every fake ball): about 0.75
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
    # a fresh point's two nearest of 3000 in 16 dimensions are at nearly the same distance
    # (the ratio of the first to the second is below 1/3 with probability of the order of
    # 3^-16): 5% is 10 of 200, far above what chance gives, far below the copies' 100%
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
    logits = torch.zeros(16, 256, 3, 8, 8, dtype=torch.float64)
    nll = torch.nn.functional.cross_entropy(logits, levels, reduction="none").flatten(1).sum(1)
    # float64: every subpixel's nll is log 256 within 2 u (256 ones sum exactly, then a log),
    # summed over 192 subpixels, averaged over 16 images, then divided by 192 log 2
    assert metrics.bits_per_dim(nll, 3 * 8 * 8) == pytest.approx(8.0, rel=(192 + 16 + 8) * U64)


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
    with pytest.raises(cli.UsageError) as e:
        metrics.load_inception()
    msg = str(e.value)
    assert "\n" not in msg and "pt_inception-2015-12-05-6726825d.pth" in msg
    assert "http://127.0.0.1:9/" in msg and str(tmp_path / "hub" / "checkpoints") in msg


# torch-fidelity's preparation (IS, KID) vs pytorch-fid's (FID), written out here from their formulas.
# TF1 resize_bilinear(align_corners=False): output pixel i samples the source at c = i * in / out (no
# half-pixel offset), between lo = floor(c) and min(lo + 1, in - 1) with weight c - lo.

def tf1_taps(n_in, n_out):
    taps = []
    for i in range(n_out):
        c = i * n_in / n_out
        lo = math.floor(c)
        taps.append((lo, min(lo + 1, n_in - 1), c - lo))
    return taps


def tf1_resize_loops(img, out_h, out_w):
    """[C, H, W] -> [C, out_h, out_w], one output pixel at a time, in float64."""
    c, h, w = img.shape
    out = torch.zeros(c, out_h, out_w, dtype=torch.float64)
    for ch in range(c):
        for i, (y0, y1, wy) in enumerate(tf1_taps(h, out_h)):
            for j, (x0, x1, wx) in enumerate(tf1_taps(w, out_w)):
                top = (1 - wx) * float(img[ch, y0, x0]) + wx * float(img[ch, y0, x1])
                bottom = (1 - wx) * float(img[ch, y1, x0]) + wx * float(img[ch, y1, x1])
                out[ch, i, j] = (1 - wy) * top + wy * bottom
    return out


def tf1_matrix(n_in, n_out):
    """The same taps as an [n_out, n_in] matrix, so that resize(img) = My @ img @ Mx.T (float64)."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i, (lo, hi, t) in enumerate(tf1_taps(n_in, n_out)):
        m[i, lo] += 1 - t
        m[i, hi] += t
    return m


def test_tf1_resize_is_the_formula_not_torchs_half_pixel_bilinear():
    g = torch.Generator().manual_seed(11)
    img = torch.rand(2, 3, 3, 5, generator=g, dtype=torch.float64)  # 3x5 -> 7x4: up in y, down in x
    want = torch.stack([tf1_resize_loops(im, 7, 4) for im in img])
    got = metrics.resize_bilinear_tf1(img, (7, 4))
    # float64, values in [0, 1): a coordinate rounding (|c| < 5, so <= 5u of position, times a
    # slope <= 1) and about 6 roundings of the lerps, each <= u: 16u with u = 2^-53 covers both.
    tol = 16 * U64
    assert got.shape == want.shape and (got - want).abs().max() <= tol
    assert (tf1_matrix(3, 7) @ img @ tf1_matrix(5, 4).T - want).abs().max() <= tol  # the tests' helper
    # Mutants: torch's bilinear (half-pixel centres, align_corners=False) and align_corners=True
    # are other resizes; both differ from TF1's by O(0.1) here, far beyond tol.
    for align in (False, True):
        other = torch.nn.functional.interpolate(img, size=(7, 4), mode="bilinear", align_corners=align)
        assert (other - want).abs().max() > 0.05
    # Down at an exact ratio (4x4 -> 2x2) TF1 picks source pixels 0 and 2, torch averages 0..1 and 2..3.
    x = torch.arange(16, dtype=torch.float64).reshape(1, 1, 4, 4)
    assert metrics.resize_bilinear_tf1(x, (2, 2)).flatten().tolist() == [0.0, 2.0, 8.0, 10.0]


def test_torch_fidelity_input_is_x_minus_128_over_128_of_uint8():
    values = [0, 1, 64, 127, 128, 129, 255]
    # (v - 128) / 128 are multiples of 2^-7 below 2 in size: exact in float32, so compared exactly.
    want = {v: (v - 128) / 128 for v in values}
    assert want[0] == -1 and want[128] == 0 and want[255] == 127 / 128
    i, j = torch.meshgrid(torch.arange(299), torch.arange(299), indexing="ij")
    pattern = torch.tensor(values)[(i + 2 * j) % len(values)]
    img = pattern.to(torch.uint8)[None, None]  # gray, 299x299: the resize is the identity there
    got = metrics.torch_fidelity_input(img)
    assert got.shape == (1, 3, 299, 299) and got.dtype == torch.float32
    expected = pattern.double().sub(128).div(128)
    for ch in range(3):  # gray repeated to RGB, as torch-fidelity's loader converts to RGB
        assert torch.equal(got[0, ch].double(), expected)
    # Mutant: pytorch-fid's x / 127.5 - 1 maps 255 to 1, not 127/128, and 128 to 1/255, not 0.
    assert (img.double() / 127.5 - 1)[0, 0].sub(expected).abs().max() > 3e-3
    with pytest.raises(TypeError):
        metrics.torch_fidelity_input(img.float())


class RecordingInception(metrics.InceptionV3):
    """A random-weight InceptionV3 whose trunk records what it is given and returns cheap features:
    48 of the prepared pixels, with a 48 -> 10 fc (so FID's eigendecompositions are 48x48, not 2048x2048,
    and the test stays fast)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(48, 10)
        self.calls = []

    def trunk(self, x):
        pool3 = x[:, :, ::75, ::75].flatten(1).float()  # 3 channels x rows and columns 0, 75, 150, 225
        self.calls.append((x.clone(), pool3))
        return pool3, self.fc(pool3)


def reference_preparations(real, fake):
    """{(set, reference): what that reference feeds the network}, computed here from its definition."""
    def pytorch_fid(u8):  # its loader's ToTensor (u8 / 255), torch's bilinear resize to 299, then 2x - 1
        x = torch.nn.functional.interpolate(u8.float() / 255, size=(299, 299), mode="bilinear", align_corners=False)
        return 2 * x - 1

    my, mx = tf1_matrix(8, 299), tf1_matrix(8, 299)

    def torch_fidelity(u8):  # TF1 resize of the uint8 values to 299, then (x - 128) / 128
        return ((my @ u8.double() @ mx.T) - 128) / 128

    return {(s, conv): fn(x) for s, x in (("real", real), ("fake", fake))
            for conv, fn in (("pytorch-fid", pytorch_fid), ("torch-fidelity", torch_fidelity))}


@pytest.mark.filterwarnings("ignore:FID from", "ignore:KID subsets")  # few samples on purpose
def test_report_prepares_images_as_each_metrics_reference(monkeypatch):
    torch.manual_seed(12)
    net = RecordingInception()
    monkeypatch.setattr(metrics, "load_inception", lambda device="cpu": net)
    g = torch.Generator().manual_seed(12)
    real = torch.randint(0, 256, (6, 3, 8, 8), generator=g, dtype=torch.uint8)
    fake = torch.randint(0, 256, (20, 3, 8, 8), generator=g, dtype=torch.uint8)  # 2 per IS split
    args = __import__("types").SimpleNamespace(features="inception", device="cpu", batch_size=100, k=3,
                                               data_dir="")
    rows, about = metrics.report(real, fake, real, {}, args, "test")
    assert "pytorch-fid" in about and "torch-fidelity" in about
    want = reference_preparations(real, fake)
    # float32 preparation vs the float64 formula, in pixel units (<= 255) then / 128: the source
    # coordinate's rounding (<= 2u * 8 of position on each axis, times a slope <= 255) plus about 5
    # roundings of size <= 255u in the lerps and the - 128, with u = 2^-24; pytorch-fid's side (values
    # in [-1, 1], the two orders of resize and 2x - 1) is ~10u, far below. Both preparations differ by
    # more than 3e-3 (the mutant asserts below, and 255 -> 1 vs 127/128).
    tol = 255 * (2 * 2 * 8 + 5) * U32 / 128
    feats = {}
    for x, pool3 in net.calls:
        hits = [key for key, w in want.items() if w.shape == x.shape and (x.double() - w).abs().max() <= tol]
        assert len(hits) == 1, hits
        feats.setdefault(hits[0], []).append(pool3)
    # real for FID and memorization (twice), fake for FID; both again for IS/KID; nothing else
    assert {k: len(v) for k, v in feats.items()} == {("real", "pytorch-fid"): 2, ("fake", "pytorch-fid"): 1,
                                                    ("real", "torch-fidelity"): 1, ("fake", "torch-fidelity"): 1}
    assert torch.equal(*feats[("real", "pytorch-fid")])
    f = {k: v[0] for k, v in feats.items()}
    w = net.fc.weight.detach().double()
    expected = {
        "FID": metrics.fid(f["real", "pytorch-fid"], f["fake", "pytorch-fid"]),
        "IS": metrics.inception_score(f["fake", "torch-fidelity"].double() @ w.T)[0],
        "KID": metrics.kid(f["real", "torch-fidelity"], f["fake", "torch-fidelity"], subset_size=6)[0],
        "precision": metrics.precision_recall(f["real", "pytorch-fid"], f["fake", "pytorch-fid"])[0],
        "memorized %": 100 * metrics.memorization(f["fake", "pytorch-fid"], f["real", "pytorch-fid"]),
    }
    # The same float64 computations on the same features as report()'s: equal up to a few float64
    # roundings of sums of <= 2048 terms (u = 2^-53, 2048u ~ 2e-13), so 1e-12 relative.
    for key, v in expected.items():
        assert rows[key] == pytest.approx(v, rel=1e-12, abs=1e-12), key
    # Mutant (the conventions swapped): each figure moves far beyond that tolerance.
    swapped = {
        "FID": metrics.fid(f["real", "torch-fidelity"], f["fake", "torch-fidelity"]),
        "IS": metrics.inception_score(f["fake", "pytorch-fid"].double() @ w.T)[0],
        "KID": metrics.kid(f["real", "pytorch-fid"], f["fake", "pytorch-fid"], subset_size=6)[0],
    }
    for key, v in swapped.items():
        assert abs(v - rows[key]) > 1e-6 * abs(rows[key]), key
    for key in want:
        other = want[key[0], "torch-fidelity" if key[1] == "pytorch-fid" else "pytorch-fid"]
        assert (want[key] - other).abs().max() > 3e-3  # the preparations are told apart


# ---- the classifier and the command line ---------------------------------------------------

def test_classifier_reaches_98_percent_on_digits(shared_data):
    splits = data.load("digits", data_dir=shared_data)
    net, acc = metrics.get_classifier("digits", splits, shared_data, log=lambda m: None)
    assert acc >= 0.98
    # the cached figure is true: a count of hits over 10,000 images, recounted by the same
    # network on the same images (pytest.approx's default rel 1e-6 is below one hit, 1e-4)
    assert metrics.classifier_accuracy(net, splits["val"]) == pytest.approx(acc)
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
    # the table prints 4 decimals: half a unit of the last, and binary64's parse of it
    assert json.load(open(tmp_path / "m.json"))["FID"] == pytest.approx(worse["FID"], abs=0.5e-4 * (1 + 1e-9))


def test_cli_bad_input_is_one_line(tmp_path, shared_data):
    np.save(tmp_path / "f.npy", np.zeros((4, 8, 8), np.float32))
    u8 = str(tmp_path / "u8.npy")  # unlabelled images: no classifier to train on them
    np.save(u8, np.zeros((20, 8, 8), np.uint8))
    for argv, says in ((["--real", "digits"], "both --real and --fake"), (["--real", "nope", "--fake", "digits"], "nope"),
                       (["--real", "digits", "--fake", str(tmp_path / "f.npy")], "f.npy"),
                       (["--ckpt", str(tmp_path / "missing.pt")], "missing.pt"),
                       (["--real", u8, "--fake", u8], "--features inception")):
        r = run_metrics(*argv, "--data-dir", shared_data)
        assert r.returncode == 2, (argv, r.stderr)
        assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert says in r.stderr, (argv, r.stderr)


def test_n_at_most_k_is_one_error_naming_the_smallest_n(tmp_path):
    # precision/recall's k-th neighbour (itself excluded) needs k + 1 points in each set
    for argv, need in ((["--n", "3"], 4), (["--n", "5", "--k", "5"], 6)):
        with pytest.raises(cli.UsageError, match=f"--n {need}\\b"):
            metrics.main(["--real", "grid25", "--fake", "grid25", *argv])
    # the smallest n that works, works
    assert metrics.main(["--real", "grid25", "--fake", "grid25", "--n", "4"]) == 0
    # n taken from the data: a .npy of 3 points compares only 3, whatever --n says
    np.save(tmp_path / "three.npy", np.random.RandomState(0).randn(3, 2).astype(np.float32))
    with pytest.raises(cli.UsageError, match="3 .*4"):
        metrics.main(["--real", "grid25", "--fake", str(tmp_path / "three.npy"), "--n", "1000"])


def test_n_below_the_inception_scores_splits_is_one_error_naming_the_smallest_n(shared_data, tmp_path):
    # The Inception Score cuts the samples into 10 parts: 9 images leave one part empty.
    with pytest.raises(cli.UsageError, match="--n 10\\b"):
        metrics.main(["--real", "digits", "--fake", "digits", "--n", "9", "--data-dir", shared_data])
    # n taken from the data: a .npy of 5 images compares 5, whatever --n says
    np.save(tmp_path / "five.npy", np.zeros((5, 1, 28, 28), np.uint8))
    with pytest.raises(cli.UsageError, match="5 .*10"):
        metrics.main(["--real", "digits", "--fake", str(tmp_path / "five.npy"), "--n", "1000",
                      "--data-dir", shared_data])


def test_too_small_n_is_one_line_on_the_command_line():
    r = run_metrics("--real", "grid25", "--fake", "grid25", "--n", "2")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--n 4" in r.stderr
