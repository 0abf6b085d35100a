#!/usr/bin/env bash
# bench_small side by side: llm_jax's benchmark and the PyTorch reference, PAIRS times over,
# one run at a time (nothing else should run on the cores). TORCH_PYTHON is a python with
# torch installed (not a dependency of llm_jax). RUNS picks the runs, in order:
#   jax        llm_jax as configured (bf16 compute)
#   jax_f32    llm_jax with --config.model.dtype=float32 (on AVX2-only hosts, whose bf16
#              dots take f32 operands, within ~10% of bf16 either way)
#   torch_f32  PyTorch eager f32;  torch_compile  torch.compile f32
#   torch_bf16 PyTorch eager with bf16 autocast (very slow on AVX2-only hosts)
#   torch_bf16_malloc  the same under llm_jax's glibc malloc settings
# Logs go to OUT (default /tmp/side_by_side); the last lines print each run's tokens/s.
#
#   TORCH_PYTHON=/path/to/torchenv/bin/python bash benchmarks/side_by_side.sh
#   RUNS="jax jax_f32 torch_f32 torch_compile" TORCH_PYTHON=... bash benchmarks/side_by_side.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/side_by_side}
torch=${TORCH_PYTHON:?set TORCH_PYTHON to a python that has torch, e.g. a venv with pip install torch}
runs=${RUNS:-jax torch_f32 torch_bf16 torch_bf16_malloc}
known=" jax jax_f32 torch_f32 torch_compile torch_bf16 torch_bf16_malloc "
for r in $runs; do  # before any run: a typo must not surface after minutes of timing
  [[ $known == *" $r "* ]] || { echo "RUNS: unknown run '$r'; use${known% }" >&2; exit 2; }
done
mkdir -p "$out"
malloc=(MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000)
jax=(python -m llm_jax.benchmark --config configs/bench_small.py --steps 20 --nopipeline)
ref=(env OMP_NUM_THREADS=2 "$torch" benchmarks/torch_reference.py --steps 20)
for p in $(seq "${PAIRS:-2}"); do
  echo "== pairing $p $(date +%T)"
  for r in $runs; do
    case $r in
      jax) cmd=("${jax[@]}") ;;
      jax_f32) cmd=("${jax[@]}" --config.model.dtype=float32) ;;
      torch_f32) cmd=("${ref[@]}") ;;
      torch_compile) cmd=("${ref[@]}" --compile) ;;
      torch_bf16) cmd=("${ref[@]}" --bf16) ;;
      torch_bf16_malloc) cmd=(env "${malloc[@]}" "${ref[@]}" --bf16) ;;
    esac
    "${cmd[@]}" > "$out/${r}_$p.log" 2>&1
  done
done
for f in "$out"/*.log; do
  echo "$(basename "$f" .log): $(grep -hE 'tokens/s \(median\)|tokens/s median|MFU|host CPU' "$f" | tr -s ' ' | paste -sd ';')"
done
