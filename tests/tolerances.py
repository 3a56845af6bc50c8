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
  adds their lengths: n below is that sum, for the small well-conditioned networks of
  the tests, whose layers do not amplify an error.
- For a loss, a mean of same-sign terms, the terms' magnitudes sum to the result. A
  gradient sums one term per example (or token) of either sign: B terms of random
  sign sum to about sqrt(B) times less than their magnitudes, so its relative error
  is sqrt(B) n U32.
- Plain SGD's update is linear in the gradient, so the weights' displacement from
  their start inherits the gradient's relative error. Each step's stored weight is
  rounded once more, relative to the weight: two runs whose updates differ by far less
  than a unit in the last place may still end one unit apart, up to 2 U32 |w| a step.
- Adam divides by the gradient's own scale: an element whose gradient is within
  rounding of zero may step the other way, 2 lr apart whatever its size. With a
  gradient perturbed by a relative eps and a smooth distribution of gradient elements
  around zero, the share of such elements is O(eps), so the displacement's norm-wise
  relative difference is about 2 sqrt(eps). The loss, which is what the claim is
  about, barely notices them: an element that flips has a gradient of about eps, so
  it moves the loss by about lr * eps.
- Muon orthogonalises the momentum by a Newton-Schulz iteration in bf16 (unit roundoff
  2^-8): 1 rounding of its input and 3 products in each of 5 iterations, 16 in a chain.
  Two inputs equal to far better than 2^-8 round alike but for a few elements; an
  allowance of 16 x 2^-8 of the update (each rounding of the chain going the other way
  once) covers that. It is an allowance, not a bound: the iteration's slope at small
  singular values is 3.4 per step, so a difference in those could grow past it.
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


def assert_displacements_agree(a, b, start, n, terms, steps, adam=True, muon=(), what=""):
    """Two state dicts after `steps` steps from the same `start`, equal in exact
    arithmetic, whose gradients sum `terms` examples (or tokens) through a chain of
    reductions n long: per tensor (Frobenius norms)
        |a - b| <= tau |a - start| + 2 steps U32 |a|,
    with eps = sqrt(terms) n U32 the gradient's relative error, tau = eps after linear
    updates (SGD), 2 sqrt(eps) after an Adam-family optimizer, at least 16 x 2^-8 for the
    tensors named in `muon` (its bf16 iteration's allowance), and the last term the
    rounding of each step's stored weights (see the module docstring)."""
    eps = math.sqrt(terms) * n * U32
    tau = 2 * math.sqrt(eps) if adam else eps
    assert a.keys() == b.keys() == start.keys(), what
    for k in a:
        x, y, w0 = a[k].double(), b[k].double(), start[k].double()
        bound = (max(tau, 16 * 2.0 ** -8) if k in muon else tau) * (x - w0).norm() + 2 * steps * U32 * x.norm()
        assert (x - y).norm() <= bound, (what, k, float((x - y).norm()), float(bound))


def weights_at_start(ckpt):
    """The weights a run started from: train.py seeds torch with the run's seed, then
    builds the model from its config (the same on every rank)."""
    import contract
    conf = ckpt["config"]
    module = contract.load_module(conf["model_path"] if os.path.isfile(conf.get("model_path", "")) else conf["model"])
    cfg = module.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in conf["model_config"].items()})
    torch.manual_seed(conf["train_config"]["seed"])
    return module.Model(cfg).state_dict()
