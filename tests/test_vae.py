"""vae.py against closed forms: probabilistic PCA, the Gaussian KL, a normalised decoder."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

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
    Minv = torch.linalg.inv(W.T @ W + s2 * torch.eye(Z))
    A, c, logvar = Minv @ W.T, -(Minv @ W.T @ b), torch.log(s2 * torch.diag(Minv))
    if not posterior:  # shrunk and too wide: a q the bound has to pay for
        A, c, logvar = 0.6 * A, 0.6 * c, logvar + 1.0
    m.encoder = Affine(A, c, logvar)
    exact = torch.distributions.MultivariateNormal(b, W @ W.T + s2 * torch.eye(D))
    x = exact.sample((256,))
    return m.eval(), x, exact.log_prob(x)


def test_ppca_exact_posterior_makes_the_elbo_the_likelihood():
    m, x, log_p = ppca(posterior=True)
    # log p(x, z) - log q(z | x) = log p(x) for every z when q is the posterior: every
    # importance weight is p(x), whatever k.
    torch.testing.assert_close(-m.nll(x, k=7), log_p.double(), atol=1e-4, rtol=1e-5)
    # The ELBO (analytic KL, one z) equals log p(x) in expectation over z.
    many = m.elbo(x[:8].repeat(4000, 1)).view(4000, 8).double().mean(0)
    torch.testing.assert_close(many, log_p[:8].double(), atol=0.05, rtol=0)


def test_ppca_elbo_below_iwae_below_likelihood_and_iwae_converges():
    m, x, log_p = ppca(posterior=False)
    g = torch.Generator().manual_seed(1)
    x = x[:64].repeat(8, 1)
    target = log_p[:64].mean().double()
    elbo = m.elbo(x, generator=g).double().mean()
    iwae = {k: -m.nll(x, k=k, chunk=100, generator=g).mean() for k in (1, 10, 100, 2000)}
    assert abs(iwae[1] - elbo) < 0.1  # IWAE with one sample is the ELBO in expectation
    assert elbo < iwae[10] < iwae[100] < iwae[2000] <= target + 1e-3, (elbo, iwae, target)
    assert target - iwae[2000] < 0.05 * (target - elbo), (elbo, iwae, target)  # closes in on log p(x)


def test_kl_matches_monte_carlo():
    m = vae.Model(vae.Config(point_dim=2, z_dim=3))
    torch.manual_seed(0)
    mean, logvar = torch.randn(4, 3), torch.randn(4, 3)
    z = mean + torch.randn(200000, 4, 3) * (0.5 * logvar).exp()
    mc = (vae.gaussian_log_density(z, mean, logvar) - vae.gaussian_log_density(z, 0, torch.zeros(()))).sum(-1).mean(0)
    torch.testing.assert_close(m.kl(mean, logvar), mc, atol=0.03, rtol=0.01)


def test_mixture_prior_density_and_kl_against_torch_distributions():
    torch.manual_seed(0)
    m = vae.Model(vae.Config(point_dim=2, z_dim=3, prior_components=4))
    with torch.no_grad():
        m.prior_logvars.normal_(0, 0.5)
        m.prior_logits.normal_()
    D = torch.distributions
    oracle = D.MixtureSameFamily(D.Categorical(logits=m.prior_logits.detach()),
                                 D.Independent(D.Normal(m.prior_means.detach(), (0.5 * m.prior_logvars.detach()).exp()), 1))
    z = 2 * torch.randn(5, 7, 3)
    torch.testing.assert_close(m.log_prior(z).detach(), oracle.log_prob(z), atol=1e-5, rtol=1e-5)
    # The one-draw KL averages to KL(q || p) = E_q[log q - log p], here by torch's own densities.
    mean, logvar = torch.randn(2, 3), torch.randn(2, 3) - 1
    eps = torch.randn(100000, 2, 3)
    ours = m.kl(mean.expand(100000, 2, 3), logvar.expand(100000, 2, 3), mean + eps * (0.5 * logvar).exp()).detach().mean(0)
    q = D.Independent(D.Normal(mean, (0.5 * logvar).exp()), 1)
    zq = mean + torch.randn(100000, 2, 3) * (0.5 * logvar).exp()  # draws of its own
    torch.testing.assert_close(ours, (q.log_prob(zq) - oracle.log_prob(zq)).mean(0), atol=0.03, rtol=0.01)
    # With one standard-normal component it agrees with the default prior's closed form,
    # in value and in its gradients (with respect to q's mean and log-variance).
    one = vae.Model(vae.Config(point_dim=2, z_dim=3, prior_components=1))
    with torch.no_grad():
        one.prior_means.zero_()
    plain = vae.Model(vae.Config(point_dim=2, z_dim=3))
    n = 200000
    mu, lv = mean.clone().requires_grad_(), logvar.clone().requires_grad_()
    mc = one.kl(mu.expand(n, 2, 3), lv.expand(n, 2, 3), mu + torch.randn(n, 2, 3) * (0.5 * lv).exp()).mean(0)
    g_mc = torch.autograd.grad(mc.sum(), (mu, lv))
    exact = plain.kl(mu, lv)
    g_exact = torch.autograd.grad(exact.sum(), (mu, lv))
    torch.testing.assert_close(mc, exact, atol=0.03, rtol=0.01)
    for a, b in zip(g_mc, g_exact):
        torch.testing.assert_close(a, b, atol=0.03, rtol=0.02)


def test_mixture_prior_iwae_and_samples():
    m, x, log_p = ppca(posterior=False)
    m2 = vae.Model(vae.Config(point_dim=3, z_dim=2, prior_components=1))
    m2.encoder, m2.decoder = m.encoder, m.decoder
    with torch.no_grad():
        m2.prior_means.zero_()  # one N(0, I) component: the same model as m
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    torch.testing.assert_close(m2.nll(x[:16], k=50, generator=g1), m.nll(x[:16], k=50, generator=g2))
    torch.manual_seed(0)
    m3 = vae.Model(vae.Config(image_size=28, z_dim=4, width=8, prior_components=3)).eval()
    x0 = m3.sample(12, temperature=0.0)  # every sample is a component's mean, decoded
    centres = m3.decode_mean(m3.prior_means.detach())
    nearest = (x0[:, None] - centres[None]).flatten(2).abs().amax(2).argmin(1)
    torch.testing.assert_close(x0, centres[nearest])
    assert len(set(nearest.tolist())) > 1  # more than one component drawn
    a, b = torch.rand(2, 1, 28, 28) * 2 - 1, torch.rand(2, 1, 28, 28) * 2 - 1
    za, zb = m3.encode(a)[0], m3.encode(b)[0]  # the mixture's mass is not on a sphere: straight lines
    torch.testing.assert_close(m3.interpolate(a, b, 5)[:, 2], m3.decode_mean((za + zb) / 2))


@pytest.mark.parametrize("mean,log_scale", [(0.0, -2.0), (0.9, -7.0), (-3.0, 1.0), (0.33, -5.0), (5.0, -7.0), (0.2, 12.0)])
def test_discretized_logistic_mixture_is_normalised_and_finite(mean, log_scale):
    x = torch.linspace(-1, 1, 256)
    K = 3
    logits = torch.tensor([0.3, -1.0, 2.0]).expand(256, K)
    means = torch.tensor([mean, -mean / 2, 0.1]).expand(256, K)
    scales = torch.tensor([log_scale, -1.0, log_scale / 2]).expand(256, K)
    lp = vae.discretized_logistic_mixture_log_prob(x, logits, means, scales)
    assert torch.isfinite(lp).all()
    assert abs(lp.double().exp().sum().item() - 1) < 1e-5
    # one component, against the logistic CDF differences computed directly in float64
    one = vae.discretized_logistic_mixture_log_prob(x, torch.zeros(256, 1), torch.full((256, 1), mean),
                                                    torch.full((256, 1), log_scale))
    edges = torch.cat([torch.tensor([-math.inf]), (x[:-1] + 1 / 255).double(), torch.tensor([math.inf])])
    u = (edges - mean) / math.exp(log_scale)
    # float64 differences of CDFs, taken in the tail each bin is in so that they keep their digits
    p = torch.where(x.double() > mean, torch.sigmoid(-u[:-1]) - torch.sigmoid(-u[1:]),
                    torch.sigmoid(u[1:]) - torch.sigmoid(u[:-1]))
    ok = p > 1e-200
    torch.testing.assert_close(one.double()[ok], p[ok].log(), atol=2e-3, rtol=1e-4)


def test_interpolation_ends_at_the_reconstructions():
    torch.manual_seed(0)
    m = vae.Model(vae.Config(image_size=28, z_dim=4, width=8, n_mix=2)).eval()
    xa, xb = torch.rand(3, 1, 28, 28) * 2 - 1, torch.rand(3, 1, 28, 28) * 2 - 1
    line = m.interpolate(xa, xb, 5)
    assert line.shape == (3, 5, 1, 28, 28)
    torch.testing.assert_close(line[:, 0], m.reconstruct(xa), atol=1e-5, rtol=0)
    torch.testing.assert_close(line[:, -1], m.reconstruct(xb), atol=1e-5, rtol=0)
    assert m.sample(4).shape == (4, 1, 28, 28)


def test_sampling_temperature_scales_the_latent():
    torch.manual_seed(0)
    m = vae.Model(vae.Config(image_size=28, z_dim=4, width=8)).eval()
    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
    for t in (0.0, 0.5, 1.0):
        x = m.sample(5, temperature=t, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(x, m.decode_mean(t * z))
    assert not torch.equal(m.sample(5, temperature=0.5, generator=torch.Generator().manual_seed(3)),
                           m.sample(5, generator=torch.Generator().manual_seed(3)))


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
    # The IWAE bound sits at or below the ELBO that the last evaluation reported.
    assert 0 < bpd <= evals[-1]["val_loss"] / math.log(2) * 1.1, (bpd, evals[-1])
