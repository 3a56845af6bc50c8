"""Tests for optim.py: our optimizers must retrace torch.optim step for step."""

import io
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tolerances import U32, U64  # noqa: E402

import contract
import optim  # noqa: E402

STEPS = 100

# ---------------------------------------------------------------------------
# A tiny problem: a 2-layer tanh MLP on fixed data plus an "extra" parameter
# that only gets a gradient on two steps out of three (its .grad is None on the
# others), so per-parameter step counting is exercised.

_gen = torch.Generator().manual_seed(0)
X = torch.randn(16, 5, generator=_gen, dtype=torch.float64)
Y = torch.randn(16, 3, generator=_gen, dtype=torch.float64)
SHAPES = [(8, 5), (8,), (3, 8), (3,), (4,)]


def make_params(dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in SHAPES]


def clone_params(params):
    return [p.detach().clone().requires_grad_() for p in params]


def compute_grads(params, step):
    w1, b1, w2, b2, extra = params
    x, y = X.to(w1.dtype), Y.to(w1.dtype)
    loss = ((torch.tanh(x @ w1.T + b1) @ w2.T + b2 - y) ** 2).mean()
    if step % 3 != 1:
        loss = loss + 0.1 * (extra ** 2).sum()
    for p in params:
        p.grad = None
    loss.backward()
    return loss


def groups_for(params, overrides):
    # group 0 keeps the constructor defaults, group 1 overrides some hyperparameters
    return [{"params": [params[0], params[1], params[4]]},
            {"params": [params[2], params[3]], **overrides}]


def tols(dtype, rounding=16 * STEPS, scale=1.0):
    """Ours and torch's do the same elementwise arithmetic, in the same order where our
    code follows theirs (then the result is bit for bit). A kernel that fuses or orders it
    otherwise (another CPU's vector path) rounds each element a few more times per step:
    under 16 roundings a step, so after STEPS steps within 16 * STEPS units of roundoff
    of the values' size, `scale` (the parameters are O(1); for optimizer state, pass its
    largest value). (The difference also feeds the next gradient, an O(lr) smaller
    effect, and no gradient here sits near zero, where Adam's division would magnify it.)"""
    u = U64 if dtype == torch.float64 else U32
    return dict(rtol=rounding * u, atol=rounding * u * scale)


def assert_params_close(ours, ref, dtype, msg=""):
    for i, (a, b) in enumerate(zip(ours, ref)):
        if not torch.equal(a, b):  # bit-identical is the norm; assert_close is slow, so only on a mismatch
            torch.testing.assert_close(a, b, **tols(dtype), msg=lambda m: f"{msg} param {i}: {m}")


CASES = [
    # (name, our class, torch class, kwargs, overrides for the second group)
    ("sgd", optim.SGD, torch.optim.SGD, dict(lr=0.1), dict(lr=0.03)),
    ("sgd_momentum", optim.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9), dict(lr=0.1, momentum=0.5)),
    ("sgd_dampening", optim.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.5),
     dict(dampening=0.1, momentum=0.8)),
    ("sgd_nesterov", optim.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True),
     dict(lr=0.02, momentum=0.7)),
    ("sgd_wd", optim.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.5, weight_decay=0.1),
     dict(weight_decay=0.0, lr=0.1)),
    ("sgd_maximize", optim.SGD, torch.optim.SGD, dict(lr=0.01, momentum=0.9, weight_decay=0.1, maximize=True),
     dict(lr=0.005)),
    ("adam", optim.Adam, torch.optim.Adam, dict(lr=0.01), dict(lr=0.03, betas=(0.8, 0.99))),
    ("adam_wd", optim.Adam, torch.optim.Adam, dict(lr=0.01, weight_decay=0.1), dict(weight_decay=0.0, eps=1e-6)),
    ("adam_amsgrad_wd", optim.Adam, torch.optim.Adam, dict(lr=0.01, weight_decay=0.1, amsgrad=True),
     dict(lr=0.003, betas=(0.5, 0.9))),
    ("adam_maximize", optim.Adam, torch.optim.Adam, dict(lr=0.01, weight_decay=0.1, maximize=True),
     dict(weight_decay=0.3)),
    ("adamw", optim.AdamW, torch.optim.AdamW, dict(lr=0.01), dict(lr=0.02, weight_decay=0.5)),
    ("adamw_amsgrad", optim.AdamW, torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1, amsgrad=True),
     dict(betas=(0.7, 0.95), weight_decay=0.0)),
    ("adamw_maximize", optim.AdamW, torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1, maximize=True),
     dict(lr=0.001)),
]
CASE_IDS = [c[0] for c in CASES]


@pytest.mark.summation_order
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name,ours_cls,torch_cls,kwargs,overrides", CASES, ids=CASE_IDS)
def test_trajectory_matches_torch(name, ours_cls, torch_cls, kwargs, overrides, dtype):
    # Always two param groups: group 0 runs on the constructor's hyperparameters, group 1
    # on overridden ones, so one run covers both "defaults" and per-group settings.
    ours_p = make_params(dtype)
    ref_p = clone_params(ours_p)
    ours = ours_cls(groups_for(ours_p, overrides), **kwargs)
    ref = torch_cls(groups_for(ref_p, overrides), foreach=True, **kwargs)
    for step in range(STEPS):
        compute_grads(ours_p, step)
        compute_grads(ref_p, step)
        ours.step()
        ref.step()
        assert_params_close(ours_p, ref_p, dtype, msg=f"{name} step {step}")
    # the per-parameter state must agree too, key names included
    for po, pr in zip(ours_p, ref_p):
        so, sr = ours.state[po], ref.state[pr]
        assert set(so) == set(sr)
        for k in sr:  # moments far below 1 (exp_avg_sq ~ grad^2): tolerances of their own size
            torch.testing.assert_close(so[k], sr[k], **tols(dtype, scale=float(sr[k].abs().max())))
    # the "extra" param missed a third of the steps, so it must be behind
    if "step" in ours.state[ours_p[0]]:
        assert ours.state[ours_p[4]]["step"].item() < ours.state[ours_p[0]]["step"].item()


def test_step_state_is_cpu_float32_tensor():
    ps = make_params(torch.float32)
    opt = optim.AdamW(ps, lr=0.01)
    compute_grads(ps, 0)
    opt.step()
    step = opt.state[ps[0]]["step"]
    assert torch.is_tensor(step) and step.dim() == 0
    assert step.dtype == torch.float32 and step.device.type == "cpu"
    assert step.item() == 1.0


def test_closure_is_called_with_grad_enabled():
    ps = make_params(torch.float64)
    ref_p = clone_params(ps)
    opt, ref = optim.Adam(ps, lr=0.01), torch.optim.Adam(ref_p, lr=0.01)
    loss = opt.step(lambda: compute_grads(ps, 0))
    ref_loss = ref.step(lambda: compute_grads(ref_p, 0))
    assert torch.is_tensor(loss) and loss.item() == ref_loss.item()
    assert_params_close(ps, ref_p, torch.float64)


# ---------------------------------------------------------------------------
# state_dict round trips

def save_load(sd):
    """Serialize like a checkpoint would, so no tensor is shared with the source."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf)


def run_steps(opt, params, start, stop):
    for step in range(start, stop):
        compute_grads(params, step)
        opt.step()


RESUME_CASES = [
    (optim.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    (optim.Adam, torch.optim.Adam, dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    (optim.AdamW, torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
    (optim.AdamW, torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
]
RESUME_IDS = ["sgd_nesterov", "adam_amsgrad", "adamw", "adamw_amsgrad"]


@pytest.mark.summation_order
@pytest.mark.parametrize("first,second", [("ours", "ours"), ("ours", "torch"), ("torch", "ours")])
@pytest.mark.parametrize("ours_cls,torch_cls,kwargs", RESUME_CASES, ids=RESUME_IDS)
def test_state_dict_resume(ours_cls, torch_cls, kwargs, first, second):
    dtype = torch.float64
    pick = {"ours": ours_cls, "torch": torch_cls}
    # reference: 100 uninterrupted steps with our optimizer
    ref_p = make_params(dtype)
    ref = ours_cls(groups_for(ref_p, dict(lr=0.02)), **kwargs)
    run_steps(ref, ref_p, 0, STEPS)
    # 50 steps, checkpoint, a brand-new optimizer (possibly the other implementation), 50 more
    ps = make_params(dtype)
    opt = pick[first](groups_for(ps, dict(lr=0.02)), **kwargs)
    run_steps(opt, ps, 0, STEPS // 2)
    sd = save_load(opt.state_dict())
    del opt
    opt = pick[second](groups_for(ps, dict(lr=0.02)), **kwargs)
    opt.load_state_dict(sd)
    assert opt.param_groups[1]["lr"] == 0.02
    run_steps(opt, ps, STEPS // 2, STEPS)
    assert_params_close(ps, ref_p, dtype, msg=f"{first}->{second}")


def test_load_state_dict_restores_hyperparameters():
    ps = make_params(torch.float32)
    opt = optim.AdamW(ps, lr=0.5, betas=(0.8, 0.9), weight_decay=0.3)
    fresh = optim.AdamW(ps)
    fresh.load_state_dict(save_load(opt.state_dict()))
    g = fresh.param_groups[0]
    assert (g["lr"], g["betas"], g["weight_decay"]) == (0.5, (0.8, 0.9), 0.3)


# ---------------------------------------------------------------------------
# zero_grad, bad inputs

def test_zero_grad():
    ps = make_params(torch.float32)
    opt = optim.SGD(ps, lr=0.1, momentum=0.9)
    compute_grads(ps, 0)
    opt.step()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in ps if p.grad is not None)
    assert ps[0].grad is not None
    opt.zero_grad()  # default: set_to_none=True, like torch
    assert all(p.grad is None for p in ps)
    before = [p.detach().clone() for p in ps]
    opt = optim.Adam(ps)
    opt.step()  # no grads at all: nothing moves, no state is created
    assert all(torch.equal(a, b) for a, b in zip(before, ps)) and len(opt.state) == 0


@pytest.mark.parametrize("make", [
    lambda p: optim.SGD(p, lr=-0.1),
    lambda p: optim.SGD(p, momentum=-0.1),
    lambda p: optim.SGD(p, weight_decay=-1e-4),
    lambda p: optim.SGD(p, nesterov=True),
    lambda p: optim.SGD(p, momentum=0.9, dampening=0.1, nesterov=True),
    lambda p: optim.Adam(p, lr=-1e-3),
    lambda p: optim.Adam(p, eps=-1e-8),
    lambda p: optim.Adam(p, betas=(1.0, 0.999)),
    lambda p: optim.Adam(p, betas=(-0.1, 0.999)),
    lambda p: optim.Adam(p, betas=(0.9, 1.0)),
    lambda p: optim.Adam(p, weight_decay=-0.1),
    lambda p: optim.AdamW(p, lr=-1e-3),
    lambda p: optim.AdamW(p, betas=(0.9, 1.5)),
    lambda p: optim.AdamW(p, weight_decay=-0.01),
    lambda p: optim.AdamW([], lr=1e-3),  # torch: "optimizer got an empty parameter list"
])
def test_invalid_hyperparameters(make):
    with pytest.raises(ValueError):
        make(make_params(torch.float32))


def test_valid_edge_hyperparameters_and_defaults():
    p = make_params(torch.float32)
    optim.SGD(p, lr=0.0, momentum=0.9, nesterov=True)
    optim.Adam(p, betas=(0.0, 0.0), eps=0.0)
    for ours, ref in [(optim.SGD, torch.optim.SGD), (optim.Adam, torch.optim.Adam),
                      (optim.AdamW, torch.optim.AdamW)]:
        d, rd = ours(p).defaults, ref(p).defaults
        assert {k: rd[k] for k in d} == d


@pytest.mark.parametrize("cls", [optim.SGD, optim.Adam, optim.AdamW])
def test_sparse_grad_raises(cls):
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        cls(emb.parameters(), lr=0.1).step()


# ---------------------------------------------------------------------------
# cosine_lr

# cosine_lr is a few float64 operations (a cosine, a product, a sum): within 1e-12 of
# the exact value, a thousand units of float64 roundoff.
F64_FEW = 1e-12


def test_cosine_lr_shape():
    lr, min_lr, warm, decay = 6e-4, 6e-5, 10, 100
    f = lambda s: optim.cosine_lr(s, lr=lr, min_lr=min_lr, warmup_iters=warm, decay_iters=decay)  # noqa: E731
    assert f(0) == pytest.approx(lr / warm, rel=F64_FEW)
    assert f(warm - 1) == pytest.approx(lr, rel=F64_FEW)
    assert f(warm) == pytest.approx(lr, rel=F64_FEW)
    assert f((warm + decay) / 2) == pytest.approx((lr + min_lr) / 2, rel=F64_FEW)
    assert f(decay) == pytest.approx(min_lr, rel=F64_FEW)
    assert f(decay + 1000) == min_lr
    values = [f(s) for s in range(decay + 20)]
    assert all(a < b for a, b in zip(values[:warm], values[1:warm]))  # strictly up during warmup
    assert all(a >= b for a, b in zip(values[warm:], values[warm + 1:]))  # never up afterwards
    assert all(min_lr <= v <= lr for v in values[warm:])


def test_cosine_lr_degenerate_schedules():
    kw = dict(lr=1.0, min_lr=0.1)
    # no warmup: starts at lr
    assert optim.cosine_lr(0, warmup_iters=0, decay_iters=10, **kw) == 1.0
    assert optim.cosine_lr(10, warmup_iters=0, decay_iters=10, **kw) == 0.1
    # no decay phase: warmup, then straight to min_lr, no ZeroDivisionError
    for warm, decay in [(10, 10), (10, 5), (0, 0)]:
        for s in range(0, 15):
            v = optim.cosine_lr(s, warmup_iters=warm, decay_iters=decay, **kw)
            assert math.isfinite(v)
            if s >= warm:
                assert v == 0.1
    assert optim.cosine_lr(9, warmup_iters=10, decay_iters=10, **kw) == pytest.approx(1.0, rel=F64_FEW)


def test_cosine_lr_hold_keeps_the_peak_then_runs_the_whole_cosine():
    kw = dict(lr=1.0, min_lr=0.1, warmup_iters=10, decay_iters=110)
    f = lambda s: optim.cosine_lr(s, hold=0.7, **kw)  # noqa: E731
    assert [f(s) for s in range(10)] == [optim.cosine_lr(s, **kw) for s in range(10)]  # warmup unchanged
    assert all(f(s) == 1.0 for s in range(10, 80))  # 70% of the 100 steps after warmup at the peak
    assert f(80 + 15) == pytest.approx(0.55, rel=F64_FEW)  # the cosine's midpoint, halfway through its 30 steps
    assert f(109) > 0.1 and f(110) == 0.1
    values = [f(s) for s in range(80, 120)]
    assert all(a > b for a, b in zip(values[:30], values[1:31]))  # strictly down across the decay
    # hold 0 is the plain schedule
    assert all(optim.cosine_lr(s, hold=0.0, **kw) == optim.cosine_lr(s, **kw) for s in range(120))


# ---------------------------------------------------------------------------
# clip_grad_norm_

def grads_pair(dtype=torch.float32, scale=1.0):
    ps = make_params(dtype)
    compute_grads(ps, 1)  # step 1: the last param has no grad
    for p in ps:
        if p.grad is not None:
            p.grad.mul_(scale)
    assert ps[4].grad is None
    return ps, clone_with_grads(ps)


def clone_with_grads(ps):
    out = clone_params(ps)
    for a, b in zip(out, ps):
        a.grad = None if b.grad is None else b.grad.clone()
    return out


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("max_norm", [0.05, 1e6], ids=["clipped", "unclipped"])
def test_clip_grad_norm_matches_torch(max_norm, dtype, foreach):
    ps, ref = grads_pair(dtype, scale=10.0)
    original = [None if p.grad is None else p.grad.clone() for p in ps]
    norm = optim.clip_grad_norm_(ps, max_norm, foreach=foreach)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm, foreach=foreach)
    assert torch.is_tensor(norm) and norm.dim() == 0 and norm.dtype == dtype
    # the norm: a sum of 75 squares in some order, then a square root; the clipped
    # gradients one multiplication more by max_norm / norm
    n = sum(p.grad.numel() for p in ps if p.grad is not None)
    torch.testing.assert_close(norm, ref_norm, **tols(dtype, rounding=n + 2))
    for p, r, o in zip(ps, ref, original):
        if r.grad is None:
            assert p.grad is None
            continue
        torch.testing.assert_close(p.grad, r.grad, **tols(dtype, rounding=n + 4))
        if max_norm > norm:
            assert torch.equal(p.grad, o)  # below the threshold: untouched
    new_norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ps if p.grad is not None]))
    # the clipped norm, recomputed: at most max_norm up to the two norms' roundings
    assert new_norm.item() <= max_norm * (1 + 2 * (n + 4) * U32) or max_norm > norm


def test_clip_grad_norm_edge_cases():
    ps = make_params(torch.float32)
    out = optim.clip_grad_norm_(ps, 1.0)  # no grads at all
    assert torch.is_tensor(out) and out.item() == 0.0
    ps[0].grad = torch.full_like(ps[0], float("inf"))
    assert math.isinf(optim.clip_grad_norm_(ps, 1.0).item())  # returned, not raised
    bf = torch.ones(1000, dtype=torch.bfloat16, requires_grad=True)
    bf.grad = torch.full_like(bf, 3.0)
    norm = optim.clip_grad_norm_([bf], 1e9)
    assert norm.dtype == torch.float32  # accumulated in fp32
    assert norm.item() == pytest.approx(3.0 * math.sqrt(1000), rel=1000 * U32)  # 1000 fp32 squares summed


# ---------------------------------------------------------------------------
# weight_decay_groups

class TiedLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = torch.nn.Embedding(11, 6)
        self.ln = torch.nn.LayerNorm(6)
        self.fc = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 11, bias=False)
        self.head.weight = self.wte.weight  # tied
        self.frozen = torch.nn.Parameter(torch.zeros(3, 3), requires_grad=False)


def test_weight_decay_groups():
    m = TiedLM()
    for source in [m, list(m.named_parameters(remove_duplicate=False))]:
        decay, no_decay = optim.weight_decay_groups(source, 0.1)
        assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
        ids = lambda ps: {id(p) for p in ps}  # noqa: E731
        assert ids(decay["params"]) == ids([m.wte.weight, m.fc.weight])
        assert len(decay["params"]) == 2  # tied weight appears once
        assert ids(no_decay["params"]) == ids([m.ln.weight, m.ln.bias, m.fc.bias])
    # and the result is accepted by both implementations
    optim.AdamW(optim.weight_decay_groups(m, 0.1), lr=1e-3)
    torch.optim.AdamW(optim.weight_decay_groups(m, 0.1), lr=1e-3)


def test_weight_decay_groups_leave_out_marked_tensors():
    import vae
    m = vae.Model(vae.Config(point_dim=2, z_dim=3, prior_components=4))
    decay, no_decay = optim.weight_decay_groups(m, 0.1, contract.hooks(m).no_decay)
    ids = {id(p) for p in no_decay["params"]}
    assert id(m.prior_means) in ids and id(m.prior_logvars) in ids  # 2D, yet a density's parameters
    assert id(m.encoder[0].weight) in {id(p) for p in decay["params"]}


# ---------------------------------------------------------------------------
# Muon: 2-D parameters only, tall, wide and square, on a least-squares problem whose
# gradients are computed afresh each step from the current weights.

MUON_SHAPES = [(12, 5), (5, 12), (7, 7)]


def muon_trajectory(cls, kwargs, steps=STEPS):
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(s, generator=g).requires_grad_() for s in MUON_SHAPES]
    xs = [torch.randn(s[1], 9, generator=g) for s in MUON_SHAPES]
    ys = [torch.randn(s[0], 9, generator=g) for s in MUON_SHAPES]
    opt = cls(ws, **kwargs)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        sum(((w @ x - y) ** 2).mean() for w, x, y in zip(ws, xs, ys)).backward()
        opt.step()
        out.append([w.detach().clone() for w in ws])
    return out, opt


@pytest.mark.parametrize("kwargs", [
    {}, dict(nesterov=False), dict(adjust_lr_fn="match_rms_adamw", lr=0.02), dict(weight_decay=0.0, momentum=0.8),
    dict(ns_steps=3, ns_coefficients=(2.0, -1.5, 0.5), lr=0.01), dict(adjust_lr_fn="original", eps=1e-5),
], ids=["defaults", "no-nesterov", "match-rms-adamw", "no-decay", "cubic-3-steps", "original"])
def test_muon_matches_torch_step_for_step(kwargs):
    """The same operations in the same order (the iteration in bf16 included), so the same
    numbers: bit for bit over 100 steps, on any CPU (one machine computes both)."""
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("this torch has no torch.optim.Muon (since 2.9)")
    ours, opt = muon_trajectory(optim.Muon, kwargs)
    theirs, ref = muon_trajectory(torch.optim.Muon, kwargs)
    for t, (a, b) in enumerate(zip(ours, theirs)):
        assert all(torch.equal(x, y) for x, y in zip(a, b)), f"step {t + 1}"
    # state dicts move between the two
    assert all(torch.equal(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"])
               for p, q in zip(opt.param_groups[0]["params"], ref.param_groups[0]["params"]))


def test_newton_schulz_orthogonalises():
    """Against the SVD: every singular value of the result within the iteration's band
    (about 0.7 to 1.2 for the default coefficients, plus bf16's 2^-8 relative rounding over
    a few products), and the same singular vectors (U V^T's inner product with the result
    is near its size)."""
    g = torch.randn(24, 40, generator=torch.Generator().manual_seed(4))
    o = optim.newton_schulz(g).float()
    s = torch.linalg.svdvals(o)
    assert s.min() > 0.6 and s.max() < 1.25, s
    u, _, vt = torch.linalg.svd(g, full_matrices=False)
    assert (o * (u @ vt)).sum() / 24 > 0.8  # the mean singular value along U V^T's directions
    assert optim.newton_schulz(g.T).float().allclose(o.T)  # a tall matrix is the wide one transposed


def test_muon_refuses_what_torch_refuses():
    for bad in (dict(lr=-1.0), dict(momentum=-0.1), dict(weight_decay=-1.0), dict(adjust_lr_fn="other")):
        with pytest.raises(ValueError):
            optim.Muon([torch.zeros(2, 2, requires_grad=True)], **bad)
    with pytest.raises(ValueError, match="2D parameters"):
        optim.Muon([torch.zeros(3, requires_grad=True)])
    with pytest.raises(ValueError, match="2D parameters"):  # a conv kernel: only with flatten=True
        optim.Muon([torch.zeros(3, 2, 3, 3, requires_grad=True)])
    with pytest.raises(ValueError, match="2D parameters"):
        optim.Muon([torch.zeros(3, requires_grad=True)], flatten=True)


@pytest.mark.parametrize("adjust", [None, "match_rms_adamw"])
def test_muon_flattened_kernels_step_as_their_matrices(adjust):
    """flatten=True on conv kernels [out, in, kh, kw] is Muon on the matrices [out, in*kh*kw]
    that hold the same numbers, gradients reshaped alike: the same operations, bit for bit
    (tall, wide and square once flattened), over 100 steps; torch.optim.Muon on those
    matrices is checked against optim.Muon above."""
    g = torch.Generator().manual_seed(5)
    shapes = [(40, 2, 3, 3), (6, 4, 3, 3), (36, 4, 3, 3)]  # as matrices 40 x 18, 6 x 36, 36 x 36
    kernels = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    matrices = [k.detach().flatten(1).clone().requires_grad_() for k in kernels]
    xs = [torch.randn(5, s[1], 6, 6, generator=g) for s in shapes]
    a = optim.Muon(kernels, lr=0.01, adjust_lr_fn=adjust, flatten=True)
    b = optim.Muon(matrices, lr=0.01, adjust_lr_fn=adjust)
    for step in range(STEPS):
        a.zero_grad()
        sum((torch.nn.functional.conv2d(x, k) ** 2).mean() for k, x in zip(kernels, xs)).backward()
        for k, m in zip(kernels, matrices):
            m.grad = k.grad.flatten(1).clone()
        a.step()
        b.step()
        assert all(torch.equal(k.detach().flatten(1), m.detach()) for k, m in zip(kernels, matrices)), step
