"""
Benchmarks: measured on this machine, in this process, each beside its baseline.

    python bench.py                                   # all of the below, one table
    python bench.py train [--models gpt:small,diffusion:tiny] [--compare fp32,bf16[,auto] | eager,compile] [--rounds 3]
    python bench.py sample                            # KV cache on/off; diffusion full-T vs DDIM-50
    python bench.py optim                             # optim.AdamW vs torch.optim.AdamW(foreach=True)
    python bench.py frechet [--dim 2048]              # our Frechet distance vs scipy's sqrtm route
    python bench.py copy-index [--data pystdlib]      # metrics.py's copy index of the train text vs np.unique
    python bench.py compare --side a="FLAGS" --side b="FLAGS" [--seeds 3] [--max-time 300] [-- FLAGS]

train: train.py itself, run in this process on the preset's batch and real data: --steps
steps warming up (compile, allocator, kernel choice), then --intervals log intervals of
--steps steps each, timed by train.py, of which the row shows the fastest (a busy moment
of the machine slows one interval, never speeds one up); with --rounds R each side runs R
times, the sides taking turns, and keeps its fastest. Beside fixed dtypes, auto is not
timed again: it shows which dtype train.py's race chose (and the race's timings), whose
row it then is, held against the faster side. FLOPs per step are counted by
torch.utils.flop_counter.FlopCounterMode, not estimated; utilisation is the achieved
FLOP/s over the peak of a large matmul in the same dtype, measured in the same run. Peak
memory is CUDA's allocator peak, or on a CPU the process's peak resident set (VmHWM,
reset before each row). "data" is the share of the step train.py spent drawing batches
and moving them to the device (host time; on a GPU it overlaps queued work). "val loss"
is train.py's evaluation after the last step (a GAN: the generator's), so the sides of
--compare can be held against each other; the runs follow the preset's LR schedule, so
a short run is still in warm-up (add -- --warmup-iters 0 to train at the peak LR).
sample: GPT tokens/s generating a full context with and without the KV cache, for one
sequence and for four (greedy, and whether the tokens are identical); diffusion images/s for ancestral sampling over
all T and for 50 DDIM steps, at the preset's T and at DDPM's T = 1000.
optim: one step on GPT-2 124M's parameter shapes (fp32), ours against torch's, and the
largest difference in the parameters after the same steps.
frechet: metrics.frechet_distance (two symmetric eigendecompositions, float64) against
the route pytorch-fid takes (scipy.linalg.sqrtm of the non-symmetric product S1 S2). The
scipy side runs only where scipy is installed (it is not a dependency).
copy-index: metrics.build_copy_index (hash every --copy-span-byte window of the train
text, np.sort, drop repeats) against the same hashes through np.unique, its distinct
windows equal; then the lookup rate of a sample's windows in the index (bytes/s).
compare: two or more sides (--side NAME=FLAGS: train.py flags, the flags after -- common
to all), each trained --seeds times with --seed 1..N and the same --max-time, the sides
taking turns (seed 1 of every side, then seed 2, ...), each run train.py in a fresh
process (the same start-up costs for every run, and no thread count, allocator cache or
compiled code carried from one side to the next). Per side, each metric's mean ± standard
error (sample standard deviation / sqrt(n)): every number of the final evaluation
(val_loss, val_bpb, ...), the step reached, the throughput (the mean of the log lines'
rates after the first), and with --metrics N metrics.py's (FID, IS, ...); per pair of
sides, Welch's t = (mean_a - mean_b) / sqrt(se_a^2 + se_b^2) and its Welch-Satterthwaite
degrees of freedom. --json holds every run's values too.
"""
import argparse
import contextlib
import gc
import io
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch.utils import flop_counter

import data
import metrics
import optim
import train
from cli import Fault, Parser, UsageError, cli
from devices import autocast, compile_unavailable, pick_device, pick_dtype

DEFAULT_MODELS = "gpt:small,diffusion:tiny,gan:tiny,vae:tiny"


def timed(fn, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device):
    """The device in words: the GPU's name, or the CPU's model and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "cpu"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            name = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), name)
    # The vector ISA torch dispatches to: AVX512 (with AMX or AVX512-BF16 for bf16) or AVX2.
    isa = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "?"
    return f"{name} ({isa}), {torch.get_num_threads()} threads"


# ---- peak memory ------------------------------------------------------------------------

def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:  # Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            _peaks["rss reset"] = True
        except OSError:
            _peaks["rss reset"] = False


def peak_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    if not _peaks.get("rss reset"):
        return float("nan")  # the peak would be the whole process's, not this row's
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    return float("nan")


# ---- the matmul peak ------------------------------------------------------------------

_peaks = {}


def matmul_peak(device, dtype):
    """(FLOP/s, n): the best rate of an n x n matmul in `dtype`, n doubling from 256 up to
    a cap or until one multiply takes over 0.05 s (so an emulated dtype is measured small
    rather than for minutes), each size best of 5."""
    key = (str(device), dtype)
    if key not in _peaks:
        cap = 8192 if device.type == "cuda" else 2048
        n, best = 256, 0.0
        while True:
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            torch.mm(a, b)  # warm-up: kernel choice, allocation

            def mm():
                torch.mm(a, b)
                sync(device)
            sync(device)
            t, _ = timed(mm, 5)
            if 2 * n ** 3 / t > best:
                best, at = 2 * n ** 3 / t, n
            if n >= cap or t > 0.05:
                break
            n *= 2
        _peaks[key] = (best, at)
    return _peaks[key]


# ---- training ---------------------------------------------------------------------------

# FlopCounterMode knows the CUDA attention kernels but not the CPU one, which it would
# count as zero; these give it the same formulas (the test holds them to the closed form).
aten = torch.ops.aten
CPU_ATTENTION_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, **kw: flop_counter.sdpa_flop_count(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad_out, q, k, v, *args, **kw: flop_counter.sdpa_backward_flop_count(grad_out, q, k, v),
}

def quiet_train(argv, out):
    """train.main on argv (whose --out-dir is `out`) with its console output swallowed;
    -> its log records."""
    with contextlib.redirect_stdout(io.StringIO()):
        code = train.main(argv)
    if code >= 128:  # stopped by a signal (Ctrl-C): stop the bench too
        raise KeyboardInterrupt
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_flags(spec, dtype_name, extra, out):
    """train.py's flags for a bench run of `spec` ("model:preset") into `out`."""
    if "--out-dir" in extra:
        raise UsageError("bench.py picks the --out-dir of its runs (a temporary folder); drop the flag")
    name, _, preset = spec.partition(":")
    return ["--model", name, *(["--preset", preset] if preset else []), *extra, "--dtype", dtype_name,
            "--eval-interval", str(10 ** 9), "--eval-iters", "1", "--sample-tokens", "8", "--sample-images", "4",
            "--out-dir", out, "--overwrite"]


def resolve_auto(spec, extra=(), workdir="."):
    """(dtype, its race's timings or None): what train.py --dtype auto trains `spec` in,
    from a 1-step run's checkpoint."""
    out = os.path.join(workdir, "run")
    quiet_train(run_flags(spec, "auto", extra, out) + ["--max-iters", "1"], out)
    conf = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["config"]
    return conf["dtype"], conf.get("dtype_race")


def bench_train(spec, dtype_name, compiled, steps, extra=(), workdir=".", intervals=1, flops=None):
    """One row: train.py itself, run in this process for (1 + intervals) x steps steps of
    `spec` ("model:preset") in `dtype_name` (fp32, bf16 or fp16: bench_sides resolves
    auto); the first `steps` warm up (compile, allocator, kernel choice), then each `steps` are
    one log interval, whose rate and data share train.py logs: the fastest interval is the
    row's. FLOPs (unless given, from an earlier row of the same run): the counted FLOPs of
    a 2-step run less those of a 1-step run (both evaluate and sample alike), so exactly
    one of train.py's steps."""
    out = os.path.join(workdir, "run")
    base = run_flags(spec, dtype_name, extra, out)
    module, tcfg, mcfg, given = train.parse_args(base)
    device = pick_device(tcfg.device)
    why = compiled and compile_unavailable(device)
    if why:  # train.py would fall back to eager, and the row would not be what it says
        raise UsageError(f"--compare eager,compile: {why}")
    if flops is None:
        counted = []
        for n in (1, 2):
            with flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
                quiet_train(base + ["--max-iters", str(n)], out)
            counted.append(counter.get_total_flops())
        flops = counted[1] - counted[0]
    if compiled:  # a fresh compile cache, so earlier rows cannot use up its entries
        torch._dynamo.reset()
    gc.collect()  # what earlier rows left behind is not this row's memory
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak(device)
    total = (1 + intervals) * steps
    log = quiet_train(base + ["--max-iters", str(total), "--log-interval", str(steps),
                              *(["--compile"] if compiled else [])], out)
    memory = peak_mib(device)
    timed_lines = [r for r in log if "lr" in r and r.get("step", 0) > steps]
    if not any(r.get("step") == total for r in timed_lines):
        raise UsageError(f"{spec}: train.py stopped before step {total} "
                               f"(a --max-time or --max-iters among the extra flags?)")
    rate_key = next(k for k in timed_lines[-1] if k.endswith("_per_s"))
    line = max(timed_lines, key=lambda r: r[rate_key])
    dtype = pick_dtype(dtype_name, device)
    peak, size = matmul_peak(device, dtype)
    final = [r for r in log if any(k.startswith("val_loss") for k in r)][-1]
    per_s = line[rate_key]
    tokens = rate_key == "tok_per_s"
    examples = per_s / mcfg.block_size if tokens else per_s
    per_step = tcfg.batch_size * tcfg.grad_accum
    step_s = per_step / examples
    val = [v for k, v in final.items() if k.startswith("val_loss")][-1]  # a GAN: the last player's
    return dict(what="train", model=spec, side=f"{str(dtype).removeprefix('torch.')} "
                                              f"{'compile' if compiled else 'eager'}",
                device=machine(device), step_s=step_s, examples_per_s=examples,
                tokens_per_s=per_s if tokens else None, gflop_per_step=flops / 1e9,
                achieved_gflops=flops / step_s / 1e9, peak_gflops=peak / 1e9, peak_matmul_n=size,
                utilisation=flops / step_s / peak, peak_mib=memory, data_share=line["data_share"],
                val_loss=val, steps=total, flops=flops)


def bench_sides(spec, sides, steps, extra, workdir, args):
    """The rows of one model: each side timed --rounds times, taking turns (a slow spell
    of the machine then hits every side alike), its fastest round kept. auto is resolved
    once, to the dtype --dtype auto trains in, and timed as that dtype (once, where a
    fixed side is the same run); beside fixed dtypes its row is marked "(auto)" and
    carries the race's timings."""
    fixed = {d for d, _ in sides if d != "auto"}
    auto = resolve_auto(spec, extra, workdir) if any(d == "auto" for d, _ in sides) else None
    dtype_of = lambda d: auto[0] if d == "auto" else d  # noqa: E731
    timed = list(dict.fromkeys((dtype_of(d), c) for d, c in sides))
    best, flops = {}, {}
    for _ in range(args.rounds):
        for dtype_name, compiled in timed:
            print(f"bench: {spec} {dtype_name} {'compile' if compiled else 'eager'}", file=sys.stderr)
            row = bench_train(spec, dtype_name, compiled, steps, extra, workdir, args.intervals,
                              flops.get((dtype_name, compiled)))
            flops[dtype_name, compiled] = row["flops"]
            if row["examples_per_s"] > best.get((dtype_name, compiled), {}).get("examples_per_s", 0):
                best[dtype_name, compiled] = row
    rows = []
    for d, c in sides:
        row = dict(best[dtype_of(d), c], rounds=args.rounds)
        if d == "auto" and fixed:
            row.update(side=row["side"] + " (auto)", race=auto[1])
        rows.append(row)
    return rows


# ---- sampling ---------------------------------------------------------------------------

def bench_sample(device, dtype):
    import diffusion
    import gpt
    rows = []
    torch.manual_seed(0)
    cfg = gpt.Config(**{k: v for k, v in gpt.PRESETS["small"].items() if hasattr(gpt.Config, k)}, vocab_size=256)
    model = gpt.Model(cfg).to(device).eval()
    new = cfg.block_size  # a full context of new tokens
    # One sequence, and four at once: one token at a time against the cache reads every
    # weight per token, so on a CPU it is bound by memory bandwidth and four sequences
    # cost little more than one (1.5x here); recomputing the window is bound by
    # arithmetic and costs more (2.7x here).
    for batch in (1, 4):
        prompt = torch.zeros(batch, 1, dtype=torch.long, device=device)
        out = {}
        for cache in (True, False):
            def go():
                with torch.no_grad(), autocast(device, dtype):
                    ids = model.generate(prompt, new, temperature=0, use_cache=cache)
                sync(device)
                return ids
            if device.type == "cuda":
                go()
            out[cache] = timed(go, 2 if cache else 1)
        rows.append(dict(what="sample", model=f"gpt:small batch {batch}", side="KV cache / none",
                         device=machine(device), per_s=batch * new / out[True][0],
                         baseline_per_s=batch * new / out[False][0], speedup=out[False][0] / out[True][0],
                         unit="tok", identical=bool(torch.equal(out[True][1], out[False][1]))))
    for T in (diffusion.PRESETS["tiny"]["timesteps"], 1000):
        torch.manual_seed(0)
        cfg = diffusion.Config(**{**{k: v for k, v in diffusion.PRESETS["tiny"].items()
                                     if hasattr(diffusion.Config, k)}, "timesteps": T})
        model = diffusion.Model(cfg).to(device).eval()
        n = 16
        if device.type == "cuda":  # library start-up and kernel choice, outside the timings
            model.sample(n, steps=2)
            sync(device)
        times = {}
        for steps in (50, 0):  # DDIM-50, then ancestral over all T
            def go():
                with autocast(device, dtype):
                    model.sample(n, steps=steps)
                sync(device)
            times[steps], _ = timed(go, 1)
        rows.append(dict(what="sample", model=f"diffusion:tiny T={T}", side="DDIM-50 / ancestral",
                         device=machine(device), per_s=n / times[50], baseline_per_s=n / times[0],
                         speedup=times[0] / times[50], unit="img"))
    return rows


# ---- the optimizer ------------------------------------------------------------------------

def gpt2_shapes():
    """The parameter shapes of GPT-2 124M (tied embedding counted once)."""
    d, L, V, C = 768, 12, 50257, 1024
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [(V, d), (C, d)] + block * L + [(d,), (d,)]


def bench_optim(device, steps=5):
    """Both optimizers on their own copy of the same parameters and gradients, stepped in
    turn (so both see the same machine state), best of `steps` after two warm-up steps."""
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g) * 0.02 for s in gpt2_shapes()]
    grads = [[torch.randn(s, generator=g) * 1e-3 for s in gpt2_shapes()] for _ in range(2)]
    kw = dict(lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    sides = {}
    for side, cls in (("ours", optim.AdamW), ("torch", torch.optim.AdamW)):
        ps = [p.clone().to(device).requires_grad_() for p in params]
        sides[side] = (ps, cls(ps, foreach=True, **kw) if side == "torch" else cls(ps, **kw))
    best = dict.fromkeys(sides, float("inf"))
    for n in range(2 + steps):  # two warm-up steps allocate the state
        for side, (ps, opt) in sides.items():
            for p, gr in zip(ps, grads[n % 2]):
                p.grad = gr.to(device)
            sync(device)
            t = time.perf_counter()
            opt.step()
            sync(device)
            if n >= 2:
                best[side] = min(best[side], time.perf_counter() - t)
    diff = max((a - b).abs().max().item() for a, b in zip(sides["ours"][0], sides["torch"][0]))
    return [dict(what="optim", model="AdamW, GPT-2 124M shapes", side="optim.py / torch foreach",
                 device=machine(device), params_m=sum(p.numel() for p in params) / 1e6,
                 ours_ms=best["ours"] * 1e3, torch_ms=best["torch"] * 1e3,
                 ratio=best["ours"] / best["torch"], max_param_diff=diff)]


# ---- the Frechet distance ------------------------------------------------------------------

def scipy_frechet(mu1, s1, mu2, s2):
    """The sqrtm route: tr((S1 S2)^1/2) from scipy's (complex) matrix square root."""
    from scipy import linalg
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # what pytorch-fid does for a singular product
        off = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    covmean = covmean.real
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def bench_frechet(dim, repeats):
    g = torch.Generator().manual_seed(0)
    # features like pool3's: non-negative, correlated, more samples than dimensions
    mix = torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim ** 0.5
    a = (torch.randn(2 * dim + 1000, dim, generator=g, dtype=torch.float64) @ mix).relu()
    b = (torch.randn(2 * dim + 1000, dim, generator=g, dtype=torch.float64) @ mix * 1.1 + 0.05).relu()
    mu1, s1 = metrics.feature_stats(a)
    mu2, s2 = metrics.feature_stats(b)
    ours_s, ours = timed(lambda: metrics.frechet_distance(mu1, s1, mu2, s2), repeats)
    row = {"what": "frechet", "dim": dim, "threads": torch.get_num_threads(), "ours_s": ours_s, "ours": ours}
    try:
        import scipy
    except ImportError:
        row["scipy"] = "not installed (pip install scipy to compare)"
        return row
    args = [t.numpy() for t in (mu1, s1, mu2, s2)]
    ref_s, ref = timed(lambda: scipy_frechet(*args), 1 if dim >= 1024 else repeats)
    row.update(scipy_version=scipy.__version__, scipy_s=ref_s, scipy=ref,
               speedup=ref_s / ours_s, rel_diff=abs(ours - ref) / abs(ref))
    return row


# ---- the copy index ------------------------------------------------------------------

def bench_copy_index(name, data_dir, span):
    """metrics.py's copy index of a text dataset's train split, built here without its
    cache, against np.unique of the same hashes; and looking up the val text in it."""
    tok = data.get_tokenizer("bytes")
    splits = data.load(name, data_dir=data_dir, block_size=1)
    if splits["train"].info.kind != "tokens":
        raise UsageError(f"--data {name} is not text; copy-index indexes a text dataset (pystdlib, a .txt "
                         f"file or folder)")
    text, val = tok.decode_bytes(splits["train"].tokens), tok.decode_bytes(splits["val"].tokens)
    ours_s, index = timed(lambda: metrics.build_copy_index(text, span), 1)
    ref_s, ref = timed(lambda: np.unique(metrics.window_hashes(text, span)), 1)
    look_s, hits = timed(lambda: metrics.copied_windows(val, index, span), 3)
    return {"what": "copy-index", "data": name, "span": span, "train_bytes": len(text), "distinct": len(index),
            "build_s": ours_s, "np_unique_s": ref_s, "speedup": ref_s / ours_s,
            "equal": bool(np.array_equal(index, ref)),
            "index_mib": index.nbytes / 2**20, "lookup_bytes_per_s": len(val) / look_s,
            "val_windows_found": float(hits.mean()) if len(hits) else 0.0}


# ---- compare: train.py flag sets over seeds -------------------------------------------------

PICKED = {"seed": "--seed", "max_time": "--max-time", "out_dir": "--out-dir", "overwrite": "--overwrite",
          "resume": "--resume"}  # what compare sets for every run itself


def mean_se(values):
    """(mean, standard error = sample standard deviation / sqrt(n), n); se None below 2."""
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None, n
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n), n


def welch(a, b):
    """(Welch's t, Welch-Satterthwaite degrees of freedom) of samples a and b:
    t = (mean_a - mean_b) / sqrt(se_a^2 + se_b^2), df = (se_a^2 + se_b^2)^2 /
    (se_a^4 / (n_a - 1) + se_b^4 / (n_b - 1)); (None, None) where neither varies."""
    (ma, sa, na), (mb, sb, nb) = mean_se(a), mean_se(b)
    if sa is None or sb is None or sa == sb == 0:
        return None, None
    va, vb = sa * sa, sb * sb
    return (ma - mb) / math.sqrt(va + vb), (va + vb) ** 2 / (va * va / (na - 1) + vb * vb / (nb - 1))


def parse_sides(p, specs):
    """[(name, train.py flags)] from --side NAME=FLAGS options, or the Parser's error."""
    sides = []
    for spec in specs:
        name, eq, flags = spec.partition("=")
        if not eq or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
            p.error(f"--side {spec!r}: write NAME=FLAGS, NAME of letters, digits and _.+- "
                    f"(e.g. --side bf16='--dtype bf16')")
        try:
            sides.append((name, shlex.split(flags)))
        except ValueError as e:
            p.error(f"--side {name}: cannot split its flags ({e})")
    names = [n for n, _ in sides]
    if len(sides) < 2 or len(set(names)) < len(names):
        p.error(f"compare needs two or more --side NAME=FLAGS, each NAME once (got {', '.join(names) or 'none'})")
    return sides


def compare_argv(args, flags, extra, seed, out):
    """train.py's flags for one run of a side: bench's --device, the flags after --, the
    side's own, then what compare sets (the seed, the budget, the run's folder)."""
    return ["--device", args.device, *extra, *flags, "--seed", str(seed), "--max-time", f"{args.max_time:g}",
            "--out-dir", out, "--overwrite"]


def check_side(name, argv):
    """train.parse_args and train.check on one side's flags; any error is one line that
    names the side."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            train.check(train.parse_args(argv)[1])
    except UsageError as e:
        raise UsageError(f"side {name}: {e}") from None
    except SystemExit:  # train.py's Parser: "train.py: error: ... (see --help)", or --help
        said = err.getvalue().strip().splitlines() or ["--help is not a flag to compare"]
        raise UsageError(f"side {name}: {said[-1].replace('train.py: error: ', 'train.py: ')}") from None


def check_sides(args, sides, extra):
    """Every side's flags as train.py would take them, and none of the flags compare sets."""
    for name, flags in sides:
        check_side(name, compare_argv(args, flags, extra, 1, "dry-run"))
        given = train.parse_args(["--device", args.device, *extra, *flags])[3]
        picked = [PICKED[k] for k in PICKED if k in given]
        if picked:
            raise UsageError(f"side {name}: compare sets {', '.join(picked)} for every run itself; drop it")


def read_run(out):
    """A finished run's metrics from its log.jsonl: every number of the last evaluation
    (val_loss, val_bpb, train_loss, ...), the step it reached, and its throughput (the mean
    of its log lines' rates, the first left out where there are more: it holds the first
    step's start-up)."""
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [json.loads(line) for line in f if line.strip()]
    evals = [r for r in log if any(k.startswith("val_") for k in r)]
    if not evals:
        raise Fault(f"{out}: train.py logged no evaluation")
    final = evals[-1]
    values = {k: float(v) for k, v in final.items()
              if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    values["steps"] = float(final["step"])
    lines = [r for r in log if any(k.endswith("_per_s") for k in r)]
    if lines:
        key = next(k for k in lines[-1] if k.endswith("_per_s"))
        rates = [r[key] for r in (lines[1:] if len(lines) > 1 else lines) if key in r]
        values[key] = math.fsum(rates) / len(rates)
    return values


def run_script(script, argv, what):
    """Run one of the project's scripts in a fresh interpreter; its output, or one line
    saying why it failed."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), script)
    done = subprocess.run([sys.executable, path, *argv], capture_output=True, text=True, check=False)
    if done.returncode == 130 or done.returncode == -2:
        raise KeyboardInterrupt
    if done.returncode:
        said = (done.stderr.strip() or done.stdout.strip() or f"exit status {done.returncode}").splitlines()[-1]
        error = UsageError if done.returncode == 2 else Fault
        raise error(f"{what}: {script} failed (exit status {done.returncode}): {said.removeprefix('error: ')}")
    return done.stdout


def run_metrics(args, out, what):
    """metrics.py's numbers (FID, IS, ... for images) on a run's checkpoint."""
    path = os.path.join(out, "metrics.json")
    run_script("metrics.py", ["--ckpt", os.path.join(out, "ckpt.pt"), "--n", str(args.metrics), "--device",
                              args.device, "--json", path], what + ", metrics.py")
    with open(path) as f:
        found = json.load(f)
    return {k: float(v) for k, v in found.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def compare_runs(args, sides, extra, workdir):
    """Every side over seeds 1..--seeds, the sides taking turns within each seed (a slow
    spell of the machine then hits them alike); each run train.py in a fresh process."""
    runs, total = [], len(sides) * args.seeds
    for seed in range(1, args.seeds + 1):
        for name, flags in sides:
            out = os.path.join(workdir, f"{name}-{seed}")
            what = f"side {name}, seed {seed}"
            print(f"compare: {what} ({len(runs) + 1}/{total})", file=sys.stderr)
            started = time.time()
            console = run_script("train.py", compare_argv(args, flags, extra, seed, out), what)
            wall = time.time() - started
            with open(os.path.join(out, "console.txt"), "w") as f:
                f.write(console)
            values = read_run(out)
            if args.metrics:
                values.update({k: v for k, v in run_metrics(args, out, what).items() if k not in values})
            runs.append(dict(side=name, seed=seed, out_dir=out, started=started, wall_s=wall, metrics=values))
    return runs


def summarize(sides, runs):
    """({side: {figure: {mean, se, n}}}, [each pair of sides, each figure: diff, t, df])."""
    names = [n for n, _ in sides]
    keys = list(dict.fromkeys(k for r in runs for k in r["metrics"]))
    values = {n: {k: [r["metrics"][k] for r in runs if r["side"] == n and k in r["metrics"]] for k in keys}
              for n in names}
    summary = {n: {k: dict(zip(("mean", "se", "n"), mean_se(v))) for k, v in values[n].items() if v}
               for n in names}
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for k in keys:
                if values[a][k] and values[b][k]:
                    t, df = welch(values[a][k], values[b][k])
                    pairs.append(dict(a=a, b=b, metric=k, diff=summary[a][k]["mean"] - summary[b][k]["mean"],
                                      t=t, df=df))
    return summary, pairs


def print_compare(sides, summary, pairs, seeds):
    names = [n for n, _ in sides]
    keys = list(dict.fromkeys(k for n in names for k in summary[n]))
    cell = lambda s: "-" if s is None else f"{s['mean']:.5g} ± {fmt(s['se'], '.2g')}"  # noqa: E731
    head = (f"mean ± se, {seeds} seeds", *names)
    body = [(k, *(cell(summary[n].get(k)) for n in names)) for k in keys]
    widths = [max(len(c) for c in col) for col in zip(head, *body)]
    for line in (head, *body):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
    for a, b in dict.fromkeys((r["a"], r["b"]) for r in pairs):
        print(f"{a} - {b}: Welch's t (df)")
        for r in (r for r in pairs if (r["a"], r["b"]) == (a, b)):
            t = "- (no spread)" if r["t"] is None else f"{r['t']:+.2f} ({r['df']:.1f})"
            print(f"  {r['metric']:<24} {r['diff']:+.4g}  t {t}")


def compare_main(p, args, extra):
    """bench.py compare's own checks of its options (the Parser's one-line errors), then compare."""
    if args.seeds < 2:
        p.error(f"--seeds {args.seeds}: at least 2 (a standard error needs two runs a side)")
    if not (args.max_time >= 0 and math.isfinite(args.max_time)) or args.metrics < 0:
        p.error("--max-time must be a finite number of seconds >= 0 (0: none), --metrics N >= 0")
    return compare(args, parse_sides(p, args.side), extra)


def compare(args, sides, extra):
    """bench.py compare: the runs, their table, and --json; every side's flags checked
    before anything runs."""
    check_sides(args, sides, extra)
    if args.dry_run:
        print(f"bench: dry run of compare: {len(sides)} sides' flags check out; nothing run")
        return 0
    with contextlib.ExitStack() as stack:
        workdir = args.runs_dir or stack.enter_context(tempfile.TemporaryDirectory())
        try:
            runs = compare_runs(args, sides, extra, workdir)
        except KeyboardInterrupt:
            print("bench: interrupted", file=sys.stderr)
            return 130
    summary, pairs = summarize(sides, runs)
    print(f"# {args.seeds} seeds x {len(sides)} sides, --max-time {args.max_time:g} s each, taking turns")
    print_compare(sides, summary, pairs, args.seeds)
    if args.json:
        body = dict(sides=[dict(name=n, flags=f) for n, f in sides], common_flags=extra, seeds=args.seeds,
                    max_time=args.max_time, order=[[r["side"], r["seed"]] for r in runs], runs=runs,
                    summary=summary, pairs=pairs, torch=torch.__version__)
        try:
            with open(args.json, "w") as f:
                json.dump(body, f, indent=1)
        except OSError as e:
            raise UsageError(f"--json {args.json}: cannot write it ({e.strerror})")
    return 0


# ---- the table ---------------------------------------------------------------------------

def fmt(v, spec=".3g"):
    if v is None:
        return "-"
    return format(v, spec) if isinstance(v, float) else str(v)


def print_table(rows):
    train_rows = [r for r in rows if r["what"] == "train"]
    if train_rows:
        head = ("model", "side", "ex/s", "tok/s", "GFLOP/step", "GFLOP/s", "peak GFLOP/s", "util", "peak MiB",
                "data", "val loss")
        body = [(r["model"], r["side"], fmt(r["examples_per_s"], ".1f"), fmt(r["tokens_per_s"], ".0f"),
                 fmt(r["gflop_per_step"], ".2f"), fmt(r["achieved_gflops"], ".1f"),
                 f"{r['peak_gflops']:.1f} (n={r['peak_matmul_n']})", f"{r['utilisation']:.1%}",
                 f"{r['peak_mib']:.0f}", f"{r['data_share']:.1%}", f"{r['val_loss']:.4f}") for r in train_rows]
        widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
        for line in (head, *body):
            print("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())
        for model in dict.fromkeys(r["model"] for r in train_rows):  # each side against the first, as a ratio
            group = [r for r in train_rows if r["model"] == model]
            a = group[0]
            auto = [r for r in group if r["side"].endswith("(auto)")]
            fixed = [r for r in group if not r["side"].endswith("(auto)")]
            for b in fixed[1:]:
                print(f"{a['model']}: {b['side']} / {a['side']} = {b['examples_per_s'] / a['examples_per_s']:.2f}x "
                      f"throughput; val loss after {b['steps']} steps {b['val_loss']:.4f} vs "
                      f"{a['val_loss']:.4f} ({(b['val_loss'] - a['val_loss']) / abs(a['val_loss'] or 1):+.2%})")
            if auto and fixed:  # --dtype auto against the faster of the fixed dtypes
                best = max(fixed, key=lambda r: r["examples_per_s"])
                race = auto[0].get("race")
                why = (f" (its race, a micro-batch's forward and backward: fp32 {1e3 * race['fp32']:.1f} ms, "
                       f"bf16 {1e3 * race['bf16']:.1f} ms)") if race else ""
                print(f"{model}: {auto[0]['side']}{why} / the faster, {best['side']} = "
                      f"{auto[0]['examples_per_s'] / best['examples_per_s']:.2f}x throughput")
    for r in rows:
        if r["what"] == "sample":
            extra = f", tokens identical: {r['identical']}" if "identical" in r else ""
            print(f"sample {r['model']}: {r['side']}: {r['per_s']:.1f} / {r['baseline_per_s']:.2f} "
                  f"{r['unit']}/s = {r['speedup']:.1f}x{extra}")
        elif r["what"] == "optim":
            print(f"optim {r['model']} ({r['params_m']:.1f}M): {r['side']}: {r['ours_ms']:.0f} / "
                  f"{r['torch_ms']:.0f} ms per step = {r['ratio']:.2f}x; largest parameter difference "
                  f"{r['max_param_diff']:.1e}")
        elif r["what"] == "copy-index":
            print(f"copy-index {r['data']} ({r['train_bytes']:,} train bytes, {r['span']}-byte windows, "
                  f"{r['distinct']:,} distinct, {r['index_mib']:.0f} MiB): built in {r['build_s']:.1f} s, "
                  f"np.unique {r['np_unique_s']:.1f} s = {r['speedup']:.1f}x, equal: {r['equal']}; lookup "
                  f"{r['lookup_bytes_per_s'] / 1e6:.1f} MB/s, {r['val_windows_found']:.1%} of val's windows found")
        elif r["what"] == "frechet":
            print("frechet " + ", ".join(f"{k} {fmt(v, '.6g')}" for k, v in r.items() if k != "what"))


def dry_run(args, sides, extra):
    """--dry-run: each train row's flags parsed and checked as train.py would; nothing run."""
    for spec in args.models.split(",") if args.what in ("all", "train") else []:
        for dtype_name, _ in sides:
            train.check(train.parse_args(run_flags(spec, dtype_name, extra, "dry-run"))[1])
    print(f"bench: dry run of {args.what}: the flags check out; nothing measured")
    return 0


def measure(args, sides, extra, device):
    """The rows of what args.what names."""
    rows = []
    if args.what in ("all", "train"):
        steps = max(args.steps, 3) if any(c for _, c in sides) else args.steps  # both sides alike
        with tempfile.TemporaryDirectory() as workdir:
            for spec in args.models.split(","):
                rows += bench_sides(spec, sides, steps, ["--device", args.device, *extra], workdir, args)
    if args.what in ("all", "sample"):
        rows += bench_sample(device, pick_dtype("auto", device))
    if args.what in ("all", "optim"):
        rows += bench_optim(device)
    if args.what == "frechet":
        rows.append(bench_frechet(args.dim, args.repeats))
    if args.what == "copy-index":
        rows.append(bench_copy_index(args.data, args.data_dir, args.copy_span))
    return rows


def parser():
    p = Parser(prog="bench.py", description=__doc__.strip().split("\n\n")[0],
               epilog=__doc__.strip().split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="all",
                   choices=["all", "train", "sample", "optim", "frechet", "copy-index", "compare"],
                   help="what to measure (default: all but frechet and copy-index)")
    p.add_argument("--models", default=DEFAULT_MODELS,
                   help="train: model:preset pairs, comma-separated (default: %(default)s)")
    p.add_argument("--compare", default="",
                   help="train: sides run in this process, dtypes (fp32,bf16 or fp32,bf16,auto: auto shows "
                        "what --dtype auto chose) or eager,compile (default: the auto dtype, eager)")
    p.add_argument("--steps", type=int, default=5,
                   help="train: steps per timed interval, after as many untimed (default: %(default)s; at least 3 "
                        "with compile, whose first steps compile)")
    p.add_argument("--intervals", type=int, default=3,
                   help="train: timed intervals per run, the fastest shown (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=1,
                   help="train: runs per side, the sides taking turns, the fastest shown (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: %(default)s)")
    p.add_argument("--dim", type=int, default=2048,
                   help="frechet: feature dimension (default: %(default)s, pool3's)")
    p.add_argument("--repeats", type=int, default=3,
                   help="frechet: best of this many runs (default: %(default)s)")
    p.add_argument("--data", default="pystdlib", help="copy-index: a text dataset (default: %(default)s)")
    p.add_argument("--data-dir", default="data", help="copy-index: its token cache (default: %(default)s)")
    p.add_argument("--copy-span", type=int, default=50, help="copy-index: window bytes (default: %(default)s)")
    p.add_argument("--side", action="append", default=[], metavar="NAME=FLAGS",
                   help="compare: one side, its name and its train.py flags (one quoted word), e.g. "
                        "--side bf16='--dtype bf16'; two or more")
    p.add_argument("--seeds", type=int, default=3,
                   help="compare: runs per side, seeds 1..N (default: %(default)s; at least 2)")
    p.add_argument("--max-time", type=float, default=300.0,
                   help="compare: every run's wall-clock budget, train.py's --max-time (default: %(default)s s; "
                        "0: none, the sides' --max-iters end the runs)")
    p.add_argument("--metrics", type=int, default=0, metavar="N",
                   help="compare: also metrics.py --n N on each run's checkpoint (FID, IS, ... for images; "
                        "default: off)")
    p.add_argument("--runs-dir", default="",
                   help="compare: keep each run's --out-dir here, as NAME-SEED (default: a temporary folder, "
                        "removed after)")
    p.add_argument("--json", default="", help="also write every figure here")
    p.add_argument("--dry-run", action="store_true",
                   help="check the flags (train: each row's train.py flags, as train.py parses them) and measure "
                        "nothing")
    p.add_argument("--", dest="extra", metavar="FLAGS", help="train: what follows goes to train.py's parser "
                   "for every row, e.g. -- --batch-size 8")
    return p


def main(argv=None):
    p = parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args, extra = p.parse_args(argv[:cut]), argv[cut + 1:]
    if args.dim < 2 or min(args.repeats, args.steps, args.intervals, args.rounds, args.copy_span) < 1:
        p.error("--dim must be at least 2, --repeats, --steps, --intervals, --rounds and --copy-span at least 1")
    if args.what == "compare":
        return compare_main(p, args, extra)
    if args.side:
        p.error("--side is for bench.py compare")
    sides = [("auto", False)]
    if args.compare:
        names = args.compare.split(",")
        if names == ["eager", "compile"]:
            sides = [("auto", False), ("auto", True)]
        elif len(names) in (2, 3) and all(n in ("fp32", "bf16", "fp16", "auto") for n in names):
            sides = [(n, False) for n in names]
        else:
            p.error(f"--compare {args.compare}: use dtypes (fp32,bf16 or fp32,bf16,auto) or eager,compile")
    if args.dry_run:
        return dry_run(args, sides, extra)
    device = pick_device(args.device)
    try:
        rows = measure(args, sides, extra, device)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    print(f"# {machine(device)}, torch {torch.__version__}")
    print_table(rows)
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(dict(machine=machine(device), torch=torch.__version__, rows=rows), f, indent=1)
        except OSError as e:
            raise UsageError(f"--json {args.json}: cannot write it ({e.strerror})")
    return 0


if __name__ == "__main__":
    cli(main)
