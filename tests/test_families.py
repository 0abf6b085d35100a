"""Encoder and encoder-decoder families against independent truth: output shapes,
bidirectional vs causal attention, padding and packing isolation, the tied MLM head,
greedy decoding against a naive loop, and shared building blocks."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import objectives
from llm_jax.config import base_config
from llm_jax.generate import greedy_decode
from llm_jax.models import build
from llm_jax.models.layers import ModelConfig

V, L = 61, 12
CFG = ModelConfig(vocab_size=V, num_layers=2, d_model=32, num_heads=4, num_kv_heads=4,
                  head_dim=8, mlp_dim=64, max_len=16, dtype=jnp.float32,
                  heads=("mlm", "nsp", "cls"), num_classes=3)
TOL = dict(rtol=1e-5, atol=1e-5)


def _positions(segs):
    """Position within each packed segment (restarts where the segment id changes)."""
    segs = np.asarray(segs)
    pos = np.zeros_like(segs)
    for r in range(segs.shape[0]):
        for t in range(1, segs.shape[1]):
            pos[r, t] = pos[r, t - 1] + 1 if segs[r, t] == segs[r, t - 1] else 0
    return pos.astype(np.int32)


def enc_batch(tokens, segs=None, types=None):
    tokens = np.asarray(tokens, np.int32)
    segs = np.ones_like(tokens) if segs is None else np.asarray(segs, np.int32)
    types = np.zeros_like(tokens) if types is None else np.asarray(types, np.int32)
    return {"tokens": tokens, "segment_ids": segs, "positions": _positions(segs),
            "token_types": types}


def ed_batch(inputs, targets, iseg=None, tseg=None):
    inputs, targets = np.asarray(inputs, np.int32), np.asarray(targets, np.int32)
    iseg = np.ones_like(inputs) if iseg is None else np.asarray(iseg, np.int32)
    tseg = np.ones_like(targets) if tseg is None else np.asarray(tseg, np.int32)
    return {"inputs": inputs, "inputs_segment_ids": iseg, "inputs_positions": _positions(iseg),
            "targets": targets, "targets_segment_ids": tseg,
            "targets_positions": _positions(tseg)}


def dec_batch(tokens):
    tokens = np.asarray(tokens, np.int32)
    segs = np.ones_like(tokens)
    return {"tokens": tokens, "segment_ids": segs, "positions": _positions(segs)}


EXAMPLE = {"decoder": lambda: dec_batch(np.zeros((1, L))),
           "encoder": lambda: enc_batch(np.zeros((1, L))),
           "encoder_decoder": lambda: ed_batch(np.zeros((1, L)), np.zeros((1, 8)))}


@functools.lru_cache(maxsize=None)
def model_and_params(family, **overrides):
    cfg = dataclasses.replace(CFG, **overrides)
    model = build(cfg, family)
    params = jax.jit(model.init)(jax.random.key(0), EXAMPLE[family]())["params"]
    return model, nn.meta.unbox(params)


@functools.lru_cache(maxsize=None)
def _compiled(model, **kw):
    """model.apply compiled once per model and shapes: much faster than op by op on CPU."""
    return jax.jit(lambda p, b, **e: model.apply({"params": p}, b, deterministic=True,
                                                 **kw, **e))


def run(model, params, batch, **kw):
    """Outputs as numpy; kw: encode_only (static) or encoded (an array)."""
    enc = {"encoded": kw.pop("encoded")} if "encoded" in kw else {}
    out = _compiled(model, **kw)(params, batch, **enc)
    return {k: np.asarray(v) for k, v in out.items()}


def _tokens(seed, shape, avoid=None):
    t = np.random.default_rng(seed).integers(1, V, shape).astype(np.int32)
    if avoid is not None:
        t[t == avoid] = avoid + 1
    return t


def _changed(a, b):
    return np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4


# 1. shapes ------------------------------------------------------------------------------

@pytest.mark.parametrize("heads,ltr", [(("mlm",), False), (("nsp",), False), (("cls",), False),
                                       (("mlm", "nsp"), False), (("mlm", "nsp", "cls"), False),
                                       (("mlm", "cls"), True)])
def test_encoder_output_shapes(heads, ltr):
    model, params = model_and_params("encoder", heads=heads, left_to_right=ltr)
    segs = np.array([[1] * L, [1] * 7 + [0] * 5, [1] * 3 + [0] * 9])
    out = run(model, params, enc_batch(_tokens(0, (3, L)), segs))
    want = {"mlm": ("logits", (3, L, V)), "nsp": ("nsp_logits", (3, 2)),
            "cls": ("cls_logits", (3, CFG.num_classes))}
    assert set(out) == {want[h][0] for h in heads}
    for h in heads:
        key, shape = want[h]
        assert out[key].shape == shape and out[key].dtype == np.float32
        assert np.isfinite(out[key]).all()


def test_decoder_and_encoder_decoder_output_shapes():
    model, params = model_and_params("decoder")
    out = run(model, params, dec_batch(_tokens(0, (2, L))))
    assert set(out) == {"logits"} and out["logits"].shape == (2, L, V)
    model, params = model_and_params("encoder_decoder")
    batch = ed_batch(_tokens(1, (2, 10)), _tokens(2, (2, 7)))
    out = run(model, params, batch)
    assert set(out) == {"logits"} and out["logits"].shape == (2, 7, V)
    assert out["logits"].dtype == np.float32 and np.isfinite(out["logits"]).all()
    enc = run(model, params, batch, encode_only=True)
    assert set(enc) == {"encoded"} and enc["encoded"].shape == (2, 10, CFG.d_model)


@pytest.mark.parametrize("family,objective,ltr", [
    ("decoder", "next_token", False), ("encoder", "mlm", False),
    ("encoder", "classification", False), ("encoder", "next_token", True),
    ("encoder_decoder", "seq2seq", False), ("encoder_decoder", "span_corruption", False)])
def test_objective_batches_fit_the_family(family, objective, ltr):
    """dummy_batch's features run through the family's model and every objective part
    scores one item per weight."""
    c = base_config()
    c.model.update(family=family, num_layers=1, d_model=16, num_heads=2, mlp_dim=32,
                   dtype="float32", left_to_right=ltr)
    c.task.objective, c.task.nsp = objective, True
    c.data.seq_len, c.data.target_seq_len = 10, 6
    obj = objectives.Objective.from_config(c)
    cfg = ModelConfig.from_config(c.model, V, 10, heads=obj.heads)
    batch = objectives.dummy_batch(c, 2, np.random.default_rng(0), V)
    model = build(cfg, family)
    params = model.init(jax.random.key(0), batch)["params"]
    out = model.apply({"params": params}, batch)
    parts = obj.parts(out, batch)
    want = {"mlm": {"mlm", "nsp"}, "classification": {"cls"}}.get(objective, {"lm"})
    assert set(parts) == want
    for loss, hit, weight in parts.values():
        assert loss.shape == hit.shape == weight.shape and np.isfinite(loss).all()


# 2. bidirectional encoder vs the left-to-right ablation ---------------------------------

@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("ltr", [False, True])
def test_encoder_attends_both_ways_unless_left_to_right(scan, ltr):
    model, params = model_and_params("encoder", scan_layers=scan, left_to_right=ltr)
    tokens = _tokens(3, (2, L))
    base = run(model, params, enc_batch(tokens))
    later = tokens.copy()
    later[:, 9] = later[:, 9] % (V - 1) + 1
    after = run(model, params, enc_batch(later))
    assert _changed(after["logits"][:, 9:], base["logits"][:, 9:])
    if ltr:  # nothing before position 9 may see it
        np.testing.assert_allclose(after["logits"][:, :9], base["logits"][:, :9], **TOL)
    else:  # every earlier position sees it
        for t in range(9):
            assert _changed(after["logits"][:, t], base["logits"][:, t]), t
    # the pooled token sees the whole row: [CLS] bidirectionally, the last token causally
    assert _changed(after["nsp_logits"], base["nsp_logits"])
    assert _changed(after["cls_logits"], base["cls_logits"])


# 3. padding and packed segments ---------------------------------------------------------

@pytest.mark.parametrize("ltr", [False, True])
def test_encoder_padding_is_invisible(ltr):
    model, params = model_and_params("encoder", left_to_right=ltr)
    n = 7
    tokens = _tokens(4, (2, L))
    segs = np.array([[1] * n + [0] * (L - n)] * 2)
    types = np.array([[0] * 4 + [1] * (L - 4)] * 2)
    base = run(model, params, enc_batch(tokens, segs, types))
    pad = tokens.copy()
    pad[:, n:] = _tokens(5, (2, L - n))
    after = run(model, params, enc_batch(pad, segs, types))
    np.testing.assert_allclose(after["logits"][:, :n], base["logits"][:, :n], **TOL)
    for k in ("nsp_logits", "cls_logits"):
        np.testing.assert_allclose(after[k], base[k], **TOL)
    # and a padded row gives what the same row without any padding gives
    alone = run(model, params, enc_batch(tokens[:, :n], segs[:, :n], types[:, :n]))
    np.testing.assert_allclose(base["logits"][:, :n], alone["logits"], rtol=1e-4, atol=1e-4)
    for k in ("nsp_logits", "cls_logits"):
        np.testing.assert_allclose(base[k], alone[k], rtol=1e-4, atol=1e-4)
    # the real tokens do matter (so the comparisons above can fail)
    real = tokens.copy()
    real[:, n - 1] = real[:, n - 1] % (V - 1) + 1
    moved = run(model, params, enc_batch(real, segs, types))
    assert _changed(moved["nsp_logits"], base["nsp_logits"])


def test_encoder_packed_segments_are_isolated():
    model, params = model_and_params("encoder")
    tokens = _tokens(6, (1, L))
    segs = np.array([[1] * 5 + [2] * 7])
    base = run(model, params, enc_batch(tokens, segs))["logits"]
    second = tokens.copy()
    second[0, 5:] = _tokens(7, (7,))
    after = run(model, params, enc_batch(second, segs))["logits"]
    np.testing.assert_allclose(after[0, :5], base[0, :5], **TOL)
    assert _changed(after[0, 5:], base[0, 5:])
    first = tokens.copy()
    first[0, :5] = _tokens(8, (5,))
    after = run(model, params, enc_batch(first, segs))["logits"]
    np.testing.assert_allclose(after[0, 5:], base[0, 5:], **TOL)
    assert _changed(after[0, :5], base[0, :5])
    alone = run(model, params, enc_batch(tokens[:, 5:]))["logits"]
    np.testing.assert_allclose(alone[0], base[0, 5:], rtol=1e-4, atol=1e-4)


# 4. token types ---------------------------------------------------------------------------

def test_token_types_change_the_outputs():
    model, params = model_and_params("encoder")
    assert params["type_embed"]["embedding"].shape == (CFG.type_vocab_size, CFG.d_model)
    tokens = _tokens(9, (1, L))
    types = np.zeros((1, L), np.int32)
    base = run(model, params, enc_batch(tokens, types=types))
    types[0, 6:] = 1
    after = run(model, params, enc_batch(tokens, types=types))
    for k in ("logits", "nsp_logits", "cls_logits"):
        assert _changed(after[k], base[k]), k
    assert _changed(after["logits"][0, 8], base["logits"][0, 8])


# 5. the tied MLM head ---------------------------------------------------------------------

def _paths(params):
    return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}


def test_mlm_head_is_tied_to_the_input_embedding():
    model, params = model_and_params("encoder")
    assert not any("lm_head" in p for p in _paths(params))
    _, untied = model_and_params("encoder", tie_embeddings=False)
    assert any("lm_head" in p for p in _paths(untied))  # the check above can fail
    rng = np.random.default_rng(10)
    params = jax.tree.map(lambda x: x, params)  # a copy to edit
    params["mlm_bias"] = jnp.asarray(rng.normal(size=V), jnp.float32)
    tokens = _tokens(11, (2, L), avoid=7)
    batch = enc_batch(tokens)
    out, state = model.apply({"params": params}, batch, deterministic=True,
                             capture_intermediates=True, mutable=["intermediates"])
    h = np.asarray(state["intermediates"]["mlm_norm"]["__call__"][0])
    table = np.asarray(params["embed"]["embedding"])
    ref = np.einsum("bld,vd->blv", h, table) + np.asarray(params["mlm_bias"])
    np.testing.assert_allclose(out["logits"], ref, rtol=1e-5, atol=1e-5)
    # token 7 is not in the input, so its embedding row only moves its own logit column
    row = jnp.asarray(rng.normal(size=CFG.d_model), jnp.float32)  # not constant: h is centred
    bumped = dict(params, embed={"embedding": params["embed"]["embedding"].at[7].add(row)})
    a, b = np.asarray(out["logits"]), run(model, bumped, batch)["logits"]
    others = np.arange(V) != 7
    np.testing.assert_allclose(b[..., others], a[..., others], **TOL)
    assert _changed(b[..., 7], a[..., 7])


# 6. encoder-decoder -------------------------------------------------------------------

def test_encoder_decoder_cross_attention_and_causality():
    model, params = model_and_params("encoder_decoder")
    inputs, targets = _tokens(12, (2, 10)), _tokens(13, (2, 8))
    base = run(model, params, ed_batch(inputs, targets))["logits"]
    last = inputs.copy()
    last[:, -1] = last[:, -1] % (V - 1) + 1
    assert _changed(run(model, params, ed_batch(last, targets))["logits"][:, 0], base[:, 0])
    future = targets.copy()
    future[:, 5:] = _tokens(14, (2, 3))
    after = run(model, params, ed_batch(inputs, future))["logits"]
    np.testing.assert_allclose(after[:, :5], base[:, :5], **TOL)
    assert _changed(after[:, 5:], base[:, 5:])


def test_encoder_decoder_packed_examples_are_isolated():
    model, params = model_and_params("encoder_decoder")
    iseg, tseg = np.array([[1] * 6 + [2] * 4]), np.array([[1] * 3 + [2] * 5])
    inputs, targets = _tokens(15, (1, 10)), _tokens(16, (1, 8))
    logits = lambda i, t: run(model, params, ed_batch(i, t, iseg, tseg))["logits"][0]
    base = logits(inputs, targets)
    second = inputs.copy()
    second[0, 6:] = _tokens(17, (4,))
    after = logits(second, targets)
    np.testing.assert_allclose(after[:3], base[:3], **TOL)
    assert _changed(after[3:], base[3:])
    first = inputs.copy()
    first[0, :6] = _tokens(18, (6,))
    after = logits(first, targets)
    assert _changed(after[:3], base[:3])
    np.testing.assert_allclose(after[3:], base[3:], **TOL)
    first_targets = targets.copy()
    first_targets[0, :3] = _tokens(19, (3,))
    np.testing.assert_allclose(logits(inputs, first_targets)[3:], base[3:], **TOL)
    # example 2 alone gives the logits it gets packed second
    alone = run(model, params, ed_batch(inputs[:, 6:], targets[:, 3:]))["logits"][0]
    np.testing.assert_allclose(alone, base[3:], rtol=1e-4, atol=1e-4)


def test_encode_only_then_encoded_equals_the_full_call():
    model, params = model_and_params("encoder_decoder")
    batch = ed_batch(_tokens(20, (2, 10)), _tokens(21, (2, 8)),
                     iseg=np.array([[1] * 10, [1] * 6 + [0] * 4]))
    full = run(model, params, batch)["logits"]
    encoded = run(model, params, batch, encode_only=True)["encoded"]
    again = run(model, params, batch, encoded=jnp.asarray(encoded))["logits"]
    np.testing.assert_allclose(again, full, **TOL)
    # the given encoding is really used instead of re-running the encoder
    other = run(model, params, batch, encoded=jnp.asarray(encoded[::-1]))["logits"]
    assert _changed(other, full)


# 7. greedy decoding -------------------------------------------------------------------

def naive_greedy(model, params, batch, length, bos_id):
    """Run the whole model on the prefix so far and append the argmax at its end."""
    rows = batch["inputs"].shape[0]
    out = np.full((rows, 1), bos_id, np.int32)
    for _ in range(length - 1):
        b = ed_batch(batch["inputs"], out, iseg=batch["inputs_segment_ids"])
        logits = run(model, params, b)["logits"]
        out = np.concatenate([out, np.argmax(logits[:, -1], -1)[:, None]], 1).astype(np.int32)
    return out


def test_greedy_decode_equals_the_naive_loop():
    # untied: a random tied model mostly copies its last token, whatever the inputs
    model, params = model_and_params("encoder_decoder", tie_embeddings=False)
    iseg = np.array([[1] * 10, [1] * 6 + [0] * 4, [1] * 3 + [0] * 7])
    inputs = np.where(iseg > 0, _tokens(22, (3, 10)), 0)
    batch = ed_batch(inputs, np.zeros((3, 1)), iseg=iseg)
    batch = {k: v for k, v in batch.items() if k.startswith("inputs")}
    got = np.asarray(greedy_decode(model, params, batch, 7, 1))
    want = naive_greedy(model, params, batch, 7, 1)
    assert got.shape == (3, 7) and (got[:, 0] == 1).all()
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(want[:, 1:])) > 2 and (want[0] != want[1]).any()  # inputs matter


# 8. shared building blocks ------------------------------------------------------------

def _shapes(tree):
    return jax.tree.map(lambda x: x.shape, tree)


def test_families_share_the_same_blocks():
    _, dec = model_and_params("decoder")
    _, enc = model_and_params("encoder")
    _, ltr = model_and_params("encoder", left_to_right=True)
    _, ed = model_and_params("encoder_decoder")
    block = _shapes(dec["decoder"]["layers"])
    assert {"attn_norm", "attn", "mlp_norm", "mlp"} == set(block)
    assert {"query", "key", "value", "out"} == set(block["attn"])
    assert {"wi", "wo"} == set(block["mlp"])
    assert _shapes(enc["encoder"]["layers"]) == block
    assert _shapes(ltr["encoder"]["layers"]) == block
    assert _shapes(ed["encoder"]["layers"]) == block
    cross = _shapes(ed["decoder"]["layers"])
    assert set(cross) == set(block) | {"cross_attn", "cross_norm"}
    assert {k: cross[k] for k in block} == block
    assert cross["cross_attn"] == block["attn"] and cross["cross_norm"] == block["attn_norm"]
    # one shared token embedding in the encoder-decoder
    assert [p for p in _paths(ed) if "embedding" in p and "pos" not in p] == [
        "['embed']['embedding']"]
