"""Model families, all built from the shared parts in layers.py and attention.py."""
from __future__ import annotations

import flax.linen as nn

from llm_jax.models.layers import ModelConfig
from llm_jax.models.transformer import DecoderLM

FAMILIES = {"decoder": DecoderLM}


def build(cfg: ModelConfig, family: str = "decoder") -> nn.Module:
    """The Flax module for a model family."""
    return FAMILIES[family](cfg)
