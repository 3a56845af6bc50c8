"""Where and in what precision a run computes: the device, the dtype (and --dtype auto's
race of fp32 against bf16 on a CPU), autocast, torch.compile and the DDP wrapper.
"""
import contextlib
import copy
import importlib
import math
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist

from cli import UsageError
from contract import forward_kwargs


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


def autocast(device, dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def fork_rng(device):
    """Draw without disturbing the training noise (CPU's generator, and CUDA's on CUDA)."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def race_dtypes(model, hooks, split, batch_size, device, seed):
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
        for player in hooks.names:
            with autocast(device, DTYPES[name]):
                loss, _ = trial(x, y, **forward_kwargs(hooks, player))
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


def run_dtype(tcfg, ckpt, model, hooks, split, device, rank, ddp, say):
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
        took = race_dtypes(model, hooks, split, tcfg.batch_size, device, tcfg.seed)
        name = min(took, key=took.get)
        say(f"--dtype auto: {name}, the faster here for this model (a micro-batch's forward and backward: "
            f"fp32 {1e3 * took['fp32']:.1f} ms, bf16 {1e3 * took['bf16']:.1f} ms)")
    if ddp:  # every process trains in rank 0's dtype, whatever its own CPU
        choice = torch.tensor([name == "bf16"], dtype=torch.int32)
        dist.broadcast(choice, 0)
        name = "bf16" if choice.item() else "fp32"
    return pick_dtype(name, device), took


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


def wrap(model, hooks, compile, device, ddp, say):
    """The model as the loop calls it: compiled (--compile, where it can be), then in DDP."""
    if compile:
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
            find_unused_parameters=len(hooks.names) > 1)
    return model
