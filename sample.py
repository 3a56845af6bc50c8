"""Sample from a checkpoint.

    python sample.py --ckpt out/gpt/ckpt.pt --prompt "def " --max-new-tokens 300 \
        --temperature 0.8 --top-k 50 --top-p 0.95
    python sample.py --ckpt out/diffusion/ckpt.pt --steps 50 --eta 0 --guidance 2 --label 3

Text models print text; image models write a PNG grid (2D-point models a scatter plot)
and can save the raw samples as a .npy for metrics.py. The checkpoint names its model,
config and data, so no other flag is needed to rebuild it.
"""
import os

import numpy as np

import torch

import common
import data
from common import UsageError, autocast


def main(argv=None):
    p = common.Parser(prog="sample.py", description=__doc__.split("\n\n")[0])
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

    device = common.pick_device(args.device)
    ckpt = common.load_checkpoint(args.ckpt)
    kept = common.trained_dtype(ckpt, device) if args.dtype == "auto" else None
    dtype = common.pick_dtype(kept or args.dtype, device)
    module, model, tcfg, mcfg = common.build_from_checkpoint(ckpt, device, args.ckpt, args.model)
    model.eval()
    kind = ckpt["config"]["data"].get("kind", "tokens")
    if kind != "tokens":
        return sample_pictures(args, ckpt, model, mcfg, device, dtype, kind)
    return sample_text(args, model, tcfg, mcfg, device, dtype)


def sample_text(args, model, tcfg, mcfg, device, dtype):
    if not hasattr(model, "generate"):
        raise UsageError(f"{args.ckpt}: its model has no generate(), so sample.py cannot continue text with it")
    tok = data.get_tokenizer(tcfg.get("tokenizer", "bytes"))
    ids = tok.encode(args.prompt)
    if not ids:
        raise UsageError("--prompt encodes to no tokens; give at least one character")
    context = getattr(mcfg, "block_size", None)
    if context is not None and len(ids) > context:
        raise UsageError(f"--prompt is {len(ids)} tokens, longer than the model's context of {context}; shorten it")
    kw = common.generate_kwargs(model, device, args.seed, args.temperature, top_k=args.top_k, top_p=args.top_p,
                                use_cache=False if args.no_cache else None)
    idx = torch.tensor([ids] * (args.num_samples or 1), device=device)
    with autocast(device, dtype):
        out = model.generate(idx, args.max_new_tokens, **kw)
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
    kw = common.sampler_kwargs(model, lambda steps: metrics.progress(steps, "sampling"),
                               steps=args.steps, eta=args.eta, guidance=args.guidance,
                               temperature=args.temperature)
    torch.manual_seed(args.seed)
    with autocast(device, dtype):
        x = common.draw_samples(model, n, classes, device, label=args.label, **kw)
    out = args.out or os.path.join(os.path.dirname(args.ckpt) or ".", "sample.png")
    data.save_samples(x, out, classes, args.label, points=ckpt["config"]["data"]["name"] if kind == "points" else None)
    print(f"wrote {out}")
    if args.npy:
        np.save(args.npy, (data.to_uint8(x) if x.dim() == 4 else x).numpy())
        print(f"wrote {args.npy}")
    return 0


if __name__ == "__main__":
    common.cli(main)
