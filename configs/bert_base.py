"""BERT-base (Devlin et al. 2019): 12 layers, d_model 768, 12 heads, MLM + NSP, for real
hardware.

Command:  python -m llm_jax.train --config configs/bert_base.py --workdir runs/bert_base \
              --config.data.name=wikipedia/20230601.en --config.data.data_dir=/path/to/tfds
Check:    add --compile_only to see per-device memory before renting (README).
Runtime:  the paper's 1M steps of 256 x 512 tokens took 4 days on 16 TPU v3 chips. The
          FLOPs model gives 9.3e19 FLOP: ~7 h on 8x H100 at 45% MFU (an estimate).
Expected: held-out masked-LM perplexity ~4 (the paper's Table 6 gives 3.99 for this
          size on BooksCorpus + Wikipedia) and MNLI-m dev accuracy ~84.4 after
          fine-tuning; not measured here. Differences from the paper: pre-norm blocks
          (post-norm in BERT), a SentencePiece vocabulary instead of WordPiece, and
          sequence length 512 throughout (BERT used 128 for 90% of the steps).
"""
from llm_jax.config import base_config


def get_config():
    c = base_config()
    c.model.family = "encoder"
    c.model.num_layers = 12
    c.model.d_model = 768
    c.model.num_heads = 12
    c.model.mlp_dim = 3072
    c.model.activation = "gelu"
    c.model.norm = "layernorm"
    c.model.positions = "learned"
    c.model.max_len = 512
    c.model.use_bias = True
    c.model.dropout = 0.1
    c.model.remat = "dots"
    c.task.objective = "mlm"
    c.task.nsp = True
    c.data.seq_len = 512
    c.data.vocab_size = 30_000  # + [CLS] [SEP] [MASK] and 100 sentinels
    c.data.tokenizer_pieces = "words"
    c.data.tokenizer_train_bytes = 200_000_000
    c.train.steps = 1_000_000
    c.train.batch_size = 256
    c.train.log_every = 100
    c.train.eval_every = 10_000
    c.train.eval_batches = 100
    c.train.checkpoint_every = 10_000
    c.optim.learning_rate = 1e-4
    c.optim.warmup_steps = 10_000
    c.optim.schedule = "linear"
    c.optim.end_lr_ratio = 0.0
    c.optim.weight_decay = 0.01
    c.optim.b2 = 0.999
    c.optim.eps = 1e-6
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    return c
