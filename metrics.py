"""
Evaluation of generative models, from scratch: FID, Inception Score, KID, precision and
recall, memorization, mode coverage, bits per dimension, text copied from the training
set, and the networks that make the features (the TensorFlow FID InceptionV3, or a small
classifier trained here).

    python metrics.py --ckpt out/diffusion/ckpt.pt --n 10000 [--features classifier|inception]
    python metrics.py --real digits --fake samples.npy
    python metrics.py --ckpt out/gpt/ckpt.pt --temperature 0.8     # text: bits/byte, copied spans

Numbers are comparable only when made with the same feature network: every report
names its network. `inception` is the standard one of the literature (its weights are
downloaded once); `classifier` works offline on labelled datasets and is trained here on
the dataset's train split, then cached.
"""
import glob
import hashlib
import json
import math
import os
import re
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from checkpoint import atomic_write, build_from_checkpoint, load_checkpoint
from cli import Parser, UsageError, cli
from contract import draw_samples, generate_kwargs, hooks, nll_kwargs, sampler_kwargs
from devices import pick_device

# ---- distances between sets of features -------------------------------------------------


def feature_stats(features):
    """Mean and covariance (unbiased, like np.cov) of [N, D] features, in float64."""
    f = torch.as_tensor(features).double()
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / (len(f) - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)) between two Gaussians.

    tr((S1 S2)^(1/2)) equals tr((A S2 A)^(1/2)) with A = S1^(1/2): the two matrices are
    similar (A S2 A = A^-1 (S1 S2) A when A is invertible, and by continuity otherwise).
    A S2 A is symmetric positive semi-definite, so its square root's trace is the sum of
    the square roots of its eigenvalues: symmetric eigendecompositions and real numbers
    throughout, no complex sqrtm (scipy's route, which pytorch-fid takes).
    With S1 = V W V', A S2 A = V (B' S2 B) V' for B = V W^(1/2): the same eigenvalues,
    so B' S2 B is decomposed instead and A itself is never formed (one matmul fewer)."""
    mu1, mu2, s1, s2 = (torch.as_tensor(t).double() for t in (mu1, mu2, sigma1, sigma2))
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    w, v = torch.linalg.eigh(s1)
    b = v * w.clamp(min=0).sqrt()  # tiny negative eigenvalues of S1 are rounding
    m = b.T @ s2 @ b
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_sqrt)


def fid(features_a, features_b):
    """Frechet distance between Gaussians fitted to two feature sets [N, D]."""
    for f in (features_a, features_b):
        if len(f) <= f.shape[1]:
            warnings.warn(f"FID from {len(f)} samples of {f.shape[1]}-dimensional features: the covariance "
                          f"is singular and the figure biased; use more samples than dimensions")
    return frechet_distance(*feature_stats(features_a), *feature_stats(features_b))


def inception_score(logits, splits=10):
    """(mean, std) over splits of exp(E_x KL(p(y|x) || p(y))).

    torch-fidelity's convention, so figures compare with its: the logits are the
    classifier's without its bias (for InceptionV3, pool3 @ fc.weight.T, which is what
    the original TensorFlow code fed its softmax); the samples are shuffled with numpy's
    RandomState(2020) permutation, cut into `splits` contiguous parts, p(y) is each
    part's mean prediction, and std is numpy's (ddof=0). Float64 throughout."""
    logits = torch.as_tensor(logits).double()
    n = len(logits)
    if n < splits:
        raise ValueError(f"the Inception Score's {splits} splits need at least {splits} samples; got {n}")
    logits = logits[torch.from_numpy(np.random.RandomState(2020).permutation(n))]
    scores = []
    for i in range(splits):
        part = logits[i * n // splits:(i + 1) * n // splits]
        logp = F.log_softmax(part, 1)
        logpy = torch.logsumexp(logp, 0) - math.log(len(part))  # log of the mean prediction
        scores.append(float((logp.exp() * (logp - logpy)).sum(1).mean().exp()))
    return float(np.mean(scores)), float(np.std(scores))


def kid(features_a, features_b, subsets=100, subset_size=1000, seed=2020):
    """Kernel Inception Distance: (mean, std) over random subsets of the unbiased MMD^2
    with the cubic polynomial kernel k(x, y) = (x.y / D + 1)^3 (Binkowski et al. 2018).
    Within-set sums leave out the diagonal k(x_i, x_i); the cross term keeps all m^2."""
    a, b = torch.as_tensor(features_a).double(), torch.as_tensor(features_b).double()
    m = min(subset_size, len(a), len(b))
    if m < subset_size:
        warnings.warn(f"KID subsets of {m} samples, not {subset_size}: too few samples")
    rng = np.random.RandomState(seed)
    d = a.shape[1]
    out = []
    for _ in range(subsets):
        x = a[torch.from_numpy(rng.choice(len(a), m, replace=False))]
        y = b[torch.from_numpy(rng.choice(len(b), m, replace=False))]
        kxx, kyy, kxy = ((p @ q.T / d + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
        within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        out.append(float(within - 2 * kxy.sum() / m ** 2))
    return float(np.mean(out)), float(np.std(out))


def _pairwise_min(a, b, fn, chunk=2048):
    """fn(distances of a chunk of a to all of b) for chunks of a, concatenated."""
    return torch.cat([fn(torch.cdist(a[i:i + chunk], b)) for i in range(0, len(a), chunk)])


def knn_radii(x, k):
    """Distance from each point to its k-th nearest neighbour in its own set (itself excluded)."""
    if len(x) <= k:
        raise ValueError(f"the {k}-th nearest neighbour needs more than {k} points; got {len(x)}")
    return _pairwise_min(x, x, lambda d: d.kthvalue(k + 1, dim=1).values)


def precision_recall(real, fake, k=3):
    """Improved precision and recall (Kynkaanniemi et al. 2019). Each set's manifold is
    the union of balls around its points reaching their k-th nearest neighbour.
    Precision: the share of fake points inside the real manifold (are samples realistic?).
    Recall: the share of real points inside the fake manifold (is the data covered?)."""
    real, fake = torch.as_tensor(real).float(), torch.as_tensor(fake).float()
    r_real, r_fake = knn_radii(real, k), knn_radii(fake, k)
    precision = _pairwise_min(fake, real, lambda d: (d <= r_real).any(1)).float().mean()
    recall = _pairwise_min(real, fake, lambda d: (d <= r_fake).any(1)).float().mean()
    return float(precision), float(recall)


def memorization(fake, train, ratio=1 / 3):
    """Share of samples whose nearest training example is closer than `ratio` times the
    distance to the second-nearest: a copy stands out from the crowd of its neighbours."""
    fake, train = torch.as_tensor(fake).float(), torch.as_tensor(train).float()
    d = _pairwise_min(fake, train, lambda d: d.topk(2, dim=1, largest=False).values)
    return float((d[:, 0] < ratio * d[:, 1]).float().mean())


def _nearest_modes(points, centers, std):
    """(index of each finite point's nearest mode, whether it is within 3 std of it)."""
    points, centers = torch.as_tensor(points).float(), torch.as_tensor(centers).float()
    points = points[torch.isfinite(points).all(1)]
    d, nearest = torch.cdist(points, centers).min(1)
    return nearest, d <= 3 * std


def mode_coverage(points, centers, std):
    """For the 2D mixtures, as in VEEGAN and PacGAN: a sample is high quality when within
    3 standard deviations of its nearest mode; a mode is covered when it is the nearest
    mode of at least one high-quality sample. -> (modes covered, share of high quality)."""
    nearest, good = _nearest_modes(points, centers, std)
    if len(nearest) == 0:
        return 0, 0.0
    return int(nearest[good].unique().numel()), float(good.float().mean())


def mode_balance(points, centers, std):
    """The least-visited mode's high-quality samples over a fair share of them (all
    high-quality samples / modes): 1 for a perfectly even spread, near 0 when a mode is
    covered by a handful of samples, which mode_coverage still counts as covered."""
    nearest, good = _nearest_modes(points, centers, std)
    counts = torch.bincount(nearest[good], minlength=len(centers)).float()
    return float(counts.min() / counts.mean()) if counts.sum() > 0 else 0.0


def bits_per_dim(nll_nats, num_dims):
    """Mean negative log-likelihood in bits per dimension.

    Convention: nll_nats is -log P(x) in nats of each example as 8-bit data, each of its
    num_dims subpixels one of 256 levels (a discrete probability, not a density on [-1, 1]).
    So a model uniform over the 256 levels scores exactly 8 bits/dim. A density p on the
    [-1, 1] scale relates to it by P(x) ~ p(x) * (2/255)^num_dims."""
    return float(torch.as_tensor(nll_nats).double().mean() / (num_dims * math.log(2)))

# ---- copied text: how much of a text model's output is its training text, verbatim ----------
# A generated byte counts as copied when it lies inside a span of at least `span` bytes that
# occurs verbatim in the training text (Carlini et al. 2021, "Extracting Training Data from
# Large Language Models", count such spans). Each span-byte window of the training text is
# hashed; a sample's window is copied when its hash is among them. The hash is a polynomial
# in an odd base mod 2^64: with N training windows, a sample window collides by chance with
# probability about N / 2^64 (1e-12 for pystdlib), so the share is exact in practice, and the
# longest span, which the report quotes, is confirmed with a plain search of the text.

HASH_BASE = np.uint64(0x100000001B3)  # the 64-bit FNV prime: odd, so no byte's term vanishes
COPY_INDEX_VERSION = 1  # bump when window_hashes changes, so cached indexes are rebuilt


def window_hashes(text, span):
    """uint64 [len(text) - span + 1]: the hash of every span-byte window of text (bytes),
    sum_j text[i + j] * B^(span - 1 - j) mod 2^64, in span vectorised passes (numpy's
    unsigned arithmetic wraps around, as mod 2^64 wants)."""
    a = np.frombuffer(text, np.uint8)
    n = max(len(a) - span + 1, 0)
    h = np.zeros(n, np.uint64)
    for j in range(span):
        h *= HASH_BASE
        h += a[j:j + n]
    return h


def build_copy_index(train_text, span):
    """The sorted distinct hashes of train_text's span-byte windows (np.sort and a
    comparison: numpy 2's np.unique is ten times slower at this size)."""
    h = np.sort(window_hashes(train_text, span))
    return h[np.concatenate(([True], h[1:] != h[:-1]))] if len(h) else h


def copy_index(split, train_text, span, log=print):
    """build_copy_index of a token split's text, cached beside its token cache and keyed as
    that cache is (dataset, tokenizer, the source files' fingerprint), with the span."""
    key = hashlib.sha1(json.dumps([split.fingerprint, span, COPY_INDEX_VERSION]).encode()).hexdigest()[:12]
    base = split.cache_path[:-len(".bin")] + f"-copy{span}"
    path = f"{base}-{key}.npy"
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        pass
    t0 = time.time()
    index = build_copy_index(train_text, span)
    built = (f"copy index: {len(index):,} distinct {span}-byte windows of {len(train_text):,} train bytes "
             f"in {time.time() - t0:.1f}s")
    try:
        atomic_write(path, lambda f: np.save(f, index))
        for stale in glob.glob(glob.escape(base) + "-*.npy"):  # indexes of older sources
            if stale != path:
                os.remove(stale)
        log(f"{built}, cached in {path}")
    except OSError as e:  # a read-only data dir: the index is rebuilt each time
        log(f"{built}; could not cache it in {path} ({e.strerror or e}), so it is rebuilt each time")
    return index


def copied_windows(text, index, span):
    """bool [len(text) - span + 1]: which span-byte windows of text the index holds."""
    h = window_hashes(text, span)
    if not len(index):
        return np.zeros(len(h), bool)
    # looked up in sorted order, the queries walk the index forwards, mostly in cache,
    # instead of each probing it at random (6x faster on pystdlib's index)
    order, at = np.argsort(h), np.empty(len(h), np.int64)
    at[order] = np.searchsorted(index, h[order])
    return index[np.minimum(at, len(index) - 1)] == h


def copied_bytes(hits, span, length):
    """bool [length]: which bytes of a text of that length (len(hits) + span - 1, or
    shorter than span and so without windows) lie inside some copied window (a
    difference array: +1 where a hit window starts, -1 where it ends)."""
    d = np.zeros(max(len(hits) + span, length + 1), np.int64)
    d[:len(hits)] += hits
    d[span:span + len(hits)] -= hits
    return np.cumsum(d)[:length] > 0


def longest_in(text, lo, hi, find, span):
    """(start, length, train offset) of the longest piece of text[lo:hi] found verbatim in
    train (find(piece): its offset in train, or -1), where every span-byte window of
    text[lo:hi] hit the index. A run is mostly one copy, found by one search; a run that
    joins copies from two places (overlapping by at least span - 1 bytes) is walked piece
    by piece, bisecting each piece's end (a piece of train stays one when shortened) and
    the next piece's start (the first that reaches further)."""
    best, a = (lo, 0, -1), lo
    while hi - a > max(best[1], span - 1):  # shorter than span after a collision: no copy
        pos = find(text[a:hi])
        if pos >= 0:
            return (a, hi - a, pos)
        good, bad, pos = a + span, hi, find(text[a:a + span])
        if pos < 0:  # a hash collision, not a copy: skip the window
            a += 1
            continue
        while bad - good > 1:  # text[a:good] is in train, text[a:bad] is not
            mid = (good + bad) // 2
            p = find(text[a:mid])
            good, bad, pos = (mid, bad, p) if p >= 0 else (good, mid, pos)
        if good - a > best[1]:
            best = (a, good - a, pos)
        first, last = a + 1, good + 1 - span  # the first start s with text[s:good + 1] in train
        while first < last:
            mid = (first + last) // 2
            first, last = (first, mid) if find(text[mid:good + 1]) >= 0 else (mid + 1, last)
        a = first
    return best


def copied_share(texts, hits, span):
    """The share of all the bytes of texts (a list of bytes) that lie in copied windows
    (hits: copied_windows of each)."""
    covered = sum(int(copied_bytes(h, span, len(t)).sum()) for t, h in zip(texts, hits))
    return covered / max(sum(map(len, texts)), 1)


def longest_copy(samples, train, index, span, hits=None):
    """{length, sample, sample_offset, train_offset, text} of the longest piece of a sample
    found verbatim in train (hits: copied_windows of each sample, where already found):
    runs of hit windows are searched longest first, until the next run is no longer than
    the piece already found. Searches are remembered: text that repeats itself (a run of
    spaces, a sample drawn twice) asks the same ones again, and each costs a pass over
    train."""
    hits = [copied_windows(s, index, span) for s in samples] if hits is None else hits
    found = {}

    def find(piece):
        if piece not in found:
            found[piece] = train.find(piece)
        return found[piece]
    runs = []  # (bytes, sample, start) of each run of hit windows
    for k, hit in enumerate(hits):
        edges = np.flatnonzero(np.diff(np.concatenate(([0], hit.astype(np.int8), [0]))))
        runs += [(int(e - b) + span - 1, k, int(b)) for b, e in zip(edges[::2], edges[1::2])]
    best = dict(length=0, sample=None, sample_offset=None, train_offset=None, text="")
    for length, k, b in sorted(runs, reverse=True):
        if length <= best["length"]:
            break
        a, got, pos = longest_in(samples[k], b, b + length, find, span)
        if got > best["length"]:
            best = dict(length=got, sample=k, sample_offset=a, train_offset=pos,
                        text=samples[k][a:a + got].decode("utf-8", errors="replace"))
    return best


def copy_rows(samples, val_text, train, index, span):
    """The report's rows for generated texts (a list of bytes): copied, copied_val (val
    text cut into pieces of the samples' lengths, spread evenly over it) and longest_copy."""
    starts = np.linspace(0, max(len(val_text) - max(map(len, samples)), 0), len(samples)).astype(int)
    pieces = [val_text[o:o + len(s)] for o, s in zip(starts, samples)]
    hits = [copied_windows(s, index, span) for s in samples]  # hashed and looked up once, used twice
    return {"copied": copied_share(samples, hits, span),
            "copied_val": copied_share(pieces, [copied_windows(p, index, span) for p in pieces], span),
            "longest_copy": longest_copy(samples, train, index, span, hits)}

# ---- feature networks -------------------------------------------------------------------

# InceptionV3 as used by FID: the TensorFlow "inception-2015-12-05" graph as ported by pytorch-fid
# (fid_inception_v3). Parameter/buffer names equal torchvision's Inception3 minus AuxLogits, so
# pytorch-fid's pt_inception-2015-12-05-6726825d.pth loads with load_state_dict(strict=True); that
# file includes BatchNorm num_batches_tracked (pytorch-fid issue #34), and a file without them would
# load too (BatchNorm fills them in when the state dict carries no version metadata).
# Departures from torchvision's textbook Inception3 are marked "FID:".


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, as in TF) -> ReLU."""

    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x):
    # FID: TF's 'SAME' average pooling leaves the padded zeros out of the mean (count_include_pad
    # =False); torchvision counts them in.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b/5c/5d, 35x35
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_tf(x))  # FID: see _avg_pool_tf
        return torch.cat([self.branch1x1(x), b5, b3, bp], 1)


class InceptionB(nn.Module):  # Mixed_6a, 35x35 -> 17x17 (same as torchvision)
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):  # Mixed_6b..6e, 17x17, factorized 7x7
    def __init__(self, cin, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        k17, k71 = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **k17)
        self.branch7x7_3 = BasicConv2d(c7, 192, **k71)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **k71)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **k17)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **k71)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **k17)
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        bp = self.branch_pool(_avg_pool_tf(x))  # FID: see _avg_pool_tf
        return torch.cat([self.branch1x1(x), b7, bd, bp], 1)


class InceptionD(nn.Module):  # Mixed_7a, 17x17 -> 8x8 (same as torchvision)
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):  # Mixed_7b (pool="avg") and Mixed_7c (pool="max"), 8x8
    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.pool == "max":
            # FID: the TF 2015 graph max-pools in Mixed_7c's pool branch (torchvision and the
            # paper average-pool); likely a quirk of that graph, but it is what FID uses.
            p = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            p = _avg_pool_tf(x)  # FID: see _avg_pool_tf
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(p)], 1)


class InceptionV3(nn.Module):
    """FID InceptionV3. forward(x): x [B, 1 or 3, H, W] in [-1, 1] -> (pool3 [B, 2048], logits [B, 1008]),
    the images prepared as pytorch-fid prepares them (FID's reference). trunk(x): the network
    itself on an already prepared x [B, 3, 299, 299]; torch_fidelity_input prepares one as
    torch-fidelity does (the reference of IS and KID), see extract's `convention`.

    The module puts itself in eval mode (BatchNorm must use its running statistics)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        # FID: no AuxLogits head (it is not part of the FID graph nor of the weights file).
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")  # FID: max pool branch, see InceptionE
        # FID: 1008 logits (the TF 2015 graph's classifier size), not torchvision's 1000.
        self.fc = nn.Linear(2048, 1008)
        self.eval()

    def forward(self, x):
        """pytorch-fid's preparation, then the network."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        # As pytorch-fid: bilinear, align_corners=False, no antialias (identity at 299x299).
        # FID: no torchvision transform_input re-normalization; the TF graph maps pixels to [-1, 1]
        # and so do our inputs (pytorch-fid's 2x-1 from [0, 1] is therefore skipped: resizing is
        # affine with weights summing to 1, so it commutes with 2x-1 up to rounding).
        return self.trunk(F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False))

    def trunk(self, x):
        """The network on prepared input [B, 3, 299, 299] -> (pool3 [B, 2048], logits [B, 1008])."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, "Mixed_" + name)(x)
        pool3 = F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)  # FID: no dropout before fc
        return pool3.float(), self.fc(pool3).float()


# ---- torch-fidelity's preparation of InceptionV3 input (IS and KID with --features inception) ----------
# torch-fidelity 0.4.0, feature_extractor_inceptionv3.py, FeatureExtractorInceptionV3.forward: uint8
# [B, 3, H, W] -> float32 -> interpolate_bilinear_2d_like_tensorflow1x(size=(299, 299),
# align_corners=False) -> (x - 128) / 128 -> the same network. pytorch-fid instead takes x / 255, resizes
# with torch's bilinear (half-pixel centres) and maps to 2x - 1. Written here from TF1's formula.


def resize_bilinear_tf1(x, size):
    """TensorFlow 1.x resize_bilinear with align_corners=False, of x [B, C, H, W] (float) to size (h, w).

    Output pixel (i, j) samples the source at (i * H/h, j * W/w): no half-pixel offset (torch's
    align_corners=False samples at (i + 0.5) * H/h - 0.5, which keeps the image centred; TF1 shifts it
    towards the top-left). From a coordinate c: lo = floor(c), hi = min(lo + 1, H - 1) (the last row or
    column repeats), weight c - lo; within rows first, top = a + (b - a) * dx, then between rows,
    top + (bottom - top) * dy. Coordinates are computed in x's dtype: in float32 that is TF1's own
    arithmetic (float(i) * float(H / h)), which torch-fidelity reproduces."""
    def axis(n_in, n_out):
        c = torch.arange(n_out, dtype=x.dtype, device=x.device) * torch.tensor(n_in / n_out, dtype=x.dtype)
        lo = c.long()  # c >= 0, so truncation is floor
        return lo, (lo + 1).clamp(max=n_in - 1), c - lo.to(x.dtype)

    (y0, y1, dy), (x0, x1, dx) = axis(x.shape[2], size[0]), axis(x.shape[3], size[1])
    r0, r1 = x[:, :, y0], x[:, :, y1]
    top = r0[..., x0] + (r0[..., x1] - r0[..., x0]) * dx
    bottom = r1[..., x0] + (r1[..., x1] - r1[..., x0]) * dx
    return top + (bottom - top) * dy[:, None]


def torch_fidelity_input(images):
    """uint8 images [B, 1 or 3, H, W] prepared for InceptionV3.trunk as torch-fidelity does: gray
    repeated to RGB (its image loader's PIL convert("RGB")), float32, resize_bilinear_tf1 to 299x299
    (the identity at 299x299), then (x - 128) / 128 (so 0 -> -1, 128 -> 0, 255 -> 127/128)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"torch-fidelity's preparation starts from uint8 images, not {images.dtype}")
    x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    return (resize_bilinear_tf1(x.float(), (299, 299)) - 128) / 128


INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"


def inception_path():
    """Where the FID InceptionV3 weights are kept: torch.hub's cache."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(INCEPTION_URL))


def load_inception(device="cpu"):
    """The FID InceptionV3 with the standard weights: read from torch.hub's cache, which
    a first online use fills. Offline and not cached: one line says what to fetch."""
    path = inception_path()
    fname = os.path.basename(path)
    if not os.path.exists(path):
        try:
            print(f"metrics: downloading {INCEPTION_URL}", file=sys.stderr)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(INCEPTION_URL, path, progress=sys.stderr.isatty())
        except Exception as e:
            raise UsageError(f"the FID InceptionV3 weights are not available ({type(e).__name__}); download "
                               f"{INCEPTION_URL} and put {fname} in {os.path.dirname(path)}/, or use "
                               f"--features classifier (offline)") from None
    net = InceptionV3()
    try:
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:
        raise UsageError(f"{path} is not the FID InceptionV3 weights file ({str(e).splitlines()[0][:100]}); "
                           f"delete it to download it again") from None
    return net.to(device).eval()


class Classifier(nn.Module):
    """A small CNN for one labelled dataset. Its last hidden layer (128 wide) is the
    feature space for FID, KID and precision/recall; its logits serve the Inception Score.
    Features are divided by their RMS over the training images (the `scale` buffer), so
    that they are O(1) like InceptionV3's and KID's cubic kernel stays well-conditioned."""

    def __init__(self, channels, size, num_classes):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(32 * (size // 4) ** 2, 128), nn.ReLU())
        self.head = nn.Linear(128, num_classes)
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x):
        f = self.body(x)
        return f / self.scale, self.head(f)


def get_classifier(name, splits, data_dir, device="cpu", epochs=1, log=print):
    """The classifier of dataset `name`, from data_dir/cache or trained now (seeded, so
    the same on every machine up to floating point) and cached. -> (net, test accuracy)."""
    info = splits["train"].info if "train" in splits else None  # a .npy of images has no splits, no labels
    if info is None or info.kind != "image" or splits["train"].labels is None:
        raise UsageError(f"--features classifier needs a labelled image dataset; {name} has no labels "
                           f"(use --features inception)")
    c, h, _ = info.shape
    stem = re.sub(r"[^0-9A-Za-z._-]", "_", os.path.basename(name.rstrip("/\\")))  # a user's path: its last part
    key = f"{stem}-{c}x{h}-{len(splits['train'])}-{hash_split(splits['train'])}"
    path = os.path.join(data_dir, "cache", f"classifier-{key}.pt")
    net = Classifier(c, h, len(info.classes)).to(device)
    if os.path.exists(path):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            net.load_state_dict(saved["model"])
            return net.eval(), saved["accuracy"]
        except Exception:
            pass  # damaged: train again
    torch.manual_seed(0)
    net = Classifier(c, h, len(info.classes)).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    steps = max(epochs * len(splits["train"]) // 128, 300)  # a user's few hundred images: still 300 steps
    for step in progress(range(steps), f"training the {name} classifier"):
        for group in opt.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        x, y = splits["train"].batch(128, g)
        x = x + 0.1 * torch.randn(x.shape, generator=g)  # robust to the slight noise of samples
        loss = F.cross_entropy(net(x.to(device))[1], y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        x = splits["train"].batch(2000, g)[0].to(device)
        net.scale.fill_(net.body(x).square().mean().sqrt().item())
    accuracy = classifier_accuracy(net, splits["val"], device)
    log(f"metrics: {name} classifier: {100 * accuracy:.2f}% accuracy on the val split; cached in {path}")
    data.atomic_write(path, lambda f: torch.save({"model": net.state_dict(), "accuracy": accuracy}, f))
    return net, accuracy


def hash_split(split):
    """A short fingerprint of a split's images, so a classifier is never reused for other data."""
    import hashlib
    return hashlib.sha1(split.images[::97].numpy().tobytes()).hexdigest()[:8]


@torch.no_grad()
def classifier_accuracy(net, split, device="cpu"):
    hits = 0
    for i in range(0, len(split), 1000):
        x = split.images[i:i + 1000].float().div(127.5).sub(1).to(device)
        hits += int((net(x)[1].argmax(1).cpu() == split.labels[i:i + 1000]).sum())
    return hits / len(split)


CONVENTIONS = ("pytorch-fid", "torch-fidelity")  # how extract prepares images for InceptionV3


@torch.no_grad()
def extract(net, images, batch_size=100, device="cpu", desc="features", convention="pytorch-fid"):
    """(features [N, D], logits without bias [N, K]) of images [N, C, H, W] in [-1, 1]
    (or uint8 0..255), in batches.

    convention, the preparation of the images (report uses each metric's reference's):
      "pytorch-fid"     uint8 -> x / 127.5 - 1, then net(x) (InceptionV3: torch's bilinear resize
                        to 299). FID's reference; the only preparation of the classifier.
      "torch-fidelity"  InceptionV3 and uint8 images only: net.trunk(torch_fidelity_input(x)),
                        TF1's bilinear resize to 299 and (x - 128) / 128. The reference of IS and KID."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, not {convention!r}")
    fidelity = convention == "torch-fidelity"
    if fidelity and not isinstance(net, InceptionV3):
        raise ValueError("the torch-fidelity preparation is InceptionV3's; the classifier has one preparation")
    feats, logits = [], []
    for i in progress(range(0, len(images), batch_size), desc):
        x = torch.as_tensor(images[i:i + batch_size])
        if fidelity:
            f, _ = net.trunk(torch_fidelity_input(x.to(device)))
        else:
            x = x.float().div(127.5).sub(1) if x.dtype == torch.uint8 else x.float()
            f, _ = net(x.to(device))
        feats.append(f.double().cpu())
        fc, scale = (net.fc, 1.0) if isinstance(net, InceptionV3) else (net.head, float(net.scale))
        logits.append((f.double() * scale @ fc.weight.double().T).cpu())  # no bias: see inception_score
    return torch.cat(feats), torch.cat(logits)


def progress(iterable, desc):
    """A one-line progress bar on stderr (redrawn in place on a terminal)."""
    items = list(iterable)
    tty, t0, shown = sys.stderr.isatty(), time.time(), 0
    for i, item in enumerate(items):
        yield item
        pct = 100 * (i + 1) // max(len(items), 1)
        if tty or (pct // 25 > shown // 25 and i > 0) or i + 1 == len(items):
            bar = "#" * (pct // 5) + "." * (20 - pct // 5)
            eta = (time.time() - t0) / (i + 1) * (len(items) - i - 1)
            print(f"\r{desc}: [{bar}] {i + 1}/{len(items)} eta {eta:.0f}s", end="" if tty else "\n",
                  file=sys.stderr, flush=True)
            shown = pct
    if tty:
        print(file=sys.stderr)

# ---- the command line -----------------------------------------------------------------


def load_set(spec, split, data_dir, n, whole=False):
    """(uint8 images [n', C, H, W] or float points, the dataset's splits) of a dataset
    name or a user's .npy, .npz or folder of images: its `split`, or with `whole` a user's
    file or folder all of it (its train split is what a classifier of its labels learns)."""
    try:
        if spec.endswith(".npy") and os.path.isfile(spec):
            a = np.load(spec, allow_pickle=False)
            if a.ndim == 2 and a.shape[1] == 2 and a.dtype.kind == "f":
                return torch.from_numpy(a[:n]).float(), None  # 2D points
            if whole:  # in the file's order; no labels, so no splits for a classifier
                return torch.from_numpy(data.npy_images(spec)[:n]), None
        splits = data.load(spec, data_dir=data_dir)
    except (UsageError, ValueError, OSError) as e:
        raise UsageError(str(e).splitlines()[0] if str(e) else f"{spec}: cannot read it")
    s = splits[split]
    if s.info.kind == "points":
        return s.batch(n, torch.Generator().manual_seed(int(split == "val")))[0], splits
    if s.info.kind != "image":
        raise UsageError(f"{spec} is text; metrics.py compares images or 2D points")
    if whole and (spec.endswith(".npz") or os.path.isdir(spec)):
        return torch.cat([splits["train"].images, splits["val"].images])[:n], splits
    return s.images[:n], splits


def feature_network(features, splits, name="the data"):
    """--features auto: the classifier for labelled images (trained on their classes), else
    InceptionV3 where its weights are here (auto downloads nothing)."""
    if features != "auto":
        return features
    if bool(splits) and "train" in splits and getattr(splits["train"], "labels", None) is not None:
        return "classifier"
    if not os.path.exists(inception_path()):
        raise UsageError(f"{name} has no labels to train the classifier on, and the InceptionV3 weights are not "
                         f"in {os.path.dirname(inception_path())}/: add --features inception to download them "
                         f"(once), or put {INCEPTION_URL} there")
    return "inception"


def report(real, fake, train_set, splits, args, name):
    """The table's rows: {metric: value} comparing fake with real."""
    rows = {}
    if fake.dtype.is_floating_point and fake.shape[1:] == (2,):  # 2D points
        centers, std = splits["train"].centers, splits["train"].std
        modes, hq = mode_coverage(fake, centers, std)
        rows.update({"modes covered": f"{modes}/{len(centers)}", "high quality %": 100 * hq,
                     "smallest mode % of fair": 100 * mode_balance(fake, centers, std)})
        rows["precision"], rows["recall"] = precision_recall(real, fake, k=args.k)
        return rows, "raw 2D coordinates"
    if fake.shape[1:] != real.shape[1:]:
        raise UsageError(f"fake images are {tuple(fake.shape[1:])}, real ones {tuple(real.shape[1:])}; "
                           f"they must match")
    inception = feature_network(args.features, splits, name) == "inception"
    if inception:
        net = load_inception(args.device)
        about = ("InceptionV3 (FID, pool3 2048-d); images prepared as pytorch-fid does for FID, precision/recall "
                 "and memorized %, as torch-fidelity does for IS and KID")
    else:
        net, acc = get_classifier(name, splits, args.data_dir, args.device, log=lambda m: print(m, file=sys.stderr))
        about = f"classifier trained on {name} ({100 * acc:.1f}% val accuracy, 128-d): not comparable with published FIDs"
    fr, _ = extract(net, real, args.batch_size, args.device, "real features")
    ff, lf = extract(net, fake, args.batch_size, args.device, "fake features")
    fr_k, ff_k = fr, ff  # the features of IS and KID
    if inception:  # a second pass, prepared as IS and KID's reference prepares images (see extract)
        fr_k, _ = extract(net, real, args.batch_size, args.device, "real features (torch-fidelity)", "torch-fidelity")
        ff_k, lf = extract(net, fake, args.batch_size, args.device, "fake features (torch-fidelity)", "torch-fidelity")
    rows["FID"] = fid(fr, ff)
    rows["IS"], rows["IS std"] = inception_score(lf, splits=10)
    rows["KID"], rows["KID std"] = kid(fr_k, ff_k, subset_size=min(1000, len(fr_k), len(ff_k)))
    rows["precision"], rows["recall"] = precision_recall(fr, ff, k=args.k)
    if train_set is not None:
        ft, _ = extract(net, train_set, args.batch_size, args.device, "train features")
        rows["memorized %"] = 100 * memorization(ff, ft)
    return rows, about


def check_counts(counts, images, k, n):
    """Refuse sets too small for the metrics, before any work: each set's k-th nearest
    neighbour (itself excluded) for precision/recall needs k + 1 samples, and for images
    the Inception Score's 10 splits need 10. counts: {what: samples compared}, which a
    .npy (or a split) can make fewer than --n."""
    need = max(k + 1, 10 if images else 2)
    what, have = min(counts.items(), key=lambda kv: kv[1])
    if have >= need:
        return
    why = f"precision/recall with --k {k} needs more than {k} samples in each set" + \
        (", and the Inception Score's 10 splits at least 10" if images else "")
    if have == n:
        raise UsageError(f"--n {n} is too few: {why}; the smallest --n that works is --n {need}")
    raise UsageError(f"{what} has {have} samples, fewer than {need}: {why}; give at least {need} "
                       f"(and --n {need} or more)")


def parse_args(argv):
    p = Parser(prog="metrics.py", description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--ckpt", default="", help="checkpoint to sample and evaluate (EMA weights where present)")
    p.add_argument("--model", default="", help="with --ckpt: the model's .py file, where it has moved since "
                   "training (default: the file the checkpoint names)")
    p.add_argument("--real", default="", help="real images: a dataset name (its train split), or a .npy, "
                   ".npz or folder of images (all of it; its labels, if any, train the classifier)")
    p.add_argument("--fake", default="", help="samples: a .npy, .npz or folder of images, or a dataset name "
                   "(its val split)")
    p.add_argument("--against", default="train", choices=["train", "val"],
                   help="with --ckpt: the split the samples are compared with (default: %(default)s; memorization always uses train)")
    p.add_argument("--n", type=int, default=None,
                   help="samples to draw and compare (default: 10000 images or points, 100 texts)")
    p.add_argument("--features", default="auto", choices=["auto", "classifier", "inception"],
                   help="feature network: classifier (trained here on the data's labels, offline) or inception "
                        "(the standard FID's; its weights downloaded once); auto: the classifier for labelled "
                        "data, else inception (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None,
                   help="diffusion: sampling steps, 0 ancestral over all T (default: the model's)")
    p.add_argument("--eta", type=float, default=None, help="diffusion: DDIM noise (default: 0)")
    p.add_argument("--guidance", type=float, default=None,
                   help="diffusion: classifier-free guidance scale, 1 neutral (default: off)")
    p.add_argument("--temperature", type=float, default=None,
                   help="text: 0 is greedy (default: 0.8); VAE and GAN: latent scale of the samples (default: 1)")
    p.add_argument("--top-k", type=int, default=None, help="text: keep the k most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="text: nucleus, the smallest set reaching this probability (default: off)")
    p.add_argument("--prompt", default="\n", help="text: what every sample continues (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="text: tokens generated per sample (default: %(default)s)")
    p.add_argument("--copy-span", type=int, default=50,
                   help="text: bytes a verbatim match with the train text needs to count as copied "
                        "(default: %(default)s)")
    p.add_argument("--nll-n", type=int, default=None,
                   help="val images (text: windows) for bits/dim (text: bits/byte) where the model has nll "
                        "(default: 100 images, 1000 windows)")
    p.add_argument("--iwae-k", type=int, default=1000,
                   help="VAE: importance samples of its IWAE bound (default: %(default)s)")
    p.add_argument("--k", type=int, default=3, help="neighbours for precision/recall (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=100,
                   help="images (text: samples) per forward pass (default: %(default)s)")
    p.add_argument("--data-dir", default="",
                   help="datasets and cached classifiers (default: the checkpoint's, else data)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default: %(default)s)")
    p.add_argument("--json", default="", help="also write the table here (default with --ckpt: beside it)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    args = p.parse_args(argv)
    if bool(args.ckpt) == bool(args.real or args.fake) or bool(args.real) != bool(args.fake):
        raise UsageError("give --ckpt, or both --real and --fake")
    if args.n is not None and args.n < 2 or (args.nll_n or 0) < 0 or min(args.k, args.batch_size, args.iwae_k) < 1:
        raise UsageError("--n must be at least 2, --k, --iwae-k and --batch-size positive, --nll-n not negative")
    if args.temperature is not None and not args.temperature >= 0:
        raise UsageError("--temperature must not be negative")
    if args.top_k is not None and args.top_k <= 0 or args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError("--top-k must be positive and --top-p in (0, 1]")
    if args.copy_span < 1 or args.max_new_tokens < 1:
        raise UsageError("--copy-span and --max-new-tokens must be positive")
    args.device, args.data_dir = pick_device(args.device), args.data_dir or ("" if args.ckpt else "data")
    return args


def draw(model, n, classes, kw, args):
    """n samples of a model (labels cycling through the classes, if it has them), on the
    CPU; images as uint8, what a sample saved as an image would be."""
    fake = draw_samples(model, n, classes, args.device, args.batch_size,
                        wrap=lambda batches: progress(batches, "sampling"), **kw)
    return data.to_uint8(fake) if fake.dim() == 4 else fake


def bits_per_dim_row(nll, val, args):
    """{label: bits/dim} of a model's nll on the first --nll-n val images (the IWAE
    bound with --iwae-k samples where nll takes k)."""
    x = val.images[:args.nll_n].float().div(127.5).sub(1).to(args.device)
    iwae = nll_kwargs(nll, args.iwae_k)
    with torch.no_grad():
        nll = torch.cat([nll(x[i:i + args.batch_size], **iwae).cpu()
                         for i in progress(range(0, len(x), args.batch_size), "bits/dim")])
    bound = f", IWAE k={args.iwae_k}" if iwae else ""
    return {f"bits/dim ({len(x)} val images{bound})": bits_per_dim(nll, x[0].numel())}


def text_samples(generate, tok, args):
    """--n generated texts (bytes, the prompt left out), in batches of --batch-size, with
    the sampler flags sample.py takes, from a model's generate()."""
    if generate is None:
        raise UsageError(f"{args.ckpt}: its model has no generate(), so there are no samples to check for copies")
    prompt = tok.encode(args.prompt)
    if not prompt:
        raise UsageError("--prompt encodes to no tokens; give at least one character")
    kw = generate_kwargs(generate, args.device, args.seed, args.temperature, top_k=args.top_k, top_p=args.top_p)
    out = []
    with torch.no_grad():
        for i in progress(range(0, args.n, args.batch_size), "sampling"):
            idx = torch.tensor([prompt] * min(args.batch_size, args.n - i), device=args.device)
            out += [tok.decode_bytes(row[len(prompt):]) for row in
                    generate(idx, args.max_new_tokens, **kw).tolist()]
    return out, {k: v for k, v in kw.items() if k != "generator"}


def bits_per_byte_row(nll, val, bytes_per_token, args):
    """{label: bits/byte} of a model's nll on --nll-n windows of the val tokens (each
    block_size + 1 long, spread evenly over the stream), as train.py's val_bpb counts."""
    block = val.block_size
    starts = np.linspace(0, len(val.tokens) - block - 1, args.nll_n).astype(np.int64)
    nats = []
    with torch.no_grad():
        for i in progress(range(0, len(starts), args.batch_size), "bits/byte"):
            rows = np.stack([val.tokens[s:s + block + 1] for s in starts[i:i + args.batch_size]])
            nats.append(nll(torch.from_numpy(rows.astype(np.int64)).to(args.device)).double().cpu())
    return {f"bits/byte ({len(starts)} val windows)": float(torch.cat(nats).mean()) / math.log(2) / bytes_per_token}


def evaluate_text(args, ckpt, model, tcfg, mcfg):
    """(rows, about line, what was compared) for a text model: val bits/byte where it has
    nll, and how much of its samples' text is copied from its training text."""
    name, tokenizer = ckpt["config"]["data"]["name"], tcfg.get("tokenizer", "bytes")
    try:
        splits = data.load(name, tokenizer=tokenizer, data_dir=args.data_dir, block_size=mcfg.block_size)
    except (UsageError, ValueError, OSError) as e:
        raise UsageError(str(e).splitlines()[0] if str(e) else f"{name}: cannot read it")
    tok, train, val = data.get_tokenizer(tokenizer), splits["train"], splits["val"]
    rows, h = {}, hooks(model)
    if h.nll is not None and args.nll_n:
        rows.update(bits_per_byte_row(h.nll, val, train.info.bytes_per_token, args))
    train_text = tok.decode_bytes(train.tokens)
    index = copy_index(train, train_text, args.copy_span, log=lambda m: print(m, file=sys.stderr))
    samples, kw = text_samples(h.generate, tok, args)  # its generator seeded with --seed
    rows.update(copy_rows(samples, tok.decode_bytes(val.tokens), train_text, index, args.copy_span))
    sampler = ", ".join(f"{k} {v}" for k, v in kw.items())
    what = (f"{args.n} samples of {args.max_new_tokens} tokens of {args.ckpt} ({sampler}, prompt {args.prompt!r}) "
            f"vs the {len(train_text):,} bytes of {name} train")
    about = (f"none (text): copied = share of sample bytes inside a span of {args.copy_span}+ bytes found "
             f"verbatim in train; copied_val = the same for as many bytes of {name} val")
    args.json = args.json or os.path.join(os.path.dirname(args.ckpt) or ".", "metrics-text.json")
    return rows, about, what


def evaluate_checkpoint(args):
    """(rows, features line, what was compared) for --ckpt: samples of the model against
    its dataset's --against split, and bits/dim where the model has nll."""
    ckpt = load_checkpoint(args.ckpt)
    module, model, tcfg, mcfg = build_from_checkpoint(ckpt, args.device, args.ckpt, args.model)
    model.eval()
    name, nll = ckpt["config"]["data"]["name"], hooks(model).nll
    args.data_dir = args.data_dir or tcfg.get("data_dir", "data")
    if ckpt["config"]["data"].get("kind") == "tokens":
        args.n, args.nll_n = args.n or 100, 1000 if args.nll_n is None else args.nll_n
        return evaluate_text(args, ckpt, model, tcfg, mcfg)
    if args.temperature == 0:
        raise UsageError("--temperature 0 is for text; an image model's latent scale must be positive")
    if args.top_k is not None or args.top_p is not None:
        raise UsageError("--top-k and --top-p are for text models; this checkpoint is not one")
    args.n, args.nll_n = args.n or 10000, 100 if args.nll_n is None else args.nll_n
    real, splits = load_set(name, args.against, args.data_dir, args.n)
    check_counts({f"{name} {args.against}": len(real), "--n": args.n},
                 splits["train"].info.kind == "image", args.k, args.n)
    torch.manual_seed(args.seed)
    kw = sampler_kwargs(model, steps=args.steps, eta=args.eta, guidance=args.guidance,
                        temperature=args.temperature)
    fake = draw(model, args.n, getattr(mcfg, "num_classes", 0) or 0, kw, args)
    train_set = real if args.against == "train" else load_set(name, "train", args.data_dir, args.n)[0]
    try:
        rows, about = report(real, fake, train_set, splits, args, name)
    except UsageError as e:  # no feature network here (no labels, no Inception weights): bits/dim still
        if not (nll is not None and args.nll_n):
            raise
        rows, about = {}, f"none, so no FID, IS, KID, precision or recall: {e}"
    named = feature_network(args.features, splits, name) if rows else "none"
    if nll is not None and splits["val"].info.kind == "image" and args.nll_n:
        rows.update(bits_per_dim_row(nll, splits["val"], args))
    sampler = ", ".join(f"{k} {v}" for k, v in kw.items())
    what = f"{args.n} samples of {args.ckpt}{f' ({sampler})' if sampler else ''} vs {len(real)} of {name} {args.against}"
    args.json = args.json or os.path.join(os.path.dirname(args.ckpt) or ".", f"metrics-{named}.json")
    return rows, about, what


def compare_sets(args):
    """(rows, features line, what was compared) for --real and --fake."""
    args.n = args.n or 10000
    real, splits = load_set(args.real, "train", args.data_dir, args.n, whole=True)
    fake, _ = load_set(args.fake, "val", args.data_dir, args.n, whole=True)
    check_counts({args.real: len(real), args.fake: len(fake)},
                 not (fake.dtype.is_floating_point and fake.shape[1:] == (2,)), args.k, args.n)
    train_set = real if fake.dim() == 4 else None
    rows, about = report(real, fake, train_set, splits or {}, args, args.real)
    return rows, about, f"{len(fake)} of {args.fake} vs {len(real)} of {args.real}"


def main(argv=None):
    args = parse_args(argv)
    rows, about, what = evaluate_checkpoint(args) if args.ckpt else compare_sets(args)
    print(f"{what}\nfeatures: {about}")
    for key, v in rows.items():
        if key == "longest_copy":
            v = f"{v['length']} bytes" + (f", sample {v['sample']} at byte {v['sample_offset']}, train byte "
                                          f"{v['train_offset']:,}: {v['text'][:40]!r}" if v["length"] else "")
        print(f"  {key:<28} {v:.4f}" if isinstance(v, float) else f"  {key:<28} {v}")
    if args.json:
        data.atomic_write(args.json, lambda f: f.write(json.dumps(
            {"what": what, "features": about, **rows}, indent=1).encode()))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    cli(main)
