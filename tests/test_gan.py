"""gan.py: the two-player step in train.py, under DDP and bf16, and mode coverage."""
import json
import os
import subprocess
import sys

import pytest
import torch

import gan
import metrics
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POINTS = ["--model", "gan", "--data", "grid25", "--width", "8", "--z-dim", "4", "--batch-size", "32",
          "--eval-iters", "1", "--log-interval", "1", "--dtype", "fp32", "--lr", "1e-3", "--warmup-iters", "0"]
DIGITS = ["--model", "gan", "--width", "8", "--z-dim", "8", "--batch-size", "8", "--eval-iters", "1",
          "--log-interval", "1", "--sample-images", "10"]


def run(*argv, nproc=1):
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    env = dict(os.environ, OMP_NUM_THREADS="1") if nproc > 1 else None
    r = subprocess.run([sys.executable, *launcher, "train.py", *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def log(out):
    return [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]


def ckpt(out):
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)


def player_model(tmp_path, players):
    """A model file that is gan.Model with another order of players, and that fails if a
    player's step starts with any gradient left over from the step before."""
    path = tmp_path / f"gan_{'_'.join(p[0] for p in players)}.py"
    path.write_text(
        "import torch\nimport gan\nfrom gan import Config, PRESETS, DATA\n\n"
        "class Model(gan.Model):\n"
        "    def __init__(self, cfg):\n"
        "        super().__init__(cfg)\n"
        f"        self.players = {tuple(players)!r}\n\n"
        "    def forward(self, x, y=None, player='generator'):\n"
        "        if torch.is_grad_enabled():\n"
        "            stale = [n for n, p in self.named_parameters() if p.grad is not None]\n"
        "            if stale:\n"
        "                raise RuntimeError(f'{player} step starts with gradients on {stale[:3]}')\n"
        "        return super().forward(x, y, player)\n")
    return str(path)


def initial_weights(out):
    """The weights train.py started from: the same seed, the same config."""
    conf = ckpt(out)["config"]
    torch.manual_seed(conf["train_config"]["seed"])
    cfg = gan.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in conf["model_config"].items()})
    return gan.Model(cfg).state_dict()


def test_each_player_steps_only_its_own_parameters(tmp_path):
    common = [*POINTS, "--max-iters", "3", "--eval-interval", "3", "--optimizer", "sgd", "--weight-decay", "0"]
    for players, moved in ((["discriminator"], "discriminator."), (["generator"], "generator."),
                           # G first: its backward pass fills D's gradients, which must not reach D's step
                           (["generator", "discriminator"], None)):
        out = str(tmp_path / "_".join(players))
        run(*common, "--model", player_model(tmp_path, players), "--out-dir", out)
        before, after = initial_weights(out), ckpt(out)["model"]
        assert before.keys() == after.keys()
        for k in before:
            changed = not torch.equal(before[k], after[k])
            if moved is None:
                assert changed or not k.endswith(("weight", "original", "bias")), k
            elif k.endswith(("weight", "original", "bias")):
                assert changed == k.startswith(moved), (players, k)


@pytest.mark.parametrize("sn,tol", [(False, 1e-5), (True, 2e-4)])
def test_two_processes_equal_one_process_for_two_players(tmp_path, sn, tol):
    # R1 on, so the penalty's double backward runs under DDP as well, and (without spectral
    # norm) the latent's categories, drawn per micro-batch as z is. Spectral norm's power
    # iteration runs once per forward pass, so 2 micro-batches take 2 iterations where 2
    # processes take 1 each: with it on, the runs differ by about 1e-5 in the loss.
    common = [*POINTS, "--max-iters", "3", "--eval-interval", "3", "--r1", "0.5", "--d-steps", "2",
              *(["--spectral-norm"] if sn else ["--no-spectral-norm", "--mbstd", "4", "--z-classes", "8"])]
    run(*common, "--grad-accum", "2", "--out-dir", str(tmp_path / "one"))
    r = run(*common, "--out-dir", str(tmp_path / "two"), nproc=2)
    assert "2 process(es)" in r.stdout
    a, b = log(tmp_path / "one"), log(tmp_path / "two")
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        for key in ra:
            if "loss" in key:
                assert abs(ra[key] - rb[key]) < tol, (key, ra, rb)
    assert {"loss_discriminator", "loss_generator"} <= set(a[1])
    if not sn:  # (with it, Adam's first steps magnify the 1e-5 into weights 1e-3 apart)
        pa, pb = ckpt(tmp_path / "one")["model"], ckpt(tmp_path / "two")["model"]
        for k in pa:
            torch.testing.assert_close(pa[k], pb[k], atol=tol, rtol=0)


def test_digits_bf16_hinge_projection_and_concat_run(shared_data, tmp_path):
    for extra in (["--dtype", "bf16", "--loss", "hinge"], ["--cond", "concat", "--no-spectral-norm", "--r1", "1"]):
        out = tmp_path / extra[1]
        run(*DIGITS, "--max-iters", "2", "--eval-interval", "2", "--data-dir", shared_data, "--out-dir", str(out), *extra)
        assert os.path.getsize(out / "samples.png") > 100
        assert not os.path.exists(out / "best.pt")  # a GAN's losses pick no best
        model = train.build_from_checkpoint(ckpt(out))[1]
        x = model.sample(6, y=torch.arange(6))
        assert x.shape == (6, 1, 28, 28) and x.abs().max() <= 1


def test_mode_coverage_rises_on_grid25(tmp_path):
    out = tmp_path / "cover"
    # A quarter of the preset's batch at twice its LR, held constant: coverage rises within
    # 1,000 steps (the preset's large batch and late cosine are for holding all 25 modes).
    run("--model", "gan", "--preset", "grid25", "--max-iters", "1000", "--batch-size", "256", "--lr", "1e-3",
        "--min-lr", "1e-3", "--lr-hold", "0", "--eval-interval", "1000",
        "--eval-iters", "1", "--log-interval", "100", "--out-dir", str(out))
    late = train.build_from_checkpoint(ckpt(out))[1].eval()
    torch.manual_seed(0)
    early = gan.Model(late.cfg).eval()  # an untrained G puts everything near the origin: one mode
    centers, std = gan_points()
    g = torch.Generator().manual_seed(0)
    before = metrics.mode_coverage(early.sample(2500, generator=g), centers, std)
    after = metrics.mode_coverage(late.sample(2500, generator=g), centers, std)
    assert before[0] <= 2 and after[0] >= 10, (before, after)


def gan_points():
    import data
    return data.POINTS["grid25"]


def test_bad_settings_are_one_line_errors(tmp_path, capsys, monkeypatch):
    for flags in (("--loss", "wasserstein"), ("--d-steps", "0"), ("--width", "12"), ("--pac", "0"),
                  ("--pac", "3", "--batch-size", "16")):
        monkeypatch.setattr(sys, "argv", ["train.py", *POINTS, *flags, "--out-dir", str(tmp_path / "x")])
        with pytest.raises(SystemExit) as e:
            train.cli()
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "multiple of 3" in err


def test_pac_judges_packs_of_consecutive_examples():
    """PacGAN: one logit per pack of `pac` consecutive examples, each pack seen whole by
    D's first layer (so changing one example changes its pack's logit only), and real and
    fake packs kept apart; the loss runs, with gradients, on images and on points."""
    torch.manual_seed(0)
    for cfg in (gan.Config(point_dim=2, width=8, pac=3), gan.Config(image_size=28, width=8, pac=3, mbstd=2)):
        d = gan.Discriminator(cfg).eval()
        x = torch.randn(12, *((2,) if cfg.point_dim else (1, 28, 28)))
        x2 = x.clone()
        x2[4] += 1.0
        a, b = d(x), d(x2)
        assert a.shape == (4,)
        # example 4 is in pack 1 (examples 3..5); with the minibatch std over groups of 2
        # packs, pack 0 shares its group
        assert (a != b).tolist() == ([False, True] if cfg.point_dim else [True, True]) + [False, False]
        first = d.features[0]  # the first layer sees the 3 examples side by side
        assert first.weight.shape[1] == 3 * (2 if cfg.point_dim else 1)
        model = gan.Model(cfg)
        assert model.batch_multiple == 3
        for player in model.players:
            loss, _ = model(x, player=player)
            loss.backward()
            assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="class-conditional"):
        gan.Model(gan.Config(image_size=28, width=8, pac=2, num_classes=10))


def test_sampling_temperature_scales_z():
    torch.manual_seed(0)
    m = gan.Model(gan.Config(point_dim=2, z_dim=4, width=8)).eval()
    z = torch.randn(6, 4, generator=torch.Generator().manual_seed(5))
    x = m.sample(6, temperature=0.5, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(x, m.sample(6, z=0.5 * z))
    x0 = m.sample(6, temperature=0.0)
    torch.testing.assert_close(x0, x0[:1].expand_as(x0))  # every z is 0 (rows may differ in the last bit)
    assert (x - x[:1]).abs().max() > 1e-3


def test_minibatch_std_looks_only_within_a_group():
    torch.manual_seed(0)
    for cfg in (gan.Config(point_dim=2, width=8, mbstd=4), gan.Config(image_size=28, width=8, mbstd=4)):
        d = gan.Discriminator(cfg).eval()  # eval: spectral norm does not iterate between calls
        x = torch.randn(12, *((2,) if cfg.point_dim else (1, 28, 28)))
        x2 = x.clone()
        x2[5] += 1.0
        changed = (d(x) != d(x2)).tolist()
        assert changed == [False] * 4 + [True] * 4 + [False] * 4  # example 5's group is 4..7
        same = x[:1].expand(4, *x.shape[1:])
        spread = d.minibatch_std(d.features(same))
        assert spread.shape == (4, 1) and spread.max() < 1e-3  # a collapsed group has no spread
        assert d.minibatch_std(d.features(x)).min() > 10 * spread.max()


def test_minibatch_std_never_groups_real_with_fake():
    # 6 real then 6 fake with groups of 4 asked: groups of 2 inside each half.
    torch.manual_seed(0)
    d = gan.Discriminator(gan.Config(point_dim=2, width=8, mbstd=4)).eval()
    real, fake = torch.randn(6, 2), torch.randn(6, 2)
    a = d(torch.cat([real, fake]), parts=2)
    b = d(torch.cat([real, fake + 1]), parts=2)
    assert torch.equal(a[:6], b[:6]) and not torch.equal(a[6:], b[6:])


def test_r1_with_packs_penalises_the_gradient_per_pack():
    """R1 is gamma/2 E|grad D|^2 over D's inputs; with packing an input is a pack, so the
    squared norm is summed over the pack's examples, not averaged over examples."""
    torch.manual_seed(0)
    cfg = gan.Config(point_dim=2, width=8, pac=2, r1=3000.0, spectral_norm=False)
    model = gan.Model(cfg)
    x = torch.randn(8, 2)
    torch.manual_seed(1)
    with_r1, _ = model(x, player="discriminator")
    model.cfg.r1 = 0.0
    torch.manual_seed(1)
    without, _ = model(x, player="discriminator")
    real = x.clone().requires_grad_()
    grad, = torch.autograd.grad(model.discriminator(real).sum(), real)
    per_pack = grad.pow(2).reshape(4, 4).sum(1)  # 4 packs of 2 examples x 2 coordinates
    assert torch.allclose(with_r1 - without, 3000.0 / 2 * per_pack.mean(), rtol=1e-4)


def test_latent_category_is_g_input_only(monkeypatch):
    """z_classes: G takes a random category beside z (each category its own embedding), D
    never sees it, and sampling draws it uniformly unless it is given."""
    torch.manual_seed(0)
    cfg = gan.Config(point_dim=2, z_dim=4, width=8, z_classes=5)
    m = gan.Model(cfg).eval()
    assert m.generator.embed.num_embeddings == 5 and m.discriminator.embed is None
    z = torch.randn(1, 4).expand(5, 4)  # one z, each category: five different points
    x = m.sample(5, y=torch.arange(5), z=z)
    assert torch.cdist(x, x).add(torch.eye(5)).min() > 1e-4
    torch.testing.assert_close(m.sample(5, y=torch.arange(5), z=z), x)
    drawn = m.sample(2000, z=z[:1].expand(2000, 4), generator=torch.Generator().manual_seed(1))
    d = torch.cdist(drawn, x, compute_mode="donot_use_mm_for_euclid_dist")
    assert d.min(1).values.max() < 1e-5  # each drawn point is one category's point
    which = d.argmin(1)
    counts = torch.bincount(which, minlength=5)
    assert counts.min() > 330 and counts.max() < 470  # uniform: 400 each, within 3.5 std
    seen, drawn_y = [], []  # the y that D's and G's forward passes get
    d_forward, g_forward = gan.Discriminator.forward, gan.Generator.forward
    monkeypatch.setattr(gan.Discriminator, "forward",
                        lambda self, x, y=None, parts=1: seen.append(y) or d_forward(self, x, y, parts))
    monkeypatch.setattr(gan.Generator, "forward", lambda self, z, y=None: drawn_y.append(y) or g_forward(self, z, y))
    for player in m.players:
        m(torch.randn(1000, 2), None, player)[0].backward()
    assert seen == [None, None]
    for y in drawn_y:  # training draws a category per example, each of the 5 about equally
        assert y.shape == (1000,) and torch.bincount(y, minlength=5).min() > 140 and y.max() < 5
    assert m.generator.embed.weight.grad.abs().sum() > 0  # G's step trains the embedding
    with pytest.raises(ValueError, match="class-conditional"):
        gan.Model(gan.Config(image_size=28, width=8, z_classes=4, num_classes=10))


def test_resume_of_a_run_from_before_a_setting_existed(tmp_path):
    """A checkpoint written before z_classes (and lr_hold) existed resumes under --preset
    grid25, which now sets them: a setting the checkpoint lacks takes its default, the
    value that run had, not the preset's (else G would want an embedding it never had)."""
    out, flags = tmp_path / "old", [*POINTS, "--eval-interval", "2"]
    run(*flags, "--max-iters", "2", "--out-dir", str(out))
    ck = ckpt(out)
    del ck["config"]["model_config"]["z_classes"], ck["config"]["train_config"]["lr_hold"]
    torch.save(ck, out / "ckpt.pt")
    run("--preset", "grid25", *flags, "--max-iters", "4", "--out-dir", str(out), "--resume")
    resumed = ckpt(out)
    conf = resumed["config"]
    assert resumed["step"] == 4
    assert conf["model_config"]["z_classes"] == 0 and conf["train_config"]["lr_hold"] == train.TrainConfig.lr_hold
    assert conf["model_config"]["d_lr_mult"] == 1.0  # stored, so the checkpoint's, not the preset's 2.0
