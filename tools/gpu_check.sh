#!/usr/bin/env bash
# Everything nanogen checks on a GPU, in one call, for a freshly lent machine:
#
#   tools/gpu_check.sh            # results in $OUT (default: gpu-check/): summary.json, table.txt, logs
#
# It installs as the README says (pip gives a CUDA build of torch there; offline it goes
# on with what is installed), prints the card and driver, runs the CUDA tests
# (tests/test_cuda.py), then bench.py: GPT-2 124M eager against torch.compile (the GPT-2
# tokenizer where tiktoken has it cached, else bytes with GPT-2's 50,257-word vocabulary),
# diffusion's ddpm-cifar10 on CIFAR-shaped images made here (the machine may be offline),
# and sampling. About 8 minutes on one card. Without CUDA it checks its own syntax and the
# bench commands' flags (bench.py --dry-run), says so in one line and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
py="${PYTHON:-python3}"
bash -n "$0" || exit 1

gpt2_flags() {  # the GPT-2 tokenizer where it can be had, else its vocabulary size on bytes
    if "$py" -c "import tiktoken; tiktoken.get_encoding('gpt2')" >/dev/null 2>&1; then
        echo "--tokenizer gpt2 --grad-accum 1"
    else
        echo "--vocab-size 50257 --grad-accum 1"
    fi
}
bench_gpt2=(train --models gpt:gpt2 --compare eager,compile --steps 5 --intervals 2)
bench_ddpm=(train --models diffusion:ddpm-cifar10 --steps 5 --intervals 2)
bench_sample=(sample)

if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    # shellcheck disable=SC2046
    "$py" bench.py "${bench_gpt2[@]}" --dry-run -- $(gpt2_flags) >/dev/null &&
        "$py" bench.py "${bench_ddpm[@]}" --dry-run -- --data cifar-shaped.npy >/dev/null ||
        { echo "gpu_check: a bench command's flags are wrong" >&2; exit 1; }
    echo "gpu_check: no CUDA device here; checked this script and the bench commands' flags, ran nothing"
    exit 0
fi

mkdir -p "$out"
start=$(date +%s)
step() {  # name, command...: run it, its output to $out/name.log, its exit code and seconds noted
    local name="$1" t0 rc
    shift
    t0=$(date +%s)
    echo "== $name: $*"
    "$@" >"$out/$name.log" 2>&1
    rc=$?
    echo "$name $rc $(($(date +%s) - t0))" >>"$out/steps.txt"
    tail -n 15 "$out/$name.log"
    return 0
}
: >"$out/steps.txt"
step install "$py" -m pip install -q -r requirements.txt
step card nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" \
    >"$out/torch.txt" 2>&1
step cuda_tests "$py" -m pytest -q tests/test_cuda.py -m cuda -x
"$py" - "$out/cifar-shaped.npy" <<'EOF'
import sys
import numpy as np
np.save(sys.argv[1], np.random.default_rng(0).integers(0, 256, (2000, 3, 32, 32), dtype=np.uint8))
EOF
# shellcheck disable=SC2046
step bench_gpt2 "$py" bench.py "${bench_gpt2[@]}" --json "$out/bench_gpt2.json" -- $(gpt2_flags)
step bench_ddpm "$py" bench.py "${bench_ddpm[@]}" --json "$out/bench_ddpm.json" -- --data "$out/cifar-shaped.npy" \
    --data-dir "$out/data"
step bench_sample "$py" bench.py "${bench_sample[@]}" --json "$out/bench_sample.json"

"$py" - "$out" "$(($(date +%s) - start))" <<'EOF'
import json, os, sys
out, seconds = sys.argv[1], int(sys.argv[2])
steps = [dict(zip(("step", "rc", "seconds"), line.split())) for line in open(os.path.join(out, "steps.txt"))]
summary = {"seconds": seconds, "torch": open(os.path.join(out, "torch.txt")).read().strip(), "steps": steps}
for name in ("bench_gpt2", "bench_ddpm", "bench_sample"):
    path = os.path.join(out, name + ".json")
    if os.path.exists(path):
        summary[name] = json.load(open(path))
lines = [summary["torch"], f"{'step':<14} {'exit':>4} {'s':>5}"] + \
    [f"{s['step']:<14} {s['rc']:>4} {s['seconds']:>5}" for s in steps]
for name in ("bench_gpt2", "bench_ddpm"):
    for r in summary.get(name, {}).get("rows", []):
        lines.append(f"{r['model']} {r['side']}: {r['tokens_per_s'] or r['examples_per_s']:.0f} "
                     f"{'tok' if r['tokens_per_s'] else 'ex'}/s, {r['utilisation']:.1%} of the matmul peak, "
                     f"{r['peak_mib']:.0f} MiB")
for r in summary.get("bench_sample", {}).get("rows", []):
    lines.append(f"sample {r['model']} {r['side']}: {r['per_s']:.1f} {r['unit']}/s ({r['speedup']:.1f}x)")
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
open(os.path.join(out, "table.txt"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
