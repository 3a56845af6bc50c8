"""
Optimizers and learning-rate plumbing, written from the formulas; the optimizers of a
training run (one per player) and its average of the weights (EMA).

SGD, Adam, AdamW and Muon are drop-in replacements for their torch.optim namesakes: same
arguments, defaults, validation, state keys and numbers, so state_dicts move freely
between the two. Updates use torch._foreach_* ops, one call per (device, dtype)
bucket: on a GPU a Python loop over ~150 tensors would launch ~150x more kernels.
"""

import copy
import math
from collections import defaultdict

import torch


def _buckets(tensors):
    """Index lists of `tensors` grouped by (device, dtype): the unit one foreach kernel can take."""
    groups = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[(t.device, t.dtype)].append(i)
    return groups.values()


def _params_with_grads(group):
    """The params of a group that got a gradient this step (others are left untouched)."""
    params, grads = [], []
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError("nanogen optimizers do not support sparse gradients")
        params.append(p)
        grads.append(p.grad)
    return params, grads


def _run_closure(closure):
    # step() runs under no_grad, but the closure must be able to call backward().
    with torch.enable_grad():
        return closure() if closure is not None else None


class SGD(torch.optim.Optimizer):
    """SGD with optional (Nesterov) momentum, dampening and L2 weight decay, as torch.optim.SGD:

        g = -grad if maximize else grad;  g = g + weight_decay * p
        buf = g on the first step, else momentum * buf + (1 - dampening) * g
        g = g + momentum * buf if nesterov else buf      (only when momentum != 0)
        p = p - lr * g
    """

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0,
                 nesterov=False, *, maximize=False):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = _run_closure(closure)
        for group in self.param_groups:
            lr, momentum, dampening = group["lr"], group["momentum"], group["dampening"]
            params, grads = _params_with_grads(group)
            for idx in _buckets(params):
                ps, gs = [params[i] for i in idx], [grads[i] for i in idx]
                # Out-of-place from here on so that p.grad itself is never modified.
                if group["maximize"]:
                    gs = torch._foreach_neg(gs)
                if group["weight_decay"] != 0:
                    gs = torch._foreach_add(gs, ps, alpha=group["weight_decay"])
                if momentum != 0:
                    # A fresh buffer starts as a copy of the gradient (no dampening on
                    # the first step); existing ones are updated together in one call.
                    bufs, old_bufs, old_gs = [], [], []
                    for p, g in zip(ps, gs):
                        buf = self.state[p].get("momentum_buffer")
                        if buf is None:
                            buf = self.state[p]["momentum_buffer"] = g.clone()
                        else:
                            old_bufs.append(buf)
                            old_gs.append(g)
                        bufs.append(buf)
                    if old_bufs:
                        torch._foreach_mul_(old_bufs, momentum)
                        torch._foreach_add_(old_bufs, old_gs, alpha=1 - dampening)
                    gs = torch._foreach_add(gs, bufs, alpha=momentum) if group["nesterov"] else bufs
                torch._foreach_add_(ps, gs, alpha=-lr)
        return loss


class Adam(torch.optim.Optimizer):
    """Adam (Kingma & Ba) with L2 weight decay folded into the gradient, as torch.optim.Adam.

    With t the per-parameter step count (after incrementing):
        g = -grad if maximize else grad;  g = g + weight_decay * p     (Adam)
        p = p * (1 - lr * weight_decay)                                (AdamW, instead)
        m = beta1 * m + (1 - beta1) * g          (a lerp of m towards g)
        v = beta2 * v + (1 - beta2) * g * g;     vmax = max(vmax, v) and use vmax if amsgrad
        p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    """

    decoupled_weight_decay = False  # AdamW flips this; it is a property of the class, not the group

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, maximize=False):
        for ok, what in ((0.0 <= lr, f"learning rate: {lr}"), (0.0 <= eps, f"epsilon value: {eps}"),
                         (0.0 <= betas[0] < 1.0, f"beta parameter at index 0: {betas[0]}"),
                         (0.0 <= betas[1] < 1.0, f"beta parameter at index 1: {betas[1]}"),
                         (0.0 <= weight_decay, f"weight_decay value: {weight_decay}")):
            if not ok:  # torch.optim.Adam's checks and messages, in its order
                raise ValueError(f"Invalid {what}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize)
        super().__init__(params, defaults)

    def _state(self, p, amsgrad):
        state = self.state[p]
        if len(state) == 0:
            # Like torch: "step" is a 0-dim CPU float tensor (reading it back is free,
            # no device sync) and the moments live next to the parameter.
            dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
            state["step"] = torch.tensor(0.0, dtype=dtype)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if amsgrad and "max_exp_avg_sq" not in state:
            # Also covers turning amsgrad on mid-run: max(0, v) = v, so the max starts now.
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = _run_closure(closure)
        for group in self.param_groups:
            params, grads = _params_with_grads(group)
            if not params:
                continue
            lr, eps, wd, amsgrad = group["lr"], group["eps"], group["weight_decay"], group["amsgrad"]
            beta1, beta2 = group["betas"]
            states = [self._state(p, amsgrad) for p in params]
            # Steps are counted per parameter: one that had no grad on some step is behind.
            steps = [s["step"] for s in states]
            torch._foreach_add_(steps, 1.0)
            for idx in _buckets(params):
                ps, gs = [params[i] for i in idx], [grads[i] for i in idx]
                ms = [states[i]["exp_avg"] for i in idx]
                vs = [states[i]["exp_avg_sq"] for i in idx]
                ts = [steps[i].item() for i in idx]  # CPU tensors: no sync

                if group["maximize"]:
                    gs = torch._foreach_neg(gs)
                if wd != 0:
                    if self.decoupled_weight_decay:
                        torch._foreach_mul_(ps, 1 - lr * wd)
                    else:
                        gs = torch._foreach_add(gs, ps, alpha=wd)

                torch._foreach_lerp_(ms, gs, 1 - beta1)
                torch._foreach_mul_(vs, beta2)
                torch._foreach_addcmul_(vs, gs, gs, 1 - beta2)
                if amsgrad:
                    vmax = [states[i]["max_exp_avg_sq"] for i in idx]
                    torch._foreach_maximum_(vmax, vs)
                    vs = vmax

                # Bias corrections are Python floats, one per tensor since step counts
                # may differ; the same op order as torch keeps the results bit-identical.
                denom = torch._foreach_sqrt(vs)
                torch._foreach_div_(denom, [(1 - beta2 ** t) ** 0.5 for t in ts])
                torch._foreach_add_(denom, eps)
                torch._foreach_addcdiv_(ps, ms, denom, [-lr / (1 - beta1 ** t) for t in ts])
        return loss


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): p *= 1 - lr * weight_decay
    before the Adam update, instead of adding weight_decay * p to the gradient."""

    decoupled_weight_decay = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize)


def newton_schulz(g, coefficients=(3.4445, -4.7750, 2.0315), steps=5, eps=1e-7):
    """An approximation of U V^T for G = U S V^T, by the quintic Newton-Schulz iteration
    in bf16: from X = G / ||G||_F (every singular value in [0, 1]), `steps` times
    X <- a X + (b A + c A^2) X with A = X X^T, which maps each singular value s to
    a s + b s^3 + c s^5. The default coefficients (Jordan et al.'s) maximise the slope at 0,
    so small singular values grow fast; the values end near 1 (within about 0.7..1.2)
    rather than at it. X is kept wide (rows <= columns), so A is the smaller Gram matrix."""
    a, b, c = coefficients
    tall = g.size(0) > g.size(1)
    x = g.bfloat16().T if tall else g.bfloat16()
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024) for 2-D parameters (hidden weight matrices), as
    torch.optim.Muon: same arguments, defaults, validation, state key and numbers. Added:
    flatten=True takes a tensor of more dims as the matrix of its first dim by the rest: a
    conv kernel [out, in, kh, kw] as [out, in * kh * kw] (a transposed conv's [in, out, ...]
    as [in, out * kh * kw]), its lr adjusted by that shape.

        buf = momentum * buf + (1 - momentum) * g        (a lerp of buf towards g)
        u = (1 - momentum) * g + momentum * buf if nesterov else buf
        p = p * (1 - lr * weight_decay) - lr' * newton_schulz(u)
        lr' = lr * sqrt(max(1, rows / cols))            adjust_lr_fn None or "original" (Jordan's)
        lr' = lr * 0.2 * sqrt(max(rows, cols))          "match_rms_adamw" (Liu et al. 2025: the
                                                        update's RMS then matches AdamW's)
    """

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=(3.4445, -4.7750, 2.0315), eps=1e-7, ns_steps=5, adjust_lr_fn=None, *,
                 flatten=False):
        for value, what in ((lr, "Learning rate"), (momentum, "momentum"), (weight_decay, "weight decay")):
            if value < 0.0:  # torch.optim.Muon's checks and messages, in its order
                raise ValueError(f"{what} should be >= 0 but is: {value}")
        if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
            raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn)
        super().__init__(params, defaults)
        self.flatten = flatten
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2 and not (flatten and p.ndim > 2):
                    raise ValueError(f"Muon only supports 2D parameters whereas we found a parameter with size: "
                                     f"{p.size()}")

    @staticmethod
    def adjusted_lr(lr, how, shape):
        rows, cols = shape[:2]
        return lr * (0.2 * math.sqrt(max(rows, cols)) if how == "match_rms_adamw" else math.sqrt(max(1, rows / cols)))

    @torch.no_grad()
    def step(self, closure=None):
        loss = _run_closure(closure)
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            params, grads = _params_with_grads(group)
            for p, g in zip(params, grads):  # one matrix at a time: the iteration is per matrix
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = torch.zeros_like(g)
                buf.lerp_(g, 1 - momentum)
                u = g.lerp(buf, momentum) if group["nesterov"] else buf
                u = u.flatten(1)
                update = newton_schulz(u, group["ns_coefficients"], group["ns_steps"], group["eps"])
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.reshape(p.shape), alpha=-self.adjusted_lr(lr, group["adjust_lr_fn"], u.shape))
        return loss


def cosine_lr(step, *, lr, min_lr, warmup_iters, decay_iters, hold=0.0):
    """Learning rate at `step` (0-based): linear warmup, an optional hold at lr, cosine
    decay, then a floor.

        step <  warmup_iters:        lr * (step + 1) / warmup_iters
        warmup_iters <= step < c0:   lr,  c0 = warmup_iters + hold * (decay_iters - warmup_iters)
        c0 <= step < decay_iters:    min_lr + (lr - min_lr) * (1 + cos(pi * r)) / 2,
                                     r = (step - c0) / (decay_iters - c0)
        step >= decay_iters:         min_lr

    Warmup starts at lr/warmup_iters (never 0: a zero-lr step is wasted) and reaches lr at
    step warmup_iters - 1; the cosine starts at lr. hold in [0, 1) is the share of the
    schedule after warmup spent at the peak ("warmup-stable-decay"; 0: the cosine starts
    right after warmup). warmup_iters=0 skips warmup; decay_iters <= warmup_iters means
    min_lr right after warmup (no division by zero: the cosine branch is only reached when
    c0 <= step < decay_iters, so decay_iters - c0 > 0).
    """
    if step < warmup_iters:
        return lr * (step + 1) / warmup_iters
    if step >= decay_iters:
        return min_lr
    c0 = decay_start(warmup_iters, decay_iters, hold)
    if step < c0:
        return lr
    ratio = (step - c0) / (decay_iters - c0)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def decay_start(warmup_iters, decay_iters, hold):
    """The step at which cosine_lr's decay begins (c0 there)."""
    return warmup_iters + hold * (decay_iters - warmup_iters)


@torch.no_grad()
def grad_norm(params, foreach=True):
    """The global L2 norm of the grads, as a 0-dim tensor (accumulated in at least fp32),
    without .item(): no host-device sync. A non-finite grad gives a non-finite norm."""
    params = [params] if isinstance(params, torch.Tensor) else params
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    # fp32 accumulation for half/bf16 grads, but do not throw away fp64 precision.
    acc = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    norms = []
    for idx in _buckets(grads):
        gs = [grads[i] for i in idx]
        if foreach:
            norms.extend(torch._foreach_norm(gs, 2, dtype=acc))
        else:
            norms.extend(torch.linalg.vector_norm(g, 2, dtype=acc) for g in gs)
    device = grads[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), 2)


@torch.no_grad()
def clip_grad_norm_(params, max_norm, foreach=True):
    """Scale grads in place so their global L2 norm is at most max_norm; return the norm.

    The scale min(1, max_norm / (norm + 1e-6)) is applied unconditionally with tensor ops,
    so no host-device sync happens here (an `if norm > max_norm` would sync). A non-finite
    norm is returned as is and the grads become non-finite; the caller decides.
    """
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    total_norm = grad_norm(params, foreach)
    grads = [p.grad for p in params if p.grad is not None]
    scale = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for idx in _buckets(grads):
        gs = [grads[i] for i in idx]
        if foreach:
            torch._foreach_mul_(gs, scale.to(gs[0].device))
        else:
            for g in gs:
                g.mul_(scale.to(g.device))
    return total_norm


def weight_decay_groups(model_or_named_params, weight_decay, no_decay_ids=()):
    """Two param groups: tensors with dim >= 2 (matmul weights, embeddings) get weight decay,
    the rest (biases, norm gains) get none -- decaying those just fights the normalization.
    Tensors whose id is in `no_decay_ids` get none either (a model's no_weight_decay(), e.g.
    a learned prior's means, which decay would pull towards 0).

    Accepts an nn.Module or an iterable of (name, param). Params with requires_grad=False are
    left out, and a tensor reachable under two names (tied weights) appears once.
    """
    named = model_or_named_params
    named = named.named_parameters() if isinstance(named, torch.nn.Module) else named
    decay, no_decay, seen = [], [], set()
    for _, p in named:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in no_decay_ids else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---- the optimizers of a run: one per player ---------------------------------------------

def make_optimizers(model, hooks, tcfg):
    """{player: optimizer} for train.py's --optimizer (adamw, adam, sgd or muon), one per
    player (hooks: contract.Hooks), weight decay on matrices and embeddings only."""
    optimizers = {}
    hidden = muon_matrices(model, hooks) if tcfg.optimizer == "muon" else set()
    for player in hooks.names:
        ids = {id(p) for p in hooks.parameters_of(player)}
        named = [(n, p) for n, p in model.named_parameters() if id(p) in ids and p.requires_grad]
        groups = weight_decay_groups([(n, p) for n, p in named if id(p) not in hidden], tcfg.weight_decay,
                                     hooks.no_decay)
        if tcfg.optimizer == "sgd":
            optimizers[player] = SGD(groups, lr=tcfg.lr, momentum=tcfg.beta1)
            continue
        cls = Adam if tcfg.optimizer == "adam" else AdamW
        optimizers[player] = cls(groups, lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2))
        matrices = [p for _, p in named if id(p) in hidden]
        if matrices:
            # Muon's update is rescaled to AdamW's RMS (0.2 sqrt(max(rows, cols)), Liu et al.
            # 2025), so one --lr, one schedule and one decoupled weight decay serve both.
            muon = Muon(matrices, lr=tcfg.lr, weight_decay=tcfg.weight_decay, momentum=tcfg.muon_momentum,
                        adjust_lr_fn="match_rms_adamw", flatten=True)
            optimizers[player] = Optimizers(muon, optimizers[player])
    return optimizers


def muon_matrices(model, hooks):
    """The ids of the tensors Muon takes: every one of 2 or more dims but embeddings and
    the weights of the model's io_layers (those that read the data or noise in, or write
    the output), which are not maps between hidden features: their updates stay AdamW's,
    as in Jordan et al.'s Muon and modded-nanogpt. Nor a tensor of no_weight_decay() (a
    density's parameters, such as the VAE prior's means), which is no map at all. Tied
    weights are one tensor."""
    outside = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    outside |= {id(p) for m in hooks.io_layers for p in m.parameters()} | hooks.no_decay
    return {id(p) for p in model.parameters() if p.dim() >= 2 and id(p) not in outside}


class Optimizers:
    """Several optimizers stepped as one (Muon's matrices, AdamW's rest). param_groups
    lists every group of each, so the lr schedule, clipping and the GradScaler, which
    read param_groups, reach every parameter."""

    def __init__(self, *parts):
        self.parts = parts

    @property
    def param_groups(self):  # read afresh: load_state_dict replaces each part's groups
        return [g for opt in self.parts for g in opt.param_groups]

    def step(self):
        for opt in self.parts:
            opt.step()

    def state_dict(self):
        return {"parts": [opt.state_dict() for opt in self.parts]}

    def load_state_dict(self, state):
        for opt, part in zip(self.parts, state["parts"], strict=True):
            opt.load_state_dict(part)


class EMA:
    """An exponential moving average of a model's weights (train.py's --ema), kept in a
    frozen copy of the model that evaluation and sampling use. The average starts as the
    initial weights, and its decay ramps up as min(decay, (1+step)/(10+step)), so a short
    run is not dominated by its random start; buffers are copied."""

    def __init__(self, model, decay):
        self.model = copy.deepcopy(model).requires_grad_(False).eval()
        self.decay = decay
        self.pairs = (list(self.model.parameters()), list(model.parameters()),
                      list(zip(self.model.buffers(), model.buffers())))

    @torch.no_grad()
    def update(self, step):
        decay = min(self.decay, (1 + step) / (10 + step))
        averages, params, buffers = self.pairs
        torch._foreach_lerp_(averages, params, 1 - decay)
        for e, b in buffers:
            e.copy_(b)
