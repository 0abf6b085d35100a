"""Tiny BERT (encoder, MLM + NSP) for tests and smoke runs.

Command:  python -m llm_jax.train --config configs/bert_tiny.py --workdir /tmp/bert_tiny
Runtime:  ~30 s on a 2-core CPU after the one-time corpus and tokenizer preparation.
Expected: MLM loss falls from ~6.3 below 6 within 30 steps; nothing more.
"""
from llm_jax.config import base_config


def get_config():
    c = base_config()
    c.model.family = "encoder"
    c.model.num_layers = 2
    c.model.d_model = 32
    c.model.num_heads = 4
    c.model.mlp_dim = 64
    c.task.objective = "mlm"
    c.task.nsp = True
    c.data.seq_len = 64
    c.data.vocab_size = 512
    c.data.tokenizer_train_bytes = 1_000_000
    c.train.steps = 30
    c.train.batch_size = 8
    c.train.log_every = 5
    c.train.eval_every = 15
    c.train.eval_batches = 4
    c.train.checkpoint_every = 15
    c.train.peak_flops = 1e11  # skip measuring: tests compare runs, not speed
    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 5
    return c
