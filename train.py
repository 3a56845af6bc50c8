"""The one training loop, for every model.

    python train.py --model gpt --preset tiny
    torchrun --standalone --nproc_per_node 2 train.py --model gpt --preset tiny

A model is a module of this project (gpt, diffusion, vae, gan) or any .py file with a
dataclass Config (each field a flag) and a Model(nn.Module) with forward and sample
(README.md, "Write or fork a model"). Precedence: defaults < --preset < flags.

Reading order: main starts the processes; Trainer.__init__ builds the run (or the run
it resumes); Trainer.fit is the loop; Trainer.train_step is one optimizer step of every
player, with its micro-batches. What a reader can skip lives elsewhere: resuming and
--init-from in checkpoint.py, dtypes and DDP in devices.py, signals, --max-time and the
non-finite guard in guard.py, the optimizers in optim.py, the hooks in contract.py.

Exit codes: 0 done; 2 bad input, or a non-finite loss or gradient (the last good
checkpoint is kept); 1 another process of a torchrun job was lost; 128 + the signal's
number (130 for SIGINT, 143 for SIGTERM) when a signal stopped the run after saving.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

import data
import optim
import plot
import sample
from checkpoint import (Progress, gpt2_model, link_best, model_name, prepare_out_dir, restore, resume_from,
                        run_config, save_checkpoint, strip_prefixes, weights_from_run)
from cli import Parser, UsageError, add_fields, check_ranges, cli
from contract import default_data, forward_kwargs, hooks, load_module, presets
from devices import autocast, dtype_name, fork_rng, pick_device, run_dtype, wrap
from guard import NonFinite, Stop, agree_to_stop, not_finite, process_group
from plot import Meter


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


# ---- flags ----------------------------------------------------------------------------------

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
    """Every training setting in its range, or one line that says which is not and why."""
    big, most_wd = 2 ** 20, 1 / tcfg.lr if tcfg.lr > 0 else math.inf  # big: examples per step, batches, tokens
    check_ranges(tcfg, dict(
        batch_size=f"[1, {big}]", grad_accum=f"[1, {big}]", max_iters="[0, inf)", max_time="[0, inf)",
        optimizer=("adamw", "adam", "sgd", "muon"), lr="(0, 1e3]", min_lr=f"[0, {tcfg.lr}] the cosine's floor",
        warmup_iters="[0, inf)", lr_decay_iters="[0, inf)", lr_hold="[0, 1) a share, e.g. 0.7 (0: none)",
        weight_decay=f"[0, {most_wd}) each step scales the weights by 1 - lr * weight_decay",
        beta1="[0, 1)", beta2="[0, 1)", muon_momentum="[0, 1) e.g. 0.95", grad_clip="[0, inf)",
        ema="[0, 1) a decay, e.g. 0.999 (0: off)", dtype=("auto", "bf16", "fp16", "fp32"),
        seed=f"[0, {2 ** 32 - 1}]", eval_interval="[1, inf)", eval_iters=f"[1, {big}]", log_interval="[1, inf)",
        sample_tokens=f"[0, {big}]", sample_images="[1, 4096]"))
    if tcfg.batch_size * tcfg.grad_accum > big:
        raise UsageError(f"--batch-size x --grad-accum must be at most {big} examples per step")
    if not tcfg.data_dir:
        raise UsageError("--data-dir must name a folder (default: data)")


# ---- the processes and the run's parts -----------------------------------------------------

def main(argv=None):
    module, tcfg, mcfg, given = parse_args(sys.argv[1:] if argv is None else argv)
    check(tcfg)
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(tcfg.device, int(os.environ.get("LOCAL_RANK", 0)))
    with process_group(ddp, device, rank):
        return Trainer(module, tcfg, mcfg, given, device, rank, world, ddp).fit()


def new_model(module, mcfg, tcfg):
    """A freshly initialised model, the same on every process (seeded)."""
    torch.manual_seed(tcfg.seed)
    try:
        return module.Model(mcfg)
    except ValueError as e:
        raise UsageError(f"model settings: {e}")


def seed_noise(*where):
    """Seed the noise a model draws in its forward (dropout, diffusion's t and epsilon,
    a GAN's z) from where in the run it is, e.g. (seed, step, player, micro-batch): the
    run then depends only on the global batch, not on the process count, and a resumed
    run draws exactly what an uninterrupted one would have. (Python's hash of a tuple
    of ints is the same in every process.)"""
    torch.manual_seed(hash(where) & 0x7FFF_FFFF_FFFF_FFFF)


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
        if ckpt is not None:
            check(tcfg)  # the settings the checkpoint brought (main checked the flags)
        raw = self.raw = self.build_model(module, mcfg, given)
        self.hooks = h = hooks(raw)
        if tcfg.batch_size % h.batch_multiple:  # e.g. a GAN whose D judges packs of examples
            raise UsageError(f"--batch-size {tcfg.batch_size}: this model takes micro-batches in multiples "
                             f"of {h.batch_multiple}; pick a multiple of {h.batch_multiple}")
        self.dtype, race = run_dtype(tcfg, ckpt, raw, h, self.splits["train"], device, rank, ddp, self.say)
        self.ema = optim.EMA(raw, tcfg.ema) if tcfg.ema > 0 else None
        self.judge = self.ema.model if self.ema is not None else raw  # the weights evaluated and sampled
        self.judge_hooks = h if self.ema is None else hooks(self.judge)  # the hooks bound to the judge
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.optimizers = optim.make_optimizers(raw, h, tcfg)
        # Each step draws one global batch from a stream seeded alike on every process; process
        # r's micro-step m takes slice r*k + m. So the run depends only on the global batch size:
        # 2 processes x batch 4 = 1 process x 2 micro-batches of 4 = 1 process x batch 8.
        self.stream = torch.Generator().manual_seed(tcfg.seed)
        self.progress = Progress() if ckpt is None else restore(
            ckpt, self.ckpt_path, tcfg.model, raw, None if self.ema is None else self.judge, self.optimizers,
            self.scaler, self.stream)
        # The cosine ends at --lr-decay-iters (default --max-iters); under --max-time, where the
        # budget ends instead (re-aimed at each log line), so a run is annealed when it stops.
        self.progress.horizon = tcfg.lr_decay_iters or tcfg.max_iters
        if ckpt is not None and tcfg.max_time and ckpt.get("horizon"):
            self.progress.horizon = ckpt["horizon"]
        if ckpt is not None:
            self.say(f"resumed from {self.ckpt_path} at step {self.progress.step}")
        self.model = wrap(raw, h, tcfg.compile, device, ddp, self.say)
        if self.master:
            prepare_out_dir(self.out_dir, ckpt, self.say)
        self.conf = dict(model=model_name(tcfg.model),
                         model_path=os.path.abspath(tcfg.model) if tcfg.model.endswith(".py") else "",
                         dtype=dtype_name(self.dtype), dtype_race=race,  # what --dtype auto chose, and its timings
                         model_config=dataclasses.asdict(self.mcfg), train_config=dataclasses.asdict(tcfg),
                         data=dict(name=self.dataset, **self.info.record()))  # classes: names, for samples
        self.setup_players()
        self.announce()
        # The time budget is the whole run's, not this process's, unless given anew.
        self.progress.t0 = time.time() - (ckpt.get("elapsed", 0.0) if ckpt and "max_time" not in given else 0)

    def build_model(self, module, mcfg, given):
        """The model on the device, fresh or with --init-from's weights, and the data it
        trains on (self.splits), whose shape fills the model's data-dependent fields."""
        tcfg, fresh = self.tcfg, self.ckpt is None
        # GPT-2 weights, when fine-tuning, fix the model's shape before the data is cut to its context.
        from_run = tcfg.init_from.endswith(".pt") and fresh  # another nanogen run's weights
        source = run_config(tcfg, mcfg, given) if from_run else None
        pretrained = gpt2_model(module, tcfg, mcfg, given) if tcfg.init_from and not from_run and fresh else None
        self.mcfg = mcfg = pretrained.cfg if pretrained is not None else mcfg
        self.dataset = tcfg.data or default_data(module)
        if not self.dataset:
            raise UsageError(f"--model {tcfg.model} names no default dataset (DATA); give --data")
        self.splits, self.info = data.load_for_model(self.dataset, mcfg, given, tcfg.tokenizer, tcfg.data_dir,
                                                     tcfg.model, pretrained is not None)
        raw = (pretrained if pretrained is not None else new_model(module, mcfg, tcfg)).to(self.device)
        if source is not None:
            new = weights_from_run(raw, source, mcfg, tcfg.init_from)
            self.say(f"--init-from {tcfg.init_from}: its weights" + (f", but {len(new)} tensors it lacks or sizes "
                     f"otherwise, fresh ({', '.join(new[:3])}{', ...' if len(new) > 3 else ''})" if new else ""))
        return raw

    def setup_players(self):
        """Each player's parameters, forward arguments and the run's per-step bookkeeping, looked up once."""
        h, raw = self.hooks, self.raw
        self.params = {p: h.parameters_of(p) for p in h.names}
        self.forward_kw = {p: forward_kwargs(h, p) for p in h.names}
        self.trainable = {id(p) for p in raw.parameters() if p.requires_grad}  # a model may freeze some
        self.own = {p: {id(q) for q in self.params[p]} & self.trainable for p in h.names}
        self.units_per_step = self.tcfg.batch_size * self.k * self.world * (
            self.info.shape[0] if self.info.kind == "tokens" else 1)
        self.nonfinite = NonFinite(self.device, self.ddp, len(h.names) > 1)

    def announce(self):
        tcfg, info = self.tcfg, self.info
        n_params = sum(p.numel() for p in self.raw.parameters())
        self.say(f"{self.conf['model']}: {n_params / 1e6:.2f}M parameters | data {self.dataset} ({info.kind}) "
                 f"| {self.device} {str(self.dtype).removeprefix('torch.')} | {self.world} process(es) x batch "
                 f"{tcfg.batch_size} x accum {self.k} = {tcfg.batch_size * self.k * self.world} per step "
                 f"| out {self.out_dir}")
        if info.kind == "tokens" and self.judge_hooks.generate is None:
            self.say("(the model has no generate(): no text samples at evaluations)")

    def fit(self):
        """The loop: evaluate and save every --eval-interval steps, log every --log-interval,
        until --max-iters, the --max-time budget, or a signal. -> the exit code."""
        tcfg, p = self.tcfg, self.progress
        Stop.listen()
        start, timed_out = p.step, False
        self.meter, self.rate_from = Meter(), None  # rate_from: (time, step) after the first step
        while True:
            last = p.step >= tcfg.max_iters or timed_out
            evaluated_at_resume = self.ckpt is not None and p.step == start and self.ckpt.get("evaluated", True)
            if (p.step % tcfg.eval_interval == 0 or last) and not evaluated_at_resume:
                if self.nonfinite.seen():
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
                if self.nonfinite.seen():
                    break
                self.log_line(lr)
                # Stop decisions are taken together, here; --max-time re-aims the cosine.
                signum, over_time = agree_to_stop(tcfg, p, self.rate_from, self.elapsed(), self.ddp, self.device)
            elif not self.ddp:  # one process: nobody to agree with, so look every step
                signum, over_time = Stop.signum, bool(tcfg.max_time and self.elapsed() > tcfg.max_time)
            else:
                signum, over_time = 0, False
            if signum:
                if self.nonfinite.seen():  # never save weights a non-finite step has touched
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
        tcfg, p, k, h = self.tcfg, self.progress, self.k, self.hooks
        if h.step is not None:  # a schedule in a model: the VAE's KL warm-up
            h.step.fill_(p.step)
        for i, player in enumerate(h.players):
            repeats = h.players.count(player)
            for group in self.optimizers[player].param_groups:
                group["lr"] = lr * h.lr_mult.get(player, 1.0)
            self.freeze_all_but(player)
            X, Y = self.timed(self.splits["train"].batch, tcfg.batch_size * k * self.world, self.stream)
            now = {}  # this step's loss and logged parts for this player, on the device
            for m in range(k):
                x, y = self.timed(self.micro_batch, X, Y, m)
                seed_noise(tcfg.seed, p.step, i, self.rank * k + m)
                # Gradients are all-reduced on the last micro-batch only.
                with self.model.no_sync() if self.ddp and m < k - 1 else contextlib.nullcontext():
                    with autocast(self.device, self.dtype):
                        loss, parts = self.model(x, y, **self.forward_kw[player])
                    self.scaler.scale(loss / k).backward()
                self.tally(now, player, {**parts, "loss": loss}, k * repeats)
            # Clip, check the loss and gradient for non-finite values (or skip), step: guard.py.
            stepped = self.nonfinite.step(self.optimizers[player], self.scaler, self.params[player], now, player,
                                          p.step, tcfg.grad_clip, tcfg.skip_nonfinite)
            self.raw.zero_grad(set_to_none=True)
            if stepped:
                self.meter.add(now, 1 / repeats)  # a player stepping twice a step: each half a step's worth
            else:
                p.skipped += 1
        self.freeze_all_but(None)
        p.step += 1
        self.meter.steps += 1
        if self.ema is not None:
            self.ema.update(p.step)

    def timed(self, fn, *args):
        """fn(*args), its seconds counted as the step's data time (drawing and moving batches)."""
        t = time.perf_counter()
        out = fn(*args)
        self.meter.data_s += time.perf_counter() - t
        return out

    def micro_batch(self, X, Y, m):
        """Micro-step m's rows of a global batch, on the device; Y may be None (no labels)."""
        b, at = self.tcfg.batch_size, self.rank * self.k + m
        rows = slice(at * b, (at + 1) * b)
        x = X[rows].to(self.device, non_blocking=True)
        return x, None if Y is None else Y[rows].to(self.device, non_blocking=True)

    def tally(self, into, player, values, parts):
        """Add a micro-batch's loss and logged parts (tensors: no device sync), each divided by
        the parts a step's value is made of (micro-batches x the player's repeats)."""
        tag = "" if len(self.hooks.names) == 1 else f"_{player}"
        for key, v in values.items():  # parts first: the most specific name for a fault
            v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v), device=self.device)
            into[key + tag] = into.get(key + tag, 0) + v / parts

    def freeze_all_but(self, player):
        """With several players, only `player`'s parameters require gradients (None: all
        that the model trains)."""
        if len(self.hooks.names) > 1:
            keep = self.trainable if player is None else self.own[player]
            for q in self.raw.parameters():
                q.requires_grad_(id(q) in keep)

    def elapsed(self):
        return time.time() - self.progress.t0

    def log(self, record):
        if self.master:
            with open(os.path.join(self.out_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def log_line(self, lr):
        """The console and log.jsonl line of the steps since the last: the global batch's
        mean losses (one all-reduce), the speed, the ETA."""
        tcfg, p = self.tcfg, self.progress
        shown = torch.stack(list(self.meter.sums.values())) if self.meter.sums else torch.zeros(0, device=self.device)
        if self.ddp:  # the logged loss is the global batch's, not rank 0's share
            dist.all_reduce(shown)
            shown /= self.world
        left = max(0.0, tcfg.max_time - self.elapsed()) if tcfg.max_time else math.inf
        now, text, record = self.meter.line(shown.tolist(), p.step, tcfg.max_iters, left, lr, self.info.unit,
                                            self.units_per_step, p.skipped if tcfg.skip_nonfinite else None)
        self.say(text)
        self.log({**record, "time": self.elapsed()})
        self.meter = Meter(since=now)

    @torch.no_grad()
    def evaluate(self):
        """{split: {player: mean loss}} on fixed batches with fixed noise, the same at every
        evaluation and for any process count; the training noise is untouched (forked RNG)."""
        tcfg, k, names, out = self.tcfg, self.k, self.hooks.names, {}
        with fork_rng(self.device):
            self.judge.eval()
            for split in ("train", "val"):
                g = torch.Generator().manual_seed(tcfg.seed * 7919 + (split == "val"))
                total = torch.zeros(len(names), device=self.device)
                for i in range(tcfg.eval_iters):  # global batches, sliced as in training
                    X, Y = self.splits[split].batch(tcfg.batch_size * k * self.world, g)
                    for m in range(k):
                        for j, player in enumerate(names):
                            seed_noise(tcfg.seed, -1, split == "val", i, j, self.rank * k + m)
                            with autocast(self.device, self.dtype):
                                loss, _ = self.judge(*self.micro_batch(X, Y, m), **self.forward_kw[player])
                            total[j] += loss.float() / k
                if self.ddp:
                    dist.all_reduce(total)
                out[split] = dict(zip(names, (total / (tcfg.eval_iters * self.world)).tolist()))
            self.train_mode()
        return out

    def train_mode(self):
        self.raw.train()
        if self.ema is not None:
            self.ema.model.eval()

    def evaluate_and_save(self):
        """Both splits' losses, logged; the checkpoint (and best.pt at a new best validation
        loss); the samples."""
        p, multi = self.progress, len(self.hooks.names) > 1
        losses = self.evaluate()
        rec = dict(step=p.step, time=self.elapsed())
        for split in ("train", "val"):
            rec.update({f"{split}_loss" + (f"_{name}" if multi else ""): v for name, v in losses[split].items()})
        if self.info.bytes_per_token:
            rec["val_bpb"] = rec["val_loss"] / math.log(2) / self.info.bytes_per_token
        self.say(f"eval step {p.step}: " + " | ".join(f"{key.replace('_loss', '')} {v:.4f}"
                                                      for key, v in rec.items() if "_loss" in key)
                 + (f" | val {rec['val_bpb']:.3f} bits/byte" if "val_bpb" in rec else ""))
        self.log(rec)
        bad = next((key for key, v in rec.items() if "_loss" in key and not math.isfinite(v)), None)
        if bad:  # weights a step has wrecked: never saved, nor sampled
            raise not_finite(f"the evaluation's {bad.replace('_', ' ')}", p.step, self.ckpt_path)
        # The best validation loss means something for one player; a GAN's players' losses
        # rise and fall against each other, so a GAN keeps no best.pt.
        improved = not multi and rec["val_loss"] < p.best_val
        if improved:
            p.best_val = rec["val_loss"]
        if p.step > 0:
            self.save(evaluated=True)
            if improved and self.master:
                link_best(self.ckpt_path, os.path.join(self.out_dir, "best.pt"))
        if self.master:
            self.write_samples()
            plot.save_curves(os.path.join(self.out_dir, "loss.png"),
                             plot.loss_panels(os.path.join(self.out_dir, "log.jsonl")))

    def save(self, evaluated):
        """The checkpoint, with all a resumed run needs to continue exactly. No RNG states:
        the noise of every micro-batch is seeded from its place in the run (seed_noise)."""
        if not self.master:
            return
        p, ema = self.progress, self.ema
        save_checkpoint(dict(model=strip_prefixes(self.raw.state_dict()),
                             ema=strip_prefixes(ema.model.state_dict()) if ema is not None else None,
                             optimizers={name: o.state_dict() for name, o in self.optimizers.items()},
                             scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
                             step=p.step, best_val=p.best_val, config=self.conf, data_rng=self.stream.get_state(),
                             horizon=p.horizon, evaluated=evaluated, skipped=p.skipped, elapsed=self.elapsed()),
                        self.ckpt_path)

    def write_samples(self):
        """This evaluation's text (appended to samples.txt) or pictures (sample.py draws both)."""
        tcfg, step, kind = self.tcfg, self.progress.step, self.info.kind
        self.judge.eval()
        if kind == "tokens":
            text = sample.evaluation_text(self.judge, self.judge_hooks, tcfg.tokenizer, tcfg.sample_tokens,
                                          tcfg.seed + step, self.device, self.dtype)
            if text is not None:
                with open(os.path.join(self.out_dir, "samples.txt"), "a") as f:
                    f.write(f"=== step {step} ===\n{text}\n")
                self.say("-" * 60 + "\n" + text[:400] + "\n" + "-" * 60)
        else:
            path = sample.evaluation_pictures(
                self.judge, self.judge_hooks, 2000 if kind == "points" else tcfg.sample_images,
                getattr(self.mcfg, "num_classes", 0) or 0, self.splits["val"], self.out_dir, step, tcfg.seed,
                self.device, self.dtype, points=self.dataset if kind == "points" else None)
            self.say(f"samples: {path}")
        self.train_mode()


if __name__ == "__main__":
    cli(main)
