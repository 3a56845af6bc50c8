"""Checkpoints: files written whole or not at all, read without running pickled code, a
model rebuilt from one, and how a run starts from one (--resume, --init-from).

A checkpoint is one dict: model and EMA state dicts (no wrapper prefixes), optimizer
states, step, best validation loss, the whole config and the data stream's state. No
RNG states: every noise draw is seeded from its place in the run (train.seed_noise).
"""
import contextlib
import dataclasses
import glob
import json
import math
import os
import re
from dataclasses import dataclass

import torch

from cli import UsageError
from contract import gpt2_loader, load_module


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


def link_best(ckpt_path, best):
    """best.pt as a hard link to the checkpoint, renamed into place: whole or absent, and
    it costs no copy."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(best + ".tmp")
    os.link(ckpt_path, best + ".tmp")
    os.replace(best + ".tmp", best)


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


def upgrade(state, mine):
    """A state dict of an older layout in the current one (`mine`, the model's own state
    dict): the U-Net's 1x1 convolutions hold [out, in] matrices where older checkpoints
    stored [out, in, 1, 1] kernels."""
    return {k: v.flatten(1) if torch.is_tensor(v) and v.dim() == 4 and v.shape[2:] == (1, 1) and k in mine
            and mine[k].shape == v.shape[:2] else v for k, v in state.items()}


def load_state(model, state, name):
    try:
        model.load_state_dict(upgrade(state, model.state_dict()))
    except (RuntimeError, TypeError, AttributeError, ValueError) as e:  # not tensors, or not of this shape
        first = [line.strip() for line in str(e).splitlines() if line.strip()][1:2]
        raise UsageError(f"checkpoint does not fit this {name} model: {first[0] if first else e}")


def model_name(path):
    """gpt for gpt, and for experiments/gpt.py."""
    return os.path.splitext(os.path.basename(path))[0]


def checkpoint_module(ckpt, path, model=""):
    """The model module a checkpoint was trained with: `model` where given (a file that
    has moved), else the file its run recorded, else the project's module of its name."""
    recorded = ckpt["config"].get("model_path") or ""
    if model:
        return load_module(model)
    if recorded and not os.path.isfile(recorded):
        raise UsageError(f"{path} was trained with {recorded}, which is not there now; "
                         f"give the file's new path with --model")
    return load_module(recorded or ckpt["config"]["model"])


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


# ---- starting a run from a checkpoint ----------------------------------------------------

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
    return ckpt


def gpt2_model(module, tcfg, mcfg, given):
    """--init-from: the model with GPT-2's weights, whose shape wins over the flags (a
    flag that contradicts it is an error; --block-size may shorten the context)."""
    from_gpt2 = gpt2_loader(module)
    if from_gpt2 is None:
        raise UsageError(f"--init-from: {tcfg.model} cannot load GPT-2 weights")
    if not os.path.exists(tcfg.init_from):
        raise UsageError(f"--init-from {tcfg.init_from}: no such file or folder")
    try:
        model = from_gpt2(tcfg.init_from, dropout=getattr(mcfg, "dropout", 0.0))
    except Exception as e:  # a user's file can fail in many ways; all of them are one line
        raise UsageError(f"--init-from {tcfg.init_from}: not loadable GPT-2 weights "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})")
    for k in sorted(given):  # the weights fix every model setting but the context and dropout
        if k not in ("block_size", "dropout") and hasattr(model.cfg, k) and getattr(mcfg, k) != getattr(model.cfg, k):
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
    mine = model.state_dict()
    state = upgrade(source["ema"] if isinstance(source.get("ema"), dict) else source["model"], mine)
    fresh = [k for k in mine if k not in state or state[k].shape != mine[k].shape]
    if old.get("num_classes", 0) == getattr(mcfg, "num_classes", 0) and any(k in state for k in fresh):
        k = next(k for k in fresh if k in state)
        raise UsageError(f"--init-from {path}: its {k} is {tuple(state[k].shape)}, this model's "
                         f"{tuple(mine[k].shape)}; drop the flags that change the model's shape")
    tied = {}  # a tensor this model holds under several names (tied embeddings) must come in whole
    for k, v in mine.items():
        if v.numel():
            tied.setdefault(v.data_ptr(), []).append(k)
    for names in tied.values():
        given = [k for k in names if k in state]
        if any(not torch.equal(state[given[0]], state[k]) for k in given[1:]):
            raise UsageError(f"--init-from {path}: its {given[0]} and {given[1]} differ, and this model ties them "
                             f"into one tensor; drop the flag that ties them (e.g. --tie-embeddings)")
    model.load_state_dict({**mine, **{k: v for k, v in state.items() if k in mine and k not in fresh}})
    return fresh


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
