"""A small BERT (encoder, MLM + NSP) pretrained on the embedded stdlib corpus, on a CPU.

Command:  python -m llm_jax.train --config configs/bert_default.py --workdir runs/bert_default
Runtime:  ~3 min on a 2-core x86 CPU after the one-time corpus and tokenizer preparation.
Expected: see README ("Model families"); the measured MLM and NSP accuracies are there.
Data:     rows are [CLS] A [SEP] B [SEP] over 128 tokens; a "sentence" of code is a block
          (a run of non-blank lines with the blank lines after it). B follows A in half
          the pairs and comes from a random file in the rest. 15% of the other tokens are
          chosen for MLM: 80% become [MASK], 10% a random piece, 10% stay.
Variants: --config.task.nsp=False (MLM only, B always follows A);
          --config.task.whole_word=True (whole-word masking).
"""
from llm_jax.config import base_config


def get_config():
    c = base_config()
    c.model.family = "encoder"
    c.model.num_layers = 2  # 4 layers leave the unigram plateau later (README)
    c.model.d_model = 192
    c.model.num_heads = 3
    c.model.mlp_dim = 768
    c.model.activation = "gelu"
    c.model.norm = "layernorm"
    c.model.positions = "rope"
    c.model.qkv_conv = 3  # centred q/k/v convolution: see the README's MLM plateau note
    c.model.remat = "none"  # unrolled, no remat: the fastest on this CPU (README, Performance)
    c.model.scan_layers = False
    c.task.objective = "mlm"
    c.task.nsp = True
    c.data.seq_len = 128
    c.data.vocab_size = 4096
    c.data.tokenizer_pieces = "words"  # the decoder default's tokenizer, shared
    c.train.steps = 1000
    c.train.batch_size = 32
    c.train.log_every = 50
    c.train.eval_every = 250
    c.train.eval_batches = 20
    c.train.checkpoint_every = 250
    c.optim.learning_rate = 1e-3  # 2e-3 and above stay on the unigram plateau (README)
    c.optim.warmup_steps = 100
    c.optim.schedule = "linear"  # BERT's schedule
    c.optim.end_lr_ratio = 0.0
    c.optim.weight_decay = 0.01
    c.optim.b2 = 0.999
    return c
