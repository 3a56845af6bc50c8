#!/usr/bin/env bash
# Run a command as another CPU would compute it: torch's own kernels
# (ATEN_CPU_CAPABILITY), oneDNN's (ONEDNN_MAX_CPU_ISA) and MKL's (MKL_ENABLE_INSTRUCTIONS)
# limited to a smaller instruction set, and one thread (OMP_NUM_THREADS=1), so that
# reductions are vectorised, blocked and split across threads in another order.
#
#   tools/other_cpu.sh [--isa avx512-bf16|avx2|default] [--threads N] command ...
#
# Without --isa: the next set below this machine's (AVX-512 -> AVX2, AVX2 -> default);
# on a machine already at the default set (or not x86) only the thread count changes.
# avx512-bf16 keeps AVX-512 but hides AMX, as on an AVX512-BF16 EPYC; avx2 also makes
# bf16 emulated, as on an AVX2-only EPYC. A set above this machine's is refused (its
# instructions would not run here). --threads N keeps N threads instead of one (to time
# things as that CPU would run them: bench.py).
set -euo pipefail
usage="usage: tools/other_cpu.sh [--isa avx512-bf16|avx2|default] [--threads N] command ..."
isa="" threads=1
while [ $# -ge 2 ] && case "$1" in --isa|--threads) true ;; *) false ;; esac; do
    if [ "$1" = --isa ]; then isa="$2"; else threads="$2"; fi
    shift 2
done
case "${1:-}" in ""|--isa|--threads) echo "$usage" >&2; exit 2 ;; esac
case "$threads" in ''|*[!0-9]*|0) echo "error: --threads $threads: a positive number" >&2; exit 2 ;; esac
case "$isa" in ""|avx512-bf16|avx2|default) ;; *) echo "error: --isa $isa: choose avx512-bf16, avx2 or default" >&2; exit 2 ;; esac
have=$(python -c "import torch; print(torch.backends.cpu.get_cpu_capability())")
rank() { case "$1" in AVX512*|avx512*) echo 2 ;; AVX2|avx2) echo 1 ;; *) echo 0 ;; esac; }
if [ -z "$isa" ]; then
    case "$have" in AVX512*) isa=avx2 ;; AVX2) isa=default ;; *) isa=native ;; esac
elif [ "$(rank "$isa")" -gt "$(rank "$have")" ] || { [ "$isa" = avx512-bf16 ] && ! grep -qw avx512_bf16 /proc/cpuinfo; }; then
    echo "error: --isa $isa: this CPU ($have) cannot run it; choose a smaller set" >&2; exit 2
fi
case "$isa" in
    avx512-bf16) export ATEN_CPU_CAPABILITY=avx512 ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 MKL_ENABLE_INSTRUCTIONS=AVX512 ;;
    avx2) export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ;;
    default) export ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2 ;;
    native) ;;
esac
export OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
echo "other_cpu: $isa instruction set (this CPU: $have), $threads thread(s) (ATEN_CPU_CAPABILITY=${ATEN_CPU_CAPABILITY:-}" \
     "ONEDNN_MAX_CPU_ISA=${ONEDNN_MAX_CPU_ISA:-} MKL_ENABLE_INSTRUCTIONS=${MKL_ENABLE_INSTRUCTIONS:-})" >&2
exec "$@"
