"""Fine-tune bert_default on code_next: is snippet B the one right after snippet A in its
file, or one from another file? (4 stripped stdlib lines per snippet; each A is asked
twice, so 50/50; validation pairs come only from files held out of pretraining.)

BERT's next-sentence task as a downstream task: pretraining's NSP pairs are whole blocks
with their indentation, these are stripped snippets, and every A appears with both labels.

Command:  python -m llm_jax.train --config configs/bert_next.py \
              --workdir runs/bert_next --config.train.init_from=runs/bert_default
Runtime:  ~3 min on a 2-core x86 CPU.
Expected: validation accuracy in the README ("Model families"); chance is 50%.
"""
import os

from llm_jax.config import load_file


def get_config():
    c = load_file(os.path.join(os.path.dirname(__file__), "bert_classify.py"))
    c.data.name = "code_next"
    c.optim.learning_rate = 1e-4  # the best of 1e-4, 3e-4, 1e-3 here (NSP ablation README)
    return c
