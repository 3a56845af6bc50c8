"""diffusion.py against closed forms and second computation paths, and through train.py."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

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


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_q_sample_moments(schedule):
    m = small(schedule=schedule, timesteps=100)
    x0 = torch.linspace(-1, 1, 5).view(5, 1, 1, 1).expand(5, 1, 8, 8)
    g = torch.Generator().manual_seed(0)
    for t in (0, 37, 99):
        tt = torch.full((5,), t)
        xs = torch.stack([m.q_sample(x0, tt, torch.randn(x0.shape, generator=g)) for _ in range(400)])
        ab = float(torch.cumprod(1 - diffusion.make_betas(schedule, 100), 0)[t])
        assert torch.allclose(xs.mean(0), math.sqrt(ab) * x0, atol=4 * math.sqrt((1 - ab) / 400) + 1e-6)
        assert xs.var(0).mean().item() == pytest.approx(1 - ab, rel=0.05)


def test_schedules_closed_forms():
    b = diffusion.make_betas("linear", 1000)
    assert b.dtype == torch.float64 and b[0] == 1e-4 and abs(b[-1] - 0.02) < 1e-15
    c = diffusion.make_betas("cosine", 1000)
    ab = torch.cumprod(1 - c, 0)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    assert float(ab[499]) == pytest.approx(f(500) / f(0), rel=1e-9)  # alpha-bar of x at paper t = 500
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
        assert torch.allclose(got_mean.double(), mean, atol=1e-5)
        assert float(got_var.flatten()[0]) == pytest.approx(float(1 / prec), rel=1e-5)
    assert m.posterior_variance[0] == 0 and torch.isfinite(m.posterior_logvar).all()
    assert torch.isfinite(m.model_logvar).all()


def test_ddim_eta_one_over_all_steps_is_ancestral_with_beta_tilde():
    m = small(variance="small")
    y = torch.tensor([0, 1, 2, 1])
    xT = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    a = m.sample(4, steps=0, y=y, x_T=xT, generator=torch.Generator().manual_seed(2))
    d = m.sample(4, steps=20, eta=1.0, y=y, x_T=xT, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(a, d, atol=1e-4), (a - d).abs().max()
    d0 = m.sample(4, steps=20, eta=0.0, y=y, x_T=xT, generator=torch.Generator().manual_seed(2))
    assert (a - d0).abs().max() > 1e-2  # the noise matters: the test can fail


def test_ddim_eta_zero_is_deterministic_given_x_T_and_returns_x0_hat():
    m = small()
    xT = torch.randn(4, 1, 8, 8)
    a = m.sample(4, steps=7, eta=0.0, x_T=xT, generator=torch.Generator().manual_seed(1))
    b = m.sample(4, steps=7, eta=0.0, x_T=xT, generator=torch.Generator().manual_seed(99))
    assert torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1  # x0-hat, clipped when sampling
    one = m.sample(4, steps=1, eta=0.0, x_T=xT)  # one step: x0-hat straight from x_T
    assert torch.allclose(one, m.predict(xT, 19)[0])


def test_guidance_one_is_plain_conditional_and_others_differ():
    m = small()
    y = torch.tensor([0, 1, 2, 0])
    xT = torch.randn(4, 1, 8, 8)
    plain = m.sample(4, steps=5, y=y, x_T=xT)
    neutral = m.sample(4, steps=5, y=y, x_T=xT, guidance=1.0)
    strong = m.sample(4, steps=5, y=y, x_T=xT, guidance=3.0)
    assert torch.allclose(plain, neutral, atol=1e-5)
    assert (plain - strong).abs().max() > 1e-2


def test_training_loss_targets_and_label_dropout():
    m = small(objective="v", p_uncond=0.5)
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    loss, _ = m(x, torch.zeros(16, dtype=torch.long))
    assert loss.ndim == 0 and torch.isfinite(loss)
    for obj in ("eps", "x0", "v"):  # each parameterisation recovers x0 from a perfect prediction
        mm = small(objective=obj)
        t = torch.full((16,), 7)
        noise = torch.randn_like(x)
        xt = mm.q_sample(x, t, noise)
        ab = mm._at("alphas_cumprod", t, x)
        target = {"eps": noise, "x0": x, "v": ab.sqrt() * noise - (1 - ab).sqrt() * x}[obj]
        eps = mm._eps(target, xt, t)
        assert torch.allclose(eps, noise, atol=1e-4)


def test_nll_equals_an_independent_computation():
    m = small(num_classes=0, timesteps=50)
    x = (torch.randint(0, 256, (3, 1, 8, 8)).float() / 127.5 - 1)
    got = m.nll(x, generator=torch.Generator().manual_seed(5))
    # The bound written out again in float64, with the same noise order (index 0..T-1).
    T = 50
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64) * (1000 / T)  # DDPM's range, scaled to T
    ab = torch.cumprod(1 - betas, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    g = torch.Generator().manual_seed(5)
    x64 = x.double()
    total = torch.zeros(3, dtype=torch.float64)

    def gauss_kl(m1, v1, m2, v2):
        return 0.5 * (torch.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1)
    for t in range(T):
        noise = torch.randn(x.shape, generator=g).double()
        xt = ab[t].sqrt() * x64 + (1 - ab[t]).sqrt() * noise
        with torch.no_grad():
            eps = m.net(xt.float(), torch.full((3,), t)).double()
        x0 = (xt - (1 - ab[t]).sqrt() * eps) / ab[t].sqrt()
        mean = (ab_prev[t].sqrt() * betas[t] * x0 + (1 - ab_prev[t]) * (1 - betas[t]).sqrt() * xt) / (1 - ab[t])
        var1 = betas[1] * (1 - ab[0]) / (1 - ab[1])  # beta-tilde at index 1, also the decoder's variance
        if t == 0:
            s = var1.sqrt()
            cdf = lambda z: 0.5 * (1 + torch.erf(z / math.sqrt(2)))
            hi = torch.where(x64 > 0.999, torch.ones_like(x64), cdf((x64 + 1 / 255 - mean) / s))
            lo = torch.where(x64 < -0.999, torch.zeros_like(x64), cdf((x64 - 1 / 255 - mean) / s))
            term = -torch.log(hi - lo)
        else:
            var = betas[t] * (1 - ab_prev[t]) / (1 - ab[t])
            true_mean = (ab_prev[t].sqrt() * betas[t] * x64 + (1 - ab_prev[t]) * (1 - betas[t]).sqrt() * xt) / (1 - ab[t])
            term = gauss_kl(true_mean, var, mean, var)
        total += term.flatten(1).sum(1)
    total += gauss_kl(ab[-1].sqrt() * x64, 1 - ab[-1], 0.0, torch.tensor(1.0, dtype=torch.float64)).flatten(1).sum(1)
    assert torch.allclose(got, total, rtol=1e-4), (got, total)


def test_discretized_likelihood_sums_to_one_and_tails_are_finite():
    levels = torch.arange(256).float() / 127.5 - 1
    for mean, log_scale in ((0.3, -2.0), (-0.9, -4.0), (0.0, 0.5)):
        logp = diffusion.discretized_gaussian_log_likelihood(levels, torch.tensor(mean), torch.tensor(log_scale))
        assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-5)
    far = diffusion.discretized_gaussian_log_likelihood(torch.tensor([0.9]), torch.tensor(-0.9), torch.tensor(-5.0))
    assert torch.isfinite(far).all() and far.item() < -1000  # a true tiny probability, not log(1e-12)


def test_ddpm_cifar10_preset_has_35_7M_parameters():
    p = diffusion.PRESETS["ddpm-cifar10"]
    cfg = diffusion.Config(**{k: v for k, v in p.items() if hasattr(diffusion.Config, k)})
    cfg.channels, cfg.image_size = 3, 32
    n = sum(q.numel() for q in diffusion.Model(cfg).parameters())
    assert abs(n - 35.7e6) < 0.2e6, n


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


def test_bf16_runs_and_two_processes_equal_one_with_accumulation(shared_data, tmp_path):
    r = run(*FAST, "--max-iters", "2", "--eval-interval", "2", "--dtype", "bf16", "--data-dir", shared_data,
            "--out-dir", str(tmp_path / "bf16"))
    assert r.returncode == 0, r.stderr
    # Each micro-batch's noise (t, epsilon, label dropout) is seeded by its place in the
    # global batch, so the process count does not change the run.
    common = [*FAST, "--max-iters", "3", "--eval-interval", "3", "--batch-size", "4", "--data-dir", shared_data,
              "--dtype", "fp32"]
    r = run(*common, "--grad-accum", "2", "--out-dir", str(tmp_path / "one"))
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "train.py", *common, "--out-dir", str(tmp_path / "ddp")], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    la, lb = (list(map(json.loads, open(tmp_path / d / "log.jsonl"))) for d in ("one", "ddp"))
    assert [sorted(x) for x in la] == [sorted(x) for x in lb]
    for x, y in zip(la, lb):
        for key in x:
            if "loss" in key:
                assert abs(x[key] - y[key]) < 1e-5, (key, x, y)
    a = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-5, rtol=0)


def test_sample_py_ddim_guidance_label(shared_data, tmp_path):
    r = run(*FAST, "--max-iters", "2", "--eval-interval", "2", "--data-dir", shared_data,
            "--out-dir", str(tmp_path / "s"))
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "sample.py", "--ckpt", str(tmp_path / "s" / "ckpt.pt"), "--steps", "5",
                        "--eta", "0", "--guidance", "2", "--label", "3", "--num-samples", "4",
                        "--out", str(tmp_path / "three.png")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert os.path.getsize(tmp_path / "three.png") > 100
