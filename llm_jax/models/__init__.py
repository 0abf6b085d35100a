"""Model families, all built from the shared parts in layers.py and attention.py.

Every family takes the batch dict and returns a dict of float32 logits (see each class);
decoders and encoder-decoders return their LM head's inputs instead with logits=False.
"""
from __future__ import annotations

import flax.linen as nn

from llm_jax.models.layers import ModelConfig
from llm_jax.models.transformer import DecoderLM, Encoder, EncoderDecoder

FAMILIES = {"decoder": DecoderLM, "encoder": Encoder, "encoder_decoder": EncoderDecoder}


def build(cfg: ModelConfig, family: str = "decoder") -> nn.Module:
    """The Flax module for a model family."""
    return FAMILIES[family](cfg)
