"""What train.py, sample.py, metrics.py, bench.py and data.py share.

- UsageError and cli: a problem the user can fix is one line on stderr and exit code 2.
- Flags from dataclasses: every field is a flag, its trailing comment the help text.
- Model files and the model contract (README.md, "Write or fork a model"): load_module
  reads a file, and players, parameters_of, forward_kwargs and can give the defaults of
  the hooks a model may leave out.
- Devices and dtypes; checkpoints (written atomically, read with weights_only); a model
  rebuilt from its checkpoint; samples drawn with their labels.
"""
import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import shutil
import sys

import torch


class UsageError(Exception):
    """A problem the user can fix; printed as one line that says how, exit code 2."""


class Fault(Exception):
    """A failure outside the user's input (a lost process); printed as one line, exit code 1."""


def cli(main, argv=None):
    """Run main(argv) as a command: its return value is the exit code; a UsageError or a
    Fault is one line on stderr (exit 2 or 1), never a traceback."""
    try:
        code = main(argv)
    except (UsageError, Fault) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2 if isinstance(e, UsageError) else 1
    sys.exit(code)


# ---- flags ---------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def field_help(cls):
    """Each field's trailing comment in the source is its --help text, continued by the
    comment-only lines below it whose # stands in the same column."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):  # a class made at runtime has no source
        return {}
    helps, name, column = {}, None, -1
    for line in src.splitlines():
        field = re.match(r"\s+(\w+)\s*:[^#\n]*(#\s*)(.*)$", line)
        if field:
            name, column = field.group(1), field.start(2)
            helps[name] = field.group(3)
        elif name and line.find("#") == column and not line[:column].strip():
            helps[name] += " " + line[column + 1:].strip()
        else:
            name = None
    return helps


def parse_value(text, typ, default):
    if typ is bool or isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError
    if isinstance(default, tuple):
        return tuple(type(default[0])(v) for v in text.split(",") if v) if default else tuple(text.split(","))
    return type(default)(text)


def add_fields(parser, cls, title):
    """One flag per field of dataclass `cls` (n_layer -> --n-layer), in their own group;
    a flag not given stays out of the parsed namespace, so a preset can fill it."""
    group = parser.add_argument_group(title)
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        doc = f"{helps.get(f.name, '')} (default: {f.default})"
        if isinstance(f.default, bool):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=doc)
            continue

        def conv(text, f=f):
            try:
                return parse_value(text, f.type, f.default)
            except ValueError:
                raise argparse.ArgumentTypeError(f"invalid value {text!r}")
        conv.__name__ = type(f.default).__name__
        group.add_argument(flag, dest=f.name, type=conv, default=argparse.SUPPRESS,
                           metavar=type(f.default).__name__.upper(), help=doc)


# ---- model files and the contract ------------------------------------------------------

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
    return getattr(module, "PRESETS", None) or {}


def players(model):
    """Who steps, in order (a name repeated steps again); one player, "model", by default."""
    return tuple(getattr(model, "players", ("model",)))


def parameters_of(model, player):
    """The parameters `player`'s optimizer steps; by default all of the model's."""
    if hasattr(model, "parameters_of"):
        return list(model.parameters_of(player))
    return list(model.parameters())


def forward_kwargs(model, player):
    """The keyword arguments of a training forward pass: player= where forward takes it
    (by name, or as one of its **kwargs)."""
    params = inspect.signature(model.forward).parameters.values()
    takes = any(p.name == "player" or p.kind is p.VAR_KEYWORD for p in params)
    return {"player": player} if takes else {}


# ---- devices and dtypes ----------------------------------------------------------------

def pick_device(name, local_rank=0):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device (auto, cpu, cuda, cuda:N, mps)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dtype_name(dtype):
    return next(n for n, d in DTYPES.items() if d == dtype)


def cpu_has_bf16():
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16), as oneDNN sees it."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pick_dtype(name, device):
    """--dtype as a torch dtype, auto resolved without timing anything: bf16 on CUDA (fp16
    where the card has no bf16) and on a CPU with bf16 matrix units (AMX, AVX512-BF16),
    fp32 on other CPUs, which emulate bf16 ~100x slower than fp32 (an AVX2-only EPYC).
    train.py refines auto on a bf16 CPU by timing the model (train.run_dtype)."""
    cpu_bf16 = device.type == "cpu" and cpu_has_bf16()
    if name == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            name = "bf16" if cpu_bf16 else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise UsageError("--dtype fp16 needs CUDA (its GradScaler); use bf16 or fp32 here")
    if name == "bf16" and device.type == "cpu" and not cpu_bf16:
        print("warning: this CPU has no bf16 matrix units (AMX or AVX512-BF16); bf16 runs emulated and "
              "far slower than fp32 here", file=sys.stderr)
    return DTYPES[name]


def native_dtype(name, device):
    """Whether this device computes `name` natively (not emulated, not refused)."""
    if device.type == "cuda":
        return name != "bf16" or torch.cuda.is_bf16_supported()
    return name == "fp32" or name == "bf16" and device.type == "cpu" and cpu_has_bf16()


def trained_dtype(ckpt, device):
    """What --dtype auto takes for a checkpoint's model: the dtype its run trained in,
    where this device computes it natively (None where it does not); "auto" (auto's rule
    of the time, no race) for a checkpoint from before train.py recorded it."""
    saved = ckpt["config"].get("dtype")
    if saved is None:
        return "auto"
    return saved if native_dtype(saved, device) else None


def autocast(device, dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def compile_unavailable(device):
    """Why torch.compile cannot work here, or None."""
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    try:
        if not importlib.import_module("torch._dynamo").is_dynamo_supported():
            return "torch.compile does not support this Python"
    except Exception as e:
        return f"torch.compile is unavailable ({type(e).__name__})"
    if device.type == "cpu" and not shutil.which(os.environ.get("CXX", "g++")) and not shutil.which("c++"):
        return "no C++ compiler for inductor's CPU kernels (install g++)"
    return None


def fork_rng(device):
    """Draw without disturbing the training noise (CPU's generator, and CUDA's on CUDA)."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


# ---- checkpoints -------------------------------------------------------------------------

def atomic_write(path, write):
    """Call write(file) on a temp file next to path, fsync it, rename it over path.
    A reader sees the old file or the new one, never half of one, even if this
    process is killed midway; when several processes write at once the last rename
    wins. Checkpoints, caches and metrics' JSON are written through here."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.{os.urandom(4).hex()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dirfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dirfd)  # make the rename itself durable
    finally:
        os.close(dirfd)


def save_checkpoint(obj, path):
    """Atomic: a crash leaves the old checkpoint or the new one, never half of one."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no checkpoint there")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a bad file; the user needs one line
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            reason = "it holds pickled objects beyond tensors and plain data, refused without running them"
        raise UsageError(f"{path}: not a readable nanogen checkpoint ({reason})")
    conf = ckpt.get("config") if isinstance(ckpt, dict) else None
    if not (isinstance(conf, dict) and isinstance(ckpt.get("model"), dict) and isinstance(conf.get("model"), str)
            and isinstance(conf.get("model_config"), dict) and isinstance(conf.get("train_config"), dict)):
        raise UsageError(f"{path}: not a nanogen checkpoint (no model, or no config of one, inside)")
    return ckpt


def strip_prefixes(state_dict):
    """State dict keys without the wrappers' prefixes (DDP's module., compile's _orig_mod.)."""
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state_dict.items()}


def load_state(model, state, name):
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError, ValueError) as e:  # not tensors, or not of this shape
        first = [line.strip() for line in str(e).splitlines() if line.strip()][1:2]
        raise UsageError(f"checkpoint does not fit this {name} model: {first[0] if first else e}")


def checkpoint_module(ckpt, path, model=""):
    """The model module a checkpoint was trained with: `model` where given (a file that
    has moved), else the file its run recorded, else the project's module of its name."""
    conf = ckpt["config"]
    recorded = conf.get("model_path") or ""
    if model:
        return load_module(model)
    if recorded and not os.path.isfile(recorded):
        raise UsageError(f"{path} was trained with {recorded}, which is not there now; "
                         f"give the file's new path with --model")
    return load_module(recorded or conf["model"])


def build_from_checkpoint(ckpt, device="cpu", path="the checkpoint", model_file=""):
    """(module, model, TrainConfig fields as a dict, Config) from a checkpoint, for
    sample.py and metrics.py. The model carries the EMA weights where the run kept them:
    those are the ones to use."""
    conf = ckpt["config"]
    try:
        module = checkpoint_module(ckpt, path, model_file)
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in conf["model_config"].items()}
        mcfg = module.Config(**fields)
        model = module.Model(mcfg)
    except UsageError:
        raise
    except Exception as e:  # an edited or damaged config: whatever breaks, one line
        raise UsageError(f"{path}: its config does not make a model ({type(e).__name__}: {str(e)[:120]})")
    load_state(model, ckpt["ema"] if isinstance(ckpt.get("ema"), dict) else ckpt["model"], conf["model"])
    return module, model.to(device), dict(conf["train_config"]), mcfg


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


def generate_kwargs(model, device, seed, temperature=None, **given):
    """model.generate's keywords for the text flags of sample.py and metrics.py: the
    temperature (default 0.8), a generator seeded with seed, and the options given (None:
    not given); an option generate() does not take is a UsageError naming its flag."""
    accepts = inspect.signature(model.generate).parameters
    kw = dict(temperature=0.8 if temperature is None else temperature,
              generator=torch.Generator(device=device).manual_seed(seed))
    for name, v in given.items():
        if v is not None and name not in accepts:
            flag = "--no-cache" if name == "use_cache" else "--" + name.replace("_", "-")
            raise UsageError(f"{flag}: this model's generate() takes no {name}")
        if v is not None:
            kw[name] = v
    return kw


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
