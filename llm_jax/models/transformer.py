"""Pre-norm Transformer blocks, a layer stack (scanned, rematerialized), and the
decoder-only language model built from them."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.models.attention import (
    ATTENTION_RESIDUALS,
    Attention,
    Packed,
    packed_segments,
    segment_mask,
)
from llm_jax.models.layers import Dense, Embed, Mlp, ModelConfig, matmul, norm

Array = jax.Array


def _dots_and_attention(prim, *avals, **params) -> bool:
    """dots_no_batch, plus attention's output and softmax statistics (cuDNN's fused kernel or
    our CPU attention's `ATTENTION_RESIDUALS`), so the backward pass does not run attention's
    forward again, for one more activation-sized tensor per layer (README, Performance)."""
    return (jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *avals, **params)
            or prim.name.startswith("dot_product_attention_fwd")
            or (prim.name == "name" and params.get("name") == ATTENTION_RESIDUALS))


REMAT_POLICIES = {
    "full": None,  # save nothing; recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_attention": _dots_and_attention,
}


class Block(nn.Module):
    """x + Attn(Norm(x)) [+ CrossAttn(Norm(x), encoded)], then x + MLP(Norm(x)).

    Returns (x, None) so it can be scanned.
    """

    cfg: ModelConfig
    causal: bool = True
    cross: bool = False  # encoder-decoder: the decoder also attends to the encoder output
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Array, mask: Array | Packed | None, positions: Array,
                 encoded: Array | None = None,
                 cross_mask: Array | None = None) -> tuple[Array, None]:
        cfg = self.cfg
        drop = nn.Dropout(cfg.dropout)
        h = norm(cfg, "attn_norm")(x)
        h = Attention(cfg, causal=self.causal, name="attn")(h, h, mask, positions, positions)
        x = x + drop(h, deterministic=self.deterministic)
        if self.cross:
            h = norm(cfg, "cross_norm")(x)
            h = Attention(cfg, use_rope=False, name="cross_attn")(h, encoded, cross_mask)
            x = x + drop(h, deterministic=self.deterministic)
        h = norm(cfg, "mlp_norm")(x)
        h = Mlp(cfg, self.deterministic, name="mlp")(h)
        x = x + drop(h, deterministic=self.deterministic)
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


class Stack(nn.Module):
    """`num_layers` blocks; with scan_layers, one block's code is compiled once and scanned."""

    cfg: ModelConfig
    num_layers: int
    causal: bool = True
    cross: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Array, mask: Array | Packed | None, positions: Array,
                 encoded: Array | None = None, cross_mask: Array | None = None) -> Array:
        cfg = self.cfg
        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat],
                             prevent_cse=not cfg.scan_layers)
        args = (cfg, self.causal, self.cross, self.deterministic)
        if cfg.scan_layers:
            scanned = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast,) * 4, length=self.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = scanned(*args, name="layers")(x, mask, positions, encoded, cross_mask)
            return x
        for i in range(self.num_layers):
            x, _ = block(*args, name=f"layer_{i}")(x, mask, positions, encoded, cross_mask)
        return x


def _embed(cfg: ModelConfig, name: str = "embed") -> Embed:
    return Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                 name=name)


def _positions(cfg: ModelConfig, x: Array, positions: Array, name: str) -> Array:
    """Adds learned absolute positions (rotary positions are applied in attention)."""
    if cfg.positions != "learned":
        return x
    return x + Embed(cfg.max_len, cfg.d_model, axes=("length", "embed"), dtype=cfg.dtype,
                     param_dtype=cfg.param_dtype, name=name)(positions)


def _enter(cfg: ModelConfig, x: Array, deterministic: bool) -> Array:
    """Embeddings into the stack: dropout, then the activation's logical axes."""
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class LMHead(nn.Module):
    """Untied output head, kernel [embed, vocab]."""

    cfg: ModelConfig

    def setup(self) -> None:
        self.kernel = self.param(
            "kernel", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                   ("embed", "vocab")),
            (self.cfg.d_model, self.cfg.vocab_size), self.cfg.param_dtype)

    def attend(self, x: Array) -> Array:
        """Logits x · kernel in float32."""
        return matmul(x, self.kernel, 1, self.cfg.dtype)

    def table(self) -> Array:
        """The head as [vocab, embed]."""
        return self.kernel.T


def _lm_out(cfg: ModelConfig, embed: Embed, x: Array, logits: bool = True,
            name: str = "lm_head") -> dict[str, Array]:
    """{"logits"} in float32 from the input embedding (tied) or a separate head; without
    logits, the head's inputs {"hidden", "head" [vocab, embed]} for
    `cross_entropy.head_sums`, which never builds the [batch, length, vocab] logits."""
    head = embed if cfg.tie_embeddings else LMHead(cfg, name=name)
    if not logits:
        return {"hidden": x, "head": head.table()}
    return {"logits": nn.with_logical_constraint(head.attend(x), ("batch", "length", "vocab"))}


class DecoderLM(nn.Module):
    """GPT/LLaMA-style decoder-only LM: {"tokens", "positions", "segment_ids"} ->
    {"logits"} of the next token (float32), or with logits=False the head's inputs."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, batch: dict[str, Array], deterministic: bool = True,
                 logits: bool = True) -> dict[str, Array]:
        cfg, positions, seg = self.cfg, batch["positions"], batch["segment_ids"]
        if cfg.max_segments:  # attention_impl cudnn_packed: the documents and padding's run
            mask = packed_segments(seg, cfg.max_segments + 1)
        else:
            mask = segment_mask(seg, seg) if cfg.document_mask else None
        if not cfg.document_mask:  # one sequence per row, as GPT-2 trains on packed rows
            positions = jnp.broadcast_to(jnp.arange(seg.shape[1]), seg.shape)
        embed = _embed(cfg)
        x = _enter(cfg, _positions(cfg, embed(batch["tokens"]), positions, "pos_embed"),
                   deterministic)
        x = Stack(cfg, cfg.num_layers, causal=True, deterministic=deterministic,
                  name="decoder")(x, mask, positions)
        return _lm_out(cfg, embed, norm(cfg, "final_norm")(x), logits)


class Encoder(nn.Module):
    """BERT-style encoder: bidirectional self-attention over [CLS] A [SEP] B [SEP] rows.

    Inputs {"tokens", "positions", "segment_ids", "token_types"}; padding is segment 0.
    Outputs, by cfg.heads: "logits" (the MLM head, tied to the input embedding; also the
    LM head of the left-to-right ablation), "nsp_logits" and "cls_logits" from the
    pooled first token ([CLS]), or the last real token when attention is causal.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, batch: dict[str, Array], deterministic: bool = True) -> dict[str, Array]:
        cfg, positions, seg = self.cfg, batch["positions"], batch["segment_ids"]
        embed = _embed(cfg)
        x = _positions(cfg, embed(batch["tokens"]), positions, "pos_embed")
        x = x + Embed(cfg.type_vocab_size, cfg.d_model, axes=(None, "embed"), dtype=cfg.dtype,
                      param_dtype=cfg.param_dtype, name="type_embed")(batch["token_types"])
        x = _enter(cfg, x, deterministic)
        x = Stack(cfg, cfg.num_layers, causal=cfg.left_to_right, deterministic=deterministic,
                  name="encoder")(x, segment_mask(seg, seg), positions)
        x = norm(cfg, "final_norm")(x)
        dense = lambda feats, name, out_dtype=None: Dense(  # noqa: E731
            (feats,), ("embed",), (None,), use_bias=True, dtype=cfg.dtype,
            param_dtype=cfg.param_dtype, out_dtype=out_dtype, name=name)
        out = {}
        if "mlm" in cfg.heads:  # BERT's transform: dense, GELU, norm, then tied logits + bias
            h = norm(cfg, "mlm_norm")(nn.gelu(dense(cfg.d_model, "mlm_transform")(x)))
            bias = self.param("mlm_bias", nn.with_logical_partitioning(
                nn.initializers.zeros, ("vocab",)), (cfg.vocab_size,), cfg.param_dtype)
            out["logits"] = _lm_out(cfg, embed, h)["logits"] + bias
        if "nsp" in cfg.heads or "cls" in cfg.heads:
            if cfg.left_to_right:  # only the last real token has seen the whole row
                last = jnp.maximum(jnp.sum(seg != 0, axis=1) - 1, 0)
                first = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
            else:
                first = x[:, 0]
            pooled = jnp.tanh(dense(cfg.d_model, "pooler")(first))
            if "nsp" in cfg.heads:
                out["nsp_logits"] = dense(2, "nsp_head", jnp.float32)(pooled)
            if "cls" in cfg.heads:
                out["cls_logits"] = dense(cfg.num_classes, "classifier", jnp.float32)(pooled)
        return out


class EncoderDecoder(nn.Module):
    """Original Transformer / T5: an encoder over "inputs", a decoder over "targets" with
    cross-attention, one shared token embedding. Both sides may be packed: example k
    holds segment k on each side, and decoder tokens attend only to their own inputs.

    `targets` start with bos; the decoder predicts targets[t + 1] at position t.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, batch: dict[str, Array], deterministic: bool = True,
                 encoded: Array | None = None, encode_only: bool = False,
                 logits: bool = True) -> dict[str, Array]:
        """{"logits"} over the targets (the head's inputs with logits=False); with
        encode_only, {"encoded"}; with `encoded` given, the encoder is not run again
        (decoding step by step)."""
        cfg = self.cfg
        embed = _embed(cfg)
        iseg = batch["inputs_segment_ids"]
        if encoded is None:
            pos = batch["inputs_positions"]
            x = _enter(cfg, _positions(cfg, embed(batch["inputs"]), pos, "enc_pos_embed"),
                       deterministic)
            x = Stack(cfg, cfg.num_layers, causal=False, deterministic=deterministic,
                      name="encoder")(x, segment_mask(iseg, iseg), pos)
            encoded = norm(cfg, "encoder_norm")(x)
            if encode_only:
                return {"encoded": encoded}
        tseg, pos = batch["targets_segment_ids"], batch["targets_positions"]
        y = _enter(cfg, _positions(cfg, embed(batch["targets"]), pos, "dec_pos_embed"),
                   deterministic)
        y = Stack(cfg, cfg.decoder_depth, causal=True, cross=True,
                  deterministic=deterministic, name="decoder")(
            y, segment_mask(tseg, tseg), pos, encoded, segment_mask(tseg, iseg))
        return _lm_out(cfg, embed, norm(cfg, "decoder_norm")(y), logits)
