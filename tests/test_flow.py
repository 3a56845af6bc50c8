"""diffusion.py's flow objective against loops written out here and closed forms."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from tolerances import U32 as U

import diffusion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flow(**kw):
    cfg = dict(channels=1, image_size=4, base=8, mults=(1,), num_res_blocks=1, attn_res=(), dropout=0.0,
               timesteps=20, num_classes=3, sample_steps=5, objective="flow")
    cfg.update(kw)
    return diffusion.Model(diffusion.Config(**cfg)).eval()


class Field(torch.nn.Module):
    """A fixed velocity field in place of the U-Net, per pixel and label:
    v(x, t, y) = a tanh(x) + t b + c[y], t = the network's time input / T. In float64 with
    `mag`, the size of its terms, so the fp32 call's error is within 8 U mag (tanh 2 U, the
    division, 2 products, 2 sums and the rounding of a, b and c). Lipschitz in x: max |a|."""

    def __init__(self, T, classes=4):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.T = T
        self.a, self.b = torch.randn(1, 1, 4, 4, generator=g), torch.randn(1, 1, 4, 4, generator=g)
        self.c = torch.randn(classes, 1, 4, 4, generator=g)
        self.calls = []

    def forward(self, x, t, y=None):
        self.calls.append((x.clone(), t.clone(), None if y is None else y.clone()))
        c = self.c[y] if y is not None else self.c[-1:]
        return self.a * torch.tanh(x) + (t / self.T).view(-1, 1, 1, 1) * self.b + c

    def exact(self, x, t, y):  # float64, t in [0, 1] (a number, or one per row of x)
        c = (self.c[y] if y is not None else self.c[-1:]).double()
        t = t.view(-1, 1, 1, 1) if torch.is_tensor(t) else t
        terms = (self.a.double() * torch.tanh(x), t * self.b.double(), c)
        return sum(terms), sum(u.abs() for u in terms)


def euler64(field, x, steps, y, guidance, null):
    """x <- x + (t' - t) v(x, t) from t = 1 to 0 over `steps` uniform steps, in float64,
    v guided as v_u + w (v_c - v_u). Returns (x, bound): a first-order bound on the fp32
    code's distance from x, each step carrying the error it is given times (1 + |dt| L)
    (L: the field's Lipschitz constant) and adding its own: v within 8 U mag (Field) and
    the guidance mix (3 operations) within 3 U of its terms, dt v within 2 U (dt and the
    product rounded), the sum within U of x."""
    L = field.a.abs().max().item() * (1 if guidance is None else 1 + 2 * guidance)

    def v64(x, t):
        if guidance is None:
            v, mag = field.exact(x, t, y)
            return v, 8 * U * mag
        (vc, mc), (vu, mu) = field.exact(x, t, y), field.exact(x, t, torch.full_like(y, null))
        v = vu + guidance * (vc - vu)
        return v, 8 * U * (1 + 2 * guidance) * (mc + mu) + 3 * U * (vu.abs() + guidance * (vc - vu).abs())

    ts = [1 - i / steps for i in range(steps + 1)]
    x, err = x.double(), 0.0
    for i in range(steps):
        dt = ts[i + 1] - ts[i]
        v, e_v = v64(x, ts[i])
        x = x + dt * v
        err = (1 + abs(dt) * L) * err + (abs(dt) * e_v + 2 * U * abs(dt) * v.abs() + U * x.abs()).max().item()
    return x, 2 * err  # doubled for the second-order terms


@pytest.mark.parametrize("guidance", [None, 2.5])
def test_sampler_with_a_fixed_field_equals_the_loop(guidance):
    T, steps, n = 20, 7, 6
    m = flow(timesteps=T)
    m.net = field = Field(T)
    y = torch.arange(n) % 3
    x_T = torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    got = m.sample(n, steps=steps, y=y, guidance=guidance, x_T=x_T)
    want, bound = euler64(field, x_T, steps, y, guidance, null=3)
    assert ((got.double() - want).abs() <= bound).all(), ((got.double() - want).abs().max(), bound)
    # the times the network saw, one call a step: t * T on the uniform grid from 1 down to
    # 1/steps (t = 0 is where the last step lands, never evaluated)
    assert [round(c[1][0].item() / T * steps) for c in field.calls] == list(range(steps, 0, -1))
    if guidance is not None:  # both halves: the labels, then the null label
        assert all(torch.equal(c[2], torch.cat([y, torch.full_like(y, 3)])) for c in field.calls)


def test_sampler_checks_its_arguments():
    m = flow()
    for kw in (dict(eta=0.5), dict(steps=0)):
        with pytest.raises(ValueError, match="flow samples"):
            m.sample(2, **kw)
    with pytest.raises(ValueError, match="sample_steps"):
        flow(sample_steps=0)
    with pytest.raises(ValueError, match="flow_time"):
        flow(flow_time="beta")


@pytest.mark.parametrize("flow_time", ["logit-normal", "uniform"])
def test_training_target_read_from_the_loss(flow_time):
    T, B = 20, 16
    m = flow(timesteps=T, flow_time=flow_time, p_uncond=0.3)
    m.net = field = Field(T)
    x = torch.rand(B, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = torch.arange(B) % 3
    # forward draws, in this order: t (sigmoid of randn(B), or rand(B)), noise = randn_like(x),
    # rand(B) for the label dropout; t as fp32 computes it, so only what follows is bounded
    torch.manual_seed(7)
    t = (torch.randn(B).sigmoid() if flow_time == "logit-normal" else torch.rand(B)).double()
    noise, drop = torch.randn_like(x).double(), torch.rand(B) < 0.3
    torch.manual_seed(7)
    loss, _ = m(x, y)
    (xt, tt, yy), = field.calls
    tb, x64 = t.view(-1, 1, 1, 1), x.double()
    # fp32: the product t * T, one rounding
    assert ((tt.double() - t * T).abs() <= U * t * T).all()
    assert torch.equal(yy, torch.where(drop, 3, y))
    # x_t = (1 - t) x + t eps: 1 - t rounded (U of itself), two products and a sum, each
    # within U of |1 - t| |x| + t |eps|: 4 U, doubled
    size = (1 - tb) * x64.abs() + tb * noise.abs()
    assert ((xt.double() - ((1 - tb) * x64 + tb * noise)).abs() <= 8 * U * size).all()
    # the loss: the mean square of v(x_t) - (eps - x); the field's error 8 U of its terms,
    # the target's U of |eps| + |x|, each square 2 |d| times those plus U d^2, then the
    # mean of B * 16 terms within (n + 1) U; doubled
    v, mag = field.exact(xt.double(), tt.double() / T, yy)
    d = v - (noise - x64)
    e = 8 * U * mag + U * (noise.abs() + x64.abs())
    n = d.numel()
    tol = 2 * ((2 * d.abs() * e + U * d ** 2).mean() + (n + 1) * U * (d ** 2).mean())
    assert abs(loss.item() - (d ** 2).mean().item()) <= tol


def test_training_times_follow_their_distribution():
    n = 20000
    for flow_time, below in (("logit-normal", 0.5 * math.erfc(math.log(3) / math.sqrt(2))), ("uniform", 0.25)):
        m = flow(image_size=1, mults=(1,), flow_time=flow_time, num_classes=0)
        m.net = field = Field(1)
        field.a, field.b, field.c = (torch.zeros(1, 1, 1, 1),) * 2 + (torch.zeros(4, 1, 1, 1),)
        torch.manual_seed(0)
        m(torch.zeros(n, 1, 1, 1))
        share = (field.calls[0][1] / 20 < 0.25).double().mean().item()  # the network sees t * T, T = 20
        # P(t < 1/4): for sigmoid(N(0, 1)), P(N < logit(1/4) = -ln 3) = Phi(-ln 3) = 0.136;
        # the binomial share's standard deviation is sqrt(p (1 - p) / n); 4 of them
        assert abs(share - below) <= 4 * math.sqrt(below * (1 - below) / n), (flow_time, share)


class Gaussian(torch.nn.Module):
    """The exact velocity of flow on data N(mu, diag(sd^2)): x_t = (1 - t) x0 + t eps is
    Gaussian jointly with x0 and eps, so v(x, t) = E[eps - x0 | x_t = x] =
    (t - (1 - t) sd^2) / ((1 - t)^2 sd^2 + t^2) (x - (1 - t) mu) - mu, linear in x."""

    def __init__(self, mu, sd, T):
        super().__init__()
        self.mu, self.sd, self.T = mu, sd, T

    def forward(self, x, t, y=None):
        t = (t / self.T).view(-1, 1, 1, 1)
        var = (1 - t) ** 2 * self.sd ** 2 + t ** 2
        return (t - (1 - t) * self.sd ** 2) / var * (x - (1 - t) * self.mu) - self.mu


@pytest.mark.parametrize("spread", ["wide", "sharp"])
def test_nll_is_the_gaussian_log_density(spread):
    """On Gaussian data with the exact field, nll is -log N(x + u; mu, sd^2) - D log(2/255),
    u the dequantization noise drawn first from the generator. The divergence estimate is
    exact here: the field's Jacobian is diagonal and z^T diag(d) z = sum(d) for z of +-1."""
    g = torch.Generator().manual_seed(0)
    mu = torch.rand(1, 1, 4, 4, generator=g) - 0.5
    sd = torch.rand(1, 1, 4, 4, generator=g) * (0.5 if spread == "wide" else 0.02) + (0.2 if spread == "wide"
                                                                                      else 0.005)
    x = (mu + sd * torch.randn(8, 1, 4, 4, generator=g)).clamp(-1, 1)
    D = 16
    errors = {}
    for T in (64, 128):
        m = flow(timesteps=T, num_classes=0)
        m.net = Gaussian(mu, sd, T)
        got = m.nll(x, generator=torch.Generator().manual_seed(1)).double()
        u = (torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) - 0.5) * (2 / 255)
        z = ((x + u).double() - mu.double()) / sd.double()
        log_p = (-0.5 * z ** 2 - sd.double().log() - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
        want = -log_p - D * math.log(2 / 255)
        errors[T] = (got - want).abs().max().item()
    # Heun is second order: halving the step divides its error by 4 (the cubic grid is a
    # smooth map of a uniform one, so the order holds); 3 to 5.5 leaves room for the next
    # term and for fp32's rounding, which is random and far smaller here (its worst case,
    # 2 T steps rounding D values of x by U, each moving log p by |grad log p| <= 3 / sd,
    # sums to 1e-2 for the sharp data; a random walk of those roundings to 1e-4).
    ratio = errors[64] / errors[128]
    assert 3 <= ratio <= 5.5, errors
    # and the size itself, against nll_flow's docstring: 0.005 nats a value at T = 100 for
    # the sharpest data, so at most that at T = 128
    assert errors[128] / D <= 0.005, errors


def test_hutchinson_estimate_is_unbiased_for_a_dense_jacobian():
    """v = M x with a dense M: every divergence estimate z^T M z has mean tr M (z of +-1)
    and variance 2 sum_{i != j} S_ij^2, S = (M + M^T) / 2. nll's divergence part is
    -(nll + D log(2/255)) - log N(x_1; 0, I), with x_1 from a Heun loop written out here."""
    D, n, T = 16, 4000, 8
    g = torch.Generator().manual_seed(0)
    M = 0.3 * torch.randn(D, D, generator=g)

    class Linear(torch.nn.Module):
        def forward(self, x, t, y=None):
            return (x.flatten(1) @ M.T).view_as(x)

    m = flow(timesteps=T, num_classes=0)
    m.net = Linear()
    x = torch.zeros(n, 1, 4, 4)
    nll = m.nll(x, generator=torch.Generator().manual_seed(1)).double()
    u = (torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) - 0.5) * (2 / 255)
    x1, M64 = (x + u).double().flatten(1), M.double()
    ts = [(i / T) ** 3 for i in range(T + 1)]
    for i in range(T):
        h = ts[i + 1] - ts[i]
        v1 = x1 @ M64.T
        x1 = x1 + 0.5 * h * (v1 + (x1 + h * v1) @ M64.T)
    log_prior = -0.5 * (x1 ** 2).sum(1) - 0.5 * D * math.log(2 * math.pi)
    div = -(nll + D * math.log(2 / 255)) - log_prior
    S = (M64 + M64.T) / 2
    sd = math.sqrt(2 * ((S ** 2).sum() - (S.diag() ** 2).sum()).item())
    # the mean of n independent estimates: within 4 standard deviations of tr M
    assert abs(div.mean().item() - M64.trace().item()) <= 4 * sd / math.sqrt(n), (div.mean(), M64.trace())
    # and its spread is the estimator's: a sum of D (D - 1) / 2 = 120 independent terms, nearly
    # normal, whose sample sd over n has a standard error of sd / sqrt(2 n) = 1.1%; 4 of them
    assert div.std().item() == pytest.approx(sd, rel=4 / math.sqrt(2 * n))


# ---- through train.py, sample.py and metrics.py -------------------------------------------

FAST = ["--model", "diffusion", "--preset", "tiny", "--objective", "flow", "--base", "8", "--mults", "1,2",
        "--attn-res", "14", "--timesteps", "20", "--sample-steps", "5", "--sample-images", "10",
        "--eval-iters", "1", "--log-interval", "1", "--warmup-iters", "5"]


def test_flow_trains_samples_and_reports_bits_per_dim(shared_data, tmp_path):
    out = tmp_path / "f"
    r = subprocess.run([sys.executable, "train.py", *FAST, "--max-iters", "60", "--eval-interval", "30",
                        "--lr", "3e-3", "--data-dir", shared_data, "--out-dir", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    train = [x["loss"] for x in map(json.loads, open(out / "log.jsonl")) if "loss" in x]
    # a smoke check, not a derived bound: the loss starts near E|eps - x0|^2 (about 1.5 on
    # digits) and learning must take a good part of it away
    assert sum(train[-10:]) / 10 < 0.6 * sum(train[:10]) / 10
    r = subprocess.run([sys.executable, "sample.py", "--ckpt", str(out / "ckpt.pt"), "--steps", "3",
                        "--guidance", "2", "--num-samples", "4", "--out", str(tmp_path / "s.png")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and os.path.getsize(tmp_path / "s.png") > 0, r.stderr
    r = subprocess.run([sys.executable, "sample.py", "--ckpt", str(out / "ckpt.pt"), "--eta", "1",
                        "--out", str(tmp_path / "e.png")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error:"), r.stderr
    r = subprocess.run([sys.executable, "metrics.py", "--ckpt", str(out / "ckpt.pt"), "--n", "50", "--nll-n", "4",
                        "--data-dir", shared_data, "--steps", "2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    table = json.load(open(out / "metrics-classifier.json"))
    assert "steps 2" in r.stdout and table["FID"] > 0
    # a smoke check of the row, not a derived bound: a bound on -log P is positive, and a
    # barely trained model's is near the 8 bits of a uniform guess
    assert 0 < table["bits/dim (4 val images)"] < 12, table
