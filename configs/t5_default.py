"""A small T5 (encoder-decoder, span corruption) pretrained on the embedded stdlib corpus.

Command:  python -m llm_jax.train --config configs/t5_default.py --workdir runs/t5_default
Runtime:  ~5 min on a 2-core x86 CPU after the one-time corpus and tokenizer preparation.
Expected: see README ("Model families") for the measured loss and accuracy.
Data:     each file is cut into pieces of 284 tokens; 15% of them, in spans of mean length
          3, are replaced by sentinels <extra_id_k> (inputs 256 tokens with eos); the
          targets are the sentinels followed by their spans (T5's format), packed into
          rows of 64 on the decoder side.
"""
from llm_jax.config import base_config


def get_config():
    c = base_config()
    c.model.family = "encoder_decoder"
    c.model.num_layers = 3  # encoder; the decoder has as many
    c.model.d_model = 192
    c.model.num_heads = 3
    c.model.mlp_dim = 768
    c.model.activation = "gelu"
    c.model.norm = "rmsnorm"
    c.model.positions = "rope"
    c.model.qkv_conv = 3  # centred in the encoder, causal in the decoder
    c.model.remat = "none"  # unrolled, no remat: the fastest on this CPU (README, Performance)
    c.model.scan_layers = False
    c.task.objective = "span_corruption"
    c.task.noise_density = 0.15
    c.task.mean_span_length = 3.0
    c.data.seq_len = 256
    c.data.target_seq_len = 64
    c.data.vocab_size = 4096
    c.data.tokenizer_pieces = "words"
    c.train.steps = 1000
    c.train.batch_size = 16
    c.train.log_every = 50
    c.train.eval_every = 250
    c.train.eval_batches = 20
    c.train.checkpoint_every = 250
    c.optim.learning_rate = 2e-3
    c.optim.warmup_steps = 100
    c.optim.schedule = "cosine"
    c.optim.end_lr_ratio = 0.05
    c.optim.weight_decay = 0.01
    return c
