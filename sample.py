"""Sample from a checkpoint; and the samples train.py writes at each evaluation.

    python sample.py --ckpt out/gpt/ckpt.pt --prompt "def " --max-new-tokens 300 \
        --temperature 0.8 --top-k 50 --top-p 0.95
    python sample.py --ckpt out/diffusion/ckpt.pt --steps 50 --eta 0 --guidance 2 --label 3

Text models print text; image models write a PNG grid (2D-point models a scatter plot)
and can save the raw samples as a .npy for metrics.py. The checkpoint names its model,
config and data, so no other flag is needed to rebuild it.
"""
import os
import shutil

import numpy as np

import torch

import data
from checkpoint import build_from_checkpoint, load_checkpoint
from cli import Parser, UsageError, cli
from contract import draw_samples, generate_kwargs, hooks, sampler_kwargs
from devices import autocast, fork_rng, pick_device, pick_dtype, trained_dtype


def parse_args(argv):
    p = Parser(prog="sample.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="out/gpt/ckpt.pt",
                   help="checkpoint written by train.py (default: %(default)s)")
    p.add_argument("--model", default="", help="the model's .py file, where it has moved since training "
                   "(default: the file the checkpoint names)")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--num-samples", type=int, default=0,
                   help="how many samples (default: 1 text, 64 images, 2000 points)")
    p.add_argument("--label", default=None,
                   help="images: class of every sample, by number or by name (default: cycle through the classes)")
    p.add_argument("--out", default="",
                   help="images: PNG to write (default: sample.png beside the checkpoint)")
    p.add_argument("--steps", type=int, default=None,
                   help="diffusion: sampling steps, DDIM when < T, 0 ancestral over all T (default: the "
                        "model's)")
    p.add_argument("--eta", type=float, default=None,
                   help="diffusion: DDIM noise, 0 deterministic, 1 ancestral-like (default: 0)")
    p.add_argument("--guidance", type=float, default=None,
                   help="diffusion: classifier-free guidance scale, 1 neutral (default: off)")
    p.add_argument("--npy", default="",
                   help="images: also save the samples here as uint8 (N, C, H, W), for metrics.py --fake")
    p.add_argument("--max-new-tokens", type=int, default=300,
                   help="tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=None,
                   help="text: 0 is greedy (default: 0.8); VAE and GAN: latent scale, below 1 cleaner and less varied (default: 1)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus: smallest set reaching this probability (default: off)")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute the whole context each token (slower, same tokens)")
    p.add_argument("--seed", type=int, default=1337, help="sampling seed (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: the dtype the run trained in, where this device computes it natively (default: %(default)s)")
    args = p.parse_args(argv)
    if args.num_samples < 0 or args.max_new_tokens < 0 or args.temperature is not None and not args.temperature >= 0:
        raise UsageError("--num-samples must be positive, --max-new-tokens and --temperature not negative")
    if args.top_k is not None and args.top_k <= 0 or args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError("--top-k must be positive and --top-p in (0, 1]")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    ckpt = load_checkpoint(args.ckpt)
    kept = trained_dtype(ckpt, device) if args.dtype == "auto" else None
    dtype = pick_dtype(kept or args.dtype, device)
    module, model, tcfg, mcfg = build_from_checkpoint(ckpt, device, args.ckpt, args.model)
    model.eval()
    kind = ckpt["config"]["data"].get("kind", "tokens")
    if kind != "tokens":
        return sample_pictures(args, ckpt, model, mcfg, device, dtype, kind)
    return sample_text(args, model, tcfg, mcfg, device, dtype)


def sample_text(args, model, tcfg, mcfg, device, dtype):
    generate = hooks(model).generate
    if generate is None:
        raise UsageError(f"{args.ckpt}: its model has no generate(), so sample.py cannot continue text with it")
    tok = data.get_tokenizer(tcfg.get("tokenizer", "bytes"))
    ids = tok.encode(args.prompt)
    if not ids:
        raise UsageError("--prompt encodes to no tokens; give at least one character")
    context = getattr(mcfg, "block_size", None)
    if context is not None and len(ids) > context:
        raise UsageError(f"--prompt is {len(ids)} tokens, longer than the model's context of {context}; shorten it")
    kw = generate_kwargs(generate, device, args.seed, args.temperature, top_k=args.top_k, top_p=args.top_p,
                         use_cache=False if args.no_cache else None)
    idx = torch.tensor([ids] * (args.num_samples or 1), device=device)
    with autocast(device, dtype):
        out = generate(idx, args.max_new_tokens, **kw)
    for i, row in enumerate(out.tolist()):
        if len(out) > 1:
            print(f"--- sample {i} ---")
        print(tok.decode(row))
    return 0


def sample_pictures(args, ckpt, model, mcfg, device, dtype, kind):
    n = args.num_samples or (2000 if kind == "points" else 64)
    classes = getattr(mcfg, "num_classes", 0) or 0
    names = ckpt["config"]["data"].get("classes") or []
    if args.label is not None:
        label = names.index(args.label) if args.label in names else \
            int(args.label) if args.label.lstrip("-").isdigit() else None
        if label is None or not (classes and 0 <= label < classes):
            have = f"classes 0..{classes - 1}" + (f" ({', '.join(names)})" if names else "") if classes \
                else "no classes"
            raise UsageError(f"--label {args.label}: the model has {have}")
        args.label = label
    import metrics  # for its progress bar
    kw = sampler_kwargs(model, lambda steps: metrics.progress(steps, "sampling"),
                               steps=args.steps, eta=args.eta, guidance=args.guidance,
                               temperature=args.temperature)
    torch.manual_seed(args.seed)
    with autocast(device, dtype):
        x = draw_samples(model, n, classes, device, label=args.label, **kw)
    out = args.out or os.path.join(os.path.dirname(args.ckpt) or ".", "sample.png")
    data.save_samples(x, out, classes, args.label, points=ckpt["config"]["data"]["name"] if kind == "points" else None)
    print(f"wrote {out}")
    if args.npy:
        np.save(args.npy, (data.to_uint8(x) if x.dim() == 4 else x).numpy())
        print(f"wrote {args.npy}")
    return 0


# ---- the samples train.py writes at each evaluation -----------------------------------------

def evaluation_text(judge, hooks, tokenizer, n_tokens, seed, device, dtype):
    """n_tokens of text from the start of a document (temperature 0.8, top-k 200 where
    generate() takes it), seeded by `seed`; None for a model without generate()."""
    if hooks.generate is None:
        return None
    tok = data.get_tokenizer(tokenizer)
    prompt = [tok.eot] if tok.eot is not None else tok.encode("\n")
    kw = generate_kwargs(hooks.generate, device, seed, optional={"top_k": 200})
    with autocast(device, dtype):
        ids = hooks.generate(torch.tensor([prompt], device=device), n_tokens, **kw)
    return tok.decode(ids[0, len(prompt):].tolist())


def evaluation_pictures(judge, hooks, n, classes, val, out_dir, step, seed, device, dtype, points=None):
    """samples-<step>.png and samples.png (data.save_samples); a model that can
    reconstruct (VAE) also gets reconstructions.png (rows of val images, each above its
    reconstructions) and interpolations.png (a row from one val image to another).
    Seeded per step, inside a fork of the RNG: the training noise after this is the same
    whether or not pictures were drawn, so a resumed run stays exact. -> the samples' path."""
    pairs = line = None
    with fork_rng(device), torch.no_grad():
        torch.manual_seed(seed + step)
        with autocast(device, dtype):
            x = draw_samples(judge, n, classes, device)
            rows = min(4, len(val.images) // 10) if points is None else 0
            if rows and hooks.reconstruct is not None:
                real = val.images[:10 * rows].to(device).float().div(127.5).sub(1)
                shape = (rows, 10, *real.shape[1:])
                pairs = torch.stack([real.view(shape), hooks.reconstruct(real).view(shape)], 1)
                if hooks.interpolate is not None:
                    line = hooks.interpolate(real[:5], real[5:10], 10)
    path = os.path.join(out_dir, f"samples-{step:06d}.png")
    data.save_samples(x, path, classes, points=points)
    if pairs is not None:
        data.save_grid(pairs.flatten(0, 2), os.path.join(out_dir, "reconstructions.png"), nrow=10)
    if line is not None:
        data.save_grid(line.flatten(0, 1), os.path.join(out_dir, "interpolations.png"), nrow=10)
    shutil.copyfile(path, os.path.join(out_dir, "samples.png"))
    return path


if __name__ == "__main__":
    cli(main)
