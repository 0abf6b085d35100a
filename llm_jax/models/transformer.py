"""Pre-norm Transformer blocks, a layer stack (scanned, rematerialized), and the
decoder-only language model built from them."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.models.attention import Attention, segment_mask
from llm_jax.models.layers import Dense, Embed, Mlp, ModelConfig, norm

Array = jax.Array

REMAT_POLICIES = {
    "full": None,  # save nothing; recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
    """x + Attn(Norm(x)), then x + MLP(Norm(x)). Returns (x, None) so it can be scanned."""

    cfg: ModelConfig
    causal: bool = True
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Array, mask: Array, positions: Array) -> tuple[Array, None]:
        cfg = self.cfg
        drop = nn.Dropout(cfg.dropout)
        h = norm(cfg, "attn_norm")(x)
        h = Attention(cfg, causal=self.causal, name="attn")(h, h, mask, positions, positions)
        x = x + drop(h, deterministic=self.deterministic)
        h = norm(cfg, "mlp_norm")(x)
        h = Mlp(cfg, self.deterministic, name="mlp")(h)
        x = x + drop(h, deterministic=self.deterministic)
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


class Stack(nn.Module):
    """`num_layers` blocks; with scan_layers, one block's code is compiled once and scanned."""

    cfg: ModelConfig
    causal: bool = True
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Array, mask: Array, positions: Array) -> Array:
        cfg = self.cfg
        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat],
                             prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            scanned = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = scanned(cfg, self.causal, self.deterministic, name="layers")(x, mask, positions)
            return x
        for i in range(cfg.num_layers):
            x, _ = block(cfg, self.causal, self.deterministic, name=f"layer_{i}")(
                x, mask, positions)
        return x


class DecoderLM(nn.Module):
    """GPT/LLaMA-style decoder-only LM: tokens -> next-token logits (float32)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens: Array, positions: Array, segment_ids: Array,
                 deterministic: bool = True) -> Array:
        cfg = self.cfg
        embed = Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype,
                      param_dtype=cfg.param_dtype, name="embed")
        x = embed(tokens)
        if cfg.positions == "learned":
            x = x + Embed(cfg.max_len, cfg.d_model, axes=("length", "embed"), dtype=cfg.dtype,
                          param_dtype=cfg.param_dtype, name="pos_embed")(positions)
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        x = Stack(cfg, causal=True, deterministic=deterministic, name="decoder")(
            x, segment_mask(segment_ids, segment_ids), positions)
        x = norm(cfg, "final_norm")(x)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = Dense((cfg.vocab_size,), ("embed",), ("vocab",), dtype=cfg.dtype,
                           param_dtype=cfg.param_dtype, out_dtype=jnp.float32,
                           name="lm_head")(x)
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
