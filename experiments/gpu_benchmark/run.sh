#!/usr/bin/env bash
# One NVIDIA GPU, under 5 minutes: train-step speed and MFU of GPT-2 small and a ~1B
# LLaMA-style model, bf16, cuDNN flash attention through jax.nn.dot_product_attention.
#   bash experiments/gpu_benchmark/run.sh            # on the GPU machine
#   SMOKE=1 bash experiments/gpu_benchmark/run.sh    # tiny shapes, checks the script on CPU
# Writes experiments/gpu_benchmark/results/*.json and prints one table per model; each model
# has its own time limit (LIMIT seconds, default 150), so one that hangs leaves the other's
# figures and says where it stopped.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=experiments/gpu_benchmark/results
mkdir -p "$out"
export PYTHONUNBUFFERED=1
attn=cudnn
extra=()
if [[ "${SMOKE:-0}" == 1 ]]; then
  attn=xla
  extra=(--config.model.num_layers=2 --config.model.d_model=128 --config.model.num_heads=4
         --config.model.num_kv_heads=2 --config.model.mlp_dim=256 --config.data.seq_len=128
         --config.data.vocab_size=512 --config.train.batch_size=8 --config.mesh.data=1
         --config.mesh.fsdp=-1)
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
bench() {  # name, batch size, then overrides
  local name=$1 batch=$2
  shift 2
  echo "== $name: start $(date +%T)"
  timeout -k 10 "${LIMIT:-150}" python -m llm_jax.benchmark --config "configs/$name.py" \
    --steps 10 --nopipeline --config.model.attention_impl=$attn \
    --config.train.batch_size="$batch" --config.mesh.data=1 --config.mesh.fsdp=-1 \
    "$@" "${extra[@]}" --json "$out/$name.json"
  echo "== $name: exit $? at $(date +%T)"
}
# GPT-2 small: 124M params, seq 1024.
bench gpt2_small 32
# llama_1b: 1.1B params, seq 2048; batch 8 per step fits an 80 GB GPU with dots remat.
bench llama_1b 8
