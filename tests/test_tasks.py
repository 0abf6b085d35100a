"""The encoder and encoder-decoder input pipelines on the real corpus."""
import numpy as np
import pytest
from data_fixtures import data_cfg, tok  # noqa: F401  (session fixtures)

from llm_jax.config import base_config
from llm_jax.data import tasks


def config(data_cfg, family, objective, **data):  # noqa: F811
    c = base_config()
    c.data.update(data_cfg.to_dict())
    c.data.update(data)
    c.model.family, c.task.objective = family, objective
    c.train.batch_size, c.train.seed = 8, 3
    return c


def take(it, n):
    return [next(it) for _ in range(n)]


def test_mlm_batches_are_reproducible_and_resume_exactly(data_cfg, tok):  # noqa: F811
    c = config(data_cfg, "encoder", "mlm", seq_len=64, prefetch=0)
    first = take(tasks.train_iterator(c, tok, process_index=0, process_count=1), 6)
    again = tasks.train_iterator(c, tok, process_index=0, process_count=1)
    for a, b in zip(first[:3], take(again, 3)):  # same seed: the same masks
        assert all(np.array_equal(a[k], b[k]) for k in a)
    state = again.get_state()
    resumed = tasks.train_iterator(c, tok, process_index=0, process_count=1)
    resumed.set_state(state)
    for a, b in zip(first[3:], take(resumed, 3)):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    c.train.seed = 4
    other = take(tasks.train_iterator(c, tok, process_index=0, process_count=1), 1)[0]
    assert not np.array_equal(other["tokens"], first[0]["tokens"])


def test_mlm_eval_rows_hold_balanced_nsp_pairs_and_15_percent_masks(data_cfg, tok):  # noqa
    c = config(data_cfg, "encoder", "mlm", seq_len=128)
    batches = tasks.eval_batches(c, tok, process_index=0, process_count=1)
    rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    real = rows["segment_ids"][:, 0] == 1
    assert (~real).sum() < c.train.batch_size  # only the last batch's filler is padding
    labels = rows["nsp_label"][real]
    n = len(labels)
    assert abs(labels.mean() - 0.5) < 4 * (0.25 / n) ** 0.5, labels.mean()
    tokens = rows["tokens"][real]
    assert (tokens[:, 0] == tok.cls_id).all()
    candidates = (rows["segment_ids"][real] == 1).sum() - 3 * n  # minus [CLS] [SEP] [SEP]
    assert abs(rows["mlm_weights"][real].sum() / candidates - 0.15) < 0.005
    chosen = rows["mlm_weights"][real] == 1
    assert abs((tokens[chosen] == tok.mask_id).mean() - 0.8) < 0.02


def test_span_corruption_rows_pack_both_sides_in_step(data_cfg, tok):  # noqa: F811
    c = config(data_cfg, "encoder_decoder", "span_corruption", seq_len=64, target_seq_len=24,
               prefetch=0)
    batch = take(tasks.train_iterator(c, tok, process_index=0, process_count=1), 1)[0]
    assert batch["inputs"].shape == (8, 64) and batch["targets"].shape == (8, 24)
    sentinels = set(tok.sentinel_ids)
    for r in range(8):
        for k in set(batch["inputs_segment_ids"][r]) - {0}:
            inp = batch["inputs"][r][batch["inputs_segment_ids"][r] == k]
            tgt = batch["targets"][r][batch["targets_segment_ids"][r] == k]
            assert tgt[0] == tok.bos_id and tgt[-1] == tok.eos_id and inp[-1] == tok.eos_id
            # example k's sentinels, in order, on both sides
            assert [t for t in inp if t in sentinels] == [t for t in tgt if t in sentinels]


@pytest.mark.parametrize("family,objective", [("encoder", "classification"),
                                              ("encoder_decoder", "seq2seq")])
def test_eval_batches_cover_each_record_once(data_cfg, tok, family, objective):  # noqa: F811
    name = "code_pairs" if objective == "classification" else "gettext_translation/de"
    feature = "text_a" if objective == "classification" else "source"
    c = config(data_cfg, family, objective, name=name, text_feature=feature, seq_len=64)
    from llm_jax.data import sources
    try:
        n = len(sources.load_source(c.data, "validation"))
    except sources.DataError as e:
        pytest.skip(str(e))
    batches = tasks.eval_batches(c, tok, process_index=0, process_count=1)
    seg = "segment_ids" if family == "encoder" else "targets_segment_ids"
    segments = sum(int(len(set(row) - {0})) for b in batches for row in b[seg])
    assert segments == n
    halves = [tasks.eval_batches(c, tok, process_index=p, process_count=2) for p in (0, 1)]
    assert all(len(h) == len(batches) for h in halves)  # every process: the same count
