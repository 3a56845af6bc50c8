"""The model contract: a model file loaded by name or path, its optional hooks resolved
once (hooks() -> Hooks, the one place that looks for them), and the calls of its samplers.

Required of a model file: a dataclass Config and a Model(nn.Module) with
forward(x, y=None) -> (loss, {name: value to log}) and sample(n, y=None). Everything
else is optional, with the defaults below (README.md, "Write or fork a model").
"""
import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from cli import UsageError

HERE = os.path.dirname(os.path.abspath(__file__))


def load_module(name):
    """A model: one of this project's files by name (gpt, diffusion, ...), or any .py file
    by path. A file is imported under a name of its own (registered in sys.modules, so
    its dataclasses and their comments, the --help texts, can be read back)."""
    if name.endswith(".py"):
        if not os.path.isfile(name):
            raise UsageError(f"--model {name}: no such file")
        path = os.path.abspath(name)
        stem = os.path.splitext(os.path.basename(path))[0]
        key = f"nanogen_model_{re.sub(r'[^0-9A-Za-z_]', '_', stem)}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[key]
            raise
    else:
        ours = re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) and os.path.isfile(os.path.join(HERE, name + ".py"))
        if not ours:
            raise UsageError(f"--model {name}: not a model of this project (gpt, ...) nor a path to a .py file")
        module = importlib.import_module(name)
    for attr in ("Config", "Model"):
        if not hasattr(module, attr):
            raise UsageError(f"--model {name}: the module defines no {attr} "
                             f"(see README.md, \"Write or fork a model\")")
    if not callable(getattr(module.Model, "sample", None)):
        raise UsageError(f"--model {name}: its Model defines no sample(n, y=None) (see README.md, "
                         f"\"Write or fork a model\")")
    if not dataclasses.is_dataclass(module.Config):
        raise UsageError(f"--model {name}: its Config is not a dataclass "
                         f"(see README.md, \"Write or fork a model\")")
    return module


def presets(module):
    """The module's PRESETS: {name: {field: value}} (none by default)."""
    return getattr(module, "PRESETS", None) or {}


def default_data(module):
    """The module's DATA, the dataset it trains on without --data ("": none)."""
    return getattr(module, "DATA", "") or ""


def gpt2_loader(module):
    """Model.from_gpt2(path, dropout=...), for --init-from GPT-2 weights; None without it."""
    return getattr(module.Model, "from_gpt2", None)


@dataclass
class Hooks:
    """A model's optional hooks, each with the default that stands in when it has none."""
    players: tuple = ("model",)          # who steps, in order; a name repeated steps again
    parameters_of: Callable = None       # player -> the parameters its optimizer steps (default: all)
    takes_player: bool = False           # forward(x, y, player=...) is called with the player
    lr_mult: dict = field(default_factory=dict)  # player -> a factor on --lr
    batch_multiple: int = 1              # micro-batches must be a multiple of this
    io_layers: list = field(default_factory=list)  # modules reading the input or writing the output
    no_decay: set = field(default_factory=set)  # ids of parameters that take no weight decay
    step: Optional[torch.Tensor] = None  # a buffer train.py fills with the optimizer step
    generate: Optional[Callable] = None  # text sampler: generate(idx, max_new_tokens, ...)
    nll: Optional[Callable] = None       # nll(x, y=None): nats per example or token
    reconstruct: Optional[Callable] = None  # reconstruct(x): the model's reconstructions of x
    interpolate: Optional[Callable] = None  # interpolate(a, b, steps): rows from a to b

    @property
    def names(self):
        """Each player once, in order of first stepping."""
        return list(dict.fromkeys(self.players))


def hooks(model):
    """The Hooks of a model (a bare nn.Module, not a DDP or compile wrapper)."""
    forward = inspect.signature(model.forward).parameters.values()
    step = getattr(model, "step", None)
    parameters_of = getattr(model, "parameters_of", None)
    return Hooks(
        players=tuple(getattr(model, "players", ("model",))),
        parameters_of=(lambda p: list(parameters_of(p))) if parameters_of else (lambda p: list(model.parameters())),
        takes_player=any(p.name == "player" or p.kind is p.VAR_KEYWORD for p in forward),
        lr_mult=dict(getattr(model, "lr_mult", {})),
        batch_multiple=int(getattr(model, "batch_multiple", 1)),
        io_layers=list(model.io_layers()) if hasattr(model, "io_layers") else [],
        no_decay={id(p) for p in model.no_weight_decay()} if hasattr(model, "no_weight_decay") else set(),
        step=step if isinstance(step, torch.Tensor) else None,
        **{name: getattr(model, name, None) for name in ("generate", "nll", "reconstruct", "interpolate")})


def forward_kwargs(hooks, player):
    """The keyword arguments of a training forward pass for `player`."""
    return {"player": player} if hooks.takes_player else {}


def sampler_kwargs(model, progress=None, **given):
    """The sampler options the user gave (None: not given) that model.sample accepts, plus
    a progress wrapper where it takes one; an option it does not take is a UsageError."""
    accepts = inspect.signature(model.sample).parameters
    kw = {k: v for k, v in given.items() if v is not None}
    for k in kw:
        if k not in accepts:
            raise UsageError(f"--{k.replace('_', '-')}: this model's sampler takes no {k}")
    if progress is not None and "progress" in accepts:
        kw["progress"] = progress
    return kw


def generate_kwargs(generate, device, seed, temperature=None, optional=None, **given):
    """generate()'s keywords for the text flags of sample.py and metrics.py: the
    temperature (default 0.8), a generator seeded with seed, the `optional` ones that it
    takes, and the options given (None: not given); an option given that generate() does
    not take is a UsageError naming its flag."""
    accepts = inspect.signature(generate).parameters
    kw = dict(temperature=0.8 if temperature is None else temperature,
              generator=torch.Generator(device=device).manual_seed(seed))
    kw.update({k: v for k, v in (optional or {}).items() if k in accepts})
    for name, v in given.items():
        if v is not None and name not in accepts:
            flag = "--no-cache" if name == "use_cache" else "--" + name.replace("_", "-")
            raise UsageError(f"{flag}: this model's generate() takes no {name}")
        if v is not None:
            kw[name] = v
    return kw


def nll_kwargs(nll, k):
    """{"k": k} where nll(x, k=...) takes a number of importance samples (an IWAE bound),
    else {}."""
    return {"k": k} if "k" in inspect.signature(nll).parameters else {}


def sample_labels(n, classes, device, label=None, start=0):
    """The labels of samples start..start+n-1: `label` for all, else cycling through the
    classes (so a grid with one column per class shows each in its column); None for a
    model without classes."""
    if not classes:
        return None
    if label is not None:
        return torch.full((n,), label, device=device)
    return torch.arange(start, start + n, device=device) % classes


@torch.no_grad()
def draw_samples(model, n, classes, device, batch_size=None, label=None, wrap=lambda it: it, **kw):
    """n samples of model.sample, in batches of batch_size (default: all at once), with
    their labels (sample_labels), as float on the CPU. A sampler's ValueError (e.g. more
    steps than the model has) is the user's to fix."""
    batch_size = batch_size or n
    out = []
    for i in wrap(range(0, n, batch_size)):
        b = min(batch_size, n - i)
        try:
            out.append(model.sample(b, y=sample_labels(b, classes, device, label, i), **kw).float().cpu())
        except ValueError as e:
            raise UsageError(str(e))
    return torch.cat(out)
