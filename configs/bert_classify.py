"""Fine-tune bert_default on sequence-pair classification: do two code snippets come from
the same file? (code_pairs: snippets of 4 stdlib lines, stripped, >= 20 characters, each
line found in one file only; balanced; validation pairs come only from files held out of
pretraining.)

Command:  python -m llm_jax.train --config configs/bert_classify.py \
              --workdir runs/bert_classify --config.train.init_from=runs/bert_default
Runtime:  ~3 min on a 2-core x86 CPU.
Expected: validation accuracy in the README ("Model families"); chance is 50%.
Without init_from the same model trains from scratch (the ablation's baseline).
"""
import os

from llm_jax.config import load_file


def get_config():
    c = load_file(os.path.join(os.path.dirname(__file__), "bert_default.py"))
    c.task.objective = "classification"
    c.model.num_classes = 2
    c.data.name = "code_pairs"
    c.data.text_feature = "text_a"
    c.train.init_from = "runs/bert_default"
    c.train.steps = 600
    c.train.batch_size = 32
    c.train.log_every = 50
    c.train.eval_every = 200
    c.train.eval_batches = 0  # the whole validation split
    c.train.checkpoint_every = 200
    c.optim.learning_rate = 3e-4  # 1e-3 collapses to one class (NSP ablation README)
    c.optim.warmup_steps = 60
    c.optim.schedule = "linear"
    c.optim.end_lr_ratio = 0.0
    return c
