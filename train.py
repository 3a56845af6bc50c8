"""The one training loop, for every model.

    python train.py --model gpt --preset tiny
    torchrun --standalone --nproc_per_node 2 train.py --model gpt --preset tiny

A model is a module (gpt, diffusion, ...) or a path to a .py file that follows the
model contract in README.md. Every field of TrainConfig below and of the model's
Config is a flag (n_layer -> --n-layer); a preset sets several at once; flags given on
the command line win over the preset, which wins over the defaults.

The loop, per step: for each player (one for most models; discriminator then
generator for a GAN), grad_accum micro-batches forward and backward, gradients
all-reduced once under DDP, unscaled, clipped, one optimizer step, and every gradient
cleared. While one player steps the others are frozen (requires_grad off), so its
backward pass computes no gradient for them and never reaches their next step.

Exit codes: 0 done; 2 bad input, or a non-finite loss or gradient (the last good
checkpoint is kept); 1 another process of a torchrun job was lost; 128 + the signal's
number (130 for SIGINT, 143 for SIGTERM) when a signal stopped the run after saving.
"""
import argparse
import contextlib
import copy
import dataclasses
import glob
import importlib
import importlib.util
import inspect
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

import data
import optim


@dataclass
class TrainConfig:
    model: str = "gpt"              # model module name or path to a .py file
    preset: str = ""                # named overrides from the model's PRESETS
    data: str = ""                  # dataset name or path; default: the model's DATA
    data_dir: str = "data"          # downloads and token caches
    tokenizer: str = "bytes"        # text only: bytes, or a tiktoken encoding (gpt2, cl100k_base, ...)
    out_dir: str = ""               # checkpoints, logs, samples; default: out/<model>
    init_from: str = ""             # GPT-2 weights (model.safetensors, pytorch_model.bin or their folder) to fine-tune
    resume: bool = False            # continue exactly from <out_dir>/ckpt.pt
    overwrite: bool = False         # start afresh even though <out_dir>/ckpt.pt exists (it will be replaced)
    batch_size: int = 32            # examples per micro-batch per process
    grad_accum: int = 1             # micro-batches per optimizer step, per process
    max_iters: int = 2000           # optimizer steps
    max_time: float = 0.0           # wall-clock budget in seconds (0: none); the run stops, evaluates and saves
    optimizer: str = "adamw"        # adamw, adam or sgd (from optim.py)
    lr: float = 1e-3                # peak learning rate
    min_lr: float = 1e-4            # floor of the cosine decay
    warmup_iters: int = 100         # linear warmup steps
    lr_decay_iters: int = 0         # step at which the cosine reaches min_lr (0: max_iters)
    lr_hold: float = 0.0            # share of the schedule after warmup held at the peak lr before the cosine starts, in [0, 1)
    weight_decay: float = 0.1       # applied to tensors of 2+ dimensions only
    beta1: float = 0.9              # Adam beta1; SGD momentum
    beta2: float = 0.95             # Adam beta2
    grad_clip: float = 1.0          # clip the global gradient norm to this (0: off)
    skip_nonfinite: bool = False    # skip a player's update whose loss or gradient is not finite, counted in the log, rather than stop (one device sync per player and step)
    ema: float = 0.0                # keep an exponential moving average of the weights with this decay (0: off); sampling, evaluation and metrics use it
    device: str = "auto"            # auto, cpu, cuda, cuda:N, mps
    dtype: str = "auto"             # auto, bf16, fp16, fp32 (auto: bf16 on CUDA; on a CPU with bf16 units, the faster for this model, timed at the start; else fp32)
    compile: bool = False           # torch.compile the model
    seed: int = 1337                # seeds model init, data order and sampling
    eval_interval: int = 250        # evaluate, sample and checkpoint every this many steps
    eval_iters: int = 20            # global batches per split in an evaluation
    log_interval: int = 10          # a console and log line every this many steps
    sample_tokens: int = 300        # text: tokens to generate at each evaluation
    sample_images: int = 64         # images: how many to draw into the grid at each evaluation (points: 2000)


class UsageError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""


class Fault(Exception):
    """A failure outside the user's input (a lost process); printed as one line, exit code 1."""


# ---- models and flags -----------------------------------------------------------

def load_module(name):
    if name.endswith(".py"):
        if not os.path.isfile(name):
            raise UsageError(f"--model {name}: no such file")
        spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(name))[0], name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or \
                not os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), name + ".py")):
            raise UsageError(f"--model {name}: not a model of this project (gpt, ...) nor a path to a .py file")
        module = importlib.import_module(name)
    for attr in ("Config", "Model", "PRESETS"):
        if not hasattr(module, attr):
            raise UsageError(f"--model {name}: the module defines no {attr} (see the model contract in README.md)")
    return module


def field_help(cls):
    """Each field's trailing comment in the source is its --help text."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return dict(re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.*)$", src, flags=re.M))


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


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_fields(parser, cls, title):
    group = parser.add_argument_group(title)
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        doc = f"{helps.get(f.name, '')} (default: {f.default})"
        if isinstance(f.default, bool):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=doc)
        else:
            def conv(text, f=f):
                try:
                    return parse_value(text, f.type, f.default)
                except ValueError:
                    raise argparse.ArgumentTypeError(f"invalid value {text!r}")
            conv.__name__ = type(f.default).__name__
            group.add_argument(flag, dest=f.name, type=conv, default=argparse.SUPPRESS,
                               metavar=type(f.default).__name__.upper(), help=doc)


def parse_args(argv):
    """-> (model module, TrainConfig, model Config, names set explicitly on the command line)."""
    pre = Parser(add_help=False)
    pre.add_argument("--model", default="gpt")
    pre.add_argument("--preset", default="")
    known, _ = pre.parse_known_args(argv)
    module = load_module(known.model)
    parser = Parser(prog="train.py", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[-1],
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fields(parser, TrainConfig, "training")
    add_fields(parser, module.Config, f"model ({known.model}); presets: {', '.join(module.PRESETS) or 'none'}")
    given = vars(parser.parse_args(argv))
    tcfg, mcfg = TrainConfig(), module.Config()
    if known.preset:
        if known.preset not in module.PRESETS:
            raise UsageError(f"--preset {known.preset}: unknown; {known.model} has {', '.join(module.PRESETS)}")
        apply(tcfg, mcfg, module.PRESETS[known.preset])
    apply(tcfg, mcfg, given)
    return module, tcfg, mcfg, set(given)


def apply(tcfg, mcfg, overrides):
    for k, v in overrides.items():
        target = tcfg if hasattr(tcfg, k) else mcfg if hasattr(mcfg, k) else None
        if target is None:
            raise UsageError(f"unknown setting {k!r}")
        setattr(target, k, v)


def check(tcfg):
    if tcfg.lr <= 0 or tcfg.min_lr < 0:
        raise UsageError(f"--lr must be > 0 and --min-lr >= 0 (got {tcfg.lr}, {tcfg.min_lr})")
    for name in ("batch_size", "grad_accum", "eval_iters", "log_interval", "eval_interval"):
        if getattr(tcfg, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer (got {getattr(tcfg, name)})")
    if tcfg.max_iters < 0 or tcfg.max_time < 0 or tcfg.warmup_iters < 0 or tcfg.grad_clip < 0:
        raise UsageError("--max-iters, --max-time, --warmup-iters and --grad-clip must not be negative")
    if not 0 <= tcfg.lr_hold < 1:
        raise UsageError(f"--lr-hold {tcfg.lr_hold}: a share of the schedule in [0, 1), e.g. 0.7 (0: cosine from the start)")
    if not 0 <= tcfg.ema < 1:
        raise UsageError(f"--ema {tcfg.ema}: a decay in [0, 1), e.g. 0.999 (0: off)")
    if tcfg.optimizer not in ("adamw", "adam", "sgd"):
        raise UsageError(f"--optimizer {tcfg.optimizer}: choose adamw, adam or sgd")
    if tcfg.dtype not in ("auto", "bf16", "fp16", "fp32"):
        raise UsageError(f"--dtype {tcfg.dtype}: choose auto, bf16, fp16 or fp32")


# ---- device, precision, distribution ------------------------------------------------

def pick_device(name, local_rank):
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


def cpu_has_bf16():
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16), as oneDNN sees it."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pick_dtype(name, device):
    """--dtype as a torch dtype, auto resolved without timing anything: bf16 on CUDA (fp16
    where the card has no bf16) and on a CPU with bf16 matrix units (AMX, AVX512-BF16),
    fp32 on other CPUs, which emulate bf16 ~100x slower than fp32 (an AVX2-only EPYC).
    train.py refines auto on a bf16 CPU by timing the model (run_dtype)."""
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


def race_dtypes(model, split, batch_size, device, seed):
    """{"fp32": seconds, "bf16": seconds} of one forward and backward of every player on one
    micro-batch, timed on a copy of the model, so the run's weights, gradients, noise and
    data stream are untouched: one untimed try of each, then the best of three tries each,
    alternating (of one when a try takes over a second: a difference that matters is then
    large against the timer's noise, and the race short against the run)."""
    trial = copy.deepcopy(model).train()
    x, y = split.batch(batch_size, torch.Generator().manual_seed(seed))
    x, y = x.to(device), None if y is None else y.to(device)

    def one_try(name):
        t = time.perf_counter()
        for player in dict.fromkeys(trial.players):
            with autocast(device, DTYPES[name]):
                loss, _ = trial(x, y, player=player)
            loss.float().backward()
            trial.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    with torch.random.fork_rng(devices=[]):
        warm = {name: one_try(name) for name in ("fp32", "bf16")}
        best = dict.fromkeys(warm, math.inf)
        for _ in range(1 if max(warm.values()) > 1.0 else 3):
            for name in best:  # in turn: a slow moment of the machine hits both alike
                best[name] = min(best[name], one_try(name))
    return best


def autocast(device, dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def compile_unavailable(device):
    """Why torch.compile cannot work here, or None."""
    import importlib
    import shutil
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    try:
        # (not `import torch._dynamo`: inside a function that makes torch a local name)
        if not importlib.import_module("torch._dynamo").is_dynamo_supported():
            return "torch.compile does not support this Python"
    except Exception as e:
        return f"torch.compile is unavailable ({type(e).__name__})"
    if device.type == "cpu" and not shutil.which(os.environ.get("CXX", "g++")) and not shutil.which("c++"):
        return "no C++ compiler for inductor's CPU kernels (install g++)"
    return None


# ---- checkpoints -------------------------------------------------------------------

def save_checkpoint(obj, path):
    """Atomic: a crash leaves the old checkpoint or the new one, never half of one."""
    data.atomic_write(path, lambda f: torch.save(obj, f))


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


def build_from_checkpoint(ckpt, device="cpu", path="the checkpoint"):
    """(module, model, TrainConfig, Config) from a checkpoint, for sample.py and the like.
    The model carries the EMA weights where the run kept them: those are the ones to use."""
    try:
        conf = ckpt["config"]
        module = load_module(conf["model_path"] if os.path.isfile(conf.get("model_path", "")) else conf["model"])
        mcfg = module.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in conf["model_config"].items()})
        model = module.Model(mcfg)
        tcfg = TrainConfig(**{k: v for k, v in conf["train_config"].items() if hasattr(TrainConfig, k)})
    except UsageError:
        raise
    except Exception as e:  # an edited or damaged config: whatever breaks, one line
        raise UsageError(f"{path}: its config does not make a model ({type(e).__name__}: {str(e)[:120]})")
    load_state(model, ckpt["ema"] if isinstance(ckpt.get("ema"), dict) else ckpt["model"], conf["model"])
    return module, model.to(device), tcfg, mcfg


def sampler_kwargs(model, progress=None, **given):
    """The sampler options the user gave (None: not given) that model.sample accepts, plus
    a progress wrapper where it takes one; an option it does not take is a UsageError."""
    import inspect
    accepts = inspect.signature(model.sample).parameters
    kw = {k: v for k, v in given.items() if v is not None}
    for k in kw:
        if k not in accepts:
            raise UsageError(f"--{k}: this model's sampler takes no {k}")
    if progress is not None and "progress" in accepts:
        kw["progress"] = progress
    return kw


def load_state(model, state, name):
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError, ValueError) as e:  # not tensors, or not of this shape
        first = [l.strip() for l in str(e).splitlines() if l.strip()][1:2]
        raise UsageError(f"checkpoint does not fit this {name} model: {first[0] if first else e}")


def logged_step(line):
    """The step of a log.jsonl line; infinity for a line that is not a whole record."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError, OverflowError):
        return math.inf


# ---- the loop -------------------------------------------------------------------------

class Stop:
    """SIGINT/SIGTERM ask the loop to save and exit after the current step."""
    signum = 0

    @classmethod
    def handler(cls, signum, frame):
        cls.signum = signum


def main(argv=None):
    module, tcfg, mcfg, given = parse_args(sys.argv[1:] if argv is None else argv)
    check(tcfg)

    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(tcfg.device, local_rank)
    if ddp:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    clean = False
    try:
        code = run(module, tcfg, mcfg, given, device, rank, world, ddp)
        clean = True
        return code
    except (RuntimeError, dist.DistError) as e:
        # Another process of the job died (killed, out of memory): the collective this
        # rank waits in fails. Checkpoints are written whole or not at all, so the last
        # one stands; say that in one line rather than with a traceback from inside gloo.
        if not ddp or not (isinstance(e, dist.DistError) or re.search(r"gloo|nccl|Connection", str(e), re.I)):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Fault(f"rank {rank}: lost contact with another process of the job ({first[:150]}); "
                    f"the last complete checkpoint is intact, continue with --resume")
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)
        if ddp:
            # Without a barrier before teardown, gloo workers abort at exit now and then.
            # After an error on this rank the others may never arrive: exit non-zero
            # instead, and torchrun stops the rest of the job.
            if clean:
                with contextlib.suppress(Exception):
                    dist.barrier()
            dist.destroy_process_group()


def load_data(module, tcfg, mcfg, given, pretrained=False):
    """-> (dataset name, splits, info) for this run; fills mcfg's data-dependent fields
    (channels, image_size, num_classes, point_dim, vocab_size) not set on the command line."""
    dataset = tcfg.data or getattr(module, "DATA", "")
    try:
        splits = data.load(dataset, tokenizer=tcfg.tokenizer, data_dir=tcfg.data_dir,
                           block_size=getattr(mcfg, "block_size", 256))
    except data.DataError as e:
        raise UsageError(str(e))
    info = splits["train"].info
    need = {"image": "image_size", "points": "point_dim", "tokens": "vocab_size"}.get(info["kind"])
    if need and not hasattr(mcfg, need):  # e.g. diffusion on 2D points: its Config has no point_dim
        raise UsageError(f"--data {dataset} is {info['kind']} data, which --model {tcfg.model} does not take "
                         f"(its Config has no {need})")
    if info.get("vocab_size") and hasattr(mcfg, "vocab_size"):
        if mcfg.vocab_size <= 0:
            mcfg.vocab_size = info["vocab_size"]
        elif mcfg.vocab_size < info["vocab_size"]:
            fix = "use --tokenizer gpt2" if pretrained else "raise --vocab-size or pick another tokenizer"
            raise UsageError(f"tokenizer {tcfg.tokenizer} has {info['vocab_size']} symbols but the model's "
                             f"vocab_size is {mcfg.vocab_size}; {fix}")
    for k in ("channels", "image_size", "num_classes", "point_dim"):
        if info.get(k) is not None and hasattr(mcfg, k) and k not in given:
            setattr(mcfg, k, info[k])
    return dataset, splits, info


def make_optimizers(model, tcfg):
    """{player: optimizer}, one per player (a player may be listed more than once: it
    steps that often), weight decay on matrices and embeddings only."""
    optimizers = {}
    for player in dict.fromkeys(model.players):
        params = list(model.parameters_of(player))
        ids = {id(p) for p in params}
        named = [(n, p) for n, p in model.named_parameters() if id(p) in ids]
        groups = optim.weight_decay_groups(named, tcfg.weight_decay)
        if tcfg.optimizer == "sgd":
            optimizers[player] = optim.SGD(groups, lr=tcfg.lr, momentum=tcfg.beta1)
        else:
            cls = optim.AdamW if tcfg.optimizer == "adamw" else optim.Adam
            optimizers[player] = cls(groups, lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2))
    return optimizers


def run_dtype(tcfg, ckpt, model, split, device, rank, ddp, say):
    """(the run's dtype, --dtype auto's race timings or None). A resumed run keeps the
    dtype its checkpoint trained in, where this device computes it natively, so a run
    never changes its arithmetic midway. Otherwise --dtype auto on a CPU with bf16 units
    races fp32 against bf16 on this model (race_dtypes) on rank 0, which tells every
    process its answer."""
    name, took = tcfg.dtype, None
    if name == "auto" and ckpt is not None:
        kept = trained_dtype(ckpt, device)
        if kept is not None:
            return pick_dtype(kept, device), ckpt["config"].get("dtype_race")
        say(f"--dtype auto: the checkpoint trained in {ckpt['config']['dtype']}, which this device does not "
            f"compute natively; choosing again")
    if name != "auto" or device.type != "cpu":
        return pick_dtype(name, device), None
    name = "bf16" if cpu_has_bf16() else "fp32"
    if rank == 0 and name == "bf16":
        took = race_dtypes(model, split, tcfg.batch_size, device, tcfg.seed)
        name = min(took, key=took.get)
        say(f"--dtype auto: {name}, the faster here for this model (a micro-batch's forward and backward: "
            f"fp32 {1e3 * took['fp32']:.1f} ms, bf16 {1e3 * took['bf16']:.1f} ms)")
    if ddp:  # every process trains in rank 0's dtype, whatever its own CPU
        choice = torch.tensor([name == "bf16"], dtype=torch.int32)
        dist.broadcast(choice, 0)
        name = "bf16" if choice.item() else "fp32"
    return pick_dtype(name, device), took


def run(module, tcfg, mcfg, given, device, rank, world, ddp):
    master = rank == 0
    out_dir = tcfg.out_dir or os.path.join("out", os.path.splitext(os.path.basename(tcfg.model))[0])
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    say = print if master else (lambda *a, **k: None)

    ckpt = None
    if tcfg.resume:
        ckpt = load_checkpoint(ckpt_path)
        conf = ckpt["config"]
        if os.path.splitext(os.path.basename(conf["model"]))[0] != os.path.splitext(os.path.basename(tcfg.model))[0]:
            raise UsageError(f"{ckpt_path} holds a {conf['model']} model, not {tcfg.model}")
        # The checkpoint's settings, except those given again on the command line now. A
        # setting it lacks (one added to the code since) was at its default in that run,
        # whatever a --preset says now.
        for cfg, stored in ((tcfg, conf["train_config"]), (mcfg, conf["model_config"])):
            for f in dataclasses.fields(cfg):
                if f.name not in stored and f.name not in given and f.default is not dataclasses.MISSING:
                    setattr(cfg, f.name, f.default)
        for k, v in conf["train_config"].items():
            if hasattr(tcfg, k) and k not in given:
                setattr(tcfg, k, v)
        for k, v in conf["model_config"].items():
            v = tuple(v) if isinstance(v, list) else v
            if k in given and hasattr(mcfg, k) and getattr(mcfg, k) != v:
                raise UsageError(f"--{k.replace('_', '-')} {getattr(mcfg, k)} differs from the checkpoint's {v}; "
                                 f"drop the flag to resume, or train afresh in another --out-dir")
            if hasattr(mcfg, k):
                setattr(mcfg, k, v)
        tcfg.resume = True
        check(tcfg)
    elif os.path.exists(ckpt_path) and not tcfg.overwrite:
        raise UsageError(f"{ckpt_path} exists: add --resume to continue that run, --overwrite to replace it, "
                         f"or choose another --out-dir")

    # GPT-2 weights, when fine-tuning, fix the model's shape before the data is cut to its context.
    model = None
    if tcfg.init_from and ckpt is None:
        if not hasattr(module.Model, "from_gpt2"):
            raise UsageError(f"--init-from: {tcfg.model} cannot load GPT-2 weights")
        if not os.path.exists(tcfg.init_from):
            raise UsageError(f"--init-from {tcfg.init_from}: no such file or folder")
        try:
            model = module.Model.from_gpt2(tcfg.init_from, dropout=getattr(mcfg, "dropout", 0.0))
        except Exception as e:  # a user's file can fail in many ways; all of them are one line
            raise UsageError(f"--init-from {tcfg.init_from}: not loadable GPT-2 weights "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})")
        for k in ("n_layer", "n_head", "n_embd", "vocab_size", "bias"):
            if k in given and getattr(mcfg, k) != getattr(model.cfg, k):
                raise UsageError(f"--{k.replace('_', '-')} {getattr(mcfg, k)}: the GPT-2 weights have "
                                 f"{getattr(model.cfg, k)}; drop the flag")
        if "block_size" in given and mcfg.block_size < model.cfg.block_size:
            model.crop_block_size(mcfg.block_size)
        mcfg = model.cfg

    # Then the data: it fills the model's data-dependent fields.
    dataset, splits, info = load_data(module, tcfg, mcfg, given, pretrained=model is not None)

    if model is None:
        torch.manual_seed(tcfg.seed)  # the same initial weights on every rank
        try:
            model = module.Model(mcfg)
        except ValueError as e:
            raise UsageError(f"model settings: {e}")
    multiple = getattr(model, "batch_multiple", 1)  # e.g. a GAN whose D judges packs of examples
    if tcfg.batch_size % multiple:
        raise UsageError(f"--batch-size {tcfg.batch_size}: this model takes micro-batches in multiples "
                         f"of {multiple}; pick a multiple of {multiple}")
    model.to(device)
    dtype, race = run_dtype(tcfg, ckpt, model, splits["train"], device, rank, ddp, say)
    # The average starts as the initial weights; its decay ramps up as min(ema, (1+step)/(10+step)),
    # so a short run is not dominated by its random start.
    ema = copy.deepcopy(model).requires_grad_(False).eval() if tcfg.ema > 0 else None
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    optimizers = make_optimizers(model, tcfg)

    # Each step draws one global batch from a stream seeded alike on every rank; rank r's
    # micro-step m takes slice r*k + m. So the run depends only on the global batch size:
    # 2 processes x batch 4 = 1 process x 2 micro-batches of 4 = 1 process x batch 8.
    k = tcfg.grad_accum
    stream = torch.Generator().manual_seed(tcfg.seed)
    start_step, best_val = 0, float("inf")
    if ckpt is not None:
        load_state(model, ckpt["model"], tcfg.model)
        if ema is not None:
            load_state(ema, ckpt["ema"] if isinstance(ckpt.get("ema"), dict) else ckpt["model"], tcfg.model)
        try:
            for player, opt in optimizers.items():
                opt.load_state_dict(ckpt["optimizers"][player])
            scaler.load_state_dict(ckpt["scaler"]) if ckpt.get("scaler") else None
            start_step, best_val = int(ckpt["step"]), float(ckpt["best_val"])
            stream.set_state(ckpt["data_rng"])
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
            raise UsageError(f"{ckpt_path}: cannot resume from it, its training state is incomplete "
                             f"({type(e).__name__}: {str(e)[:100]}); start afresh with --overwrite")
        say(f"resumed from {ckpt_path} at step {start_step}")

    raw = model
    if tcfg.compile:
        why = compile_unavailable(device)
        if why:
            say(f"--compile: {why}; running eager")
        else:
            model = torch.compile(model)
    if ddp:
        # With two players, each forward leaves the other's parameters without gradients
        # (D's step runs G without a graph): DDP must look for them rather than wait.
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=len(set(raw.players)) > 1)

    if master:
        try:
            os.makedirs(out_dir, exist_ok=True)
            # A run killed while saving leaves its temp file (the checkpoint it replaced is intact).
            for stale in glob.glob(os.path.join(glob.escape(out_dir), "*.tmp*")):
                os.remove(stale)
                say(f"removed {stale}, a file a killed run had not finished writing")
            keep = []
            if ckpt is not None and os.path.exists(os.path.join(out_dir, "log.jsonl")):
                # Lines after the checkpoint's step belong to steps that are about to be redone.
                # (A line cut short by a kill is dropped too.)
                with open(os.path.join(out_dir, "log.jsonl"), errors="replace") as f:
                    keep = [l.rstrip("\n") + "\n" for l in f if logged_step(l) <= ckpt["step"]]
            data.atomic_write(os.path.join(out_dir, "log.jsonl"), lambda f: f.write("".join(keep).encode()))
        except OSError as e:
            raise UsageError(f"--out-dir {out_dir}: cannot write there ({e.strerror})")

    conf = dict(model=os.path.splitext(os.path.basename(tcfg.model))[0],
                model_path=os.path.abspath(tcfg.model) if tcfg.model.endswith(".py") else "",
                dtype=next(n for n, d in DTYPES.items() if d == dtype),  # what --dtype auto chose
                dtype_race=race,  # its timings (seconds), where it raced fp32 and bf16
                model_config=dataclasses.asdict(mcfg), train_config=dataclasses.asdict(tcfg),
                data=dict(name=dataset, **{k: v for k, v in info.items() if isinstance(v, (int, float, str))}))
    n_params = sum(p.numel() for p in raw.parameters())
    per_step = tcfg.batch_size * k * world
    unit = {"tokens": "tok", "image": "img", "points": "pt"}.get(info["kind"], "ex")
    units_per_step = per_step * (info["shape"][0] if unit == "tok" else 1)
    say(f"{conf['model']}: {n_params / 1e6:.2f}M parameters | data {dataset} ({info['kind']}) | "
        f"{device} {str(dtype).removeprefix('torch.')} | {world} process(es) x batch {tcfg.batch_size} x "
        f"accum {k} = {per_step} per step | out {out_dir}")

    def share(X, Y, rows):
        """This micro-step's rows of a global batch, on the device; Y may be None (no labels)."""
        return X[rows].to(device, non_blocking=True), None if Y is None else Y[rows].to(device, non_blocking=True)

    def log(record):
        if master:
            with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    # The cosine ends at --lr-decay-iters (default --max-iters). Under --max-time it ends
    # when the budget does instead, re-estimated from the measured step time at each log
    # line, so a 5-minute run is annealed at 5 minutes, not cut off at a high LR.
    horizon = tcfg.lr_decay_iters or tcfg.max_iters
    if ckpt is not None and tcfg.max_time and ckpt.get("horizon"):
        horizon = ckpt["horizon"]

    def lr_at(step):
        return optim.cosine_lr(step, lr=tcfg.lr, min_lr=tcfg.min_lr, warmup_iters=tcfg.warmup_iters,
                               decay_iters=horizon, hold=tcfg.lr_hold)

    judge = ema if ema is not None else raw  # the weights that are evaluated and sampled
    names = list(dict.fromkeys(raw.players))  # each player once, in order
    lr_mult = getattr(raw, "lr_mult", {})  # e.g. a GAN's TTUR: {"discriminator": 2.0}

    ema_pairs = (list(ema.parameters()), list(raw.parameters()), list(zip(ema.buffers(), raw.buffers()))) \
        if ema is not None else None

    @torch.no_grad()
    def update_ema(step):
        d = min(tcfg.ema, (1 + step) / (10 + step))
        torch._foreach_lerp_(ema_pairs[0], ema_pairs[1], 1 - d)
        for e, b in ema_pairs[2]:
            e.copy_(b)

    def seed_noise(*where):
        """Seed the noise a model draws in its forward (dropout, diffusion's t and epsilon,
        a GAN's z) from where in the run it is, e.g. (step, player, micro-batch): the run
        then depends only on the global batch, not on the process count, and a resumed
        run draws exactly what an uninterrupted one would have. (Python's hash of a tuple
        of ints is the same in every process.)"""
        torch.manual_seed(hash((tcfg.seed,) + where) & 0x7FFF_FFFF_FFFF_FFFF)

    @torch.no_grad()
    def evaluate():
        """{split: {player: mean loss}} on fixed batches with fixed noise, the same at every
        evaluation and for any process count; the training noise is untouched (forked RNG)."""
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            judge.eval()
            out = {}
            for split in ("train", "val"):
                g = torch.Generator().manual_seed(tcfg.seed * 7919 + (split == "val"))
                total = torch.zeros(len(names), device=device)
                for i in range(tcfg.eval_iters):  # global batches, sliced as in training
                    X, Y = splits[split].batch(tcfg.batch_size * k * world, g)
                    for m in range(k):
                        rows = slice((rank * k + m) * tcfg.batch_size, (rank * k + m + 1) * tcfg.batch_size)
                        for j, player in enumerate(names):
                            seed_noise(-1, split == "val", i, j, rank * k + m)
                            with autocast(device, dtype):
                                loss, _ = judge(*share(X, Y, rows), player=player)
                            total[j] += loss.float() / k
                if ddp:
                    dist.all_reduce(total)
                out[split] = dict(zip(names, (total / (tcfg.eval_iters * world)).tolist()))
            raw.train()
            if ema is not None:
                ema.eval()
        return out

    def write_samples(step):
        if not master:
            return
        if info["kind"] != "tokens":
            return write_picture(step)
        tok = data.get_tokenizer(tcfg.tokenizer)
        prompt = [tok.eot] if tok.eot is not None else tok.encode("\n")
        g = torch.Generator(device=device).manual_seed(tcfg.seed + step)
        judge.eval()
        with autocast(device, dtype):
            ids = judge.generate(torch.tensor([prompt], device=device), tcfg.sample_tokens,
                               temperature=0.8, top_k=200, generator=g)
        raw.train()
        text = tok.decode(ids[0, len(prompt):].tolist())
        with open(os.path.join(out_dir, "samples.txt"), "a") as f:
            f.write(f"=== step {step} ===\n{text}\n")
        say("-" * 60 + "\n" + text[:400] + "\n" + "-" * 60)

    def write_picture(step):
        """Images: a grid, one column per class for a model with classes. Points: a scatter
        over the true modes. Written to <out_dir>/samples-<step>.png and samples.png. A model
        that can reconstruct (VAE) also gets reconstructions.png (rows of inputs, each above
        its reconstructions) and interpolations.png (a row from one val image to another)."""
        n = 2000 if info["kind"] == "points" else tcfg.sample_images
        classes = getattr(mcfg, "num_classes", 0) or 0
        y = (torch.arange(n, device=device) % classes) if classes else None
        # Seeded per step, inside a fork of the RNG: the training noise after this point is
        # the same whether or not pictures were drawn, so a resumed run stays exact.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(tcfg.seed + step)
            judge.eval()
            with autocast(device, dtype):
                x = judge.sample(n, y=y)
                pairs = None
                rows = min(4, len(splits["val"].images) // 10) if info["kind"] == "image" else 0
                if rows and hasattr(judge, "reconstruct"):
                    real = splits["val"].images[:10 * rows].to(device).float().div(127.5).sub(1)
                    shape = (rows, 10, *real.shape[1:])
                    pairs = torch.stack([real.view(shape), judge.reconstruct(real).view(shape)], 1)
                    line = judge.interpolate(real[:5], real[5:10], 10) if hasattr(judge, "interpolate") else None
            raw.train()
            if ema is not None:
                ema.eval()
        path = os.path.join(out_dir, f"samples-{step:06d}.png")
        if info["kind"] == "points":
            split = splits["train"]
            data.save_scatter(x, path, centers=split.centers, radius=3 * split.std)
        else:
            data.save_grid(x, path, nrow=classes if classes else int(math.ceil(math.sqrt(n))))
            if pairs is not None:
                data.save_grid(pairs.flatten(0, 2), os.path.join(out_dir, "reconstructions.png"), nrow=10)
                if line is not None:
                    data.save_grid(line.flatten(0, 1), os.path.join(out_dir, "interpolations.png"), nrow=10)
        shutil.copyfile(path, os.path.join(out_dir, "samples.png"))
        say(f"samples: {path}")

    def checkpoint(step, evaluated, path=ckpt_path):
        # No RNG states: the noise of every micro-batch is seeded from its place in the run
        # (see the loop), so a resumed run draws what an uninterrupted one would have.
        if master:
            save_checkpoint(dict(model=strip_prefixes(raw.state_dict()),
                                 ema=strip_prefixes(ema.state_dict()) if ema is not None else None,
                                 optimizers={p: o.state_dict() for p, o in optimizers.items()},
                                 scaler=scaler.state_dict() if scaler.is_enabled() else None,
                                 step=step, best_val=best_val, config=conf,
                                 data_rng=stream.get_state(), horizon=horizon, evaluated=evaluated, skipped=skipped,
                                 elapsed=time.time() - t0), path)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, Stop.handler)
    Stop.signum = 0
    # The first non-finite value, as step * 1024 + its index in `checked` (NONE: none yet),
    # kept on the device so the hot loop never syncs; read at log and evaluation time.
    NONE = 2 ** 62
    bad_at = torch.full((), NONE, dtype=torch.long, device=device)
    bad, checked, where = NONE, {}, {}
    trainable = {id(p) for p in raw.parameters() if p.requires_grad}  # a model may freeze some on purpose
    own = {player: {id(p) for p in raw.parameters_of(player)} & trainable for player in names}
    skipped = ckpt.get("skipped", 0) if ckpt is not None else 0

    def any_bad():
        """Whether any rank saw a non-finite value; every rank must take the same branch."""
        nonlocal bad
        first = bad_at.clone()
        if ddp:  # the earliest over the ranks
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        bad = int(first.item())
        return bad < NONE

    # Running sums of what the log shows (each player's loss and its model's parts) and
    # how many steps each holds (a skipped update adds nothing).
    sums, counts, loss_n = {}, {}, 0
    data_s = 0.0  # seconds the host spent drawing batches and moving them to the device

    def tally(player, loss, parts, into):
        """Add a micro-batch's loss and logged parts (tensors, no device sync) to `into`."""
        tag = "" if len(names) == 1 else f"_{player}"
        for key, v in {**parts, "loss": loss}.items():  # parts first: the most specific name for a fault
            v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v), device=device)
            into[key + tag] = into.get(key + tag, 0) + v / (k * raw.players.count(player))

    t0 = t_log = time.time()
    if ckpt is not None and "max_time" not in given:  # the budget is the whole run's, not this process's
        t0 -= ckpt.get("elapsed", 0.0)
    t_train = None  # when the first evaluation ended: the step rate is measured from there
    step, stop_reason = start_step, None

    while True:
        last = step >= tcfg.max_iters or stop_reason is not None
        if (step % tcfg.eval_interval == 0 or last) and not (ckpt is not None and step == start_step
                                                              and ckpt.get("evaluated", True)):
            if any_bad():
                break
            losses = evaluate()
            rec = dict(step=step, time=time.time() - t0)
            for split in ("train", "val"):
                rec.update({f"{split}_loss" + (f"_{p}" if len(names) > 1 else ""): v for p, v in losses[split].items()})
            if "bytes_per_token" in info:
                rec["val_bpb"] = rec["val_loss"] / math.log(2) / info["bytes_per_token"]
            say(f"eval step {step}: " + " | ".join(f"{key.replace('_loss', '')} {v:.4f}" for key, v in rec.items()
                                                    if "_loss" in key)
                + (f" | val {rec['val_bpb']:.3f} bits/byte" if "val_bpb" in rec else ""))
            log(rec)
            # The best validation loss means something for one player; a GAN's players' losses
            # rise and fall against each other, so a GAN keeps no best.pt.
            improved = len(names) == 1 and rec["val_loss"] < best_val
            best_val = min(best_val, rec["val_loss"]) if improved else best_val
            if step > 0:
                checkpoint(step, evaluated=True)
                if improved and master:
                    # A hard link renamed into place: best.pt is whole or absent, and costs no copy.
                    best = os.path.join(out_dir, "best.pt")
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(best + ".tmp")
                    os.link(ckpt_path, best + ".tmp")
                    os.replace(best + ".tmp", best)
            write_samples(step)
        if last:
            break

        lr = lr_at(step)
        if isinstance(getattr(raw, "step", None), torch.Tensor):  # a schedule inside a model: the VAE's KL warm-up
            raw.step.fill_(step)
        for i, player in enumerate(raw.players):
            opt = optimizers[player]
            for group in opt.param_groups:
                group["lr"] = lr * lr_mult.get(player, 1.0)
            if len(names) > 1:
                # Freeze the other players: the generator's backward pass then goes through
                # D to its input without computing D's weight gradients, which it would
                # throw away (a third of D's backward pass).
                for p in raw.parameters():
                    p.requires_grad_(id(p) in own[player])
            t_data = time.perf_counter()
            X, Y = splits["train"].batch(tcfg.batch_size * k * world, stream)
            data_s += time.perf_counter() - t_data
            now = {}  # this step's loss and parts, for this player
            for m in range(k):
                rows = slice((rank * k + m) * tcfg.batch_size, (rank * k + m + 1) * tcfg.batch_size)
                t_data = time.perf_counter()
                x, y = share(X, Y, rows)
                data_s += time.perf_counter() - t_data
                seed_noise(step, i, rank * k + m)
                # All-reduce gradients only on the last micro-step.
                sync = contextlib.nullcontext() if (not ddp or m == k - 1) else model.no_sync()
                with sync:
                    with autocast(device, dtype):
                        loss, parts = model(x, y, player=player)
                    scaler.scale(loss / k).backward()
                tally(player, loss, parts, now)
            # The gradient norm (the clip's, when clipping) is checked along with the loss.
            # Under fp16 the GradScaler owns non-finite gradients: it skips those steps.
            norm = None
            if tcfg.grad_clip > 0:
                scaler.unscale_(opt)
                norm = optim.clip_grad_norm_(raw.parameters_of(player), tcfg.grad_clip)
            elif not scaler.is_enabled():
                norm = optim.grad_norm(raw.parameters_of(player))
            values = [*now.values()] + ([norm.to(device)] if not scaler.is_enabled() else [])
            if (player, *now) not in where:  # each value's index in `checked`, named once
                prefix = "" if len(names) == 1 else f"{player} "
                labels = [prefix + key.removesuffix(f"_{player}") for key in now] + [prefix + "gradient"]
                where[(player, *now)] = torch.tensor([checked.setdefault(label, len(checked))
                                                      for label in labels[:len(values)]], device=device)
            finite = torch.isfinite(torch.stack(values))
            first = where[(player, *now)][(~finite).int().argmax()]
            if tcfg.skip_nonfinite:
                ok = finite.all().float()
                if ddp:  # every rank skips, or none
                    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
                if not ok.item():
                    skipped += 1
                    if tcfg.grad_clip > 0 and scaler.is_enabled():
                        scaler.update()  # after unscale_, or the next unscale_ of this optimizer fails
                    raw.zero_grad(set_to_none=True)
                    continue
            else:
                bad_at = torch.where((bad_at == NONE) & ~finite.all(), step * 1024 + first, bad_at)
            for key, v in now.items():
                sums[key] = sums.get(key, 0) + v
                counts[key] = counts.get(key, 0) + 1 / raw.players.count(player)
            scaler.step(opt)
            scaler.update()
            raw.zero_grad(set_to_none=True)
        if len(names) > 1:
            for p in raw.parameters():
                p.requires_grad_(id(p) in trainable)
        loss_n += 1
        step += 1
        if ema is not None:
            update_ema(step)

        if t_train is None:
            t_train, step_train = time.time(), step
        if step % tcfg.log_interval == 0 or step == tcfg.max_iters:
            if any_bad():
                break
            shown = torch.stack(list(sums.values())) if sums else torch.zeros(0, device=device)
            if ddp:  # the logged loss is the global batch's, not rank 0's share
                dist.all_reduce(shown)
                shown /= world
            dt = time.time() - t_log
            t_log = time.time()
            losses = {key: v / counts[key] for key, v in zip(sums, shown.tolist())}
            if tcfg.skip_nonfinite:
                losses["skipped"] = skipped  # updates skipped so far, this run and the ones it resumed
            speed = loss_n * units_per_step / dt
            eta = (tcfg.max_iters - step) * dt / loss_n
            if tcfg.max_time:
                eta = min(eta, max(0.0, tcfg.max_time - (time.time() - t0)))
            rate_text = f"{speed / 1e3:.1f}k" if speed >= 1e4 else f"{speed:.0f}"
            shown_text = (f"{key.replace('_', ' ')} {v:.4f}" if isinstance(v, float) else f"{key} {v}"
                          for key, v in losses.items())
            say(f"step {step} | " + " | ".join(shown_text) + f" | lr {lr:.2e} | {rate_text} {unit}/s | ETA {eta / 60:.1f}m")
            log(dict(step=step, **losses, lr=lr, **{f"{unit}_per_s": speed}, data_share=data_s / dt,
                     time=time.time() - t0))
            sums, counts, loss_n, data_s = {}, {}, 0, 0.0
            # Stop decisions are taken together, here, so no rank waits on another forever.
            elapsed = time.time() - t0
            rate = (step - step_train) / max(time.time() - t_train, 1e-9)  # steps/s, evals included
            steps_left = (tcfg.max_time - elapsed) * rate if step > step_train else 1e12  # no rate yet
            stop = torch.tensor([Stop.signum, tcfg.max_time > 0 and elapsed > tcfg.max_time,
                                 -(step + steps_left)], dtype=torch.float32, device=device)
            if ddp:  # MAX of the negated estimate: every rank takes the same, earliest end
                dist.all_reduce(stop, op=dist.ReduceOp.MAX)
            signum, timed_out, neg_end = stop.tolist()  # one device read for all three
            signum, timed_out = int(signum), timed_out > 0
            # Re-aim the cosine at the estimated end; under --lr-hold only while the LR is
            # still held, so a started decay never jumps back up to the peak.
            decaying = tcfg.lr_hold and step >= optim.decay_start(tcfg.warmup_iters, horizon, tcfg.lr_hold)
            if tcfg.max_time and not decaying:
                horizon = max(step, int(min(tcfg.lr_decay_iters or tcfg.max_iters, -neg_end)))
        elif not ddp:  # one process: nobody to agree with, so look every step
            signum, timed_out = Stop.signum, bool(tcfg.max_time and time.time() - t0 > tcfg.max_time)
        else:
            signum, timed_out = 0, False
        if signum:
            if any_bad():  # never save weights a non-finite step has touched
                break
            checkpoint(step, evaluated=False)
            say(f"stopped by signal {signum} at step {step}; saved {ckpt_path} (resume with --resume)")
            return 128 + signum
        if timed_out and stop_reason is None:
            stop_reason = "max_time"
            say(f"--max-time {tcfg.max_time:g}s reached at step {step}")

    if bad < NONE:
        at, what = divmod(bad, 1024)
        what = next(key for key, j in checked.items() if j == what)
        raise UsageError(f"{what} is not finite at step {at}; stopped, the last good checkpoint {ckpt_path} "
                         f"is kept (lower --lr, try --dtype fp32, or --skip-nonfinite to skip such updates)")
    return 0


def cli():
    try:
        code = main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except Fault as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    cli()
