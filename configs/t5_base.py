"""T5-base (Raffel et al. 2020): 12 + 12 layers, d_model 768, 12 heads, span corruption
on C4, for real hardware.

Command:  python -m llm_jax.train --config configs/t5_base.py --workdir runs/t5_base \
              --config.data.name=c4/en:3.1.0 --config.data.data_dir=/path/to/tfds
Check:    add --compile_only to see per-device memory before renting (README).
Runtime:  2^19 steps of 128 x (512 + 114) tokens (the paper's 34B tokens). The FLOPs
          model gives 2.9e19 FLOP: ~2.2 h on 8x H100 at 45% MFU (an estimate).
Expected: after fine-tuning, the paper's baseline (Table 1) reaches GLUE 83.3,
          CNN/DM ROUGE-2 19.2, SQuAD EM 80.9 and WMT En-De BLEU 27.0; not measured
          here. Differences from the paper: AdamW with an inverse-square-root schedule
          instead of Adafactor, rotary positions instead of relative position buckets.
"""
from llm_jax.config import base_config


def get_config():
    c = base_config()
    c.model.family = "encoder_decoder"
    c.model.num_layers = 12
    c.model.num_decoder_layers = 12
    c.model.d_model = 768
    c.model.num_heads = 12
    c.model.mlp_dim = 3072
    c.model.activation = "relu"  # T5 v1.0; "swiglu" for the v1.1 recipe
    c.model.norm = "rmsnorm"  # T5's layer norm has no bias and no mean subtraction
    c.model.positions = "rope"
    c.model.dropout = 0.0  # T5 pretrains without dropout (0.1 when fine-tuning)
    c.model.remat = "dots"
    c.task.objective = "span_corruption"
    c.task.noise_density = 0.15
    c.task.mean_span_length = 3.0
    c.data.seq_len = 512
    c.data.target_seq_len = 114
    c.data.vocab_size = 32_000
    c.data.tokenizer_train_bytes = 200_000_000
    c.train.steps = 524_288
    c.train.batch_size = 128
    c.train.log_every = 100
    c.train.eval_every = 10_000
    c.train.eval_batches = 100
    c.train.checkpoint_every = 10_000
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 10_000
    c.optim.schedule = "rsqrt"
    c.optim.weight_decay = 0.0
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    return c
