"""How far apart two fp32 computations of one quantity may honestly be: bounds derived
from the arithmetic, never tuned to the machine that runs the tests.

The CPUs that run this suite (AVX2, AVX-512, AMX; a GPU) sum in different orders:
their matmul kernels block and vectorise a reduction differently, so two computations
that are equal in exact arithmetic (k micro-batches and one batch; 2 processes and 1)
differ by rounding, and by a different amount on each machine. What does not depend on
the machine is the bound on that rounding:

- One rounding moves a value by at most U32 = 2^-24 of itself (fp32's unit roundoff).
- A sum of n terms, in any order, is off by at most (n - 1) U32 times the sum of the
  terms' magnitudes (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed.,
  section 4.2). A chain of reductions (a matmul, a softmax, a mean over the batch)
  adds their lengths; for the small well-conditioned networks of the tests, n below
  is that sum, and the terms' magnitudes are those of the result.
- Plain SGD's update is linear in the gradient, so the weights' displacement from
  their start inherits the gradient's relative error, n U32.
- Adam divides by the gradient's own scale: an element whose gradient is within
  rounding of zero may step the other way (an O(lr) difference, whatever its size).
  With a gradient perturbed by a relative eps = n U32 and a smooth distribution of
  gradient elements around zero, the share of such elements is O(eps) and the
  displacement's norm-wise relative difference O(sqrt(eps)). The loss, which is
  what the claim is about, is first-order insensitive to them: an element that flips
  has a gradient of about eps, so it moves the loss by about lr * eps.
"""
import math
import os

import torch

U32 = 2.0 ** -24   # fp32 unit roundoff
U64 = 2.0 ** -53   # fp64 unit roundoff


def reduction_error(n, scale=1.0, u=U32):
    """Worst-case rounding of an n-term reduction whose terms have magnitudes summing to
    about `scale` (the result itself, for same-sign terms such as a mean of losses)."""
    return n * u * abs(scale)


def assert_losses_agree(a, b, n, what=""):
    """Two logs {step: loss} of runs equal in exact arithmetic: every step's loss within
    reduction_error(n, loss), n being the longest chain of reductions in the loss. (The
    weight differences the earlier steps left add about lr * n * U32 more: negligible.)"""
    assert sorted(a) == sorted(b), (what, sorted(a), sorted(b))
    for step in a:
        tol = reduction_error(n, max(abs(a[step]), abs(b[step])))
        assert abs(a[step] - b[step]) <= tol, (what, step, a[step], b[step], tol)


def assert_displacements_agree(a, b, start, n, adam=True, what=""):
    """Two state dicts after the same steps from the same `start`, equal in exact
    arithmetic: per tensor, |a - b| <= tau |a - start| (Frobenius norms) with
    tau = n U32 after linear updates (SGD), sqrt(n U32) after an Adam-family optimizer
    (see the module docstring). A tensor that did not move must be equal bit for bit."""
    tau = math.sqrt(n * U32) if adam else n * U32
    assert a.keys() == b.keys() == start.keys(), what
    for k in a:
        x, y, w0 = a[k].double(), b[k].double(), start[k].double()
        moved = (x - w0).norm()
        if moved == 0:
            assert torch.equal(a[k], b[k]), (what, k)
            continue
        assert (x - y).norm() <= tau * moved, (what, k, float((x - y).norm() / moved), tau)


def weights_at_start(ckpt):
    """The weights a run started from: train.py seeds torch with the run's seed, then
    builds the model from its config (the same on every rank)."""
    import train
    conf = ckpt["config"]
    module = train.load_module(conf["model_path"] if os.path.isfile(conf.get("model_path", "")) else conf["model"])
    cfg = module.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in conf["model_config"].items()})
    torch.manual_seed(conf["train_config"]["seed"])
    return module.Model(cfg).state_dict()
