"""Objectives: which heads a family needs, what a batch holds, and the loss parts.

A batch is a dict of int32 arrays, rows first. Per family:
  decoder, encoder    tokens, segment_ids (0 = padding), positions [B, L]
  encoder             + token_types [B, L]; mlm: mlm_targets, mlm_weights [B, L],
                      nsp_label [B]; classification: label [B]
  encoder_decoder     inputs, inputs_segment_ids, inputs_positions [B, L_in] and
                      targets, targets_segment_ids, targets_positions [B, L_out]
Each objective scores one or more parts ("lm", "mlm", "nsp", "cls"); the loss is the sum
of each part's mean over its weights, as BERT sums its MLM and NSP losses. Decoders and
encoder-decoders hand their LM head's inputs to `cross_entropy.head_sums` instead of logits.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from llm_jax import cross_entropy

Array = jax.Array
Batch = dict[str, Array]
Part = tuple[Array, Array, Array]  # Σ w·loss (nats), Σ w·hit (0/1), Σ w over the items


def next_token_targets(tokens: Array, segment_ids: Array) -> tuple[Array, Array]:
    """Targets shifted left by one and a 0/1 weight of which positions are scored:
    position t predicts t+1 when both lie in the same (non-padding) segment."""
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    same = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
    return targets, jnp.pad(same, ((0, 0), (0, 1))).astype(jnp.float32)


def _part(logits: Array, labels: Array, w: Array) -> Part:
    return (*cross_entropy.logit_sums(logits, labels, w), jnp.sum(w))


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    family: str
    nsp: bool = False

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "Objective":
        t = config.task
        return cls(t.objective, config.model.family, t.objective == "mlm" and t.nsp)

    @property
    def heads(self) -> tuple[str, ...]:
        """The encoder's output heads this objective trains."""
        if self.family != "encoder":
            return ()
        return {"mlm": ("mlm", "nsp") if self.nsp else ("mlm",), "next_token": ("mlm",),
                "classification": ("cls",)}[self.name]

    def lm_fields(self) -> tuple[str, str]:
        """The token and segment features next-token prediction runs over."""
        if self.family == "encoder_decoder":
            return "targets", "targets_segment_ids"
        return "tokens", "segment_ids"

    def weights(self, batch: Batch) -> dict[str, Array]:
        """Each part's weights; known before the forward pass, so accumulated microbatches
        can be normalized by the whole batch's totals."""
        if self.name == "mlm":
            w = {"mlm": batch["mlm_weights"].astype(jnp.float32)}
            if self.nsp:
                w["nsp"] = (batch["segment_ids"][:, 0] != 0).astype(jnp.float32)
            return w
        if self.name == "classification":
            return {"cls": (batch["segment_ids"][:, 0] != 0).astype(jnp.float32)}
        tokens, seg = self.lm_fields()
        return {"lm": next_token_targets(batch[tokens], batch[seg])[1]}

    @property
    def model_kwargs(self) -> dict[str, bool]:
        """How the model is applied: decoders return their LM head's inputs, not logits."""
        return {} if self.family == "encoder" else {"logits": False}

    def parts(self, out: dict[str, Array], batch: Batch, dtype: Any) -> dict[str, Part]:
        """(Σ w·loss, Σ w·hit, Σ w) for each part; `dtype` is the LM head's compute dtype."""
        w = self.weights(batch)
        if self.name == "mlm":
            res = {"mlm": _part(out["logits"], batch["mlm_targets"], w["mlm"])}
            if self.nsp:
                res["nsp"] = _part(out["nsp_logits"], batch["nsp_label"], w["nsp"])
            return res
        if self.name == "classification":
            return {"cls": _part(out["cls_logits"], batch["label"], w["cls"])}
        tokens, seg = self.lm_fields()
        targets, _ = next_token_targets(batch[tokens], batch[seg])
        sums = (cross_entropy.logit_sums(out["logits"], targets, w["lm"]) if "logits" in out
                else cross_entropy.head_sums(out["hidden"], out["head"], targets, w["lm"], dtype))
        return {"lm": (*sums, jnp.sum(w["lm"]))}

    def scored_tokens(self, batch: Batch) -> Array:
        """The token targets of the "lm" part (for bits per byte)."""
        tokens, seg = self.lm_fields()
        return next_token_targets(batch[tokens], batch[seg])[0]


def feature_shapes(config: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    """Per-row shape of every batch feature for this config's family and objective."""
    family, obj, seq = config.model.family, config.task.objective, config.data.seq_len
    if family == "encoder_decoder":
        out = config.data.target_seq_len or seq
        return {f"{side}{k}": (n,) for side, n in (("inputs", seq), ("targets", out))
                for k in ("", "_segment_ids", "_positions")}
    shapes = {k: (seq,) for k in ("tokens", "segment_ids", "positions")}
    if family == "encoder":
        shapes["token_types"] = (seq,)
        if obj == "mlm":
            shapes.update(mlm_targets=(seq,), mlm_weights=(seq,), nsp_label=())
        elif obj == "classification":
            shapes["label"] = ()
    return shapes


def dummy_batch(config: ml_collections.ConfigDict, batch_size: int,
                rng: np.random.Generator | None = None, vocab_size: int = 1) -> dict:
    """A batch of the right shapes: one segment per row, tokens 0 or random with rng."""
    out = {}
    for k, shape in feature_shapes(config).items():
        full = (batch_size, *shape)
        if k.endswith("segment_ids"):
            out[k] = np.ones(full, np.int32)
        elif k.endswith("positions"):
            out[k] = np.broadcast_to(np.arange(shape[0], dtype=np.int32), full).copy()
        elif rng is not None and k in ("tokens", "inputs", "targets", "mlm_targets"):
            out[k] = rng.integers(0, vocab_size, full).astype(np.int32)
        else:
            out[k] = np.zeros(full, np.int32)
    return out
