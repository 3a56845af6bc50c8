"""Sample from a checkpoint.

    python sample.py --ckpt out/gpt/ckpt.pt --prompt "def " --max-new-tokens 300 \
        --temperature 0.8 --top-k 50 --top-p 0.95

Text models print text. The checkpoint names its model, config and tokenizer, so no
other flag is needed to rebuild it.
"""
import argparse
import sys

import torch

import data
import train


def main(argv=None):
    p = train.Parser(prog="sample.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="out/gpt/ckpt.pt", help="checkpoint written by train.py (default: %(default)s)")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--num-samples", type=int, default=1, help="how many samples (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=300, help="tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus: smallest set reaching this probability (default: off)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context each token (slower, same tokens)")
    p.add_argument("--seed", type=int, default=1337, help="sampling seed (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="(default: %(default)s)")
    args = p.parse_args(argv)
    if args.num_samples <= 0 or args.max_new_tokens < 0 or not args.temperature >= 0:
        raise train.UsageError("--num-samples must be positive, --max-new-tokens and --temperature not negative")
    if args.top_k is not None and args.top_k <= 0 or args.top_p is not None and not 0 < args.top_p <= 1:
        raise train.UsageError("--top-k must be positive and --top-p in (0, 1]")

    device = train.pick_device(args.device, 0)
    dtype = train.pick_dtype(args.dtype, device)
    ckpt = train.load_checkpoint(args.ckpt)
    module, model, tcfg, mcfg = train.build_from_checkpoint(ckpt, device)
    model.eval()
    if not hasattr(model, "generate"):
        raise train.UsageError(f"{args.ckpt} holds a {ckpt['config']['model']} model; sample.py prints text models only so far")
    try:
        tok = data.get_tokenizer(tcfg.tokenizer)
    except data.DataError as e:
        raise train.UsageError(str(e))
    ids = tok.encode(args.prompt)
    if not ids:
        raise train.UsageError("--prompt encodes to no tokens; give at least one character")
    if len(ids) > mcfg.block_size:
        raise train.UsageError(f"--prompt is {len(ids)} tokens, longer than the model's context of "
                               f"{mcfg.block_size}; shorten it")
    g = torch.Generator(device=device).manual_seed(args.seed)
    idx = torch.tensor([ids] * args.num_samples, device=device)
    with train.autocast(device, dtype):
        out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, use_cache=not args.no_cache, generator=g)
    for i, row in enumerate(out.tolist()):
        if args.num_samples > 1:
            print(f"--- sample {i} ---")
        print(tok.decode(row))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except train.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
