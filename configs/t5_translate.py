"""Fine-tune t5_default on English→German interface strings from the gettext catalogs
installed on this machine (gettext_translation/de: ~42,500 deduplicated pairs, 3% held
out by hash of the English string). Reports BLEU (sacrebleu) of greedy translations.

Command:  python -m llm_jax.train --config configs/t5_translate.py \
              --workdir runs/t5_translate --config.train.init_from=runs/t5_default
Runtime:  ~5 min on a 2-core x86 CPU, decoding for BLEU included.
Expected: validation BLEU in the README ("Model families").
Other languages: --config.data.name=gettext_translation/fr (any of the 24 configured in
          llm_jax/data/corpora/gettext_translation.py that has catalogs here).
"""
import os

from llm_jax.config import load_file


def get_config():
    c = load_file(os.path.join(os.path.dirname(__file__), "t5_default.py"))
    c.task.objective = "seq2seq"
    c.task.inputs_feature = "source"
    c.task.targets_feature = "target"
    c.task.bleu_examples = 2000  # the whole validation split (1,278 pairs here)
    c.data.name = "gettext_translation/de"
    c.data.text_feature = "source"
    c.data.seq_len = 64
    c.data.target_seq_len = 64
    c.train.init_from = "runs/t5_default"
    c.train.steps = 1200
    c.train.batch_size = 32
    c.train.log_every = 50
    c.train.eval_every = 400
    c.train.eval_batches = 0
    c.train.checkpoint_every = 400
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 100
    c.optim.schedule = "cosine"
    c.optim.end_lr_ratio = 0.05
    return c
