"""vae.py against closed forms: probabilistic PCA, the Gaussian KL, a normalised decoder."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from tolerances import U32, U64

import checkpoint  # noqa: E402
import vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Affine(nn.Module):
    """x -> [A x + c, a constant log-variance]: the linear-Gaussian nets of PPCA."""

    def __init__(self, A, c, logvar):
        super().__init__()
        self.A, self.c, self.logvar = A, c, logvar

    def forward(self, x):
        return torch.cat([x @ self.A.T + self.c, self.logvar.expand(len(x), -1)], 1)


def ppca(posterior):
    """A VAE whose decoder is p(x|z) = N(W z + b, s2 I), z ~ N(0, I): then log p(x) is
    N(x; b, W W^T + s2 I) in closed form. The encoder is the exact posterior
    z | x ~ N(M^-1 W^T (x - b), s2 M^-1), M = W^T W + s2 I, which is diagonal (as the
    VAE's q is) because W's columns are orthogonal; or else an arbitrary linear one."""
    torch.manual_seed(0)
    D, Z, s2 = 3, 2, 0.3
    Q, _ = torch.linalg.qr(torch.randn(D, Z))
    W, b = Q * torch.tensor([2.0, 0.7]), torch.randn(D)
    m = vae.Model(vae.Config(point_dim=D, z_dim=Z))
    m.decoder = Affine(W, b, torch.full((D,), math.log(s2)))
    # the posterior of these fp32 W, b, s2, in float64, then rounded once to fp32
    W64, b64 = W.double(), b.double()
    Minv = torch.linalg.inv(W64.T @ W64 + s2 * torch.eye(Z, dtype=torch.float64))
    A, c, logvar = Minv @ W64.T, -(Minv @ W64.T @ b64), torch.log(s2 * torch.diag(Minv))
    if not posterior:  # shrunk and too wide: a q the bound has to pay for
        A, c, logvar = 0.6 * A, 0.6 * c, logvar + 1.0
    m.encoder = Affine(A.float(), c.float(), logvar.float())
    exact = torch.distributions.MultivariateNormal(b, W @ W.T + s2 * torch.eye(D))
    x = exact.sample((256,))
    # log p(x) in float64, for the fp32 W, b, s2 the model holds (within a few U64: exact here)
    cov = W64 @ W64.T + float(m.decoder.logvar[0].double().exp()) * torch.eye(D, dtype=torch.float64)
    return m.eval(), x, torch.distributions.MultivariateNormal(b64, cov).log_prob(x.double())


LOG_2PI = math.log(2 * math.pi)


def log_weight_rounding(m, x, eps):
    """Bound on the fp32 rounding of one importance log weight of a ppca model,
    log p(x|z) + log p(z) - log q(z|x) at z = mean + eps std, for draws eps [k, B, Z]: per
    draw [k, B]. Each Gaussian log-density rounds about 8 times per element, and its sums
    over D or Z terms and the two adds take (D + 2Z + 3) u more, of the terms' magnitudes;
    on top, the errors of z (the encoder's affine map, q's rounded parameters, z's own
    ops) and of the decoder's mean reach the densities through their slopes:
    d/dr (r^2 / 2 s2) = r / s2 and d/dz (z^2 / 2) = z."""
    enc, dec = m.encoder, m.decoder
    A, c, lv = enc.A.double(), enc.c.double(), enc.logvar.double()
    W, b, lvx = dec.A.double(), dec.c.double(), dec.logvar.double()
    xd, e = x.double(), eps.double()
    D, Z = W.shape
    mean = xd @ A.T + c
    std = (0.5 * lv).exp()
    z = mean + e * std
    r = xd - (z @ W.T + b)
    d_mean = (D + 2) * U32 * (xd.abs() @ A.abs().T + c.abs())  # rounded A, c, then D products and c
    d_std = 3 * U32 * std * (1 + lv.abs())  # rounded logvar, exp(lv / 2), the product
    d_z = d_mean + e.abs() * d_std + U32 * (mean.abs() + 2 * (e * std).abs())
    d_r = d_z @ W.abs().T + (Z + 2) * U32 * (z.abs() @ W.abs().T + b.abs() + xd.abs())
    mag = (0.5 * (LOG_2PI + lvx.abs() + r ** 2 * (-lvx).exp())).sum(-1) + \
        (0.5 * (LOG_2PI + z ** 2)).sum(-1) + (0.5 * (LOG_2PI + lv.abs() + e ** 2)).sum(-1)
    slopes = (r.abs() * d_r * (-lvx).exp()).sum(-1) + (z.abs() * d_z).sum(-1)
    return (8 + D + 2 * Z + 3) * U32 * mag + slopes


def test_ppca_exact_posterior_makes_the_elbo_the_likelihood():
    m, x, log_p = ppca(posterior=True)
    # log p(x, z) - log q(z | x) = log p(x) for every z when q is the posterior: every
    # importance weight is p(x), whatever k; so -nll is log p(x) but for the rounding of
    # the weights (logsumexp moves by at most the largest error of its terms).
    torch.manual_seed(3)
    got = -m.nll(x, k=7)
    torch.manual_seed(3)
    eps = torch.randn(7, 256, 2)  # nll's draws: one chunk of 7 (its chunk, 2048 // 256 = 8, holds them)
    tol = log_weight_rounding(m, x, eps).amax(0) + 16 * U64 * log_p.abs()
    assert ((got - log_p).abs() <= tol).all(), ((got - log_p).abs().max(), tol.min())
    # The ELBO (analytic KL, one z) equals log p(x) in expectation over z: 5 standard errors
    # of the mean of 4000 draws (from their own spread), and a draw's rounding, which is
    # that of a log weight (the same log p(x|z); the analytic KL rounds less than the
    # log p(z) - log q it stands for).
    draws = m.elbo(x[:8].repeat(4000, 1)).view(4000, 8).double()
    se = draws.std(0) / math.sqrt(4000)
    assert ((draws.mean(0) - log_p[:8]).abs() <= 5 * se + tol[:8]).all(), (draws.mean(0) - log_p[:8], se)


def test_ppca_elbo_below_iwae_below_likelihood_and_iwae_converges():
    m, x, log_p = ppca(posterior=False)
    g = torch.Generator().manual_seed(1)
    x = x[:64].repeat(8, 1)
    target = log_p[:64].mean().double()
    rows = {"elbo": m.elbo(x, generator=g).double()}
    rows.update({k: -m.nll(x, k=k, chunk=100, generator=g) for k in (1, 10, 100, 2000)})
    # Standard errors of the means over the 512 rows (8 draws of each of the 64 x's) from
    # the draws' spread within each x, pooled: the x's own spread is not an error here,
    # as the target is the mean over the same 64.
    se = {k: float((v.view(8, 64).var(0).mean() / len(v)).sqrt()) for k, v in rows.items()}
    elbo, iwae = float(rows["elbo"].mean()), {k: float(rows[k].mean()) for k in (1, 10, 100, 2000)}
    # IWAE with one sample is the ELBO in expectation: 5 standard errors of the difference
    assert abs(iwae[1] - elbo) < 5 * math.hypot(se[1], se["elbo"])
    # at or below log p(x) in expectation: 5 standard errors above it at most
    assert elbo < iwae[10] < iwae[100] < iwae[2000] <= target + 5 * se[2000], (elbo, iwae, target, se)
    assert target - iwae[2000] < 0.05 * (target - elbo), (elbo, iwae, target)  # closes in on log p(x)


def test_kl_matches_monte_carlo():
    m = vae.Model(vae.Config(point_dim=2, z_dim=3))
    torch.manual_seed(0)
    mean, logvar = torch.randn(4, 3), torch.randn(4, 3)
    z = mean.double() + torch.randn(200000, 4, 3, dtype=torch.float64) * (0.5 * logvar.double()).exp()
    draws = (vae.gaussian_log_density(z, mean.double(), logvar.double()) -
             vae.gaussian_log_density(z, 0, torch.zeros((), dtype=torch.float64))).sum(-1)
    # 5 standard errors of the float64 Monte Carlo mean, and the closed form's fp32 rounding:
    # 5 roundings a dimension and a sum of 3, of 0.5 (mean^2 + e^logvar + 1 + |logvar|) each
    tol = 5 * draws.std(0) / math.sqrt(len(draws)) + \
        (5 + 3) * U32 * (0.5 * (mean ** 2 + logvar.exp() + 1 + logvar.abs())).sum(1).double()
    assert ((m.kl(mean, logvar).double() - draws.mean(0)).abs() <= tol).all()


def test_mixture_prior_density_and_kl_against_torch_distributions():
    torch.manual_seed(0)
    m = vae.Model(vae.Config(point_dim=2, z_dim=3, prior_components=4))
    with torch.no_grad():
        m.prior_logvars.normal_(0, 0.5)
        m.prior_logits.normal_()
    D = torch.distributions
    z = 2 * torch.randn(5, 7, 3)
    # torch's density in float64 (from the same fp32 parameters and z), against the fp32 one:
    # per component 8 roundings a dimension and a sum of 3, the log weight, the
    # logsumexp over 4 (K + 3 roundings): of the largest component term's magnitude
    oracle64 = D.MixtureSameFamily(D.Categorical(logits=m.prior_logits.detach().double()),
                                   D.Independent(D.Normal(m.prior_means.detach().double(),
                                                          (0.5 * m.prior_logvars.detach().double()).exp()), 1))
    log_w, means, logvars = (t.detach().double() for t in m.mixture())
    terms = log_w.abs() + 0.5 * (LOG_2PI + logvars.abs() + (z.double()[..., None, :] - means) ** 2 * (-logvars).exp()).sum(-1)
    tol = (8 + 3 + 1 + 4 + 3) * U32 * terms.amax(-1)
    assert ((m.log_prior(z).detach().double() - oracle64.log_prob(z.double())).abs() <= tol).all()
    # The one-draw KL averages to KL(q || p) = E_q[log q - log p], here by torch's own densities
    # (float64, draws of its own): 5 standard errors of the difference of the two means, and
    # the fp32 rounding of our draws (as above, and the entropy term's 3 dimensions).
    mean, logvar = torch.randn(2, 3), torch.randn(2, 3) - 1
    eps = torch.randn(100000, 2, 3)
    zs = mean + eps * (0.5 * logvar).exp()
    ours = m.kl(mean.expand(100000, 2, 3), logvar.expand(100000, 2, 3), zs).detach().double()
    q = D.Independent(D.Normal(mean.double(), (0.5 * logvar.double()).exp()), 1)
    zq = mean.double() + torch.randn(100000, 2, 3, dtype=torch.float64) * (0.5 * logvar.double()).exp()
    theirs = q.log_prob(zq) - oracle64.log_prob(zq)
    se = (ours.var(0) / len(ours) + theirs.var(0) / len(theirs)).sqrt()
    terms = log_w.abs() + 0.5 * (LOG_2PI + logvars.abs() + (zs.double()[..., None, :] - means) ** 2 * (-logvars).exp()).sum(-1)
    rounding = ((8 + 3 + 1 + 4 + 3) * U32 * terms.amax(-1) + (3 + 3) * U32 * 0.5 * (LOG_2PI + 1 + logvar.abs()).sum(-1)).mean(0)
    assert ((ours.mean(0) - theirs.mean(0)).abs() <= 5 * se + rounding).all(), (ours.mean(0) - theirs.mean(0), se)
    # With one standard-normal component it agrees with the default prior's closed form,
    # in value and in its gradients (with respect to q's mean and log-variance).
    one = vae.Model(vae.Config(point_dim=2, z_dim=3, prior_components=1))
    with torch.no_grad():
        one.prior_means.zero_()
    plain = vae.Model(vae.Config(point_dim=2, z_dim=3))
    # In float64, as 20 batches of 10,000 draws: the estimate is their mean, its standard
    # error their spread / sqrt(20) (batch means), for the value and for each gradient.
    mu, lv = mean.double().requires_grad_(), logvar.double().requires_grad_()
    batches = []
    for _ in range(20):
        n = 10000
        mc = one.kl(mu.expand(n, 2, 3), lv.expand(n, 2, 3),
                    mu + torch.randn(n, 2, 3, dtype=torch.float64) * (0.5 * lv).exp()).mean(0)
        batches.append(torch.cat([mc.detach(), *(g.flatten() for g in torch.autograd.grad(mc.sum(), (mu, lv)))]))
    batches = torch.stack(batches)
    exact = plain.kl(mu, lv)
    want = torch.cat([exact.detach(), *(g.flatten() for g in torch.autograd.grad(exact.sum(), (mu, lv)))])
    se = batches.std(0) / math.sqrt(20)
    # 5 standard errors (an estimate from 20 batches is within 20% of the true one, so 4 true
    # ones at least); the float64 rounding is below 1e-12 of these O(1) figures
    assert ((batches.mean(0) - want).abs() <= 5 * se).all(), (batches.mean(0) - want, se)


def spy_codes(m):
    """Record the model's encoder outputs (mean, logvar) and decode_mean's (input, output)."""
    codes, latents = [], []
    encode, decode_mean = m.encode, m.decode_mean

    def enc(x):
        codes.append(encode(x))
        return codes[-1]

    def dec(z):
        latents.append((z, decode_mean(z)))
        return latents[-1][1]

    m.encode, m.decode_mean = enc, dec
    return codes, latents


@pytest.mark.summation_order
def test_mixture_prior_iwae_and_samples():
    m, x, log_p = ppca(posterior=False)
    m2 = vae.Model(vae.Config(point_dim=3, z_dim=2, prior_components=1))
    m2.encoder, m2.decoder = m.encoder, m.decoder
    with torch.no_grad():
        m2.prior_means.zero_()  # one N(0, I) component: the same model as m
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    # The same draws, the same weights but log p(z): the one component's log density, the
    # same elementwise ops as N(0, I)'s, summed over z_dim = 2 (one rounding, in any order),
    # plus log_softmax([0]) = 0 and a logsumexp over one term, x + log(exp(0)): exact.
    assert torch.equal(m2.nll(x[:16], k=50, generator=g1), m.nll(x[:16], k=50, generator=g2))
    torch.manual_seed(0)
    m3 = vae.Model(vae.Config(image_size=28, z_dim=4, width=8, prior_components=3)).eval()
    codes, latents = spy_codes(m3)
    x0 = m3.sample(12, temperature=0.0)  # every sample is a component's mean, decoded
    (z0, out), = latents
    assert out is x0
    # at temperature 0 the latent is means[k] + 0 * eps * std = means[k], exactly
    means = m3.prior_means.detach()
    which = [[k for k in range(3) if torch.equal(z0[i], means[k])] for i in range(12)]
    assert all(len(w) == 1 for w in which) and len({w[0] for w in which}) > 1  # more than one component
    a, b = torch.rand(2, 1, 28, 28) * 2 - 1, torch.rand(2, 1, 28, 28) * 2 - 1
    latents.clear()
    line = m3.interpolate(a, b, 5)  # the mixture's mass is not on a sphere: straight lines
    (za, _), (zb, _) = codes
    (z, out), = latents
    assert torch.equal(line.flatten(0, 1), out)
    # t = 0.5 exactly (linspace(0, 1, 5)): 0.5 a + 0.5 b rounds once, as (a + b) / 2 does
    assert torch.equal(z.view(2, 5, 4)[:, 2], (za + zb) / 2)


def logistic_bins(x, mean, log_scale):
    """One logistic component on the 256 bins [x - 1/255, x + 1/255] of the fp32 grid x (the
    end bins reaching to -inf and +inf), in float64 from the same fp32 inputs: (P [256],
    in the tail each bin is in, so that a difference of CDFs keeps its digits; a bound on
    the fp32 rounding of discretized_logistic_mixture_log_prob's log P for this component;
    the float64 reference's own error of log P; the density at each bin's upper edge).

    fp32: an edge (x - mean +- 1/255) / scale rounds 3 times and 1/scale = exp(-log_scale)
    once (1 ulp); log sigmoid moves by at most an argument's error, and log(1 - e^-(a - b))
    by that of a - b over e^(a - b) - 1 (its slope); each of the 3 logs and 2 adds rounds
    once more (a few u of the terms' magnitudes)."""
    xd, m, inv = x.double(), float(mean), math.exp(-float(log_scale))
    a = (xd - m + 1 / 255) * inv  # upper edges
    b = (xd - m - 1 / 255) * inv  # lower edges
    a[-1], b[0] = math.inf, -math.inf
    sig = torch.sigmoid
    p = torch.where(xd > m, sig(-b) - sig(-a), sig(a) - sig(b))
    ref = 4 * U64 * torch.where(xd > m, sig(-b) + sig(-a), sig(a) + sig(b)) / p + 4 * U64
    near = lambda e: U32 * (inv * (2 * (xd - m).abs() + 2 / 255) + 3 * e.abs().nan_to_num(posinf=0.0))
    da, db = near(a), near(b)
    F = torch.nn.functional
    l1, l2, l3 = F.logsigmoid(a), F.logsigmoid(-b), torch.log(-torch.expm1(b - a))
    err = da + db + (da + db + U32 * (a - b)) / torch.expm1(a - b) + 6 * U32 * (l1.abs() + l2.abs() + l3.abs() + 1)
    err[0] = da[0] + 6 * U32 * (l1[0].abs() + 1)      # log sigmoid(upper)
    err[-1] = db[-1] + 6 * U32 * (l2[-1].abs() + 1)   # log(1 - sigmoid(lower))
    density = sig(a) * sig(-a) * inv
    return p, err, ref, density.nan_to_num(nan=0.0)


@pytest.mark.parametrize("mean,log_scale", [(0.0, -2.0), (0.9, -7.0), (-3.0, 1.0), (0.33, -5.0), (5.0, -7.0), (0.2, 12.0)])
def test_discretized_logistic_mixture_is_normalised_and_finite(mean, log_scale):
    x = torch.linspace(-1, 1, 256)
    K = 3
    logits = torch.tensor([0.3, -1.0, 2.0]).expand(256, K)
    means = torch.tensor([mean, -mean / 2, 0.1]).expand(256, K)
    scales = torch.tensor([log_scale, -1.0, log_scale / 2]).expand(256, K)
    lp = vae.discretized_logistic_mixture_log_prob(x, logits, means, scales)
    assert torch.isfinite(lp).all()
    # The mixture in float64: P = sum_k w_k P_k. log P moves by each component's error of
    # its log, weighted by its share w_k P_k / P of the bin; log_softmax over K = 3 and the
    # logsumexp round (K + 3) u of the logits' and the terms' magnitudes more.
    bins = [logistic_bins(x, means[0, k], scales[0, k]) for k in range(K)]
    log_w = torch.log_softmax(logits[0].double(), 0)
    p = sum(log_w[k].exp() * bins[k][0] for k in range(K))
    share = [torch.where(bins[k][0] > 0, log_w[k].exp() * bins[k][0] / p, 0.0) for k in range(K)]
    weigh = lambda k, e: torch.where(share[k] > 0, share[k] * e, 0.0)
    terms = [log_w[k] + torch.where(bins[k][0] > 0, bins[k][0].log(), 0.0) for k in range(K)]
    err = sum(weigh(k, bins[k][1] + 2 * U32 * terms[k].abs()) for k in range(K)) + \
        (K + 3) * U32 * (logits[0].double().abs().max() + log_w.abs().max() + p.log().abs() + 1)
    ref = sum(weigh(k, bins[k][2]) for k in range(K)) + K * U64
    ok = p > 1e-300
    assert ((lp.double()[ok] - p[ok].log()).abs() <= err[ok] + ref[ok]).all()
    # Normalised: the 256 bins would tile the line, but for the fp32 grid's rounding (each x
    # within 3 u of -1 + 2i/255, so neighbouring edges up to 6 u apart, where the density
    # is that at the edge); and each bin's P within e^(its error) - 1 of itself.
    gaps = 6 * U32 * sum(log_w[k].exp() * bins[k][3][:-1].sum() for k in range(K)) * 1.01
    total = lp.double().exp().sum().item()
    assert abs(total - 1) <= float((p * ((err + ref).exp() - 1)).sum() + gaps + 256 * U64)
    # one component, against the logistic CDF differences computed directly in float64
    one = vae.discretized_logistic_mixture_log_prob(x, torch.zeros(256, 1), torch.full((256, 1), mean),
                                                    torch.full((256, 1), log_scale))
    p1, err1, ref1, _ = logistic_bins(x, torch.tensor(mean), torch.tensor(log_scale))
    ok = p1 > 1e-200
    assert ((one.double()[ok] - p1[ok].log()).abs() <= err1[ok] + ref1[ok]).all()


def interpolation_latents(m, xa, xb, steps):
    """m.interpolate(xa, xb, steps), with the encoder means it took (a, b) and the latents it
    decoded [B, steps, z_dim], recorded; and a check that its images are their decoding."""
    codes, latents = spy_codes(m)
    line = m.interpolate(xa, xb, steps)
    (a, _), (b, _) = codes
    (z, out), = latents
    assert torch.equal(line.flatten(0, 1), out)  # the images are decode_mean of these latents
    return line, a, b, z.view(len(a), steps, -1)


def slerp_bound(a, b, t):
    """The great circle at t, sin((1 - t) theta) / sin theta a + sin(t theta) / sin theta b,
    in float64 from the fp32 a, b [B, Z]; and a bound on interpolate's fp32 rounding of it.
    fp32: cos theta within (2Z + 8) u (cosine_similarity: dot products of Z terms, norms, a
    division), so theta within that / sin theta (acos' slope) and 2 u theta (acos); each
    weight moves by its slope in theta times that, and by 8 u of itself (two sines, a
    product, a division); z = wa a + wb b rounds 3 times more."""
    a, b = a.double(), b.double()
    Z = a.shape[1]
    cos = (a * b).sum(1, keepdim=True) / (a.norm(dim=1, keepdim=True) * b.norm(dim=1, keepdim=True))
    th = torch.acos(cos)
    sin = torch.sin(th)
    wa, wb = torch.sin((1 - t) * th) / sin, torch.sin(t * th) / sin
    dwa = ((1 - t) * torch.cos((1 - t) * th) - wa * cos) / sin  # d wa / d theta
    dwb = (t * torch.cos(t * th) - wb * cos) / sin
    dth = (2 * Z + 8) * U32 / sin + 2 * U32 * th
    tol = (dwa.abs() * dth + 8 * U32 * wa.abs()) * a.abs() + (dwb.abs() * dth + 8 * U32 * wb.abs()) * b.abs() + \
        3 * U32 * (wa.abs() * a.abs() + wb.abs() * b.abs())
    return wa * a + wb * b, tol, th


def test_interpolation_ends_at_the_reconstructions():
    # The reconstructions are the decoder's mean at the encoder's mean: the line's end
    # latents are those means (up to the rounding of weights 1 and 0: slerp_bound at t = 0,
    # 1), and its end images their decoding.
    torch.manual_seed(0)
    m = vae.Model(vae.Config(image_size=28, z_dim=4, width=8, n_mix=2)).eval()
    xa, xb = torch.rand(3, 1, 28, 28) * 2 - 1, torch.rand(3, 1, 28, 28) * 2 - 1
    line, a, b, z = interpolation_latents(m, xa, xb, 5)
    assert line.shape == (3, 5, 1, 28, 28)
    # the reconstructions' codes: the same computation again, so the same bits
    assert torch.equal(a, m.encode(xa)[0]) and torch.equal(b, m.encode(xb)[0])
    for i, t, end in ((0, 0.0, a), (-1, 1.0, b)):
        want, tol, _ = slerp_bound(a, b, t)
        assert ((z[:, i].double() - end.double()).abs() <= tol).all()
    assert m.sample(4).shape == (4, 1, 28, 28)


def test_interpolation_is_spherical_under_the_standard_normal_prior():
    # Between the ends, the latent is on the great circle through the two encoder means
    # (N(0, I)'s mass lies near a sphere, not on the chord): at t = 0.25, 0.5, 0.75.
    torch.manual_seed(0)
    m = vae.Model(vae.Config(image_size=28, z_dim=4, width=8)).eval()
    xa, xb = torch.rand(3, 1, 28, 28) * 2 - 1, torch.rand(3, 1, 28, 28) * 2 - 1
    _, a, b, z = interpolation_latents(m, xa, xb, 5)  # t = linspace(0, 1, 5): 0.25 and 0.5 exact in fp32
    for i, t in ((1, 0.25), (2, 0.5), (3, 0.75)):
        want, tol, th = slerp_bound(a, b, t)
        assert ((th > 0.1) & (th < math.pi - 0.1)).all()  # the slerp branch, well-conditioned
        assert ((z[:, i].double() - want).abs() <= tol).all(), (t, (z[:, i].double() - want).abs().max(), tol.min())
        chord = (1 - t) * a.double() + t * b.double()
        assert ((chord - want).abs() > 100 * tol).any()  # (a straight line would not pass)


def test_sampling_temperature_scales_the_latent():
    torch.manual_seed(0)
    m = vae.Model(vae.Config(image_size=28, z_dim=4, width=8)).eval()
    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
    codes, latents = spy_codes(m)
    for t in (0.0, 0.5, 1.0):
        latents.clear()
        x = m.sample(5, temperature=t, generator=torch.Generator().manual_seed(3))
        (zt, out), = latents
        # the same draws, times t: one correctly rounded product, the same bits on any CPU;
        # and the samples are their decoding
        assert torch.equal(zt, t * z) and out is x
    assert not torch.equal(m.sample(5, temperature=0.5, generator=torch.Generator().manual_seed(3)),
                           m.sample(5, generator=torch.Generator().manual_seed(3)))


def test_kl_warmup_and_beta_weight_the_kl_in_the_training_loss():
    """Training (train mode): loss = (rec + w kl) / dims, the batch means that forward logs,
    with w = min(1, step / kl_warmup) beta and step the buffer train.py writes before each
    step; evaluation (eval mode): the plain negative ELBO, w = 1."""
    torch.manual_seed(0)
    cfg = vae.Config(point_dim=2, z_dim=2, width=4, beta=0.5, kl_warmup=10)
    m = vae.Model(cfg)
    x = 4 * torch.randn(32, 2)  # far from the origin: a KL well above 0 at the start
    for step in (0, 3, 10, 25):
        m.train()
        m.step.fill_(step)
        torch.manual_seed(1)
        loss, logs = m(x)
        w = min(1.0, step / cfg.kl_warmup) * cfg.beta
        rec, kl = logs["rec"].double(), logs["kl"].double()
        # fp32: the batch mean of rec + w kl (32 terms) against the logged means of each:
        # (32 + 4) u of the terms' magnitudes, over the 2 dims
        tol = (32 + 4) * U32 * float(rec.abs() + w * kl.abs() + 1e-30) / 2
        assert abs(loss.item() - float(rec + w * kl) / 2) <= tol, (step, loss.item(), float(rec + w * kl) / 2)
        # (and far from the weights of a warm-up left out, beta left out, or no cap at 1)
        for wrong in {cfg.beta, min(1.0, step / cfg.kl_warmup), step / cfg.kl_warmup * cfg.beta} - {w}:
            assert abs(loss.item() - float(rec + wrong * kl) / 2) > 100 * tol, (step, wrong)
    m.eval()  # the plain bound: w = 1, whatever beta and step
    torch.manual_seed(1)
    loss, logs = m(x)
    rec, kl = logs["rec"].double(), logs["kl"].double()
    tol = (32 + 4) * U32 * float(rec.abs() + kl.abs()) / 2
    assert abs(loss.item() - float(rec + kl) / 2) <= tol
    assert abs(float(rec + kl) - float(rec + cfg.beta * kl)) > 100 * tol  # (beta is left out)


def test_training_lowers_the_bound_and_writes_its_pictures(shared_data, tmp_path):
    out = tmp_path / "v"
    r = subprocess.run([sys.executable, "train.py", "--model", "vae", "--width", "8", "--z-dim", "4",
                        "--batch-size", "32", "--max-iters", "60", "--eval-interval", "60", "--eval-iters", "2",
                        "--lr", "3e-3", "--warmup-iters", "5", "--kl-warmup", "20", "--log-interval", "5",
                        "--data-dir", shared_data, "--out-dir", str(out), "--sample-images", "10"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    recs = [json.loads(l) for l in open(out / "log.jsonl")]
    steps = [x for x in recs if "loss" in x]
    assert {"rec", "kl"} <= set(steps[0]) and steps[-1]["loss"] < 0.9 * steps[0]["loss"]
    evals = [x for x in recs if "val_loss" in x]
    assert evals[-1]["val_loss"] < 0.9 * evals[0]["val_loss"]
    for name in ("samples.png", "reconstructions.png", "interpolations.png"):
        assert os.path.getsize(out / name) > 100
    r = subprocess.run([sys.executable, "metrics.py", "--ckpt", str(out / "ckpt.pt"), "--n", "200",
                        "--nll-n", "20", "--temperature", "0.8", "--json", str(tmp_path / "m.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.load(open(tmp_path / "m.json"))
    bpd = m["bits/dim (20 val images, IWAE k=1000)"]
    assert "(k " not in m["what"] and "temperature 0.8" in m["what"]  # the IWAE's k is not a sampler option
    # The IWAE bound sits at or below the ELBO, as the evaluation computes it (eval mode's
    # loss, nats per dim), on the same 20 val images: below their mean over 100 draws, but
    # for 5 standard errors of the two estimates. The ELBO's from its 100 draws; the
    # reported IWAE figure's from two more IWAE runs (an image's variance is half the
    # square of their difference), both of the mean over the 20 images.
    import data
    model = checkpoint.build_from_checkpoint(checkpoint.load_checkpoint(str(out / "ckpt.pt")))[1].eval()
    x = data.load("digits", data_dir=shared_data)["val"].images[:20].float().div(127.5).sub(1)
    torch.manual_seed(0)
    with torch.no_grad():
        elbo = torch.tensor([model(x)[0].item() for _ in range(100)], dtype=torch.float64) / math.log(2)
        runs = torch.stack([model.nll(x, k=1000) for _ in range(2)]) / (x[0].numel() * math.log(2))
    se_elbo = float(elbo.std() / 10)
    se_iwae = float(((runs[0] - runs[1]) ** 2 / 2).sum().sqrt() / 20)
    assert 0 < bpd <= float(elbo.mean()) + 5 * math.hypot(se_elbo, se_iwae), (bpd, float(elbo.mean()), se_elbo, se_iwae)
