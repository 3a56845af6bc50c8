"""The one training loop, for every model.

    python train.py --model gpt --preset tiny
    torchrun --standalone --nproc_per_node 2 train.py --model gpt --preset tiny

A model is a module of this project (gpt, diffusion, vae, gan) or the path of any .py
file that defines at least (the model contract; README.md has it in full):

    @dataclass
    class Config: ...                      # each field a flag (n_layer -> --n-layer),
                                           # its trailing comment the flag's help
    class Model(nn.Module):
        def __init__(self, cfg): ...
        def forward(self, x, y=None): ...  # -> (loss, {name: value to log})
        def sample(self, n, y=None): ...   # -> n images in [-1, 1], or 2D points

and may add PRESETS, DATA and the hooks players, parameters_of, forward's player=,
lr_mult, batch_multiple, io_layers, a buffer step, reconstruct, interpolate, generate
and nll.
Without them a model is one player, "model", whose optimizer steps every parameter.
Every field of TrainConfig below and of the model's Config is a flag; a preset sets
several at once; flags on the command line win over the preset, which wins over the
defaults.

Reading order: main starts the processes; Trainer.__init__ builds the run (or the run
it resumes); Trainer.fit is the loop; Trainer.train_step is one optimizer step of
every player, with its micro-batches, clipping, the non-finite check and the EMA.

Exit codes: 0 done; 2 bad input, or a non-finite loss or gradient (the last good
checkpoint is kept); 1 another process of a torchrun job was lost; 128 + the signal's
number (130 for SIGINT, 143 for SIGTERM) when a signal stopped the run after saving.
"""
import argparse
import contextlib
import copy
import dataclasses
import glob
import inspect
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import common
import data
import optim
import plot
from common import (DTYPES, Fault, Parser, UsageError, add_fields, atomic_write, autocast, cli,
                    compile_unavailable, draw_samples, dtype_name, fork_rng, forward_kwargs, load_checkpoint,
                    load_module, load_state, parameters_of, pick_device, pick_dtype, players, presets,
                    save_checkpoint, strip_prefixes, trained_dtype)


@dataclass
class TrainConfig:
    model: str = "gpt"              # model module name or path to a .py file
    preset: str = ""                # named overrides from the model's PRESETS
    data: str = ""                  # dataset name or path; default: the model's DATA
    data_dir: str = "data"          # downloads and token caches
    tokenizer: str = "bytes"        # text only: bytes, or a tiktoken encoding (gpt2, cl100k_base, ...)
    out_dir: str = ""               # checkpoints, logs, samples; default: out/<model>
    init_from: str = ""             # start from these weights, with fresh optimizers at step 0: another
                                    # run's ckpt.pt (EMA weights where kept), or GPT-2's (model.safetensors,
                                    # pytorch_model.bin or their folder)
    resume: bool = False            # continue exactly from <out_dir>/ckpt.pt
    overwrite: bool = False         # start afresh even though <out_dir>/ckpt.pt exists (it will be
                                    # replaced)
    batch_size: int = 32            # examples per micro-batch per process
    grad_accum: int = 1             # micro-batches per optimizer step, per process
    max_iters: int = 2000           # optimizer steps
    max_time: float = 0.0           # wall-clock budget in seconds (0: none); the run stops, evaluates and
                                    # saves
    optimizer: str = "adamw"        # adamw, adam, sgd, or muon: Muon for hidden matrices (conv kernels too),
                                    # AdamW for embeddings, input and output layers, gains and biases
    lr: float = 1e-3                # peak learning rate
    min_lr: float = 1e-4            # floor of the cosine decay
    warmup_iters: int = 100         # linear warmup steps
    lr_decay_iters: int = 0         # step at which the cosine reaches min_lr (0: max_iters)
    lr_hold: float = 0.0            # share of the schedule after warmup held at the peak lr before the
                                    # cosine starts, in [0, 1)
    weight_decay: float = 0.1       # applied to tensors of 2+ dimensions only
    beta1: float = 0.9              # Adam beta1; SGD momentum
    beta2: float = 0.95             # Adam beta2
    muon_momentum: float = 0.95     # Muon's momentum (Nesterov)
    grad_clip: float = 1.0          # clip the global gradient norm to this (0: off)
    skip_nonfinite: bool = False    # skip a player's update whose loss or gradient is not finite, counted
                                    # in the log, rather than stop (one device sync per player and step)
    ema: float = 0.0                # keep an exponential moving average of the weights with this decay (0:
                                    # off); sampling, evaluation and metrics use it
    device: str = "auto"            # auto, cpu, cuda, cuda:N, mps
    dtype: str = "auto"             # auto, bf16, fp16, fp32 (auto: bf16 on CUDA; on a CPU with bf16 units,
                                    # the faster for this model, timed at the start; else fp32)
    compile: bool = False           # torch.compile the model
    seed: int = 1337                # seeds model init, data order and sampling
    eval_interval: int = 250        # evaluate, sample and checkpoint every this many steps
    eval_iters: int = 20            # global batches per split in an evaluation
    log_interval: int = 10          # a console and log line every this many steps
    sample_tokens: int = 300        # text: tokens to generate at each evaluation
    sample_images: int = 64         # images: how many to draw into the grid at each evaluation (points: 2000)


# ---- flags ------------------------------------------------------------------------------

def parse_args(argv):
    """-> (model module, TrainConfig, model Config, names set explicitly on the command line)."""
    pre = Parser(add_help=False)
    pre.add_argument("--model", default="gpt")
    pre.add_argument("--preset", default="")
    known, _ = pre.parse_known_args(argv)
    module = load_module(known.model)
    named = presets(module)
    parser = Parser(prog="train.py", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[-1],
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fields(parser, TrainConfig, "training")
    add_fields(parser, module.Config, f"model ({known.model}); presets: {', '.join(named) or 'none'}")
    given = vars(parser.parse_args(argv))
    tcfg, mcfg = TrainConfig(), module.Config()
    if known.preset:
        if known.preset not in named:
            raise UsageError(f"--preset {known.preset}: unknown; {known.model} has {', '.join(named) or 'none'}")
        apply(tcfg, mcfg, named[known.preset])
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
        raise UsageError(f"--lr-hold {tcfg.lr_hold}: a share of the schedule in [0, 1), e.g. 0.7 "
                         f"(0: cosine from the start)")
    if not 0 <= tcfg.ema < 1:
        raise UsageError(f"--ema {tcfg.ema}: a decay in [0, 1), e.g. 0.999 (0: off)")
    if tcfg.optimizer not in ("adamw", "adam", "sgd", "muon"):
        raise UsageError(f"--optimizer {tcfg.optimizer}: choose adamw, adam, sgd or muon")
    if not 0 <= tcfg.muon_momentum < 1:
        raise UsageError(f"--muon-momentum {tcfg.muon_momentum}: a momentum in [0, 1), e.g. 0.95")
    if tcfg.dtype not in ("auto", "bf16", "fp16", "fp32"):
        raise UsageError(f"--dtype {tcfg.dtype}: choose auto, bf16, fp16 or fp32")


def model_name(path):
    """gpt for gpt, and for experiments/gpt.py."""
    return os.path.splitext(os.path.basename(path))[0]


# ---- the processes ------------------------------------------------------------------------

def main(argv=None):
    module, tcfg, mcfg, given = parse_args(sys.argv[1:] if argv is None else argv)
    check(tcfg)
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(tcfg.device, int(os.environ.get("LOCAL_RANK", 0)))
    if ddp:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    clean = False
    try:
        code = Trainer(module, tcfg, mcfg, given, device, rank, world, ddp).fit()
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


class Stop:
    """SIGINT/SIGTERM ask the loop to save and exit after the current step."""
    signum = 0

    @classmethod
    def handler(cls, signum, frame):
        cls.signum = signum


# ---- building a run -------------------------------------------------------------------------

def resume_from(tcfg, mcfg, given, ckpt_path):
    """The checkpoint to continue (None: a fresh run). Its settings are taken into tcfg
    and mcfg, except those given again on the command line now; a setting it lacks (one
    added to the code since) was at its default in that run, whatever a preset says now."""
    if not tcfg.resume:
        if os.path.exists(ckpt_path) and not tcfg.overwrite:
            raise UsageError(f"{ckpt_path} exists: add --resume to continue that run, --overwrite to replace "
                             f"it, or choose another --out-dir")
        return None
    ckpt = load_checkpoint(ckpt_path)
    conf = ckpt["config"]
    if model_name(conf["model"]) != model_name(tcfg.model):
        raise UsageError(f"{ckpt_path} holds a {conf['model']} model, not {tcfg.model}")
    if "optimizer" in given and conf["train_config"].get("optimizer", "adamw") != tcfg.optimizer:
        raise UsageError(f"--optimizer {tcfg.optimizer}: {ckpt_path} was trained with "
                         f"{conf['train_config'].get('optimizer', 'adamw')}, whose state it holds; drop the flag to "
                         f"resume, or start afresh from its weights with --init-from")
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
    return ckpt


def gpt2_model(module, tcfg, mcfg, given):
    """--init-from: the model with GPT-2's weights, whose shape wins over the flags (a
    flag that contradicts it is an error; --block-size may shorten the context)."""
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
    return model


DATA_FIELDS = ("channels", "image_size", "point_dim", "vocab_size")  # what the data decides


def run_config(tcfg, mcfg, given):
    """--init-from another run's ckpt.pt: that checkpoint, whose model settings become
    this run's (those given on the command line now win; the data fills its fields)."""
    source = load_checkpoint(tcfg.init_from)
    conf = source["config"]
    if model_name(conf["model"]) != model_name(tcfg.model):
        raise UsageError(f"--init-from {tcfg.init_from} holds a {conf['model']} model, not {tcfg.model}")
    for k, v in conf["model_config"].items():
        if hasattr(mcfg, k) and k not in given and k not in DATA_FIELDS + ("num_classes",):
            setattr(mcfg, k, tuple(v) if isinstance(v, list) else v)
    return source


def weights_from_run(model, source, mcfg, path):
    """Copy a run's weights (its EMA where kept) into `model`. The data-dependent fields
    must fit; num_classes may differ, and then the tensors sized by it (label embeddings)
    keep their fresh initialisation, as do tensors the old model lacks."""
    old = source["config"]["model_config"]
    for k in DATA_FIELDS:
        if k in old and getattr(mcfg, k, old[k]) != old[k]:
            raise UsageError(f"--init-from {path}: its model has {k} {old[k]}, this data needs "
                             f"{getattr(mcfg, k)}; train on data of the same {k.replace('_', ' ')}")
    state = source["ema"] if isinstance(source.get("ema"), dict) else source["model"]
    mine = model.state_dict()
    fresh = [k for k in mine if k not in state or state[k].shape != mine[k].shape]
    if old.get("num_classes", 0) == getattr(mcfg, "num_classes", 0) and any(k in state for k in fresh):
        k = next(k for k in fresh if k in state)
        raise UsageError(f"--init-from {path}: its {k} is {tuple(state[k].shape)}, this model's "
                         f"{tuple(mine[k].shape)}; drop the flags that change the model's shape")
    model.load_state_dict({**mine, **{k: v for k, v in state.items() if k in mine and k not in fresh}})
    return fresh


def load_data(module, tcfg, mcfg, given, pretrained=False):
    """-> (dataset name, splits, info) for this run; fills mcfg's data-dependent fields
    (channels, image_size, num_classes, point_dim, vocab_size) not set on the command line."""
    dataset = tcfg.data or getattr(module, "DATA", "")
    if not dataset:
        raise UsageError(f"--model {tcfg.model} names no default dataset (DATA); give --data")
    # A folder of images is converted to these where given (else to what most of its images are).
    asked = {k: getattr(mcfg, k) for k in ("channels", "image_size") if k in given and hasattr(mcfg, k)}
    splits = data.load(dataset, tokenizer=tcfg.tokenizer, data_dir=tcfg.data_dir,
                       block_size=getattr(mcfg, "block_size", 256), **asked)
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


def new_model(module, mcfg, tcfg):
    """A freshly initialised model, the same on every process (seeded)."""
    torch.manual_seed(tcfg.seed)
    try:
        model = module.Model(mcfg)
    except ValueError as e:
        raise UsageError(f"model settings: {e}")
    return model


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
        for player in dict.fromkeys(players(trial)):
            with autocast(device, DTYPES[name]):
                loss, _ = trial(x, y, **forward_kwargs(trial, player))
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
    name = "bf16" if common.cpu_has_bf16() else "fp32"
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


def make_optimizers(model, tcfg):
    """{player: optimizer}, one per player (a player may be listed more than once: it
    steps that often), weight decay on matrices and embeddings only."""
    optimizers = {}
    hidden = muon_matrices(model) if tcfg.optimizer == "muon" else set()  # the model's, whoever's player
    for player in dict.fromkeys(players(model)):
        ids = {id(p) for p in parameters_of(model, player)}
        named = [(n, p) for n, p in model.named_parameters() if id(p) in ids and p.requires_grad]
        groups = optim.weight_decay_groups([(n, p) for n, p in named if id(p) not in hidden], tcfg.weight_decay)
        if tcfg.optimizer == "sgd":
            optimizers[player] = optim.SGD(groups, lr=tcfg.lr, momentum=tcfg.beta1)
            continue
        cls = optim.Adam if tcfg.optimizer == "adam" else optim.AdamW
        optimizers[player] = cls(groups, lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2))
        matrices = [p for _, p in named if id(p) in hidden]
        if matrices:
            # Muon's update is rescaled to AdamW's RMS (0.2 sqrt(max(rows, cols)), Liu et al.
            # 2025), so one --lr, one schedule and one decoupled weight decay serve both.
            muon = optim.Muon(matrices, lr=tcfg.lr, weight_decay=tcfg.weight_decay, momentum=tcfg.muon_momentum,
                              adjust_lr_fn="match_rms_adamw", flatten=True)
            optimizers[player] = Optimizers(muon, optimizers[player])
    return optimizers


def muon_matrices(model):
    """The ids of the tensors Muon takes: every one of 2 or more dims but embeddings and
    the weights of the model's io_layers() (those that read the data or noise in, or
    write the output), which are not maps between hidden features: their updates stay
    AdamW's, as in Jordan et al.'s Muon and modded-nanogpt. Nor a tensor marked
    no_weight_decay (a density's parameters, such as the VAE prior's means), which is
    no map at all. Tied weights are one tensor."""
    outside = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    io = model.io_layers() if hasattr(model, "io_layers") else []
    outside |= {id(p) for m in io for p in m.parameters()}
    return {id(p) for p in model.parameters()
            if p.dim() >= 2 and id(p) not in outside and not getattr(p, "no_weight_decay", False)}


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


@dataclass
class Progress:
    """What changes as the run goes, and what its checkpoint keeps of it."""
    step: int = 0
    best_val: float = math.inf
    horizon: int = 0      # the step at which the cosine reaches --min-lr (re-aimed under --max-time)
    skipped: int = 0      # updates skipped as non-finite, in this run and the runs it resumed
    t0: float = 0.0       # time.time() when the run began, less the time of the runs it resumed


def restore(ckpt, ckpt_path, name, model, ema, optimizers, scaler, stream):
    """Load a checkpoint's weights, optimizer states and data stream into this run's;
    -> its Progress."""
    load_state(model, ckpt["model"], name)
    if ema is not None:
        load_state(ema, ckpt["ema"] if isinstance(ckpt.get("ema"), dict) else ckpt["model"], name)
    try:
        for player, opt in optimizers.items():
            opt.load_state_dict(ckpt["optimizers"][player])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        stream.set_state(ckpt["data_rng"])
        return Progress(step=int(ckpt["step"]), best_val=float(ckpt["best_val"]), skipped=ckpt.get("skipped", 0))
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
        raise UsageError(f"{ckpt_path}: cannot resume from it, its training state is incomplete "
                         f"({type(e).__name__}: {str(e)[:100]}); start afresh with --overwrite")


def wrap(model, tcfg, device, ddp, say):
    """The model as the loop calls it: compiled (--compile, where it can be), then in DDP."""
    # With two players, each forward leaves the other's parameters without gradients
    # (D's step runs G without a graph): DDP must look for them rather than wait.
    find_unused = len(set(players(model))) > 1
    if tcfg.compile:
        why = compile_unavailable(device)
        if why:
            say(f"--compile: {why}; running eager")
        else:
            model = torch.compile(model)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused)
    return model


def prepare_out_dir(out_dir, ckpt, say):
    """Create --out-dir, remove the temp files of a run killed while saving (the file it
    replaced is intact), and keep of log.jsonl only the lines up to the resumed step
    (the later ones are about to be redone; a line cut short by a kill goes too)."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        for stale in glob.glob(os.path.join(glob.escape(out_dir), "*.tmp*")):
            os.remove(stale)
            say(f"removed {stale}, a file a killed run had not finished writing")
        keep = []
        log = os.path.join(out_dir, "log.jsonl")
        if ckpt is not None and os.path.exists(log):
            with open(log, errors="replace") as f:
                keep = [line.rstrip("\n") + "\n" for line in f if logged_step(line) <= ckpt["step"]]
        atomic_write(log, lambda f: f.write("".join(keep).encode()))
    except OSError as e:
        raise UsageError(f"--out-dir {out_dir}: cannot write there ({e.strerror})")


def logged_step(line):
    """The step of a log.jsonl line; infinity for a line that is not a whole record."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError, OverflowError):
        return math.inf


def seed_noise(*where):
    """Seed the noise a model draws in its forward (dropout, diffusion's t and epsilon,
    a GAN's z) from where in the run it is, e.g. (seed, step, player, micro-batch): the
    run then depends only on the global batch, not on the process count, and a resumed
    run draws exactly what an uninterrupted one would have. (Python's hash of a tuple
    of ints is the same in every process.)"""
    torch.manual_seed(hash(where) & 0x7FFF_FFFF_FFFF_FFFF)


class NonFinite:
    """The run's first non-finite loss, logged part or gradient norm, found without a
    device sync in the hot loop: record() folds each check into one tensor on the device;
    seen() reads it only where the loop waits anyway (log lines, evaluations, a signal).
    The tensor holds step * SLOTS + the value's label's slot (NEVER: none yet), a number
    ordered as (step, slot) are, so the earliest over the processes is one MIN."""
    SLOTS = 1024  # labels a run can name
    NEVER = 2 ** 62

    def __init__(self, device):
        self.device = device
        self.first = torch.full((), self.NEVER, dtype=torch.long, device=device)
        self.slots = {}  # label ("loss", "discriminator gradient", ...) -> its slot, in order of first check
        self.on_device = {}  # a tuple of labels -> their slots, as a tensor on the device
        self.found = self.NEVER  # what seen() read last

    def record(self, step, labels, finite):
        """finite: a bool tensor, one per label; the first False, if none came before, is kept."""
        if labels not in self.on_device:
            slots = [self.slots.setdefault(label, len(self.slots)) for label in labels]
            self.on_device[labels] = torch.tensor(slots, device=self.device)
        slot = self.on_device[labels][(~finite).int().argmax()]
        self.first = torch.where((self.first == self.NEVER) & ~finite.all(), step * self.SLOTS + slot, self.first)

    def seen(self, ddp):
        """Whether any process has recorded one; a collective under DDP, so every process
        calls it at the same place and takes the same branch."""
        first = self.first.clone()
        if ddp:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        self.found = int(first.item())
        return self.found < self.NEVER

    def error(self, ckpt_path):
        step, slot = divmod(self.found, self.SLOTS)
        label = next(name for name, s in self.slots.items() if s == slot)
        return UsageError(f"{label} is not finite at step {step}; stopped, the last good checkpoint "
                          f"{ckpt_path} is kept (lower --lr, try --dtype fp32, or --skip-nonfinite to skip "
                          f"such updates)")


@dataclass
class Meter:
    """What the next log line shows, gathered since the last one: each player's loss and
    logged parts summed on the device (no sync), how many steps each sum holds (a skipped
    update adds nothing), and the seconds spent drawing batches and moving them to the device."""
    since: float = field(default_factory=time.time)
    sums: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    steps: int = 0
    data_s: float = 0.0

    def add(self, values, count):
        for key, v in values.items():
            self.sums[key] = self.sums.get(key, 0) + v
            self.counts[key] = self.counts.get(key, 0) + count


def stop_vote(signum, over_time, end_step, ddp, device):
    """(signal, over --max-time, estimated end step) as every process sees them, agreed in
    one all-reduce so that no process waits on another forever: the MAX of the signal
    numbers, of the over-time flags, and of the negated end estimates (a MAX of the
    negation is the MIN: every process takes the earliest end)."""
    vote = torch.tensor([signum, over_time, -end_step], dtype=torch.float32, device=device)
    if ddp:
        dist.all_reduce(vote, op=dist.ReduceOp.MAX)
    signum, over_time, neg_end = vote.tolist()  # one device read for all three
    return int(signum), over_time > 0, -neg_end


# ---- the run --------------------------------------------------------------------------------

class Trainer:
    """One training run: __init__ builds it from the flags (or from the checkpoint it
    resumes), fit() trains it."""

    def __init__(self, module, tcfg, mcfg, given, device, rank, world, ddp):
        self.tcfg, self.device, self.rank, self.world, self.ddp = tcfg, device, rank, world, ddp
        self.master, self.k = rank == 0, tcfg.grad_accum
        self.say = print if self.master else (lambda *a, **kw: None)
        self.out_dir = tcfg.out_dir or os.path.join("out", model_name(tcfg.model))
        self.ckpt_path = os.path.join(self.out_dir, "ckpt.pt")
        self.ckpt = ckpt = resume_from(tcfg, mcfg, given, self.ckpt_path)
        # GPT-2 weights, when fine-tuning, fix the model's shape before the data is cut to its context.
        from_run = tcfg.init_from.endswith(".pt") and ckpt is None  # another nanogen run's weights
        source = run_config(tcfg, mcfg, given) if from_run else None
        pretrained = gpt2_model(module, tcfg, mcfg, given) if tcfg.init_from and not from_run and ckpt is None \
            else None
        self.mcfg = mcfg = pretrained.cfg if pretrained is not None else mcfg
        self.dataset, self.splits, self.info = load_data(module, tcfg, mcfg, given, pretrained is not None)
        raw = self.raw = (pretrained if pretrained is not None else new_model(module, mcfg, tcfg)).to(device)
        if source is not None:
            fresh = weights_from_run(raw, source, mcfg, tcfg.init_from)
            self.say(f"--init-from {tcfg.init_from}: its weights" + (f", but {len(fresh)} tensors sized by the "
                     f"classes, fresh ({', '.join(fresh[:3])}{', ...' if len(fresh) > 3 else ''})" if fresh else ""))
        multiple = getattr(raw, "batch_multiple", 1)  # e.g. a GAN whose D judges packs of examples
        if tcfg.batch_size % multiple:
            raise UsageError(f"--batch-size {tcfg.batch_size}: this model takes micro-batches in multiples "
                             f"of {multiple}; pick a multiple of {multiple}")
        self.dtype, race = run_dtype(tcfg, ckpt, raw, self.splits["train"], device, rank, ddp, self.say)
        # The average starts as the initial weights (see update_ema).
        self.ema = copy.deepcopy(raw).requires_grad_(False).eval() if tcfg.ema > 0 else None
        self.judge = self.ema if self.ema is not None else raw  # the weights evaluated and sampled
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.optimizers = make_optimizers(raw, tcfg)
        # Each step draws one global batch from a stream seeded alike on every process; process
        # r's micro-step m takes slice r*k + m. So the run depends only on the global batch size:
        # 2 processes x batch 4 = 1 process x 2 micro-batches of 4 = 1 process x batch 8.
        self.stream = torch.Generator().manual_seed(tcfg.seed)
        self.progress = Progress() if ckpt is None else restore(
            ckpt, self.ckpt_path, tcfg.model, raw, self.ema, self.optimizers, self.scaler, self.stream)
        # The cosine ends at --lr-decay-iters (default --max-iters); under --max-time, where the
        # budget ends instead (re-aimed at each log line), so a run is annealed when it stops.
        self.progress.horizon = tcfg.lr_decay_iters or tcfg.max_iters
        if ckpt is not None and tcfg.max_time and ckpt.get("horizon"):
            self.progress.horizon = ckpt["horizon"]
        if ckpt is not None:
            self.say(f"resumed from {self.ckpt_path} at step {self.progress.step}")
        self.model = wrap(raw, tcfg, device, ddp, self.say)
        if self.master:
            prepare_out_dir(self.out_dir, ckpt, self.say)
        self.conf = dict(model=model_name(tcfg.model),
                         model_path=os.path.abspath(tcfg.model) if tcfg.model.endswith(".py") else "",
                         dtype=dtype_name(self.dtype), dtype_race=race,  # what --dtype auto chose, and its timings
                         model_config=dataclasses.asdict(mcfg), train_config=dataclasses.asdict(tcfg),
                         data=dict(name=self.dataset, classes=self.info.get("classes"),  # names, for samples
                                   **{k: v for k, v in self.info.items() if isinstance(v, (int, float, str))}))
        self.setup_players()
        self.unit = {"tokens": "tok", "image": "img", "points": "pt"}.get(self.info["kind"], "ex")
        self.units_per_step = tcfg.batch_size * self.k * world * (self.info["shape"][0] if self.unit == "tok" else 1)
        self.nonfinite, self.labels = NonFinite(device), {}  # labels: see check_finite
        self.meter, self.rate_from = Meter(), None  # rate_from: (time, step) after the first step of fit()
        self.announce()
        # The time budget is the whole run's, not this process's, unless given anew.
        self.progress.t0 = time.time() - (ckpt.get("elapsed", 0.0) if ckpt and "max_time" not in given else 0)

    def setup_players(self):
        """Each player's parameters, optimizer settings and forward arguments, looked up once."""
        raw = self.raw
        self.players = players(raw)  # in order of stepping, a name repeated steps again
        self.names = list(dict.fromkeys(self.players))  # each once
        self.lr_mult = getattr(raw, "lr_mult", {})  # e.g. a GAN's TTUR: {"discriminator": 2.0}
        self.params = {p: parameters_of(raw, p) for p in self.names}
        self.forward_kw = {p: forward_kwargs(raw, p) for p in self.names}
        self.trainable = {id(p) for p in raw.parameters() if p.requires_grad}  # a model may freeze some
        self.own = {p: {id(q) for q in self.params[p]} & self.trainable for p in self.names}
        if self.ema is not None:
            self.ema_pairs = (list(self.ema.parameters()), list(raw.parameters()),
                              list(zip(self.ema.buffers(), raw.buffers())))

    def announce(self):
        tcfg, info = self.tcfg, self.info
        per_step = tcfg.batch_size * self.k * self.world
        n_params = sum(p.numel() for p in self.raw.parameters())
        self.say(f"{self.conf['model']}: {n_params / 1e6:.2f}M parameters | data {self.dataset} ({info['kind']}) "
                 f"| {self.device} {str(self.dtype).removeprefix('torch.')} | {self.world} process(es) x batch "
                 f"{tcfg.batch_size} x accum {self.k} = {per_step} per step | out {self.out_dir}")
        if info["kind"] == "tokens" and not hasattr(self.judge, "generate"):
            self.say("(the model has no generate(): no text samples at evaluations)")

    def fit(self):
        """The loop: evaluate and save every --eval-interval steps, log every --log-interval,
        until --max-iters, the --max-time budget, or a signal. -> the exit code."""
        tcfg, p = self.tcfg, self.progress
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, Stop.handler)
        Stop.signum = 0
        start, timed_out = p.step, False
        self.meter, self.rate_from = Meter(), None
        while True:
            last = p.step >= tcfg.max_iters or timed_out
            evaluated_at_resume = self.ckpt is not None and p.step == start and self.ckpt.get("evaluated", True)
            if (p.step % tcfg.eval_interval == 0 or last) and not evaluated_at_resume:
                if self.nonfinite.seen(self.ddp):
                    break
                self.evaluate_and_save()
            if last:
                break
            lr = optim.cosine_lr(p.step, lr=tcfg.lr, min_lr=tcfg.min_lr, warmup_iters=tcfg.warmup_iters,
                                 decay_iters=p.horizon, hold=tcfg.lr_hold)
            self.train_step(lr)
            if self.rate_from is None:
                self.rate_from = (time.time(), p.step)
            if p.step % tcfg.log_interval == 0 or p.step == tcfg.max_iters:
                if self.nonfinite.seen(self.ddp):
                    break
                self.log_line(lr)
                signum, over_time = self.agree_to_stop()  # stop decisions are taken together, here
            elif not self.ddp:  # one process: nobody to agree with, so look every step
                signum, over_time = Stop.signum, bool(tcfg.max_time and self.elapsed() > tcfg.max_time)
            else:
                signum, over_time = 0, False
            if signum:
                if self.nonfinite.seen(self.ddp):  # never save weights a non-finite step has touched
                    break
                self.save(evaluated=False)
                self.say(f"stopped by signal {signum} at step {p.step}; saved {self.ckpt_path} "
                         f"(resume with --resume)")
                return 128 + signum
            if over_time and not timed_out:
                timed_out = True
                self.say(f"--max-time {tcfg.max_time:g}s reached at step {p.step}")
        if self.nonfinite.found < NonFinite.NEVER:
            raise self.nonfinite.error(self.ckpt_path)
        return 0

    def train_step(self, lr):
        """One optimizer step of every player in turn. While one player steps the others are
        frozen (requires_grad off), so its backward pass computes no gradient for them:
        the generator's goes through D to its input without D's weight gradients (a third
        of D's backward pass), and nothing of it reaches D's next step."""
        tcfg, p, k, raw, scaler = self.tcfg, self.progress, self.k, self.raw, self.scaler
        if isinstance(getattr(raw, "step", None), torch.Tensor):  # a schedule in a model: the VAE's KL warm-up
            raw.step.fill_(p.step)
        for i, player in enumerate(self.players):
            opt, repeats = self.optimizers[player], self.players.count(player)
            for group in opt.param_groups:
                group["lr"] = lr * self.lr_mult.get(player, 1.0)
            self.freeze_all_but(player)
            t = time.perf_counter()
            X, Y = self.splits["train"].batch(tcfg.batch_size * k * self.world, self.stream)
            self.meter.data_s += time.perf_counter() - t
            now = {}  # this step's loss and logged parts for this player, on the device
            for m in range(k):
                t = time.perf_counter()
                x, y = self.micro_batch(X, Y, m)
                self.meter.data_s += time.perf_counter() - t
                seed_noise(tcfg.seed, p.step, i, self.rank * k + m)
                # Gradients are all-reduced on the last micro-batch only.
                with self.model.no_sync() if self.ddp and m < k - 1 else contextlib.nullcontext():
                    with autocast(self.device, self.dtype):
                        loss, parts = self.model(x, y, **self.forward_kw[player])
                    scaler.scale(loss / k).backward()
                self.tally(now, player, {**parts, "loss": loss}, k * repeats)
            # The gradient norm (the clip's, when clipping) is checked along with the loss.
            # Under fp16 the GradScaler owns non-finite gradients: it skips those steps.
            norm = None
            if tcfg.grad_clip > 0:
                scaler.unscale_(opt)
                norm = optim.clip_grad_norm_(self.params[player], tcfg.grad_clip)
            elif not scaler.is_enabled():
                norm = optim.grad_norm(self.params[player])
            labels, finite = self.check_finite(player, now, None if scaler.is_enabled() else norm)
            if tcfg.skip_nonfinite and not self.all_finite(finite):  # one device sync per player and step
                p.skipped += 1
                if tcfg.grad_clip > 0 and scaler.is_enabled():
                    scaler.update()  # after unscale_, or the next unscale_ of this optimizer fails
                raw.zero_grad(set_to_none=True)
                continue
            if not tcfg.skip_nonfinite:
                self.nonfinite.record(p.step, labels, finite)
            self.meter.add(now, 1 / repeats)  # a player stepping twice a step: each half a step's worth
            scaler.step(opt)
            scaler.update()
            raw.zero_grad(set_to_none=True)
        self.freeze_all_but(None)
        p.step += 1
        self.meter.steps += 1
        if self.ema is not None:
            self.update_ema()

    def micro_batch(self, X, Y, m):
        """Micro-step m's rows of a global batch, on the device; Y may be None (no labels)."""
        b, at = self.tcfg.batch_size, self.rank * self.k + m
        rows = slice(at * b, (at + 1) * b)
        x = X[rows].to(self.device, non_blocking=True)
        return x, None if Y is None else Y[rows].to(self.device, non_blocking=True)

    def tally(self, into, player, values, parts):
        """Add a micro-batch's loss and logged parts (tensors: no device sync), each divided by
        the parts a step's value is made of (micro-batches x the player's repeats)."""
        tag = "" if len(self.names) == 1 else f"_{player}"
        for key, v in values.items():  # parts first: the most specific name for a fault
            v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v), device=self.device)
            into[key + tag] = into.get(key + tag, 0) + v / parts

    def check_finite(self, player, now, norm):
        """(labels, a bool tensor of which of this step's loss, parts and gradient norm are finite).
        The labels are named once per player and set of parts, not every step."""
        key = (player, *now, norm is not None)
        labels = self.labels.get(key)
        if labels is None:
            prefix, tag = ("", "") if len(self.names) == 1 else (f"{player} ", f"_{player}")
            labels = self.labels[key] = tuple(prefix + k.removesuffix(tag) for k in now) + \
                ((prefix + "gradient",) if norm is not None else ())
        values = [*now.values()] + ([norm.to(self.device)] if norm is not None else [])
        return labels, torch.isfinite(torch.stack(values))

    def all_finite(self, finite):
        """--skip-nonfinite: whether every process's values are finite (every process skips, or none)."""
        ok = finite.all().float()
        if self.ddp:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def freeze_all_but(self, player):
        """With several players, only `player`'s parameters require gradients (None: all
        that the model trains)."""
        if len(self.names) > 1:
            keep = self.trainable if player is None else self.own[player]
            for q in self.raw.parameters():
                q.requires_grad_(id(q) in keep)

    @torch.no_grad()
    def update_ema(self):
        """The average's decay ramps up as min(--ema, (1+step)/(10+step)), so a short run is
        not dominated by its random start; buffers are copied."""
        step = self.progress.step
        decay = min(self.tcfg.ema, (1 + step) / (10 + step))
        ema_params, params, buffers = self.ema_pairs
        torch._foreach_lerp_(ema_params, params, 1 - decay)
        for e, b in buffers:
            e.copy_(b)

    def elapsed(self):
        return time.time() - self.progress.t0

    def log(self, record):
        if self.master:
            with open(os.path.join(self.out_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def log_line(self, lr):
        """The console and log.jsonl line of the steps since the last: the global batch's
        mean losses (one all-reduce), the speed, the ETA."""
        tcfg, p, meter = self.tcfg, self.progress, self.meter
        shown = torch.stack(list(meter.sums.values())) if meter.sums else torch.zeros(0, device=self.device)
        if self.ddp:  # the logged loss is the global batch's, not rank 0's share
            dist.all_reduce(shown)
            shown /= self.world
        now = time.time()
        dt = now - meter.since
        losses = {key: v / meter.counts[key] for key, v in zip(meter.sums, shown.tolist())}
        if tcfg.skip_nonfinite:
            losses["skipped"] = p.skipped  # updates skipped so far, this run and the ones it resumed
        speed = meter.steps * self.units_per_step / dt
        eta = (tcfg.max_iters - p.step) * dt / meter.steps
        if tcfg.max_time:
            eta = min(eta, max(0.0, tcfg.max_time - self.elapsed()))
        rate = f"{speed / 1e3:.1f}k" if speed >= 1e4 else f"{speed:.0f}"
        text = " | ".join(f"{key.replace('_', ' ')} {v:.4f}" if isinstance(v, float) else f"{key} {v}"
                          for key, v in losses.items())
        self.say(f"step {p.step} | {text} | lr {lr:.2e} | {rate} {self.unit}/s | ETA {eta / 60:.1f}m")
        self.log(dict(step=p.step, **losses, lr=lr, **{f"{self.unit}_per_s": speed},
                      data_share=meter.data_s / dt, time=self.elapsed()))
        self.meter = Meter(since=now)

    def agree_to_stop(self):
        """(signal number, over --max-time), agreed by every process; under --max-time the
        cosine is re-aimed at the step the budget is estimated to end at, from the step rate
        since the first step (evaluations included), and under --lr-hold only while the LR
        is still held, so a started decay never jumps back up to the peak."""
        tcfg, p = self.tcfg, self.progress
        elapsed = self.elapsed()
        since, first = self.rate_from
        rate = (p.step - first) / max(time.time() - since, 1e-9)  # steps/s
        steps_left = (tcfg.max_time - elapsed) * rate if p.step > first else 1e12  # no rate yet
        signum, over_time, end = stop_vote(Stop.signum, tcfg.max_time > 0 and elapsed > tcfg.max_time,
                                           p.step + steps_left, self.ddp, self.device)
        decaying = tcfg.lr_hold and p.step >= optim.decay_start(tcfg.warmup_iters, p.horizon, tcfg.lr_hold)
        if tcfg.max_time and not decaying:
            p.horizon = max(p.step, int(min(tcfg.lr_decay_iters or tcfg.max_iters, end)))
        return signum, over_time

    @torch.no_grad()
    def evaluate(self):
        """{split: {player: mean loss}} on fixed batches with fixed noise, the same at every
        evaluation and for any process count; the training noise is untouched (forked RNG)."""
        tcfg, k, out = self.tcfg, self.k, {}
        with fork_rng(self.device):
            self.judge.eval()
            for split in ("train", "val"):
                g = torch.Generator().manual_seed(tcfg.seed * 7919 + (split == "val"))
                total = torch.zeros(len(self.names), device=self.device)
                for i in range(tcfg.eval_iters):  # global batches, sliced as in training
                    X, Y = self.splits[split].batch(tcfg.batch_size * k * self.world, g)
                    for m in range(k):
                        for j, player in enumerate(self.names):
                            seed_noise(tcfg.seed, -1, split == "val", i, j, self.rank * k + m)
                            with autocast(self.device, self.dtype):
                                loss, _ = self.judge(*self.micro_batch(X, Y, m), **self.forward_kw[player])
                            total[j] += loss.float() / k
                if self.ddp:
                    dist.all_reduce(total)
                out[split] = dict(zip(self.names, (total / (tcfg.eval_iters * self.world)).tolist()))
            self.train_mode()
        return out

    def train_mode(self):
        self.raw.train()
        if self.ema is not None:
            self.ema.eval()

    def evaluate_and_save(self):
        """Both splits' losses, logged; the checkpoint (and best.pt at a new best validation
        loss); the samples."""
        p, multi = self.progress, len(self.names) > 1
        losses = self.evaluate()
        rec = dict(step=p.step, time=self.elapsed())
        for split in ("train", "val"):
            rec.update({f"{split}_loss" + (f"_{name}" if multi else ""): v for name, v in losses[split].items()})
        if "bytes_per_token" in self.info:
            rec["val_bpb"] = rec["val_loss"] / math.log(2) / self.info["bytes_per_token"]
        self.say(f"eval step {p.step}: " + " | ".join(f"{key.replace('_loss', '')} {v:.4f}"
                                                      for key, v in rec.items() if "_loss" in key)
                 + (f" | val {rec['val_bpb']:.3f} bits/byte" if "val_bpb" in rec else ""))
        self.log(rec)
        # The best validation loss means something for one player; a GAN's players' losses
        # rise and fall against each other, so a GAN keeps no best.pt.
        improved = not multi and rec["val_loss"] < p.best_val
        if improved:
            p.best_val = rec["val_loss"]
        if p.step > 0:
            self.save(evaluated=True)
            if improved and self.master:
                # A hard link renamed into place: best.pt is whole or absent, and costs no copy.
                best = os.path.join(self.out_dir, "best.pt")
                with contextlib.suppress(FileNotFoundError):
                    os.remove(best + ".tmp")
                os.link(self.ckpt_path, best + ".tmp")
                os.replace(best + ".tmp", best)
        if self.master:
            self.write_text() if self.info["kind"] == "tokens" else self.write_pictures()
            plot.save_curves(os.path.join(self.out_dir, "loss.png"),
                             plot.loss_panels(os.path.join(self.out_dir, "log.jsonl")))

    def save(self, evaluated):
        """The checkpoint, with all a resumed run needs to continue exactly. No RNG states:
        the noise of every micro-batch is seeded from its place in the run (seed_noise)."""
        if not self.master:
            return
        p, ema = self.progress, self.ema
        save_checkpoint(dict(model=strip_prefixes(self.raw.state_dict()),
                             ema=strip_prefixes(ema.state_dict()) if ema is not None else None,
                             optimizers={name: o.state_dict() for name, o in self.optimizers.items()},
                             scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
                             step=p.step, best_val=p.best_val, config=self.conf, data_rng=self.stream.get_state(),
                             horizon=p.horizon, evaluated=evaluated, skipped=p.skipped, elapsed=self.elapsed()),
                        self.ckpt_path)

    def write_text(self):
        """--sample-tokens of text from the start of a document, appended to samples.txt."""
        if not hasattr(self.judge, "generate"):
            return
        tok = data.get_tokenizer(self.tcfg.tokenizer)
        prompt = [tok.eot] if tok.eot is not None else tok.encode("\n")
        g = torch.Generator(device=self.device).manual_seed(self.tcfg.seed + self.progress.step)
        self.judge.eval()
        top_k = {"top_k": 200} if "top_k" in inspect.signature(self.judge.generate).parameters else {}
        with autocast(self.device, self.dtype):
            ids = self.judge.generate(torch.tensor([prompt], device=self.device), self.tcfg.sample_tokens,
                                      temperature=0.8, generator=g, **top_k)
        self.train_mode()
        text = tok.decode(ids[0, len(prompt):].tolist())
        with open(os.path.join(self.out_dir, "samples.txt"), "a") as f:
            f.write(f"=== step {self.progress.step} ===\n{text}\n")
        self.say("-" * 60 + "\n" + text[:400] + "\n" + "-" * 60)

    def write_pictures(self):
        """samples-<step>.png and samples.png (data.save_samples); a model that can
        reconstruct (VAE) also gets reconstructions.png (rows of val images, each above its
        reconstructions) and interpolations.png (a row from one val image to another)."""
        step, judge, device = self.progress.step, self.judge, self.device
        kind, val = self.info["kind"], self.splits["val"]
        n = 2000 if kind == "points" else self.tcfg.sample_images
        classes = getattr(self.mcfg, "num_classes", 0) or 0
        pairs = line = None
        # Seeded per step, inside a fork of the RNG: the training noise after this point is
        # the same whether or not pictures were drawn, so a resumed run stays exact.
        with fork_rng(device), torch.no_grad():
            torch.manual_seed(self.tcfg.seed + step)
            judge.eval()
            with autocast(device, self.dtype):
                x = draw_samples(judge, n, classes, device)
                rows = min(4, len(val.images) // 10) if kind == "image" else 0
                if rows and hasattr(judge, "reconstruct"):
                    real = val.images[:10 * rows].to(device).float().div(127.5).sub(1)
                    shape = (rows, 10, *real.shape[1:])
                    pairs = torch.stack([real.view(shape), judge.reconstruct(real).view(shape)], 1)
                    line = judge.interpolate(real[:5], real[5:10], 10) if hasattr(judge, "interpolate") else None
            self.train_mode()
        path = os.path.join(self.out_dir, f"samples-{step:06d}.png")
        data.save_samples(x, path, classes, points=self.dataset if kind == "points" else None)
        if pairs is not None:
            data.save_grid(pairs.flatten(0, 2), os.path.join(self.out_dir, "reconstructions.png"), nrow=10)
        if line is not None:
            data.save_grid(line.flatten(0, 1), os.path.join(self.out_dir, "interpolations.png"), nrow=10)
        shutil.copyfile(path, os.path.join(self.out_dir, "samples.png"))
        self.say(f"samples: {path}")


if __name__ == "__main__":
    try:
        cli(main)
    except SystemExit as e:
        if "RANK" not in os.environ:
            raise
        # A torchrun worker leaves without the interpreter's teardown, its files written
        # and closed and its process group destroyed by now. A worker of a 2-process test
        # run aborted once in CI with "terminate called without an active exception", the
        # message of a C++ thread destroyed unjoined, which that teardown (freeing gloo's
        # objects in whatever order) can hit; torchrun then fails the whole job.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(e.code if isinstance(e.code, int) else 1)
