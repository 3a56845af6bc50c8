"""diffusion.py against closed forms and second computation paths, and through train.py."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from tolerances import (
    U32,
    U64,
    assert_displacements_agree,
    assert_losses_agree,
    weights_at_start,
)

import checkpoint
import diffusion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small(**kw):
    cfg = dict(channels=1, image_size=8, base=8, mults=(1, 2), num_res_blocks=1, attn_res=(4,), dropout=0.0,
               timesteps=20, num_classes=3, sample_steps=5)
    cfg.update(kw)
    torch.manual_seed(0)
    m = diffusion.Model(diffusion.Config(**cfg)).eval()
    with torch.no_grad():  # leave the zero init: the network must predict something non-trivial
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


# Tolerances below are sized from fp32 arithmetic, never from what this CPU happens to give:
# one correctly rounded fp32 operation errs by at most U relative (torch's exp, log, sqrt and
# erfc-based kernels by at most 2 U), and a bound is the sum over the operations, to first
# order, doubled where the second-order terms are left out.
U = U32  # fp32 unit roundoff (tolerances.py)


def schedule64(schedule, T):
    """(betas, alpha-bar) at index 0..T-1 in float64 from the schedules' own formulas, written
    apart from diffusion.make_betas: linear is DDPM's 1e-4..0.02 scaled by 1000/T, cosine
    has alpha-bar(t) = f(t)/f(0) with f(t) = cos^2((t/T + 0.008)/1.008 pi/2); betas capped at 0.999."""
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
    betas, ab, p = [], [], 1.0
    for i in range(T):
        b = (1e-4 + (0.02 - 1e-4) * i / (T - 1)) * 1000 / T if schedule == "linear" else 1 - f(i + 1) / f(i)
        betas.append(min(b, 0.999))
        p *= 1 - betas[-1]
        ab.append(p)
    return torch.tensor(betas, dtype=torch.float64), torch.tensor(ab, dtype=torch.float64)


# What the network predicts, per objective, as a row (r1, r2): out = r1 x0 + r2 eps, where
# x_t = a x0 + s eps, a = sqrt(ab), s = sqrt(1 - ab), and v = a eps - s x0 (Salimans & Ho 2022).
ROWS = {"eps": lambda a, s: (0.0, 1.0), "x0": lambda a, s: (1.0, 0.0), "v": lambda a, s: (-s, a)}


def x0_eps64(objective, out, xt, ab):
    """(x0, eps) from the network's output in float64: x_t = a x0 + s eps and out = r1 x0 + r2 eps
    solved by Cramer's rule (not the code's formulas)."""
    a, s = ab ** 0.5, (1 - ab) ** 0.5
    r1, r2 = ROWS[objective](a, s)
    det = a * r2 - s * r1
    return (xt * r2 - s * out) / det, (a * out - r1 * xt) / det


class Fixed(torch.nn.Module):
    """Stands in for the U-Net: returns `cond` on rows with a real label (or with none) and
    `uncond` on rows with the null label; records its inputs."""

    def __init__(self, cond, uncond=None, null=None):
        super().__init__()
        self.cond, self.uncond, self.null, self.calls = cond, uncond, null, []

    def forward(self, x, t, y=None):
        self.calls.append((x, t, y))
        k = x.shape[0] // self.cond.shape[0]
        if y is None or self.null is None:
            return self.cond.repeat(k, 1, 1, 1)
        return torch.where((y == self.null).view(-1, 1, 1, 1), self.uncond.repeat(k, 1, 1, 1),
                           self.cond.repeat(k, 1, 1, 1))


class Known(torch.nn.Module):
    """Stands in for the U-Net with a known function of (x_t, t, y), evaluated in x_t's dtype, so
    a float64 reference computes the very function the model sees: c_t x + d_t z + e_y w with
    fixed random z, w and c_t = 1/4 + (t mod 4)/8, d_t = ((t mod 3) - 1)/4, e_y = (y - 1)/4
    (dyadic: exact in both dtypes). c_t <= 5/8 is its Lipschitz constant in x; its fp32
    evaluation (3 products, 2 sums) errs by at most 3 U (|c x| + |d z| + |e w|) = 3 U mag."""

    def __init__(self, shape=(1, 1, 8, 8), seed=3):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.z, self.w, self.calls = torch.randn(shape, generator=g), torch.randn(shape, generator=g), []

    @staticmethod
    def lip(t):
        return 0.25 + (t % 4) / 8

    def terms(self, x, t, y=None):
        c = (0.25 + (t % 4).to(x.dtype) / 8).view(-1, 1, 1, 1)
        d = ((t % 3).to(x.dtype) - 1).view(-1, 1, 1, 1) / 4
        e = torch.zeros_like(c) if y is None else (y.to(x.dtype) - 1).view(-1, 1, 1, 1) / 4
        return c * x, d * self.z.to(x.dtype), e * self.w.to(x.dtype)

    def mag(self, x, t, y=None):
        return sum(p.abs() for p in self.terms(x, t, y))

    def forward(self, x, t, y=None):
        self.calls.append((x, t, y))
        cx, dz, ew = self.terms(x, t, y)
        return cx + dz + ew


def log_Phi64(z):
    """log of the standard normal CDF at the float z, in float64: erfc on the lower tail, log1p
    on the upper, and below -30 (erfc near underflow) the asymptotic series Phi(z) = phi(z)/|z|
    (1 - 1/z^2 + 3/z^4 - 15/z^6 + 105/z^8 - ...), whose truncation is < 945/z^10 < 2e-12."""
    if z > 0:
        return math.log1p(-0.5 * math.erfc(z / math.sqrt(2)))
    if z > -30:
        return math.log(0.5 * math.erfc(-z / math.sqrt(2)))
    q = 1 / (z * z)
    return -z * z / 2 - math.log(-z) - 0.5 * math.log(2 * math.pi) + math.log1p(q * (-1 + q * (3 + q * (-15 + 105 * q))))


def log_bin64(x, mean, log_scale, e_mean=0.0, e_ls=0.0):
    """(log P(bin of x), bound) for N(mean, e^(2 log_scale)) on the 8-bit grid of [-1, 1] (bins
    2/255 wide, the end bins reaching to -inf and +inf), in float64 from floats; `bound` is a
    first-order bound on the fp32 code's error at these fp32 inputs when mean and log_scale
    already err by e_mean and e_ls."""
    sd = math.exp(log_scale)
    hi, lo = (x + 1 / 255 - mean) / sd, (x - 1 / 255 - mean) / sd
    # the code's z-values: x - mean, +-1/255 (rounded), the sum, times exp(-log_scale) (2 U) rounded
    ez = (e_mean + 3 * U * (abs(x - mean) + 1 / 255)) / sd + (abs(hi) + abs(lo)) * (e_ls + 3 * U)

    def err(z, lp):  # |d log Phi/dz| = phi/Phi <= |z| + 1; log_ndtr itself within 4 U (1 + |log Phi|)
        return (abs(z) + 1) * ez + 4 * U * (1 + abs(lp))
    if x < -0.999:
        return log_Phi64(hi), err(hi, log_Phi64(hi))
    if x > 0.999:
        return log_Phi64(-lo), err(-lo, log_Phi64(-lo))
    if hi + lo > 0:  # Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi): take the side of the lower tail
        hi, lo = -lo, -hi
    lh, ll = log_Phi64(hi), log_Phi64(lo)
    if lo > -30:  # a float64 difference of CDFs, relative error ~1e-16 times Phi(hi) / P(bin)
        logp = math.log(0.5 * (math.erfc(-hi / math.sqrt(2)) - math.erfc(-lo / math.sqrt(2))))
    else:
        logp = lh + math.log1p(-math.exp(ll - lh))
    # the code takes log_hi + log1p(-exp(log_lo - log_hi)): an error in log_lo - log_hi is
    # amplified by kappa = Phi(lo) / P(bin), the conditioning of a narrow bin
    kappa = 1 / math.expm1(lh - ll)
    eh, el = err(hi, lh), err(lo, ll)
    return logp, eh + kappa * (eh + el + U * (abs(ll - lh) + 2)) + U * abs(logp)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_q_sample_moments(schedule):
    m = small(schedule=schedule, timesteps=100)
    x0 = torch.linspace(-1, 1, 5).view(5, 1, 1, 1).expand(5, 1, 8, 8)
    g = torch.Generator().manual_seed(0)
    for t in (0, 37, 99):
        tt = torch.full((5,), t)
        xs = torch.stack([m.q_sample(x0, tt, torch.randn(x0.shape, generator=g)) for _ in range(400)])
        ab = float(schedule64(schedule, 100)[1][t])
        # Monte Carlo: each of the 320 means of 400 draws has standard error sqrt((1 - ab)/400);
        # 5 of them (two-sided 5.7e-7 each, so < 1e-3 for all 1920 checks here), plus the fp32
        # sum of 400 terms, within 400 U of the sum of their sizes.
        tol = 5 * math.sqrt((1 - ab) / 400) + 400 * U * xs.abs().mean(0)
        assert ((xs.mean(0) - math.sqrt(ab) * x0).abs() <= tol).all()
        # the sample variance of 400 normals has relative standard error sqrt(2/399), their mean
        # over 320 independent elements sqrt(2/399/320): 5 of them, plus 400 U of fp32 sums
        assert xs.var(0).mean().item() == pytest.approx(1 - ab, rel=5 * math.sqrt(2 / 399 / 320) + 400 * U)


def test_schedules_closed_forms():
    b = diffusion.make_betas("linear", 1000)
    # float64 linspace: the ends within a few roundings of 2^-53 relative (16 of them allowed)
    assert b.dtype == torch.float64 and b[0] == 1e-4 and abs(b[-1] - 0.02) <= 16 * U64 * 0.02
    c = diffusion.make_betas("cosine", 1000)
    ab = torch.cumprod(1 - c, 0)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    # alpha-bar of x at paper t = 500: a float64 product of 500 factors 1 - beta = f(t+1)/f(t), each
    # within 4 roundings of 2^-53 (cos, the ratio, 1 - ratio, 1 - beta), doubled: 4000 * 2^-53
    assert float(ab[499]) == pytest.approx(f(500) / f(0), rel=4000 * U64)
    assert c.max() <= 0.999


def test_posterior_coefficients_by_bayes_rule():
    m = small(timesteps=50)
    betas = diffusion.make_betas("linear", 50)
    ab = torch.cumprod(1 - betas, 0)
    x0, xt = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.randn(3, 1, 8, 8, dtype=torch.float64)
    for t in (1, 10, 49):
        # q(x_{t-1} | x0) = N(sqrt(ab_{t-1}) x0, 1 - ab_{t-1}); q(x_t | x_{t-1}) = N(sqrt(1 - b_t) x_{t-1}, b_t):
        # the product of the two Gaussians in x_{t-1}, normalised.
        prec = 1 / (1 - ab[t - 1]) + (1 - betas[t]) / betas[t]
        mean = (ab[t - 1].sqrt() * x0 / (1 - ab[t - 1]) + (1 - betas[t]).sqrt() * xt / betas[t]) / prec
        got_mean, got_var = m.q_posterior(x0.float(), xt.float(), torch.full((3,), t))
        # fp32: x0, xt and the two coefficients rounded, two products and a sum: each product
        # within 3 U, the sum 1 U more, of |c1 x0| + |c2 xt|; doubled
        c1, c2 = ab[t - 1].sqrt() * betas[t] / (1 - ab[t]), (1 - ab[t - 1]) * (1 - betas[t]).sqrt() / (1 - ab[t])
        assert ((got_mean.double() - mean).abs() <= 8 * U * (c1 * x0.abs() + c2 * xt.abs())).all()
        # the float64 variance rounded once to fp32 (U), doubled
        assert float(got_var.flatten()[0]) == pytest.approx(float(1 / prec), rel=2 * U)
    assert m.posterior_variance[0] == 0 and torch.isfinite(m.posterior_logvar).all()
    assert torch.isfinite(m.model_logvar).all()


def sample64(net, objective, schedule, T, seq, x_T, seed, eta=None, y=None, guidance=None, null=None):
    """A float64 reference of the model's samplers over the timesteps `seq` with the stub `net`
    (a Known): DDIM (Song et al. 2021, eq. 12) with noise eta, or with eta None DDPM's ancestral
    sampling with beta-tilde over seq = T-1..0. As predict does when sampling, x0-hat is clipped
    to [-1, 1] and eps-hat recomputed from it; guidance mixes epsilons, eps_u + w (eps_c - eps_u),
    and x0-hat follows from the mixed eps. Noise: one draw from a generator seeded `seed` after
    every step but the last. Returns (x, bound), bound a first-order bound on the fp32 code's
    distance from x: each step carries the error it is given times its Lipschitz constant in x,
    and adds the errors of its own fp32 operations (each product within 4 U of its size: two
    roundings of the operands, one of the product, one of the sum it goes into)."""
    betas, ab = schedule64(schedule, T)
    g = torch.Generator().manual_seed(seed)
    x, err, B = x_T.double(), 0.0, x_T.shape[0]
    for i, t in enumerate(seq):
        tt = torch.full((B,), t)
        a, s = ab[t].sqrt(), (1 - ab[t]).sqrt()
        r1, r2 = ROWS[objective](a, s)
        det = abs(a * r2 - s * r1)
        if guidance is None:
            out = net(x, tt, y)
            x0, eps = x0_eps64(objective, out, x, ab[t])
            e_out = 3 * U * net.mag(x, tt, y)
        else:
            oc, ou = net(x, tt, y), net(x, tt, torch.full((B,), null))
            x0c, ec = x0_eps64(objective, oc, x, ab[t])
            x0u, eu = x0_eps64(objective, ou, x, ab[t])
            eps = eu + guidance * (ec - eu)
            x0 = (x - s * eps) / a
            out = ou + guidance * (oc - ou)  # what the code maps: its mix of outputs
            # each output within 3 U mag, the mix (3 operations) within 3 U (|ou| + w |oc - ou|)
            e_out = 6 * U * (1 + 2 * guidance) * (net.mag(x, tt, y) + net.mag(x, tt, torch.full((B,), null)))
        lip_out = Known.lip(t)  # the same c_t x in both halves: the mix is c_t-Lipschitz too
        # the code's x0 = (r2 x - s out) / det: 2 products, a sum, a division (3 U more)
        lip_x0 = (abs(r2) + s * lip_out) / det
        e_x0 = (4 * U * (abs(r2) * x.abs() + s * out.abs()) + s * e_out) / det + 3 * U * x0.abs()
        x0 = x0.clamp(-1, 1)  # 1-Lipschitz, exact
        if i == len(seq) - 1:
            return x0, float(lip_x0 * err + e_x0.max())
        eps = (x - a * x0) / s
        lip_eps = (1 + a * lip_x0) / s
        e_eps = (4 * U * (x.abs() + a * x0.abs()) + a * e_x0) / s + 3 * U * eps.abs()
        z = torch.randn(x.shape, generator=g).double()
        if eta is None:  # q(x_{t-1} | x_t, x0-hat) with variance beta-tilde
            ab_prev = ab[t - 1] if t > 0 else torch.tensor(1.0, dtype=torch.float64)
            c1, c2 = betas[t] * ab_prev.sqrt() / (1 - ab[t]), (1 - ab_prev) * (1 - betas[t]).sqrt() / (1 - ab[t])
            sd = (betas[t] * (1 - ab_prev) / (1 - ab[t])).sqrt()
            x_new = c1 * x0 + c2 * x + sd * z
            lip, e = c1 * lip_x0 + c2, c1 * e_x0 + 4 * U * (c1 * x0.abs() + c2 * x.abs() + sd * z.abs())
        else:  # eq. 12: sqrt(ab') x0 + sqrt(1 - ab' - sigma^2) eps + sigma z
            ab_prev = ab[seq[i + 1]]
            sigma = eta * ((1 - ab_prev) / (1 - ab[t])).sqrt() * (1 - ab[t] / ab_prev).sqrt()
            A, C = ab_prev.sqrt(), (1 - ab_prev - sigma ** 2).sqrt()
            x_new = A * x0 + C * eps + sigma * z
            lip = A * lip_x0 + C * lip_eps
            e = A * e_x0 + C * e_eps + 4 * U * (A * x0.abs() + C * eps.abs() + sigma * z.abs())
        err = float(lip * err + e.max())
        x = x_new


@pytest.mark.parametrize("objective,guidance", [("x0", None), ("v", None), ("x0", 3.0), ("v", 3.0)])
def test_ddim_respaced_with_eta_is_eq_12_in_float64(objective, guidance):
    # eps is left out here: at T = 20 alpha-bar(19) = 5.6e-11, and x0 = (x - s eps)/a amplifies
    # the fp32 rounding 1/a = 1.3e5 times: the parameterisation's conditioning, not DDIM's.
    m = small(objective=objective)  # T = 20, linear, 3 classes (null label 3)
    net = m.net = Known()
    y = torch.tensor([0, 1, 2, 1])
    xT = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    got = m.sample(4, steps=6, eta=0.5, y=y, guidance=guidance, x_T=xT, generator=torch.Generator().manual_seed(2))
    seq = [19, 15, 11, 8, 4, 0]  # 6 steps evenly from T-1 to 0: 19 - 3.8 i, rounded
    assert [int(c[1][0]) for c in net.calls] == seq
    want, bound = sample64(net, objective, "linear", 20, seq, xT, 2, eta=0.5, y=y, guidance=guidance, null=3)
    assert (got.double() - want).abs().max() <= 2 * bound, ((got.double() - want).abs().max(), bound)
    assert (want - xT.double()).abs().max() > 0.5  # the chain moved: the comparison is not of x_T with itself


def test_ddim_eta_one_over_all_steps_is_ancestral_with_beta_tilde():
    m = small(variance="small", objective="x0")
    net = m.net = Known()
    y = torch.tensor([0, 1, 2, 1])
    xT = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    a = m.sample(4, steps=0, y=y, x_T=xT, generator=torch.Generator().manual_seed(2))
    d = m.sample(4, steps=20, eta=1.0, y=y, x_T=xT, generator=torch.Generator().manual_seed(2))
    # each path against its float64 reference (ancestral; eq. 12 with eta = 1), within the
    # propagated fp32 bounds (doubled for second order), and so the two paths against each other
    seq = list(range(19, -1, -1))
    ref_a, bound_a = sample64(net, "x0", "linear", 20, seq, xT, 2, y=y)
    ref_d, bound_d = sample64(net, "x0", "linear", 20, seq, xT, 2, eta=1.0, y=y)
    assert (a.double() - ref_a).abs().max() <= 2 * bound_a
    assert (d.double() - ref_d).abs().max() <= 2 * bound_d
    assert (a - d).abs().max() <= 2 * (bound_a + bound_d), ((a - d).abs().max(), bound_a, bound_d)
    d0 = m.sample(4, steps=20, eta=0.0, y=y, x_T=xT, generator=torch.Generator().manual_seed(2))
    # the noise matters, by far more than the bounds above (~1e-5): the comparison can fail
    assert (a - d0).abs().max() > 100 * 2 * (bound_a + bound_d)


def test_ddim_eta_zero_is_deterministic_given_x_T_and_returns_x0_hat():
    m = small()
    xT = torch.randn(4, 1, 8, 8)
    a = m.sample(4, steps=7, eta=0.0, x_T=xT, generator=torch.Generator().manual_seed(1))
    b = m.sample(4, steps=7, eta=0.0, x_T=xT, generator=torch.Generator().manual_seed(99))
    assert torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1  # x0-hat, clipped when sampling
    one = m.sample(4, steps=1, eta=0.0, x_T=xT)  # one step: x0-hat straight from x_T
    assert torch.equal(one, m.predict(xT, 19)[0])  # the same operations on the same inputs


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_q_sample_coefficients_are_exact_where_alpha_bar_is_near_one(schedule):
    """x_t = sqrt(ab) x0 + sqrt(1 - ab) eps at the first steps, where ab is 0.9999 (linear,
    T = 1000): 1 - ab formed in fp32 would keep only a few digits of sqrt(1 - ab) (off by
    3e-4 of itself at t = 0). Against the float64 schedule: each coefficient one fp32
    rounding of its float64 value, then one multiplication and one addition."""
    m = small(schedule=schedule, timesteps=1000)
    _, ab = schedule64(schedule, 1000)
    for t in (0, 1, 2, 10):
        tt = torch.tensor([t])
        s = float(m.q_sample(torch.zeros(1, 1, 8, 8), tt, torch.ones(1, 1, 8, 8))[0, 0, 0, 0])
        a = float(m.q_sample(torch.ones(1, 1, 8, 8), tt, torch.zeros(1, 1, 8, 8))[0, 0, 0, 0])
        assert abs(s - math.sqrt(1 - ab[t])) <= 3 * U * math.sqrt(1 - ab[t]), (t, s, math.sqrt(1 - ab[t]))
        assert abs(a - math.sqrt(ab[t])) <= 3 * U * math.sqrt(ab[t]), (t, a)


@pytest.mark.parametrize("objective", ["v", "x0"])
def test_predict_x0_is_exact_where_alpha_bar_is_tiny(objective):
    # cosine at T = 1000: alpha-bar is 2.4e-6 at index 998 and 2.4e-9 at 999 (beta capped at
    # 0.999), a = sqrt(ab) = 1.6e-3 and 4.9e-5. Rebuilding x0 through eps, (x_t - s eps)/a,
    # turns fp32 rounding of eps into errors of U/a ~ 1e-3 in x0.
    m = small(schedule="cosine", timesteps=1000, objective=objective, num_classes=0)
    ab = schedule64("cosine", 1000)[1]
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    for t in (999, 998):
        a, s = ab[t].sqrt(), (1 - ab[t]).sqrt()
        xt = a * x0 + s * noise
        r1, r2 = ROWS[objective](a, s)
        out = r1 * x0 + r2 * noise  # the exact output, in float64
        m.net = Fixed(out.float())
        got_x0, got_eps = m.predict(xt.float(), t, clip=False)
        # fp32: x_t and out rounded (U each), a and s from the rounded alpha-bar (2 U), each
        # product within 4 U of its size, the sum 1 U of the result: 4 U (|a x_t| + s |out|) + U |x0|
        # for v (x0 = a x_t - s v); for x0 just its rounding. Doubled for second order.
        assert ((got_x0.double() - x0).abs() <= 8 * U * (a * xt.abs() + s * out.abs() + x0.abs())).all(), t
        # eps = (x_t - a x0)/s or s x_t + a v, the same count over s >= 0.99 here
        assert ((got_eps.double() - noise).abs() <= 8 * U * (xt.abs() + a * out.abs() + noise.abs()) / s).all(), t


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_guidance_is_eps_u_plus_w_times_eps_c_minus_eps_u(objective):
    m = small(objective=objective)  # T = 20, linear, 3 classes: the null label is 3
    g = torch.Generator().manual_seed(0)
    xt, oc, ou = (torch.randn(4, 1, 8, 8, generator=g) for _ in range(3))
    m.net = Fixed(oc, ou, null=3)  # the conditional and the unconditional output, fixed
    y, t = torch.tensor([0, 1, 2, 1]), 5
    ab = schedule64("linear", 20)[1][t]  # 0.40
    a, s = float(ab.sqrt()), float((1 - ab).sqrt())
    x64 = xt.double()
    _, eps_c = x0_eps64(objective, oc.double(), x64, ab)
    _, eps_u = x0_eps64(objective, ou.double(), x64, ab)
    for w, label in ((None, y), (0.0, y), (1.0, y), (3.0, y), (None, None)):
        x0, eps = m.predict(xt, t, label, guidance=w, clip=False)
        ww = (1.0 if label is not None else 0.0) if w is None else w  # no guidance: conditional, or none
        want_eps = eps_u + ww * (eps_c - eps_u)  # w = 3: the push is 3 (eps_c - eps_u), away from eps_u
        want_x0 = (x64 - s * want_eps) / a
        # fp32: the mix of outputs (3 operations) within 3 U M, M = |ou| + w |oc - ou|; the map
        # to (x0, eps) within 6 U (|x_t| + M) over min(a, s); doubled for second order
        M = ou.double().abs() + abs(ww) * (oc.double() - ou.double()).abs()
        tol = 2 * (6 * U * (x64.abs() + M) + 3 * U * M) / min(a, s)
        assert ((eps.double() - want_eps).abs() <= tol).all(), w
        assert ((x0.double() - want_x0).abs() <= tol).all(), w


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_training_target_read_from_the_loss(objective):
    T, B = 20, 16
    m = small(objective=objective, p_uncond=0.3, timesteps=T)
    x = torch.rand(B, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = torch.arange(B) % 3
    # forward draws, in this order: t = randint(0, T, (B,)), noise = randn_like(x), rand(B) for dropout
    torch.manual_seed(7)
    t, noise, drop = torch.randint(0, T, (B,)), torch.randn_like(x), torch.rand(B) < 0.3
    ab = schedule64("linear", T)[1][t].view(-1, 1, 1, 1)
    a, s = ab.sqrt(), (1 - ab).sqrt()
    x64, n64 = x.double(), noise.double()
    r1, r2 = ROWS[objective](a, s)
    target = r1 * x64 + r2 * n64
    # the code's fp32 x_t and v: two rounded coefficients, two products and a sum, within 4 U of
    # `size` (its eps and x0 targets are its inputs, exact)
    size = a * x64.abs() + s * n64.abs()
    n = target.numel()
    for out in (torch.zeros_like(x), target.float()):
        m.net = net = Fixed(out)
        torch.manual_seed(7)
        loss, _ = m(x, y)
        (xt, tt, yy), = net.calls
        assert torch.equal(tt, t) and torch.equal(yy, torch.where(drop, 3, y))
        assert ((xt.double() - (a * x64 + s * n64)).abs() <= 8 * U * size).all()  # 4 U, doubled
        if out.abs().max() == 0:
            # the loss is the mean square of the target: each square within 2 |target| 4 U size
            # + U target^2, the fp32 mean of n non-negative terms within (n + 1) U; doubled
            tol = 2 * ((8 * U * target.abs() * size + U * target ** 2).mean() + (n + 1) * U * (target ** 2).mean())
            assert abs(loss.item() - (target ** 2).mean().item()) <= tol, (loss, (target ** 2).mean())
        else:  # the true target: each difference is only the roundings, 4 U size + U |target|; doubled
            assert loss.item() <= 2 * ((4 * U * size + U * target.abs()) ** 2).mean().item(), loss


def test_label_dropout_rate_is_p_uncond():
    n, p = 20000, 0.3
    m = small(p_uncond=p)
    m.net = net = Fixed(torch.zeros(1, 1, 1, 1))  # a 1x1 image is enough: only the labels are read
    m(torch.zeros(n, 1, 1, 1), torch.randint(0, 3, (n,)))
    share = (net.calls[-1][2] == 3).double().mean().item()
    # binomial(n, p): the share has standard deviation sqrt(p (1 - p)/n) = 0.0032; 4 of them
    assert abs(share - p) <= 4 * math.sqrt(p * (1 - p) / n), share
    m(torch.zeros(8, 1, 1, 1))  # no labels: the unconditional model, the null class throughout
    assert (net.calls[-1][2] == 3).all()


NLL_CASES = [("eps", "small", "linear"), ("x0", "small", "cosine"), ("v", "small", "cosine"),
             ("eps", "large", "cosine"), ("x0", "large", "linear"), ("v", "large", "linear")]


def gauss_kl64(m1, v1, m2, v2, e_d):
    """KL(N(m1, v1) || N(m2, v2)) per element in float64, and a bound on the fp32 normal_kl's
    error in it when its m1 - m2 = d is off by e_d: 2 |d| e_d / (2 v2) from the square, and its
    ~10 operations on log-variances rounded to fp32 (U |log v|) and on terms no larger than
    2 + r + d^2/v2 (r = v1/v2), each within 4 U (1 + |log v1| + |log v2|) of that."""
    d, r = m1 - m2, v1 / v2
    lv = 1 + v1.log().abs() + v2.log().abs()
    return 0.5 * (torch.log(1 / r) + r + d ** 2 / v2 - 1), d.abs() * e_d / v2 + 4 * U * lv * (2 + r + d ** 2 / v2)


@pytest.mark.parametrize("objective,variance,schedule", NLL_CASES)
def test_nll_equals_an_independent_computation(objective, variance, schedule):
    T = 50
    m = small(num_classes=0, timesteps=T, objective=objective, variance=variance, schedule=schedule)
    net = m.net = Known()  # a network whose output the reference can evaluate in float64
    x = torch.randint(0, 256, (3, 1, 8, 8), generator=torch.Generator().manual_seed(4)).float() / 127.5 - 1
    got = m.nll(x, generator=torch.Generator().manual_seed(5))
    # The bound written out again in float64, with the same noise order (index 0..T-1), and next
    # to each term a first-order bound on the fp32 code's error in it (nll sums in float64).
    betas, ab = schedule64(schedule, T)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    bt = betas * (1 - ab_prev) / (1 - ab)  # beta-tilde, the variance of q(x_{t-1} | x_t, x0)
    g = torch.Generator().manual_seed(5)
    x64 = x.double()
    total, err = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for t in range(T):
        noise = torch.randn(x.shape, generator=g).double()
        tt = torch.full((3,), t)
        a, s = ab[t].sqrt(), (1 - ab[t]).sqrt()
        xt = a * x64 + s * noise
        out = net(xt, tt)
        x0, _ = x0_eps64(objective, out, xt, ab[t])  # from the output, by the objective's definition
        c1 = betas[t] * ab_prev[t].sqrt() / (1 - ab[t])
        c2 = (1 - ab_prev[t]) * (1 - betas[t]).sqrt() / (1 - ab[t])
        mean = c1 * x0 + c2 * xt
        # the decoder (index 0) has beta-tilde at index 1; "large" is beta above it
        var = bt[1] if t == 0 else bt[t] if variance == "small" else betas[t]
        # fp32 errors: x_t (two rounded coefficients, two products, a sum: 4 U of its size), the
        # network (Known), x0 = (r2 x_t - s out)/det (4 U of its terms, 3 U for the division),
        # each posterior mean (4 U of its terms)
        r1, r2 = ROWS[objective](a, s)
        det = abs(a * r2 - s * r1)
        e_xt = 4 * U * (a * x64.abs() + s * noise.abs())
        e_out = Known.lip(t) * e_xt + 3 * U * net.mag(xt, tt)
        e_x0 = (4 * U * (abs(r2) * xt.abs() + s * out.abs()) + abs(r2) * e_xt + s * e_out) / det + 3 * U * x0.abs()
        e_mean = c1 * e_x0 + c2 * e_xt + 4 * U * (c1 * x0.abs() + c2 * xt.abs())
        if t == 0:  # -log of the discretised Gaussian, log-scale 0.5 log var (rounded: U |log-scale|)
            ls = 0.5 * float(var.log())
            pairs = [log_bin64(xi, mi, ls, ei, U * abs(ls))
                     for xi, mi, ei in zip(x64.flatten().tolist(), mean.flatten().tolist(), e_mean.flatten().tolist())]
            term = -torch.tensor([p[0] for p in pairs], dtype=torch.float64).view_as(x)
            e = torch.tensor([p[1] for p in pairs], dtype=torch.float64).view_as(x)
        else:
            true_mean = c1 * x64 + c2 * xt
            e_true = c2 * e_xt + 4 * U * (c1 * x64.abs() + c2 * xt.abs())
            term, e = gauss_kl64(true_mean, bt[t], mean, var, e_mean + e_true + U * (true_mean - mean).abs())
        total += term.flatten(1).sum(1)
        err += e.flatten(1).sum(1)
    one = torch.tensor(1.0, dtype=torch.float64)
    prior, e = gauss_kl64(ab[-1].sqrt() * x64, 1 - ab[-1], torch.zeros_like(x64), one, 4 * U * ab[-1].sqrt() * x64.abs())
    total += prior.flatten(1).sum(1)
    err += e.flatten(1).sum(1)
    assert ((got - total).abs() <= 2 * err).all(), (got, total, err)  # first-order bound, doubled


LIKELIHOOD_CASES = ((0.3, -2.0), (-0.9, -4.0), (0.0, 0.5))  # (mean, log-scale)


def test_discretized_likelihood_sums_to_one_and_tails_are_finite():
    levels = torch.arange(256).float() / 127.5 - 1
    for mean, log_scale in LIKELIHOOD_CASES:
        logp = diffusion.discretized_gaussian_log_likelihood(levels, torch.tensor(mean), torch.tensor(log_scale))
        mean = float(torch.tensor(mean))  # the fp32 value the code sees
        ref = [log_bin64(v, mean, log_scale) for v in levels.tolist()]
        # each exp(logp) within its log's error (doubled, as in test_discretized_likelihood_at_known_bins)
        # + 2 U relative, the fp32 sum of 256 non-negative terms within 255 U
        tol = sum(math.exp(lp) * (2 * e + 2 * U) for lp, e in ref) + 255 * U
        assert abs(float(logp.exp().sum()) - 1) <= tol
    far = diffusion.discretized_gaussian_log_likelihood(torch.tensor([0.9]), torch.tensor(-0.9), torch.tensor(-5.0))
    assert torch.isfinite(far).all() and far.item() < -1000  # a true tiny probability, not log(1e-12)


def test_discretized_likelihood_at_known_bins():
    levels = torch.arange(256).float() / 127.5 - 1
    # Phi(z) = (1 + erf(z/sqrt 2))/2 written with erfc, so the lower tail keeps its digits; Q = 1 - Phi
    Phi, Q = lambda z: 0.5 * math.erfc(-z / math.sqrt(2)), lambda z: 0.5 * math.erfc(z / math.sqrt(2))
    f = lambda x, mean, ls: diffusion.discretized_gaussian_log_likelihood(
        torch.tensor([x]), torch.tensor(mean), torch.tensor(ls)).item()
    for mean, ls in LIKELIHOOD_CASES:
        got = diffusion.discretized_gaussian_log_likelihood(levels, torch.tensor(mean), torch.tensor(ls))
        mean, sd = float(torch.tensor(mean)), math.exp(ls)  # the fp32 mean the code sees
        # every bin against float64 (the bound of log_bin64 counts the fp32 code's roundings, to
        # first order; doubled)
        for v, lp in zip(levels.tolist(), got.tolist()):
            want, e = log_bin64(v, mean, ls)
            assert abs(lp - want) <= 2 * e, (v, mean, ls, lp, want)
        # spelled out: the level 1/255 (k = 128), its bin [0, 2/255], as a difference of CDFs on
        # the side of the mean it lies; the end bins, to -inf and +inf, as one CDF each
        hi, lo = (2 / 255 - mean) / sd, -mean / sd
        for v, p in ((1 / 255, Phi(hi) - Phi(lo) if mean >= 1 / 255 else Q(lo) - Q(hi)),
                     (-1.0, Phi((-1 + 1 / 255 - mean) / sd)),
                     (1.0, Q((1 - 1 / 255 - mean) / sd))):
            v = float(torch.tensor(v))  # the fp32 level the code sees
            if p > 1e-300:  # float64 CDFs underflow beyond ~37 sd: the far tail is checked below
                assert abs(f(v, mean, ls) - math.log(p)) <= 2 * log_bin64(v, mean, ls)[1], (v, mean, ls)
    # A far tail bin: 0.9 under N(-0.9, e^-10): its lower edge at z = 267 standard deviations,
    # P = Phi(-z_lo) - Phi(-z_hi) = Phi(-z_lo)(1 - e^-313 ...), and log Phi(-z) by its asymptotic
    # series -z^2/2 - log(z sqrt(2 pi)) + log(1 - 1/z^2 + 3/z^4), truncated below 15/z^6 = 4e-14.
    x, mean = float(torch.tensor(0.9)), float(torch.tensor(-0.9))
    z = (x - 1 / 255 - mean) / math.exp(-5.0)
    want = -z * z / 2 - math.log(z * math.sqrt(2 * math.pi)) + math.log1p(-1 / z ** 2 + 3 / z ** 4)
    assert abs(f(x, mean, -5.0) - want) <= 2 * log_bin64(x, mean, -5.0)[1], (f(x, mean, -5.0), want)


def test_ddpm_cifar10_preset_has_35_7M_parameters():
    p = diffusion.PRESETS["ddpm-cifar10"]
    cfg = diffusion.Config(**{k: v for k, v in p.items() if hasattr(diffusion.Config, k)})
    cfg.channels, cfg.image_size = 3, 32
    n = sum(q.numel() for q in diffusion.Model(cfg).parameters())
    assert abs(n - 35.7e6) < 0.05e6, n  # the paper's 35.7M, rounded to 0.1M


def test_image_size_not_divisible_is_refused():
    with pytest.raises(ValueError, match="divisible"):
        diffusion.Model(diffusion.Config(image_size=28, mults=(1, 2, 2, 2)))


# ---- through train.py --------------------------------------------------------------------

FAST = ["--model", "diffusion", "--preset", "tiny", "--base", "8", "--mults", "1,2", "--attn-res", "14",
        "--timesteps", "50", "--sample-steps", "5", "--sample-images", "10", "--eval-iters", "1",
        "--log-interval", "1", "--warmup-iters", "5"]


def run(*argv, timeout=300):
    return subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_loss_falls_and_ema_is_saved(shared_data, tmp_path):
    r = run(*FAST, "--max-iters", "60", "--eval-interval", "30", "--lr", "3e-3", "--data-dir", shared_data,
            "--out-dir", str(tmp_path / "d"))
    assert r.returncode == 0, r.stderr
    log = [json.loads(l) for l in open(tmp_path / "d" / "log.jsonl")]
    train = [x["loss"] for x in log if "loss" in x]
    assert sum(train[-10:]) / 10 < 0.6 * sum(train[:10]) / 10
    assert os.path.exists(tmp_path / "d" / "samples-000060.png")
    ck = torch.load(tmp_path / "d" / "ckpt.pt", weights_only=True)
    assert ck["ema"] is not None and ck["ema"].keys() == ck["model"].keys()
    assert any(not torch.equal(ck["ema"][k], ck["model"][k]) for k in ck["model"])


def test_resume_with_ema_continues_exactly(shared_data, tmp_path):
    # The first run stops at step 3, which is not an evaluation step of the uninterrupted
    # run: the extra evaluation there must not change the training noise that follows.
    common = [*FAST, "--max-iters", "6", "--eval-interval", "4", "--data-dir", shared_data, "--dtype", "fp32"]
    assert run(*common, "--out-dir", str(tmp_path / "a")).returncode == 0
    r = run(*common, "--max-iters", "3", "--lr-decay-iters", "6", "--out-dir", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    r = run(*common, "--lr-decay-iters", "6", "--out-dir", str(tmp_path / "b"), "--resume")
    assert r.returncode == 0, r.stderr
    la = {x["step"]: x["loss"] for x in map(json.loads, open(tmp_path / "a" / "log.jsonl")) if "loss" in x}
    lb = {x["step"]: x["loss"] for x in map(json.loads, open(tmp_path / "b" / "log.jsonl")) if "loss" in x}
    assert la == lb
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["ema"]
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["ema"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_runs(shared_data, tmp_path):
    r = run(*FAST, "--max-iters", "2", "--eval-interval", "2", "--dtype", "bf16", "--data-dir", shared_data,
            "--out-dir", str(tmp_path / "bf16"))
    assert r.returncode == 0, r.stderr


@pytest.mark.summation_order
def test_two_processes_equal_one_with_accumulation(shared_data, tmp_path):
    # Each micro-batch's noise (t, epsilon, label dropout) is seeded by its place in the
    # global batch, so the process count does not change the run.
    # SGD without clipping: its update is linear in the gradient, so a gradient off by
    # any factor (a sum over processes for a mean, say, which AdamW and the clip hide)
    # moves the weights by that factor.
    common = [*FAST, "--max-iters", "3", "--eval-interval", "3", "--batch-size", "4", "--data-dir", shared_data,
              "--dtype", "fp32", "--optimizer", "sgd", "--grad-clip", "0"]
    r = run(*common, "--grad-accum", "2", "--out-dir", str(tmp_path / "one"))
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "train.py", *common, "--out-dir", str(tmp_path / "ddp")], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "UserWarning" not in r.stderr, r.stderr[-2000:]  # DDP's "grad strides do not match bucket view"
    la, lb = (list(map(json.loads, open(tmp_path / d / "log.jsonl"))) for d in ("one", "ddp"))
    assert [sorted(x) for x in la] == [sorted(x) for x in lb]
    # Equal in exact arithmetic, summed in another order (tolerances.py). The longest chain
    # of reductions: a conv weight's gradient sums over the 8 images x 784 pixels of the
    # global batch; GroupNorm over 4 channels x 784 pixels; the widest conv's 3x3 x 48
    # inputs; attention over 196 positions; the 32-wide time embedding.
    n = 8 * 784 + 4 * 784 + 9 * 48 + 196 + 32
    for key in {k for x in la for k in x if "loss" in k}:
        assert_losses_agree(*({x["step"]: x[key] for x in log if key in x} for log in (la, lb)), n, key)
    a = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)
    # a conv weight's gradient sums over the 8 x 784 pixels of the global batch
    assert_displacements_agree(a["model"], b["model"], weights_at_start(a), n, terms=8 * 784, steps=3, adam=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_gradient_has_its_parameters_strides(dtype):
    # DDP's buckets take each gradient as a view when its strides are the parameter's,
    # and copy it (with a UserWarning) when not; a 1x1 nn.Conv2d's weight got [c, 1, c, c]
    # for its [c, 1, 1, 1] in attention's projection, the layout of its transposed input
    cfg = diffusion.Config(base=8, mults=(1, 2), attn_res=(14,), timesteps=50)
    torch.manual_seed(0)
    model = diffusion.Model(cfg)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss, _ = model(torch.randn(4, 1, 28, 28))
    loss.float().backward()
    assert [(n, p.grad.stride()) for n, p in model.named_parameters() if p.grad.stride() != p.stride()] == []


def test_conv1x1_is_a_1x1_conv2d_and_loads_its_checkpoints():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, 1)
    torch.manual_seed(0)
    ours = diffusion.Conv1x1(8, 16)
    assert torch.equal(ours.weight, conv.weight.flatten(1)) and torch.equal(ours.bias, conv.bias)  # same draws
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(ours(x), conv(x))  # the same convolution, on a view of the same weight
    fresh = diffusion.Conv1x1(8, 16)
    # a [16, 8, 1, 1] weight from an older checkpoint, converted where checkpoints are loaded
    checkpoint.load_state(fresh, conv.state_dict(), "diffusion")
    assert torch.equal(fresh.weight, ours.weight)


def test_two_processes_in_bf16_warn_nothing(shared_data, tmp_path):
    # the design's headline command, torchrun with 2 processes, small; bf16 is where this
    # CPU's oneDNN gave the 1x1 convolutions' gradients other strides
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "train.py", *FAST, "--max-iters", "2", "--eval-interval", "2", "--batch-size", "4",
                        "--dtype", "bf16", "--data-dir", shared_data, "--out-dir", str(tmp_path / "ddp")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "UserWarning" not in r.stderr, r.stderr[-2000:]


def test_sample_py_ddim_guidance_label(shared_data, tmp_path):
    r = run(*FAST, "--max-iters", "2", "--eval-interval", "2", "--data-dir", shared_data,
            "--out-dir", str(tmp_path / "s"))
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "sample.py", "--ckpt", str(tmp_path / "s" / "ckpt.pt"), "--steps", "5",
                        "--eta", "0", "--guidance", "2", "--label", "3", "--num-samples", "4",
                        "--out", str(tmp_path / "three.png")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert os.path.getsize(tmp_path / "three.png") > 100
