"""diffusion.py's DiT denoiser (--arch dit; Peebles & Xie 2023): its pieces against
independent computations, its initialisation, every objective and sampler through it, and
a run through train.py, sample.py and metrics.py."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import diffusion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_dit(**kw):
    """A DiT of a few kB on 8x8 images: 16 tokens of 2x2 patches, 2 blocks of width 32."""
    cfg = dict(arch="dit", channels=1, image_size=8, patch=2, dit_depth=2, dit_width=32, dit_heads=2,
               timesteps=20, num_classes=3, sample_steps=5)
    cfg.update(kw)
    torch.manual_seed(0)
    return diffusion.Model(diffusion.Config(**cfg))


@pytest.mark.parametrize("p", [1, 2, 4, 7])
def test_patchify_is_unfold_and_unpatchify_inverts_it(p):
    x = torch.randn(2, 3, 28, 28)
    tokens = diffusion.patchify(x, p)
    # F.unfold cuts the same non-overlapping p x p blocks (kernel = stride = p), in row-major
    # order, each flattened channel-major: an independent implementation of the layout
    assert torch.equal(tokens, F.unfold(x, p, stride=p).transpose(1, 2))
    back = diffusion.unpatchify(tokens, p, 3, 28, 28)
    assert torch.equal(back, x)  # exact: a permutation of the elements
    assert torch.equal(back, F.fold(tokens.transpose(1, 2), (28, 28), p, stride=p))


def test_position_embedding_is_the_1d_sinusoid_of_row_and_column():
    pos = diffusion.sincos_2d(16, 3, 5)  # 3 rows x 5 columns of tokens, 16 channels
    assert pos.shape == (15, 16)
    # channels 0..7 depend only on the row, 8..15 only on the column, each the Transformer's
    # [sin(i w_k), cos(i w_k)] with w_k = 10000^(-k/4), k = 0..3, written out here
    for n in range(15):
        r, c = divmod(n, 5)
        for k in range(4):
            w = 10000 ** (-k / 4)
            want = torch.tensor([torch.sin(torch.tensor(r * w, dtype=torch.float64)),
                                 torch.cos(torch.tensor(r * w, dtype=torch.float64)),
                                 torch.sin(torch.tensor(c * w, dtype=torch.float64)),
                                 torch.cos(torch.tensor(c * w, dtype=torch.float64))]).float()
            got = pos[n, [k, 4 + k, 8 + k, 12 + k]]
            assert torch.allclose(got, want, atol=1e-6), (n, k, got, want)
    assert len({tuple(row.tolist()) for row in pos}) == 15  # every token its own position


def test_adaln_zero_blocks_are_the_identity_and_the_untrained_output_is_zero():
    m = small_dit()
    net = m.net
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 5, 11, 19]), torch.tensor([0, 1, 2, 3])
    c = net.time(diffusion.timestep_embedding(t, net.freq)) + net.label(y)
    h = net.inp(diffusion.patchify(x, 2)) + net.pos
    assert h.abs().sum() > 0 and c.abs().sum() > 0  # the blocks are given something to change
    for block in net.blocks:
        out = block(h, c)
        assert torch.equal(out, h)  # every gate 0: each branch added times exactly zero
        h = out
    assert torch.equal(net(x, t, y), torch.zeros_like(x))
    # through the model: every objective's prediction starts at exactly zero
    assert torch.equal(m.output(x, t, y), torch.zeros_like(x))


def test_time_and_label_embeddings_reach_the_output():
    m = small_dit()
    net = m.net
    with torch.no_grad():  # the final layer (its adaLN regression and its linear map) off zero
        for p in list(net.ada.parameters()) + list(net.out.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(4, 1, 8, 8)
    t, y = torch.tensor([0, 5, 11, 19]), torch.tensor([0, 1, 2, 3])
    net(x, t, y).square().sum().backward()
    for name, p in net.named_parameters():
        if name.startswith(("time.", "label.")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert net.label.weight.grad[y].abs().sum(1).gt(0).all()  # each row used, the null class (3) too
    # and the output itself moves with t and with y (the same x)
    with torch.no_grad():
        a = net(x, t, y)
        assert not torch.equal(a, net(x, t.flip(0), y)) and not torch.equal(a, net(x, t, y.flip(0)))


@pytest.mark.parametrize("objective", ["eps", "x0", "v", "flow"])
def test_every_objective_trains_and_samples(objective):
    m = small_dit(objective=objective)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    losses = []
    for _ in range(3):
        loss, _ = m(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert any(p.abs().sum() > 0 for p in m.net.out.parameters())  # the zero output layer has moved
    m.eval()
    g = lambda: torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2])
    runs = [m.sample(3, generator=g()), m.sample(3, y=labels, guidance=2.0, generator=g())]
    if objective == "flow":
        runs.append(m.sample(3, steps=3, y=labels, generator=g()))
    else:
        runs += [m.sample(3, steps=0, y=labels, guidance=2.0, generator=g()),  # ancestral
                 m.sample(3, steps=4, eta=1.0, y=labels, generator=g())]  # DDIM with noise
    for s in runs:
        assert s.shape == (3, 1, 8, 8) and torch.isfinite(s).all()
    # guidance moves the samples (the label reaches the network), and w = 1 is plain conditional
    assert not torch.equal(runs[1], m.sample(3, y=labels, guidance=0.0, generator=g()))
    assert torch.allclose(m.sample(3, y=labels, guidance=1.0, generator=g()), m.sample(3, y=labels, generator=g()),
                          atol=1e-5)
    xq = torch.randint(0, 256, (2, 1, 8, 8)).float() / 127.5 - 1
    nll = m.nll(xq, y=labels[:2], generator=g())
    assert nll.shape == (2,) and torch.isfinite(nll).all()


def test_image_size_not_divisible_by_the_patch_is_refused():
    with pytest.raises(ValueError, match="divisible by the patch"):
        diffusion.Model(diffusion.Config(arch="dit", image_size=28, patch=3))
    with pytest.raises(ValueError, match="dit_heads"):
        diffusion.Model(diffusion.Config(arch="dit", dit_width=96, dit_heads=5))
    with pytest.raises(ValueError, match="arch"):
        diffusion.Model(diffusion.Config(arch="vit"))
    # the U-Net's rule (divisible by 2^levels) is not the DiT's: 30 = 15 patches of 2
    m = diffusion.Model(diffusion.Config(arch="dit", image_size=30, patch=2, dit_depth=1, dit_width=16))
    assert m.net.pos.shape == (225, 16)


def count(preset, **data):
    p = diffusion.PRESETS[preset]
    cfg = diffusion.Config(**{k: v for k, v in p.items() if hasattr(diffusion.Config, k)}, **data)
    return sum(q.numel() for q in diffusion.Model(cfg).parameters())


def test_dit_s2_preset_is_the_papers_33M_model():
    # The paper's DiT-S/2 (table 1): 33M parameters, on ImageNet's 32x32x4 latents with 1000
    # classes; it also predicts a variance (8 output channels), which this file does not:
    # the 4 channels x 2 x 2 pixels of that head are 384 x 16 + 16 parameters more.
    n = count("dit-s2", channels=4, image_size=32, num_classes=1000) + 384 * 16 + 16
    assert abs(n - 33e6) < 0.5e6, n  # the paper's 33M, rounded to 1M
    assert count("dit-s2", channels=3, image_size=32, num_classes=10) == 32_475_660  # CIFAR-10, as the preset runs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_gradient_has_its_parameters_strides(dtype):
    # as for the U-Net (tests/test_diffusion.py): DDP copies, and warns about, a gradient
    # whose strides are not its parameter's
    m = small_dit(image_size=28, patch=4)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss, _ = m(torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 0]))
    loss.float().backward()
    assert [(n, p.grad.stride()) for n, p in m.named_parameters() if p.grad.stride() != p.stride()] == []


# ---- through train.py, sample.py and metrics.py -------------------------------------------

FAST = ["--model", "diffusion", "--preset", "tiny", "--arch", "dit", "--patch", "4", "--dit-depth", "2",
        "--dit-width", "32", "--dit-heads", "2", "--timesteps", "20", "--sample-steps", "3", "--sample-images", "4",
        "--eval-iters", "1", "--log-interval", "1", "--warmup-iters", "5"]


def run(script, *argv):
    return subprocess.run([sys.executable, script, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_dit_trains_resumes_exactly_samples_and_is_evaluated(shared_data, tmp_path):
    # As test_diffusion.py's resume test: the first run stops at step 3, not an evaluation
    # step of the uninterrupted run.
    common = [*FAST, "--max-iters", "6", "--eval-interval", "4", "--data-dir", shared_data, "--dtype", "fp32"]
    r = run("train.py", *common, "--out-dir", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    r = run("train.py", *common, "--max-iters", "3", "--lr-decay-iters", "6", "--out-dir", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    r = run("train.py", *common, "--lr-decay-iters", "6", "--out-dir", str(tmp_path / "b"), "--resume")
    assert r.returncode == 0, r.stderr
    la = {x["step"]: x["loss"] for x in map(json.loads, open(tmp_path / "a" / "log.jsonl")) if "loss" in x}
    lb = {x["step"]: x["loss"] for x in map(json.loads, open(tmp_path / "b" / "log.jsonl")) if "loss" in x}
    assert la == lb and len(la) == 6
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    assert a["model"].keys() == b["model"].keys() and any(k.startswith("net.blocks.") for k in a["model"])
    assert all(torch.equal(a[w][k], b[w][k]) for w in ("model", "ema") for k in a["model"])
    ckpt = str(tmp_path / "b" / "ckpt.pt")
    r = run("sample.py", "--ckpt", ckpt, "--steps", "3", "--eta", "0", "--guidance", "2", "--label", "3",
            "--num-samples", "4", "--out", str(tmp_path / "three.png"))
    assert r.returncode == 0 and os.path.getsize(tmp_path / "three.png") > 100, r.stderr
    r = run("metrics.py", "--ckpt", ckpt, "--n", "50", "--nll-n", "4", "--data-dir", shared_data, "--steps", "2")
    assert r.returncode == 0, r.stderr
    table = json.load(open(tmp_path / "b" / "metrics-classifier.json"))
    # a smoke check of the row, not a derived bound: a bound on -log P is positive and finite
    # (a barely trained eps-model's is far above 8 bits: its decoder at T = 20 is sharp)
    assert table["FID"] > 0 and 0 < table["bits/dim (4 val images)"] < float("inf"), table
