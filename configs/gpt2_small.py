"""GPT-2 small (124M): 12 layers, d_model 768, 12 heads, seq 1024, on real hardware.

Command:  python -m llm_jax.train --config configs/gpt2_small.py --workdir runs/gpt2s \
              --config.data.name=openwebtext --config.data.data_dir=/path/to/tfds
Runtime:  374k tokens/s per H200 at batch 32 (32% MFU; 405k with
          --config.model.document_mask=false), measured 2026-11-29 with
          experiments/gpu_benchmark/run.sh: 20k steps of 512x1024 tokens (10.5B tokens)
          take ~1 h on 8 such GPUs, if FSDP over 8 scales near linearly (not measured).
Expected: validation loss ~3.0 nats/token on OpenWebText with the GPT-2 tokenizer's
          vocab size (nanoGPT reports 2.85 after 600k steps); not yet measured here.
Data:     any TFDS dataset prepared locally in ArrayRecord format (see README).
"""
from llm_jax.config import base_config


def get_config():
    c = base_config()
    c.model.num_layers = 12
    c.model.d_model = 768
    c.model.num_heads = 12
    c.model.mlp_dim = 3072
    c.model.activation = "gelu"
    c.model.norm = "layernorm"
    c.model.positions = "learned"
    c.model.use_bias = True
    c.model.dropout = 0.0
    c.model.remat = "dots"
    c.data.seq_len = 1024
    c.data.vocab_size = 50304  # GPT-2's 50257 rounded up to a multiple of 128
    c.data.tokenizer_train_bytes = 200_000_000
    c.train.steps = 20_000
    c.train.batch_size = 512
    c.train.log_every = 50
    c.train.eval_every = 1000
    c.train.eval_batches = 50
    c.train.checkpoint_every = 1000
    c.optim.learning_rate = 6e-4
    c.optim.warmup_steps = 700
    c.optim.weight_decay = 0.1
    c.optim.b2 = 0.95
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    return c
