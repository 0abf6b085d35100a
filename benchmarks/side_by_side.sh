#!/usr/bin/env bash
# bench_small side by side: llm_jax's benchmark, then the PyTorch reference in f32, with
# bf16 autocast, and with bf16 autocast under llm_jax's glibc malloc settings, PAIRS times
# over, one run at a time (nothing else should run on the cores). TORCH_PYTHON is a python
# with torch installed (not a dependency of llm_jax). Logs go to OUT (default
# /tmp/side_by_side); the last lines print each run's tokens/s.
#
#   TORCH_PYTHON=/path/to/torchenv/bin/python bash benchmarks/side_by_side.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/side_by_side}
torch=${TORCH_PYTHON:?set TORCH_PYTHON to a python that has torch, e.g. a venv with pip install torch}
mkdir -p "$out"
malloc=(MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000)
ref=(benchmarks/torch_reference.py --steps 20)
for p in $(seq "${PAIRS:-2}"); do
  echo "== pairing $p $(date +%T)"
  python -m llm_jax.benchmark --config configs/bench_small.py --steps 20 --nopipeline \
    > "$out/llm_jax_$p.log" 2>&1
  OMP_NUM_THREADS=2 "$torch" "${ref[@]}" > "$out/torch_f32_$p.log" 2>&1
  OMP_NUM_THREADS=2 "$torch" "${ref[@]}" --bf16 > "$out/torch_bf16_$p.log" 2>&1
  env "${malloc[@]}" OMP_NUM_THREADS=2 "$torch" "${ref[@]}" --bf16 \
    > "$out/torch_bf16_malloc_$p.log" 2>&1
done
for f in "$out"/*.log; do
  echo "$(basename "$f" .log): $(grep -hE 'tokens/s \(median\)|tokens/s median|MFU|host CPU' "$f" | tr -s ' ' | paste -sd ';')"
done
