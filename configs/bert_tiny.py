"""Tiny BERT (encoder, MLM + NSP) for tests and smoke runs: configs/tiny.py's sizes and
schedule with the encoder family.

Command:  python -m llm_jax.train --config configs/bert_tiny.py --workdir /tmp/bert_tiny
Runtime:  ~30 s on a 2-core CPU after the one-time corpus and tokenizer preparation.
Expected: MLM loss falls from ~6.4 (ln 615) by more than 0.5 within 30 steps; nothing more.
"""
import os

from llm_jax.config import load_file


def get_config():
    c = load_file(os.path.join(os.path.dirname(__file__), "tiny.py"))
    c.model.family = "encoder"
    c.task.objective = "mlm"
    c.task.nsp = True
    return c
