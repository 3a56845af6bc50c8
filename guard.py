"""When a run stops, decided alike by every process: a signal, --max-time, a non-finite
value, or a lost process; and the process group's start and orderly end.
"""
import contextlib
import os
import re
import signal
import time

import torch
import torch.distributed as dist

from cli import Fault, UsageError
from optim import clip_grad_norm_, decay_start, grad_norm


@contextlib.contextmanager
def process_group(ddp, device, rank):
    """Join the torchrun job's process group (gloo on a CPU, nccl on GPUs) for the run, and
    restore the signal handlers after it. A collective that fails because another process
    of the job died (killed, out of memory) becomes one line: checkpoints are written whole
    or not at all, so the last one stands."""
    if ddp:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    clean = False
    try:
        yield
        clean = True
    except (RuntimeError, dist.DistError) as e:
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

    @classmethod
    def listen(cls):
        cls.signum = 0
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, cls.handler)


def agree_to_stop(tcfg, p, rate_from, elapsed, ddp, device):
    """(signal number, over --max-time), agreed by every process at a log line. Under
    --max-time the cosine's end (p.horizon) is re-aimed at the step the budget is
    estimated to end at, from the step rate since the first step (evaluations included),
    and under --lr-hold only while the LR is still held, so a started decay never jumps
    back up to the peak."""
    since, first = rate_from
    rate = (p.step - first) / max(time.time() - since, 1e-9)  # steps/s
    steps_left = (tcfg.max_time - elapsed) * rate if p.step > first else 1e12  # no rate yet
    signum, over_time, end = stop_vote(Stop.signum, tcfg.max_time > 0 and elapsed > tcfg.max_time,
                                       p.step + steps_left, ddp, device)
    decaying = tcfg.lr_hold and p.step >= decay_start(tcfg.warmup_iters, p.horizon, tcfg.lr_hold)
    if tcfg.max_time and not decaying:
        p.horizon = max(p.step, int(min(tcfg.lr_decay_iters or tcfg.max_iters, end)))
    return signum, over_time


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


class NonFinite:
    """The run's first non-finite loss, logged part or gradient norm, found without a
    device sync in the hot loop: record() folds each check into one tensor on the device;
    seen() reads it only where the loop waits anyway (log lines, evaluations, a signal).
    The tensor holds step * SLOTS + the value's label's slot (NEVER: none yet), a number
    ordered as (step, slot) are, so the earliest over the processes is one MIN."""
    SLOTS = 1024  # labels a run can name
    NEVER = 2 ** 62

    def __init__(self, device, ddp, several_players):
        self.device, self.ddp, self.several = device, ddp, several_players
        self.first = torch.full((), self.NEVER, dtype=torch.long, device=device)
        self.slots = {}  # label ("loss", "discriminator gradient", ...) -> its slot, in order of first check
        self.on_device = {}  # a tuple of labels -> their slots, as a tensor on the device
        self.labels = {}  # (player, the names of its values, with a norm or not) -> their labels
        self.found = self.NEVER  # what seen() read last

    def check(self, player, values, norm):
        """(labels, a bool tensor of which of a step's values (loss and logged parts, keyed
        as the log names them) and gradient norm (None: not checked) are finite). The labels
        are named once per player and set of values, not every step."""
        key = (player, *values, norm is not None)
        labels = self.labels.get(key)
        if labels is None:
            prefix, tag = (f"{player} ", f"_{player}") if self.several else ("", "")
            labels = self.labels[key] = tuple(prefix + k.removesuffix(tag) for k in values) + \
                ((prefix + "gradient",) if norm is not None else ())
        checked = [*values.values()] + ([norm.to(self.device)] if norm is not None else [])
        return labels, torch.isfinite(torch.stack(checked))

    def everywhere(self, finite):
        """--skip-nonfinite: whether every process's values are finite (every process skips,
        or none); one device sync."""
        ok = finite.all().float()
        if self.ddp:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def step(self, opt, scaler, params, values, player, step, grad_clip, skip):
        """Clip a player's gradients (grad_clip > 0), check them and its loss and logged
        values for non-finite ones, and step its optimizer through the scaler; -> False
        where skip (--skip-nonfinite) skipped the update. The gradient norm (the clip's,
        when clipping) is checked along with the loss; under fp16 the GradScaler owns
        non-finite gradients: it skips those steps itself."""
        norm = None
        if grad_clip > 0:
            scaler.unscale_(opt)
            norm = clip_grad_norm_(params, grad_clip)
        elif not scaler.is_enabled():
            norm = grad_norm(params)
        labels, finite = self.check(player, values, None if scaler.is_enabled() else norm)
        if skip and not self.everywhere(finite):  # one device sync per player and step
            if grad_clip > 0 and scaler.is_enabled():
                scaler.update()  # after unscale_, or the next unscale_ of this optimizer fails
            return False
        if not skip:
            self.record(step, labels, finite)
        scaler.step(opt)
        scaler.update()
        return True

    def record(self, step, labels, finite):
        """finite: a bool tensor, one per label; the first False, if none came before, is kept."""
        if labels not in self.on_device:
            slots = [self.slots.setdefault(label, len(self.slots)) for label in labels]
            self.on_device[labels] = torch.tensor(slots, device=self.device)
        slot = self.on_device[labels][(~finite).int().argmax()]
        self.first = torch.where((self.first == self.NEVER) & ~finite.all(), step * self.SLOTS + slot, self.first)

    def seen(self):
        """Whether any process has recorded one; a collective under DDP, so every process
        calls it at the same place and takes the same branch."""
        first = self.first.clone()
        if self.ddp:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        self.found = int(first.item())
        return self.found < self.NEVER

    def error(self, ckpt_path):
        step, slot = divmod(self.found, self.SLOTS)
        label = next(name for name, s in self.slots.items() if s == slot)
        return not_finite(label, step, ckpt_path)


def not_finite(what, step, ckpt_path):
    """The one line of a run stopped by a non-finite value, naming what it kept."""
    kept = f"the last good checkpoint {ckpt_path} is kept" if os.path.exists(ckpt_path) else \
        "no checkpoint had been written"
    return UsageError(f"{what} is not finite at step {step}; stopped, {kept} (lower --lr, try --dtype fp32, or "
                      f"--skip-nonfinite to skip such updates)")
