"""Encoder and encoder-decoder families against independent truth: output shapes,
bidirectional vs causal attention, padding and packing isolation, the tied MLM head,
greedy decoding against a naive loop, and the building blocks all families share.

Speed (CPU): parameters are drawn with numpy from the shapes `jax.eval_shape` gives (no
compiled init), and every variant a test compares runs as a row of one padded batch, so
each model compiles about once.
"""
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

V, L, ROWS = 61, 12, 8  # vocab, encoder row length, rows of every batch run
LIN, LOUT = 10, 8  # encoder-decoder input and target lengths
CFG = ModelConfig(vocab_size=V, num_layers=2, d_model=32, num_heads=4, num_kv_heads=4,
                  head_dim=8, mlp_dim=64, max_len=16, dtype=jnp.float32,
                  heads=("mlm", "nsp", "cls"), num_classes=3)
TOL = dict(rtol=1e-5, atol=1e-5)


def _positions(segs):
    """Position within each packed segment (restarts where the segment id changes)."""
    segs = np.asarray(segs)
    pos = np.zeros_like(segs)
    for t in range(1, segs.shape[1]):
        pos[:, t] = np.where(segs[:, t] == segs[:, t - 1], pos[:, t - 1] + 1, 0)
    return pos.astype(np.int32)


def _ids(x, like=None):
    return np.ones_like(like) if x is None else np.asarray(x, np.int32)


def enc_batch(tokens, segs=None, types=None):
    tokens = np.asarray(tokens, np.int32)
    segs = _ids(segs, tokens)
    types = np.zeros_like(tokens) if types is None else np.asarray(types, np.int32)
    return {"tokens": tokens, "segment_ids": segs, "positions": _positions(segs),
            "token_types": types}


def ed_batch(inputs, targets, iseg=None, tseg=None):
    inputs, targets = np.asarray(inputs, np.int32), np.asarray(targets, np.int32)
    iseg, tseg = _ids(iseg, inputs), _ids(tseg, targets)
    return {"inputs": inputs, "inputs_segment_ids": iseg, "inputs_positions": _positions(iseg),
            "targets": targets, "targets_segment_ids": tseg,
            "targets_positions": _positions(tseg)}


def dec_batch(tokens):
    tokens = np.asarray(tokens, np.int32)
    segs = np.ones_like(tokens)
    return {"tokens": tokens, "segment_ids": segs, "positions": _positions(segs)}


EXAMPLE = {"decoder": lambda: dec_batch(np.zeros((1, L))),
           "encoder": lambda: enc_batch(np.zeros((1, L))),
           "encoder_decoder": lambda: ed_batch(np.zeros((1, LIN)), np.zeros((1, LOUT)))}


def stack(*batches):
    """Batches with the same features, as the rows of one batch."""
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def random_params(shapes, seed=0):
    """Norm scales near 1, every other parameter (biases too) N(0, 0.1²)."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        noise = rng.standard_normal(s.shape).astype(np.float32)
        return 1 + 0.1 * noise if jax.tree_util.keystr(path).endswith("['scale']") else 0.1 * noise

    return jax.tree_util.tree_map_with_path(draw, shapes)


def param_shapes(family, **overrides):
    cfg = dataclasses.replace(CFG, **overrides)
    model = build(cfg, family)
    boxed = jax.eval_shape(model.init, jax.random.key(0), EXAMPLE[family]())["params"]
    return model, nn.meta.unbox(boxed)


@functools.lru_cache(maxsize=None)
def model_and_params(family, **overrides):
    model, shapes = param_shapes(family, **overrides)
    return model, random_params(shapes)


@functools.lru_cache(maxsize=None)
def _compiled(model, encode_only):
    return jax.jit(lambda p, b, e: model.apply({"params": p}, b, deterministic=True,
                                               encoded=e, encode_only=encode_only))


@functools.lru_cache(maxsize=None)
def _compiled_plain(model):
    return jax.jit(lambda p, b: model.apply({"params": p}, b, deterministic=True))


def run(model, params, batch, encoded=None, encode_only=False):
    """Outputs as numpy. Rows are padded to ROWS (copies of row 0) so that one compiled
    function serves every call with the same lengths; rows never interact."""
    n = len(next(iter(batch.values())))
    assert n <= ROWS
    fill = lambda a: np.concatenate([a, np.repeat(a[:1], ROWS - n, 0)])  # noqa: E731
    batch = {k: fill(np.asarray(v)) for k, v in batch.items()}
    if "inputs" in batch:
        enc = None if encoded is None else fill(np.asarray(encoded))
        out = _compiled(model, encode_only)(params, batch, enc)
    else:
        out = _compiled_plain(model)(params, batch)
    return {k: np.asarray(v)[:n] for k, v in out.items()}


def tokens(seed, shape, avoid=None):
    t = np.random.default_rng(seed).integers(1, V, shape).astype(np.int32)
    if avoid is not None:
        t[t == avoid] = avoid + 1
    return t


def bump(t):
    """A different token id."""
    return t % (V - 1) + 1


def changed(a, b):
    return np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4


# 1. shapes -------------------------------------------------------------------------

@pytest.mark.parametrize("heads,ltr", [(("mlm",), False), (("nsp",), False), (("cls",), False),
                                       (("mlm", "nsp"), False), (("mlm", "nsp", "cls"), False),
                                       (("mlm", "cls"), True), (("nsp",), True)])
def test_encoder_output_shapes(heads, ltr):
    model, shapes = param_shapes("encoder", heads=heads, left_to_right=ltr)
    segs = np.array([[1] * L, [1] * 7 + [0] * 5, [1] * 3 + [0] * 9])
    out = jax.eval_shape(lambda p, b: model.apply({"params": p}, b), shapes,
                         enc_batch(tokens(0, (3, L)), segs))
    want = {"mlm": ("logits", (3, L, V)), "nsp": ("nsp_logits", (3, 2)),
            "cls": ("cls_logits", (3, CFG.num_classes))}
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
        want[h][0]: (want[h][1], jnp.float32) for h in heads}


def test_decoder_and_encoder_decoder_output_shapes():
    model, shapes = param_shapes("decoder")
    out = jax.eval_shape(lambda p, b: model.apply({"params": p}, b), shapes,
                         dec_batch(tokens(0, (2, L))))
    assert {k: v.shape for k, v in out.items()} == {"logits": (2, L, V)}
    model, params = model_and_params("encoder_decoder")
    batch = ed_batch(tokens(1, (2, LIN)), tokens(2, (2, LOUT)))
    out = run(model, params, batch)
    assert {k: v.shape for k, v in out.items()} == {"logits": (2, LOUT, V)}
    assert out["logits"].dtype == np.float32 and np.isfinite(out["logits"]).all()
    enc = run(model, params, batch, encode_only=True)
    assert {k: v.shape for k, v in enc.items()} == {"encoded": (2, LIN, CFG.d_model)}
    short = ed_batch(tokens(1, (2, LIN)), tokens(2, (2, 3)))  # decoder length is free
    out = jax.eval_shape(lambda p, b: model.apply({"params": p}, b), params, short)
    assert {k: v.shape for k, v in out.items()} == {"logits": (2, 3, V)}


@pytest.mark.parametrize("family,objective,ltr", [
    ("decoder", "next_token", False), ("encoder", "mlm", False),
    ("encoder", "classification", False), ("encoder", "next_token", True),
    ("encoder_decoder", "seq2seq", False), ("encoder_decoder", "span_corruption", False)])
def test_objective_batches_fit_the_family(family, objective, ltr):
    """dummy_batch's features go through the family's model with the objective's heads,
    and every part of the objective scores one item per weight."""
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
    parts = jax.jit(lambda p, b: obj.parts(model.apply({"params": p}, b, **obj.model_kwargs),
                                           b, jnp.float32))(params, batch)
    assert set(parts) == {"mlm": {"mlm", "nsp"}, "classification": {"cls"}}.get(
        objective, {"lm"})
    weights = obj.weights(batch)
    for name, (loss, hit, weight) in parts.items():
        want = (2,) if name in ("nsp", "cls") else (2, 6 if family == "encoder_decoder" else 10)
        assert weights[name].shape == want, name
        assert float(weight) == float(jnp.sum(weights[name])), name
        assert 0 <= float(hit) <= float(weight) and (float(loss) > 0) == (float(weight) > 0)


# 2. bidirectional encoder vs the left-to-right ablation --------------------------

@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("ltr", [False, True])
def test_encoder_attends_both_ways_unless_left_to_right(scan, ltr):
    model, params = model_and_params("encoder", scan_layers=scan, left_to_right=ltr)
    base = tokens(3, (2, L))
    later, earlier = base.copy(), base.copy()
    later[:, 9], earlier[:, 2] = bump(later[:, 9]), bump(earlier[:, 2])
    out = run(model, params, enc_batch(np.concatenate([base, later, earlier])))
    b, a, e = ({k: v[i:i + 2] for k, v in out.items()} for i in (0, 2, 4))
    assert changed(a["logits"][:, 9:], b["logits"][:, 9:])
    assert changed(e["logits"][:, 9], b["logits"][:, 9])  # the past is seen either way
    if ltr:  # nothing before position 9 may see it
        np.testing.assert_allclose(a["logits"][:, :9], b["logits"][:, :9], **TOL)
    else:  # every earlier position sees it
        for t in range(9):
            assert changed(a["logits"][:, t], b["logits"][:, t]), t
    # the pooled token sees the whole row: [CLS] bidirectionally, the last token causally
    assert changed(a["nsp_logits"], b["nsp_logits"])
    assert changed(a["cls_logits"], b["cls_logits"])


# 3. padding and packed segments ----------------------------------------------------

@pytest.mark.parametrize("ltr", [False, True])
def test_encoder_padding_is_invisible(ltr):
    model, params = model_and_params("encoder", left_to_right=ltr)
    n = 7
    base = tokens(4, (2, L))
    segs = np.array([[1] * n + [0] * (L - n)] * 2)
    types = np.array([[0] * 4 + [1] * (L - 4)] * 2)
    pad, last = base.copy(), base.copy()
    pad[:, n:] = tokens(5, (2, L - n))
    last[:, n - 1] = bump(last[:, n - 1])
    rows = [enc_batch(t, segs, types) for t in (base, pad, last)]
    out = run(model, params, stack(*rows))
    b, p, s = ({k: v[i:i + 2] for k, v in out.items()} for i in (0, 2, 4))
    np.testing.assert_allclose(p["logits"][:, :n], b["logits"][:, :n], **TOL)
    for k in ("nsp_logits", "cls_logits"):
        np.testing.assert_allclose(p[k], b[k], **TOL)
        assert changed(s[k], b[k])  # the last real token does matter to the pooled output
    # a padded row gives what the same row without padding gives
    alone = run(model, params, enc_batch(base[:, :n], segs[:, :n], types[:, :n]))
    for k in ("logits", "nsp_logits", "cls_logits"):
        np.testing.assert_allclose(b[k][:, :n] if k == "logits" else b[k], alone[k],
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ltr", [False, True])
def test_pooled_heads_read_the_first_or_last_real_token(ltr):
    """nsp/cls logits = dense(tanh(dense(x_pool))) with x the final hidden states and
    x_pool the first token, or the last real token of the left-to-right ablation."""
    model, params = model_and_params("encoder", left_to_right=ltr)
    lengths = np.array([L, 7, 3])
    segs = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
    batch = enc_batch(tokens(23, (3, L)), segs)
    apply = jax.jit(lambda p, b: model.apply({"params": p}, b, capture_intermediates=True,
                                             mutable=["intermediates"]))
    out, state = apply(params, batch)
    x = np.asarray(state["intermediates"]["final_norm"]["__call__"][0])
    at = lengths - 1 if ltr else np.zeros(3, int)
    dense = lambda h, name: h @ params[name]["kernel"] + params[name]["bias"]  # noqa: E731
    pooled = np.tanh(dense(x[np.arange(3), at], "pooler"))
    np.testing.assert_allclose(out["nsp_logits"], dense(pooled, "nsp_head"), **TOL)
    np.testing.assert_allclose(out["cls_logits"], dense(pooled, "classifier"), **TOL)


def test_encoder_packed_segments_are_isolated():
    model, params = model_and_params("encoder")
    base = tokens(6, (1, L))
    segs = np.array([[1] * 5 + [2] * 7])
    second, first = base.copy(), base.copy()
    second[0, 5:], first[0, :5] = tokens(7, (7,)), tokens(8, (5,))
    b, s, f = run(model, params, enc_batch(np.concatenate([base, second, first]),
                                           np.repeat(segs, 3, 0)))["logits"]
    np.testing.assert_allclose(s[:5], b[:5], **TOL)
    assert changed(s[5:], b[5:])
    np.testing.assert_allclose(f[5:], b[5:], **TOL)
    assert changed(f[:5], b[:5])
    # the segment packed second gives what it gives alone (positions restart)
    alone = run(model, params, enc_batch(base[:, 5:]))["logits"]
    np.testing.assert_allclose(alone[0], b[5:], rtol=1e-4, atol=1e-4)


# 4. token types ---------------------------------------------------------------------

def test_token_types_change_the_outputs():
    model, params = model_and_params("encoder")
    assert params["type_embed"]["embedding"].shape == (CFG.type_vocab_size, CFG.d_model)
    row = tokens(9, (1, L))
    types = np.zeros((2, L), np.int32)
    types[1, 6:] = 1
    out = run(model, params, enc_batch(np.repeat(row, 2, 0), types=types))
    for k in ("logits", "nsp_logits", "cls_logits"):
        assert changed(out[k][0], out[k][1]), k
    assert changed(out["logits"][0, 8], out["logits"][1, 8])


# 5. the tied MLM head ---------------------------------------------------------------

def _paths(params):
    return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}


def test_mlm_head_is_tied_to_the_input_embedding():
    model, params = model_and_params("encoder")
    assert not any("lm_head" in p for p in _paths(params))
    untied = param_shapes("encoder", tie_embeddings=False)[1]
    assert any("lm_head" in p for p in _paths(untied))  # so the check above can fail
    batch = enc_batch(tokens(11, (2, L), avoid=7))
    # logits = (transformed hidden) · embeddingᵀ + bias, with the hidden state captured
    apply = jax.jit(lambda p, b: model.apply({"params": p}, b, capture_intermediates=True,
                                             mutable=["intermediates"]))
    out, state = apply(params, batch)
    h = np.asarray(state["intermediates"]["mlm_norm"]["__call__"][0])
    table = np.asarray(params["embed"]["embedding"])
    ref = np.einsum("bld,vd->blv", h, table) + params["mlm_bias"]
    np.testing.assert_allclose(out["logits"], ref, rtol=1e-5, atol=1e-5)
    # token 7 is not in the input, so its embedding row moves only its own logit column
    row = np.random.default_rng(10).normal(size=CFG.d_model)  # not constant: h is centred
    bumped = dict(params, embed={"embedding": table + np.eye(V, dtype=np.float32)[:, 7:8]
                                 * row.astype(np.float32)})
    a, b = np.asarray(out["logits"]), run(model, bumped, batch)["logits"]
    others = np.arange(V) != 7
    np.testing.assert_allclose(b[..., others], a[..., others], **TOL)
    assert changed(b[..., 7], a[..., 7])


# 6. encoder-decoder -----------------------------------------------------------------

def test_encoder_decoder_cross_attention_and_causality():
    model, params = model_and_params("encoder_decoder")
    inputs, targets = tokens(12, (2, LIN)), tokens(13, (2, LOUT))
    last, future = inputs.copy(), targets.copy()
    last[:, -1] = bump(last[:, -1])
    future[:, 5:] = tokens(14, (2, LOUT - 5))
    rows = stack(ed_batch(inputs, targets), ed_batch(last, targets), ed_batch(inputs, future))
    logits = run(model, params, rows)["logits"]
    b, a, f = logits[:2], logits[2:4], logits[4:]
    assert changed(a[:, 0], b[:, 0])  # target 0 sees the last input token
    np.testing.assert_allclose(f[:, :5], b[:, :5], **TOL)
    assert changed(f[:, 5:], b[:, 5:])


def test_encoder_decoder_packed_examples_are_isolated():
    """Example 1 is segment 1 on both sides, example 2 segment 2."""
    model, params = model_and_params("encoder_decoder")
    iseg = np.array([[1] * 6 + [2] * 4])
    tseg = np.array([[1] * 3 + [2] * 5])
    inputs, targets = tokens(15, (1, LIN)), tokens(16, (1, LOUT))
    second, first, first_t = inputs.copy(), inputs.copy(), targets.copy()
    second[0, 6:], first[0, :6] = tokens(17, (4,)), tokens(18, (6,))
    first_t[0, :3] = tokens(19, (3,))
    rows = [ed_batch(i, t, iseg, tseg)
            for i, t in ((inputs, targets), (second, targets), (first, targets),
                         (inputs, first_t))]
    # example 2 alone, at the start of a padded row
    pad = lambda x, n: np.pad(x, ((0, 0), (0, n - x.shape[1])))  # noqa: E731
    rows.append(ed_batch(pad(inputs[:, 6:], LIN), pad(targets[:, 3:], LOUT),
                         pad(iseg[:, 6:] * 0 + 1, LIN), pad(tseg[:, 3:] * 0 + 1, LOUT)))
    b, s, f, ft, alone = run(model, params, stack(*rows))["logits"]
    np.testing.assert_allclose(s[:3], b[:3], **TOL)  # example 2's inputs: not seen by 1
    assert changed(s[3:], b[3:])
    assert changed(f[:3], b[:3])  # example 1's inputs: seen by 1 only
    np.testing.assert_allclose(f[3:], b[3:], **TOL)
    np.testing.assert_allclose(ft[3:], b[3:], **TOL)  # example 1's targets: not seen by 2
    np.testing.assert_allclose(alone[:5], b[3:], rtol=1e-4, atol=1e-4)


def test_encode_only_then_encoded_equals_the_full_call():
    model, params = model_and_params("encoder_decoder")
    batch = ed_batch(tokens(20, (2, LIN)), tokens(21, (2, LOUT)),
                     iseg=np.array([[1] * LIN, [1] * 6 + [0] * (LIN - 6)]))
    full = run(model, params, batch)["logits"]
    encoded = run(model, params, batch, encode_only=True)["encoded"]
    again = run(model, params, batch, encoded=encoded)["logits"]
    np.testing.assert_allclose(again, full, **TOL)
    # the given encoding is really what the decoder uses
    other = run(model, params, batch, encoded=encoded + 1.0)["logits"]
    assert changed(other, full)


# 7. greedy decoding -----------------------------------------------------------------

def naive_greedy(model, params, inputs, iseg, length, bos_id):
    """Run the whole model on the prefix written so far; append the argmax at its end."""
    out = np.full((len(inputs), 1), bos_id, np.int32)
    for _ in range(length - 1):
        logits = run(model, params, ed_batch(inputs, out, iseg))["logits"]
        out = np.concatenate([out, np.argmax(logits[:, -1], -1)[:, None]], 1)
    return out.astype(np.int32)


def test_greedy_decode_equals_the_naive_loop():
    # untied: a random tied model mostly copies its last token, whatever the inputs
    model, params = model_and_params("encoder_decoder", tie_embeddings=False)
    iseg = np.array([[1] * LIN, [1] * 6 + [0] * (LIN - 6), [1] * 3 + [0] * (LIN - 3)])
    inputs = np.where(iseg > 0, tokens(22, (3, LIN)), 0)
    batch = {k: v for k, v in ed_batch(inputs, inputs, iseg).items() if k.startswith("in")}
    got = np.asarray(greedy_decode(model, params, batch, 6, 1))
    want = naive_greedy(model, params, inputs, iseg, 6, 1)
    assert got.shape == (3, 6) and (got[:, 0] == 1).all()
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(want[:, 1:])) > 2 and (want[0] != want[1]).any()  # inputs matter


# 8. shared building blocks ----------------------------------------------------------

def _shapes(tree):
    return jax.tree.map(lambda x: x.shape, tree)


def test_families_share_the_same_blocks():
    dec = param_shapes("decoder")[1]
    enc = param_shapes("encoder")[1]
    ltr = param_shapes("encoder", left_to_right=True)[1]
    ed = param_shapes("encoder_decoder")[1]
    block = _shapes(dec["decoder"]["layers"])
    assert set(block) == {"attn_norm", "attn", "mlp_norm", "mlp"}
    assert set(block["attn"]) == {"query", "key", "value", "out"}
    assert set(block["mlp"]) == {"wi", "wo"}
    assert _shapes(enc["encoder"]["layers"]) == block
    assert _shapes(ltr["encoder"]["layers"]) == block
    assert _shapes(ed["encoder"]["layers"]) == block
    cross = _shapes(ed["decoder"]["layers"])
    assert set(cross) == set(block) | {"cross_attn", "cross_norm"}
    assert {k: cross[k] for k in block} == block
    assert cross["cross_attn"] == block["attn"] and cross["cross_norm"] == block["attn_norm"]
    # one token embedding, shared by both sides of the encoder-decoder
    assert sorted(p for p in _paths(ed) if "embedding" in p) == [
        "['dec_pos_embed']['embedding']", "['embed']['embedding']",
        "['enc_pos_embed']['embedding']"]
