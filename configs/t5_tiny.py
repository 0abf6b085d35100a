"""Tiny T5 (encoder-decoder, span corruption) for tests and smoke runs: configs/tiny.py's
sizes and schedule with the encoder-decoder family.

Command:  python -m llm_jax.train --config configs/t5_tiny.py --workdir /tmp/t5_tiny
Runtime:  ~30 s on a 2-core CPU after the one-time corpus and tokenizer preparation.
Expected: loss falls by more than 0.5 within 30 steps; nothing more.
"""
import os

from llm_jax.config import load_file


def get_config():
    c = load_file(os.path.join(os.path.dirname(__file__), "tiny.py"))
    c.model.family = "encoder_decoder"
    c.task.objective = "span_corruption"
    c.data.target_seq_len = 24
    return c
