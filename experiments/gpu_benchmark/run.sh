#!/usr/bin/env bash
# One NVIDIA GPU, about 4 minutes: train-step speed and MFU of GPT-2 small and a ~1B
# LLaMA-style model, bf16, cuDNN flash attention through jax.nn.dot_product_attention.
#   bash experiments/gpu_benchmark/run.sh            # on the GPU machine
#   SMOKE=1 bash experiments/gpu_benchmark/run.sh    # tiny shapes, checks the script on CPU
# Writes experiments/gpu_benchmark/results/*.json and prints one table per run; each run
# has its own time limit (LIMIT seconds, default 150), so one that hangs leaves the others'
# figures, says where it stopped and prints Python's stack (SIGABRT + faulthandler).
# ATTN=auto|xla|cudnn sets the attention implementation (default auto: cuDNN on NVIDIA GPUs);
# the cudnn_packed runs keep theirs, after a check of that kernel against XLA's attention.
# PROFILE=1 also writes a jax.profiler trace of 3 steps per run to results/trace_NAME
# and prints their time by op scope (llm_jax/op_profile.py), with CUDA command buffers off;
# its figures go to results/profiled_NAME.json, apart from the plain runs'.
# Exits 1 if any run failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=experiments/gpu_benchmark/results
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
# the default 75% of GPU memory is too little for llama_1b at batch 32
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
attn=${ATTN:-auto}
if [[ -n "${PROFILE:-}" ]]; then
  # kernels replayed from a CUDA command buffer lose their HLO op in traces (openxla/xprof
  # #3070), so profiled runs go without (their speeds may differ from the plain runs')
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer="
fi
failed=0
extra=()
if [[ "${SMOKE:-0}" == 1 ]]; then
  extra=(--config.model.num_layers=2 --config.model.d_model=128 --config.model.num_heads=4
         --config.model.num_kv_heads=2 --config.model.mlp_dim=256 --config.data.seq_len=128
         --config.data.vocab_size=512 --config.train.batch_size=8 --config.mesh.data=1
         --config.mesh.fsdp=-1)
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
bench() {  # result name, config name, batch size, then overrides; A=... sets the attention
  local name=$1 config=$2 batch=$3
  shift 3
  echo "== $name: start $(date +%T)"
  timeout -s ABRT -k 10 "${LIMIT:-150}" python -m llm_jax.benchmark \
    --config "configs/$config.py" --steps 10 --nopipeline \
    --config.model.attention_impl="${A:-$attn}" \
    --config.train.batch_size="$batch" --config.mesh.data=1 --config.mesh.fsdp=-1 \
    ${PROFILE:+--profile=$out/trace_$name} "$@" ${extra[@]+"${extra[@]}"} \
    --json "$out/${PROFILE:+profiled_}$name.json"
  local rc=$?
  echo "== $name: exit $rc at $(date +%T)"
  [[ $rc == 0 ]] || failed=1
}
# Each model as configured (document_mask on: exact packing), then with GPT-2-style
# cross-document attention, which lets cuDNN run plain causal flash attention; then larger
# batches, which the H200's 141 GB hold.
# llama_1b: 1.1B params, seq 2048. gpt2_small: 124M params, seq 1024.
nodoc=--config.model.document_mask=false
bench llama_1b llama_1b 16
bench llama_1b_nodocmask llama_1b 16 $nodoc
bench gpt2_small gpt2_small 32
bench gpt2_small_nodocmask gpt2_small 32 $nodoc
bench llama_1b_b32_nodocmask llama_1b 32 $nodoc
bench gpt2_small_b64_nodocmask gpt2_small 64 $nodoc
# Exact document masking through cuDNN's packed attention (Hopper or later; experimental,
# not yet run on a GPU): first its output and gradients against XLA's masked attention
# (skipped off Hopper), then llama_1b with it; the synthetic rows hold one document each,
# so it does the work of plain causal attention, as MFU counts it. cuDNN keeps softmax
# statistics per segment slot, [batch·(16+1), heads, seq] f32 per layer (~3 GB in all
# for llama_1b at batch 32), so the batch-32 run may not fit an 80 GB GPU.
echo "== packed attention check: start $(date +%T)"
timeout -s ABRT -k 10 "${LIMIT:-150}" python -m pytest -q -p no:cacheprovider \
  tests/test_packed_attention.py -k on_gpu -rs
rc=$?
echo "== packed attention check: exit $rc at $(date +%T)"
[[ $rc == 0 ]] || failed=1
packed=(--config.data.max_segments_per_row=16)
A=cudnn_packed bench llama_1b_packed llama_1b 16 "${packed[@]}"
A=cudnn_packed bench llama_1b_b32_packed llama_1b 32 "${packed[@]}"
exit $failed
