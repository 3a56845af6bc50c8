"""gan.py: the two-player step in train.py, under DDP and bf16, and mode coverage."""
import json
import os
import subprocess
import sys

import pytest
import torch
from tolerances import (
    U32,
    assert_displacements_agree,
    assert_losses_agree,
    reduction_error,
    weights_at_start,
)

import checkpoint  # noqa: E402
import cli  # noqa: E402
import contract  # noqa: E402
import gan
import metrics
import optim  # noqa: E402
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


def test_each_player_steps_only_its_own_parameters(tmp_path):
    same = [*POINTS, "--max-iters", "3", "--eval-interval", "3", "--optimizer", "sgd", "--weight-decay", "0"]
    for players, moved in ((["discriminator"], "discriminator."), (["generator"], "generator."),
                           # G first: its backward pass fills D's gradients, which must not reach D's step
                           (["generator", "discriminator"], None)):
        out = str(tmp_path / "_".join(players))
        run(*same, "--model", player_model(tmp_path, players), "--out-dir", out)
        before, after = weights_at_start(ckpt(out)), ckpt(out)["model"]
        assert before.keys() == after.keys()
        for k in before:
            changed = not torch.equal(before[k], after[k])
            if moved is None:
                assert changed or not k.endswith(("weight", "original", "bias")), k
            elif k.endswith(("weight", "original", "bias")):
                assert changed == k.startswith(moved), (players, k)


# The longest chain of reductions in POINTS' losses: a weight's gradient sums over the
# 64 real and 64 fake examples of a global batch, through G's 4 and D's 4 layers, 64
# wide (8 x --width); R1's double backward runs that chain once more.
POINTS_REDUCTION = 2 * (128 + 8 * 64 + 2)


@pytest.mark.summation_order
@pytest.mark.parametrize("sn", [False, True], ids=["no-sn", "sn"])
def test_two_processes_equal_one_process_for_two_players(tmp_path, sn):
    # R1 on, so the penalty's double backward runs under DDP as well, and (without spectral
    # norm) the latent's categories, drawn per micro-batch as z is.
    # SGD without clipping: its update is linear in the gradient, so a gradient off by
    # any factor (a sum over processes for a mean, say, which AdamW and the clip hide)
    # moves the weights by that factor.
    same = [*POINTS, "--max-iters", "3", "--eval-interval", "3", "--r1", "0.5", "--d-steps", "2",
              "--optimizer", "sgd", "--grad-clip", "0",
              *(["--spectral-norm"] if sn else ["--no-spectral-norm", "--mbstd", "4", "--z-classes", "8"])]
    run(*same, "--grad-accum", "2", "--out-dir", str(tmp_path / "one"))
    r = run(*same, "--out-dir", str(tmp_path / "two"), nproc=2)
    assert "2 process(es)" in r.stdout
    assert "UserWarning" not in r.stderr, r.stderr[-2000:]  # DDP's "grad strides do not match bucket view"
    a, b = log(tmp_path / "one"), log(tmp_path / "two")
    assert len(a) == len(b) and {"loss_discriminator", "loss_generator"} <= set(a[1])
    keys = [k for k in a[1] if "loss" in k]
    for key in keys:
        la = {r["step"]: r[key] for r in a if key in r}
        lb = {r["step"]: r[key] for r in b if key in r}
        if not sn:  # equal in exact arithmetic, summed in another order (tolerances.py)
            assert_losses_agree(la, lb, POINTS_REDUCTION, key)
        else:
            # Not equal in exact arithmetic: spectral norm's power iteration runs once per
            # forward pass of D, so 2 micro-batches take 2 iterations where 2 processes take
            # 1 each (rank 0's estimate broadcast). Both runs are within their estimates'
            # error of the run with exact spectral norms. D is positively homogeneous in
            # each layer's scale 1/sigma, so a relative error e of a layer's sigma moves
            # the logits by e of themselves, the losses (softplus, 1-Lipschitz, of logits
            # of the losses' size) by as much, R1 (the gradient squared) by 2e: the two
            # runs' losses within 2 x (1 + 2) x the layers' summed relative errors.
            assert sorted(la) == sorted(lb)
            e = max(sigma_errors(ckpt(tmp_path / out)["model"]) for out in ("one", "two"))
            assert 0 < e < 0.5  # the estimates are estimates, and near the mark
            assert all(abs(la[s] - lb[s]) <= 6 * e * abs(la[s]) + reduction_error(POINTS_REDUCTION, la[s])
                       for s in la), (key, la, lb, e)
    if not sn:
        ck = ckpt(tmp_path / "one")
        assert_displacements_agree(ck["model"], ckpt(tmp_path / "two")["model"], weights_at_start(ck),
                                   POINTS_REDUCTION, terms=128, steps=2 * 3, adam=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("points", [True, False], ids=["points", "images"])
@pytest.mark.parametrize("sn", [False, True], ids=["no-sn", "sn"])
def test_every_gradient_has_its_parameters_strides(dtype, points, sn):
    # DDP's buckets take each gradient as a view when its strides are the parameter's, and
    # copy it (with a UserWarning) when not; D's [1, 65] logit weight got strides [1, 1]
    # from R1's double backward and the loss summed, when it was applied through F.linear
    shape = dict(point_dim=2) if points else dict(image_size=8)
    cfg = gan.Config(**shape, width=8, z_dim=4, mbstd=4, r1=0.5, spectral_norm=sn)
    torch.manual_seed(0)
    model = gan.Model(cfg)
    x = torch.randn(8, *((2,) if points else (1, 8, 8)))
    for player in model.players:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss, _ = model(x, player=player)
        loss.float().backward()
    assert [(n, p.grad.stride()) for n, p in model.named_parameters()
            if p.grad is not None and p.grad.stride() != p.stride()] == []


def sigma_errors(state):
    """The summed relative error, over D's spectrally normed layers, of each layer's
    power-iteration estimate u'Wv of its largest singular value (exact: the 2-norm)."""
    total = 0.0
    for k in state:
        if k.endswith("parametrizations.weight.original"):
            w = state[k].double().flatten(1)
            u, v = (state[k.replace("original", "0._" + x)].double() for x in "uv")
            exact = torch.linalg.matrix_norm(w, 2)
            total += float(abs(u @ w @ v - exact) / exact)
    return total


def test_digits_bf16_hinge_projection_and_concat_run(shared_data, tmp_path):
    for extra in (["--dtype", "bf16", "--loss", "hinge"], ["--cond", "concat", "--no-spectral-norm", "--r1", "1"]):
        out = tmp_path / extra[1]
        run(*DIGITS, "--max-iters", "2", "--eval-interval", "2", "--data-dir", shared_data, "--out-dir", str(out), *extra)
        assert os.path.getsize(out / "samples.png") > 100
        assert not os.path.exists(out / "best.pt")  # a GAN's losses pick no best
        model = checkpoint.build_from_checkpoint(ckpt(out))[1]
        x = model.sample(6, y=torch.arange(6))
        assert x.shape == (6, 1, 28, 28) and x.abs().max() <= 1


def test_mode_coverage_rises_on_grid25(tmp_path):
    out = tmp_path / "cover"
    # A quarter of the preset's batch at twice its LR, held constant: coverage rises within
    # 1,000 steps (the preset's large batch and late cosine are for holding all 25 modes).
    run("--model", "gan", "--preset", "grid25", "--max-iters", "1000", "--batch-size", "256", "--lr", "1e-3",
        "--min-lr", "1e-3", "--lr-hold", "0", "--eval-interval", "1000",
        "--eval-iters", "1", "--log-interval", "100", "--out-dir", str(out))
    late = checkpoint.build_from_checkpoint(ckpt(out))[1].eval()
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
            cli.cli(train.main)
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




def mlp_rounding(net, x):
    """Elementwise bound on |fp32 net(x) - net(x) in exact arithmetic| for a stack of Linear,
    ReLU and LeakyReLU layers. A Linear of fan-in n sums n products and the bias: in any
    order within (n + 1) u of |W| |x| + |b| (Higham 4.2), and passes its input's error on
    through |W|; an activation is 1-Lipschitz and rounds at most once (u of its output)."""
    x = x.double()
    e = torch.zeros_like(x)
    for layer in net:
        if isinstance(layer, torch.nn.Linear):
            w, b = layer.weight.detach().double(), layer.bias.detach().double()
            e = e @ w.abs().T + (w.shape[1] + 1) * U32 * (x.abs() @ w.abs().T + b.abs())
            x = x @ w.T + b
        else:
            assert isinstance(layer, (torch.nn.ReLU, torch.nn.LeakyReLU)), layer
            x = layer(x)
            e = e + U32 * x.abs()
    return e


def spy_players(monkeypatch):
    """Record every pass of G (its output) and of D (its input and output)."""
    passes = {"G": [], "D": []}
    d_forward, g_forward = gan.Discriminator.forward, gan.Generator.forward

    def d_spy(self, x, y=None, parts=1):
        out = d_forward(self, x, y, parts)
        passes["D"].append((x, out))
        return out

    def g_spy(self, z, y=None):
        out = g_forward(self, z, y)
        passes["G"].append(out)
        return out

    monkeypatch.setattr(gan.Discriminator, "forward", d_spy)
    monkeypatch.setattr(gan.Generator, "forward", g_spy)
    return passes


@pytest.mark.parametrize("loss", ["ns", "hinge"])
def test_losses_are_their_formulas_of_ds_logits(monkeypatch, loss):
    """Each player's loss against its formula, written out in float64 from the logits of
    the very D pass forward makes (recorded): D's input is the real batch, then G's
    samples (without a graph: no gradient reaches G); G's loss is D's verdict on samples
    that carry G's graph.
      ns (Goodfellow et al. 2014): D: -log sigmoid(D(x)) - log(1 - sigmoid(D(G(z)))), G: -log sigmoid(D(G(z)))
      hinge: D: max(0, 1 - D(x)) + max(0, 1 + D(G(z))), G: -D(G(z)); each a batch mean."""
    torch.manual_seed(0)
    m = gan.Model(gan.Config(point_dim=2, z_dim=4, width=8, loss=loss))
    passes = spy_players(monkeypatch)
    x = torch.randn(16, 2) + torch.tensor([3.0, -2.0])  # real points apart from the samples
    for player in m.players:
        passes["G"].clear(), passes["D"].clear()
        got, _ = m(x, player=player)
        (fake,), ((d_in, logit),) = passes["G"], passes["D"]
        l = logit.detach().double()
        if player == "discriminator":
            assert torch.equal(d_in, torch.cat([x, fake])) and not fake.requires_grad
            lr, lf = l[:16], l[16:]
            if loss == "ns":
                tr, tf = -torch.log(torch.sigmoid(lr)), -torch.log(1 - torch.sigmoid(lf))
            else:
                tr, tf = torch.clamp(1 - lr, min=0), torch.clamp(1 + lf, min=0)
            terms = (tr, tf)
        else:
            assert torch.equal(d_in, fake) and fake.requires_grad
            terms = (-torch.log(torch.sigmoid(l)),) if loss == "ns" else (-l,)
        want = sum(t.mean() for t in terms)
        # fp32: each term within 6 u of itself (softplus: exp and log1p each 1 ulp, or one
        # subtraction), a mean of 16 terms within 16 u of their magnitudes, one more add
        tol = (16 + 8) * U32 * float(sum(t.abs().mean() for t in terms))
        assert abs(got.item() - float(want)) <= tol, (player, got.item(), float(want), tol)


def test_projection_discriminator_is_psi_of_phi_plus_the_label_embedding_inner_product():
    """Miyato & Koyama 2018: D(x, y) = psi(phi(x)) + <embed(y), phi(x)>, psi the linear head,
    recomputed in float64 from D's own sub-layers: its features phi (recorded from the
    pass), head and embedding weights (spectral-normalised: read in eval mode, where the
    power iteration holds still, so they are the weights the pass used)."""
    torch.manual_seed(0)
    for cfg, x in ((gan.Config(point_dim=2, width=8, num_classes=5), torch.randn(12, 2)),
                   (gan.Config(image_size=8, width=8, num_classes=10), torch.rand(12, 1, 8, 8) * 2 - 1)):
        d = gan.Discriminator(cfg).eval()
        assert d.embed is not None and cfg.cond == "projection" and cfg.spectral_norm
        phis = []
        d.features.register_forward_hook(lambda mod, inp, out: phis.append(out))
        y = torch.randint(0, cfg.num_classes, (12,))
        with torch.no_grad():
            got = d(x, y).double()
            (phi,) = phis
            phi = phi.double()
            w, b, e = d.head.weight.double()[0], d.head.bias.double()[0], d.embed.weight.double()
        n = phi.shape[1]
        want = torch.tensor([sum(float(phi[i, j] * w[j]) for j in range(n)) + float(b) +
                             sum(float(e[y[i], j] * phi[i, j]) for j in range(n)) for i in range(12)],
                            dtype=torch.float64)
        # fp32: the head and the inner product each sum n products (n + 1 roundings, in any
        # order), then one add: (n + 2) u of the terms' magnitudes
        tol = (n + 2) * U32 * ((phi.abs() @ w.abs()) + b.abs() + (e[y] * phi).abs().sum(1))
        assert ((got - want).abs() <= tol).all(), ((got - want).abs().max(), tol.min())
        assert (got - (phi @ w + b)).abs().max() > 1e3 * tol.max()  # the label's term is there, and matters


def test_sampling_temperature_scales_z():
    torch.manual_seed(0)
    m = gan.Model(gan.Config(point_dim=2, z_dim=4, width=8)).eval()
    z = torch.randn(6, 4, generator=torch.Generator().manual_seed(5))
    x = m.sample(6, temperature=0.5, generator=torch.Generator().manual_seed(5))
    # equal in exact arithmetic: each side within mlp_rounding of G(0.5 z)
    assert ((x - m.sample(6, z=0.5 * z)).abs() <= 2 * mlp_rounding(m.generator.net, 0.5 * z)).all()
    x0 = m.sample(6, temperature=0.0)
    # every z is 0: the rows are one point, each row within its rounding of it
    assert ((x0 - x0[:1]).abs() <= 2 * mlp_rounding(m.generator.net, torch.zeros(6, 4))).all()
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
        # a collapsed group has no spread: identical examples' features differ by rounding
        # only (fan-ins of at most 256: ~ 256 u ~ 2e-5 of features O(1)), so the spread is
        # the floor sqrt(1e-8) = 1e-4 plus at most that; 1e-3 is well above both
        assert spread.shape == (4, 1) and spread.max() < 1e-3
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
    # the gradient of D's real logits from the pass forward makes (real and fake together;
    # seed 1 draws the same z): the same computation, so the same gradient
    torch.manual_seed(1)
    z = torch.randn(8, cfg.z_dim)
    with torch.no_grad():
        fake = model.generator(z)
    real = x.clone().requires_grad_()
    grad, = torch.autograd.grad(model.discriminator(torch.cat([real, fake]), parts=2)[:4].sum(), real,
                                create_graph=True)
    g = grad.detach().double().reshape(4, 2, 2)  # 4 packs of 2 examples x 2 coordinates
    per_pack = [sum(float(v) ** 2 for v in g[i].flatten()) for i in range(4)]
    want = 3000.0 / 2 * sum(per_pack) / 4
    # fp32: squares, a pack's sum of 4, the mean of 4, the factor (12 u of the penalty);
    # adding it to the loss and taking the loss away again (u of each result)
    tol = 12 * U32 * want + U32 * (abs(with_r1.item()) + abs((with_r1 - without).item()))
    assert abs((with_r1 - without).item() - want) <= tol
    assert abs(want - 3000.0 / 2 * sum(per_pack) / 8) > 1e3 * tol  # (not the mean over examples)


@pytest.mark.summation_order
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
    # G's input is [z, embed(y)]; its rounding bound, per category
    err = mlp_rounding(m.generator.net, torch.cat([z, m.generator.embed(torch.arange(5))], 1).detach())
    assert ((m.sample(5, y=torch.arange(5), z=z) - x).abs() <= 2 * err).all()
    drawn = m.sample(2000, z=z[:1].expand(2000, 4), generator=torch.Generator().manual_seed(1))
    d = torch.cdist(drawn, x, compute_mode="donot_use_mm_for_euclid_dist")
    # each drawn point is one category's point: as far from it as the two roundings reach
    # (and the distance's own few roundings, u each)
    assert d.min(1).values.max() <= 2 * err.norm(dim=1).max() * (1 + 8 * U32)
    which = d.argmin(1)
    counts = torch.bincount(which, minlength=5)
    assert counts.min() > 330 and counts.max() < 470  # uniform: 400 each, sd 17.9: within 3.9 sd
    seen, drawn_y = [], []  # the y that D's and G's forward passes get
    d_forward, g_forward = gan.Discriminator.forward, gan.Generator.forward
    monkeypatch.setattr(gan.Discriminator, "forward",
                        lambda self, x, y=None, parts=1: seen.append(y) or d_forward(self, x, y, parts))
    monkeypatch.setattr(gan.Generator, "forward", lambda self, z, y=None: drawn_y.append(y) or g_forward(self, z, y))
    for player in m.players:
        m(torch.randn(1000, 2), None, player)[0].backward()
    assert seen == [None, None]
    for y in drawn_y:  # training draws a category per example, each of the 5 about equally
        # 200 each, sd 12.6: 140 is 4.7 sd below
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


@pytest.mark.summation_order
def test_muon_steps_every_player_and_two_processes_equal_one(tmp_path):
    """--optimizer muon on both players (D twice a step), 2 processes against 1 with 2
    micro-batches. Muon takes each player's hidden matrices (the h x h layers), AdamW the
    layers that read z or the data and write points or logits."""
    same = [*POINTS, "--max-iters", "3", "--eval-interval", "3", "--d-steps", "2", "--optimizer", "muon",
            "--no-spectral-norm"]
    run(*same, "--grad-accum", "2", "--out-dir", str(tmp_path / "one"))
    r = run(*same, "--out-dir", str(tmp_path / "two"), nproc=2)
    assert "2 process(es)" in r.stdout
    a, b = ckpt(tmp_path / "one"), ckpt(tmp_path / "two")
    start = weights_at_start(a)
    model = gan.Model(gan.Config(point_dim=2, width=8, z_dim=4, spectral_norm=False))
    hidden = {n for n, p in model.named_parameters() if id(p) in optim.muon_matrices(model, contract.hooks(model))}
    assert hidden == {"generator.net.2.weight", "generator.net.4.weight", "discriminator.features.2.weight",
                      "discriminator.features.4.weight"}
    assert all(not torch.equal(a["model"][k], start[k]) for k in a["model"] if k.endswith(("weight", "bias")))
    # equal in exact arithmetic: each step's gradients within fp32's summation error, Muon's
    # bf16 iteration then within its allowance (tolerances.py)
    assert_displacements_agree(a["model"], b["model"], start, POINTS_REDUCTION, terms=128, steps=3, muon=hidden)
