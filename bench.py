"""
Benchmarks: measured on this machine, in this process, each beside its baseline.

    python bench.py                                   # all of the below, one table
    python bench.py train [--models gpt:small,diffusion:tiny] [--compare fp32,bf16 | eager,compile]
    python bench.py sample                            # KV cache on/off; diffusion full-T vs DDIM-50
    python bench.py optim                             # optim.AdamW vs torch.optim.AdamW(foreach=True)
    python bench.py frechet [--dim 2048]              # our Frechet distance vs scipy's sqrtm route

train: the training step train.py takes (each player's forward, backward, clip and
optimizer step, under autocast), on the preset's batch and real data, timed after
warm-up. FLOPs are counted by torch.utils.flop_counter.FlopCounterMode on one step, not
estimated; utilisation is the achieved FLOP/s over the peak of a large matmul in the
same dtype, measured in the same run. Peak memory is CUDA's allocator peak, or on a CPU
the process's peak resident set (VmHWM, reset before each row). "data" is the share of
the step spent drawing the batch and moving it to the device. "loss" is the mean of the
last 10 steps, so sides of --compare can be held against each other.
sample: GPT tokens/s generating a full context with and without the KV cache (greedy,
and whether the tokens are identical); diffusion images/s for ancestral sampling over
all T and for 50 DDIM steps, at the preset's T and at DDPM's T = 1000.
optim: one step on GPT-2 124M's parameter shapes (fp32), ours against torch's, and the
largest difference in the parameters after the same steps.
frechet: metrics.frechet_distance (two symmetric eigendecompositions, float64) against
the route pytorch-fid takes (scipy.linalg.sqrtm of the non-symmetric product S1 S2). The
scipy side runs only where scipy is installed (it is not a dependency).
"""
import argparse
import contextlib
import json
import os
import platform
import sys
import time

import numpy as np
import torch
from torch.utils import flop_counter

import metrics
import optim
import train

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
        with contextlib.suppress(OSError):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")


def peak_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    return float("nan")


# ---- the matmul peak ------------------------------------------------------------------

_peaks = {}


def matmul_peak(device, dtype):
    """FLOP/s of a square matmul in `dtype`: the largest size whose single multiply stays
    under ~0.2 s (so an emulated dtype is measured small rather than for minutes), best of 5."""
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
            best = max(best, 2 * n ** 3 / t)
            if n >= cap or t > 0.05:
                break
            n *= 2
        _peaks[key] = (best, n)
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

def bench_train(spec, dtype_name, compiled, steps, warmup, extra=()):
    """One row: the training step of `spec` ("model:preset") in one dtype, eager or compiled."""
    name, _, preset = spec.partition(":")
    argv = ["--model", name, "--dtype", dtype_name, *(["--preset", preset] if preset else []), *extra]
    module, tcfg, mcfg, given = train.parse_args(argv)
    device = train.pick_device(tcfg.device, 0)
    dtype = train.pick_dtype(tcfg.dtype, device)
    _, splits, info = train.load_data(module, tcfg, mcfg, given)
    torch.manual_seed(tcfg.seed)
    model = module.Model(mcfg).to(device)
    optimizers = train.make_optimizers(model, tcfg)
    step_model = torch.compile(model) if compiled else model
    players, k, B = model.players, tcfg.grad_accum, tcfg.batch_size
    own = {p: {id(q) for q in model.parameters_of(p)} for p in players}
    stream = torch.Generator().manual_seed(tcfg.seed)
    lr_mult = getattr(model, "lr_mult", {})

    def step(n, step_model=step_model):
        """The step train.py takes (at the peak LR, one process); -> (last loss, data seconds)."""
        data_s, loss = 0.0, None
        for i, player in enumerate(players):
            opt = optimizers[player]
            for group in opt.param_groups:
                group["lr"] = tcfg.lr * lr_mult.get(player, 1.0)
            if len(set(players)) > 1:  # the other players frozen, as in train.py
                for p in model.parameters():
                    p.requires_grad_(id(p) in own[player])
            sync(device)
            t = time.perf_counter()
            X, Y = splits["train"].batch(B * k, stream)
            X = X.to(device, non_blocking=True)
            Y = None if Y is None else Y.to(device, non_blocking=True)
            sync(device)
            data_s += time.perf_counter() - t
            for m in range(k):
                torch.manual_seed(hash((tcfg.seed, n, i, m)) & 0x7FFF_FFFF_FFFF_FFFF)  # as train.py seeds it
                rows = slice(m * B, (m + 1) * B)
                with train.autocast(device, dtype):
                    loss, _ = step_model(X[rows], None if Y is None else Y[rows], player=player)
                (loss / k).backward()
            if tcfg.grad_clip > 0:
                optim.clip_grad_norm_(model.parameters_of(player), tcfg.grad_clip)
            opt.step()
            model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(True)
        return loss.detach(), data_s

    # FLOPs of one step, counted on the eager model (the arithmetic is the same compiled).
    with flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        step(0, model)
    flops = counter.get_total_flops()
    for n in range(1, 1 + warmup):  # compile, allocator and kernel choice
        step(n)
    sync(device)
    reset_peak(device)
    losses, data_s = [], 0.0
    t = time.perf_counter()
    for n in range(1 + warmup, 1 + warmup + steps):
        loss, d = step(n)
        losses.append(loss)
        data_s += d
    sync(device)
    dt = (time.perf_counter() - t) / steps
    peak, size = matmul_peak(device, dtype)
    per_step = B * k
    tokens = per_step * info["shape"][0] if info["kind"] == "tokens" else None
    return dict(what="train", model=spec, side=f"{str(dtype).removeprefix('torch.')} "
                                              f"{'compile' if compiled else 'eager'}",
                device=machine(device), step_s=dt, examples_per_s=per_step / dt,
                tokens_per_s=tokens / dt if tokens else None, gflop_per_step=flops / 1e9,
                achieved_gflops=flops / dt / 1e9, peak_gflops=peak / 1e9, peak_matmul_n=size,
                utilisation=flops / dt / peak, peak_mib=peak_mib(device), data_share=data_s / (dt * steps),
                loss=torch.stack(losses[-10:]).float().mean().item(), steps=steps, after_steps=warmup + steps + 1)


# ---- sampling ---------------------------------------------------------------------------

def bench_sample(device, dtype):
    import diffusion
    import gpt
    rows = []
    torch.manual_seed(0)
    cfg = gpt.Config(**{k: v for k, v in gpt.PRESETS["small"].items() if hasattr(gpt.Config, k)}, vocab_size=256)
    model = gpt.Model(cfg).to(device).eval()
    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)
    new = cfg.block_size  # a full context of new tokens
    out = {}
    for cache in (True, False):
        def go():
            with torch.no_grad(), train.autocast(device, dtype):
                ids = model.generate(prompt, new, temperature=0, use_cache=cache)
            sync(device)
            return ids
        go() if device.type == "cuda" else None
        out[cache] = timed(go, 2 if cache else 1)
    rows.append(dict(what="sample", model="gpt:small", side="KV cache / none", device=machine(device),
                     per_s=new / out[True][0], baseline_per_s=new / out[False][0],
                     speedup=out[False][0] / out[True][0], unit="tok",
                     identical=bool(torch.equal(out[True][1], out[False][1]))))
    for T in (diffusion.PRESETS["tiny"]["timesteps"], 1000):
        torch.manual_seed(0)
        cfg = diffusion.Config(**{**{k: v for k, v in diffusion.PRESETS["tiny"].items()
                                     if hasattr(diffusion.Config, k)}, "timesteps": T})
        model = diffusion.Model(cfg).to(device).eval()
        n = 16
        times = {}
        for steps in (50, 0):  # DDIM-50, then ancestral over all T
            def go():
                with train.autocast(device, dtype):
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


# ---- the table ---------------------------------------------------------------------------

def fmt(v, spec=".3g"):
    if v is None:
        return "-"
    return format(v, spec) if isinstance(v, float) else str(v)


def print_table(rows):
    train_rows = [r for r in rows if r["what"] == "train"]
    if train_rows:
        head = ("model", "side", "ex/s", "tok/s", "GFLOP/step", "GFLOP/s", "peak GFLOP/s", "util", "peak MiB",
                "data", "loss")
        body = [(r["model"], r["side"], fmt(r["examples_per_s"], ".1f"), fmt(r["tokens_per_s"], ".0f"),
                 fmt(r["gflop_per_step"], ".2f"), fmt(r["achieved_gflops"], ".1f"),
                 f"{r['peak_gflops']:.1f} (n={r['peak_matmul_n']})", f"{r['utilisation']:.1%}",
                 f"{r['peak_mib']:.0f}", f"{r['data_share']:.1%}", f"{r['loss']:.4f}") for r in train_rows]
        widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
        for line in (head, *body):
            print("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())
        for a, b in zip(train_rows, train_rows[1:]):  # each compared pair, as a ratio
            if a["model"] == b["model"]:
                print(f"{a['model']}: {b['side']} / {a['side']} = {b['examples_per_s'] / a['examples_per_s']:.2f}x "
                      f"throughput; loss after {b['after_steps']} steps {b['loss']:.4f} vs {a['loss']:.4f} "
                      f"({(b['loss'] - a['loss']) / a['loss']:+.2%})")
    for r in rows:
        if r["what"] == "sample":
            extra = f", tokens identical: {r['identical']}" if "identical" in r else ""
            print(f"sample {r['model']}: {r['side']}: {r['per_s']:.1f} / {r['baseline_per_s']:.2f} "
                  f"{r['unit']}/s = {r['speedup']:.1f}x{extra}")
        elif r["what"] == "optim":
            print(f"optim {r['model']} ({r['params_m']:.1f}M): {r['side']}: {r['ours_ms']:.0f} / "
                  f"{r['torch_ms']:.0f} ms per step = {r['ratio']:.2f}x; largest parameter difference "
                  f"{r['max_param_diff']:.1e}")
        elif r["what"] == "frechet":
            print("frechet " + ", ".join(f"{k} {fmt(v, '.6g')}" for k, v in r.items() if k != "what"))


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.strip().split("\n\n")[0],
                                epilog=__doc__.strip().split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="all", choices=["all", "train", "sample", "optim", "frechet"],
                   help="what to measure (default: all but frechet)")
    p.add_argument("--models", default=DEFAULT_MODELS,
                   help="train: model:preset pairs, comma-separated (default: %(default)s)")
    p.add_argument("--compare", default="",
                   help="train: two sides run in this process, fp32,bf16 (dtypes) or eager,compile "
                        "(default: the auto dtype, eager)")
    p.add_argument("--steps", type=int, default=5, help="train: timed steps per row (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2,
                   help="train: untimed steps before them (default: %(default)s; at least 3 with compile)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: %(default)s)")
    p.add_argument("--dim", type=int, default=2048, help="frechet: feature dimension (default: %(default)s, pool3's)")
    p.add_argument("--repeats", type=int, default=3, help="frechet: best of this many runs (default: %(default)s)")
    p.add_argument("--json", default="", help="also write every figure here")
    p.add_argument("--", dest="extra", metavar="FLAGS", help="train: what follows goes to train.py's parser "
                   "for every row, e.g. -- --batch-size 8")
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args, extra = p.parse_args(argv[:cut]), argv[cut + 1:]
    if args.dim < 2 or args.repeats < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--dim must be at least 2, --repeats and --steps at least 1, --warmup at least 0")
    sides = [("auto", False)]
    if args.compare:
        names = args.compare.split(",")
        if names == ["eager", "compile"]:
            sides = [("auto", False), ("auto", True)]
        elif len(names) == 2 and all(n in ("fp32", "bf16", "fp16") for n in names):
            sides = [(n, False) for n in names]
        else:
            p.error(f"--compare {args.compare}: use two dtypes (fp32,bf16) or eager,compile")
    try:
        device = train.pick_device(args.device, 0)
        rows = []
        if args.what in ("all", "train"):
            # Both sides take the same steps, so their losses compare; compiling takes a few.
            warmup = max(args.warmup, 3) if any(c for _, c in sides) else args.warmup
            for spec in args.models.split(","):
                for dtype_name, compiled in sides:
                    print(f"bench: {spec} {dtype_name} {'compile' if compiled else 'eager'}", file=sys.stderr)
                    rows.append(bench_train(spec, dtype_name, compiled, args.steps, warmup,
                                            ["--device", args.device, *extra]))
        if args.what in ("all", "sample"):
            rows += bench_sample(device, train.pick_dtype("auto", device))
        if args.what in ("all", "optim"):
            rows += bench_optim(device)
        if args.what == "frechet":
            rows.append(bench_frechet(args.dim, args.repeats))
    except train.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"# {machine(device)}, torch {torch.__version__}")
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine(device), torch=torch.__version__, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
