"""Real `python -m llm_jax.train` runs of the encoder and encoder-decoder families:
pretraining, then fine-tuning from the pretrained workdir (8 fake devices)."""
import json
import os
import subprocess
import sys

import pytest
from data_fixtures import data_cfg  # noqa: F401  (session fixture: the prepared corpus)

from llm_jax.data.corpora import gettext_translation

pytestmark = pytest.mark.slow


def train(config, workdir, data_dir, *overrides, timeout=300):
    cmd = [sys.executable, "-m", "llm_jax.train", f"--config=configs/{config}.py",
           f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
           "--config.train.progress=lines", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def records(workdir, split):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def pretrained(config, tmp_path_factory, data_dir):
    """Workdir of a finished run of configs/CONFIG.py."""
    workdir = tmp_path_factory.mktemp(config)
    r = train(config, workdir, data_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory, data_cfg):  # noqa: F811
    return pretrained("bert_tiny", tmp_path_factory, data_cfg.data_dir)


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory, data_cfg):  # noqa: F811
    return pretrained("t5_tiny", tmp_path_factory, data_cfg.data_dir)


def test_bert_learns_mlm_and_nsp_and_writes_the_same_outputs_as_the_decoder(bert_run):
    parts = {"mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy"}
    train_recs, eval_recs = records(bert_run, "train"), records(bert_run, "eval")
    assert all(parts | {"loss", "tokens_per_sec", "mfu"} <= set(r) for r in train_recs)
    assert all(parts | {"loss"} <= set(r) for r in eval_recs)
    assert train_recs[-1]["mlm_loss"] < train_recs[0]["mlm_loss"] - 0.5
    assert eval_recs[-1]["loss"] < eval_recs[0]["loss"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(bert_run / "tensorboard"))
    assert sorted(os.listdir(bert_run / "checkpoints")) == ["15", "30"]
    assert (bert_run / "tokenizer.model").is_file()


def test_t5_learns_span_corruption(t5_run):
    train_recs, eval_recs = records(t5_run, "train"), records(t5_run, "eval")
    assert train_recs[-1]["loss"] < train_recs[0]["loss"] - 0.5
    assert eval_recs[-1]["loss"] < eval_recs[0]["loss"]
    assert "bits_per_byte" not in eval_recs[-1]  # sentinels spell no text
    assert sorted(os.listdir(t5_run / "checkpoints")) == ["15", "30"]


def test_classification_fine_tunes_from_the_pretrained_encoder(bert_run, tmp_path, data_cfg):  # noqa: F811
    r = train("bert_tiny", tmp_path, data_cfg.data_dir, f"--config.train.init_from={bert_run}",
              "--config.task.objective=classification", "--config.data.name=code_pairs",
              "--config.data.text_feature=text_a", "--config.train.steps=10",
              "--config.train.eval_batches=4")
    assert r.returncode == 0, r.stderr[-3000:]
    report = [line for line in r.stdout.splitlines() if line.startswith("init_from")][0]
    assert "(step 30)" in report and "new: classifier/bias, classifier/kernel;" in report
    assert "not used: mlm_bias" in report and "nsp_head/kernel" in report
    assert {"loss", "accuracy"} <= set(records(tmp_path, "eval")[-1])


def test_init_from_with_other_shapes_stops_with_one_line(bert_run, tmp_path, data_cfg):  # noqa: F811
    r = train("bert_tiny", tmp_path, data_cfg.data_dir, f"--config.train.init_from={bert_run}",
              "--config.model.mlp_dim=128")
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.startswith("error")]
    assert len(lines) == 1 and "shapes disagree" in lines[0] and "mlp/wi/kernel" in lines[0]
    assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")


def test_init_from_with_other_layer_layout_stops_with_one_line(bert_run, tmp_path, data_cfg):  # noqa: F811
    """A stacked (scanned) checkpoint into an unrolled model would load no layer at all."""
    r = train("bert_tiny", tmp_path, data_cfg.data_dir, f"--config.train.init_from={bert_run}",
              "--config.model.scan_layers=false")
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.startswith("error")]
    assert len(lines) == 1 and "--config.model.scan_layers=true" in lines[0], r.stderr[-2000:]


def test_init_from_a_directory_without_a_run_stops_with_one_line(tmp_path, data_cfg):  # noqa: F811
    r = train("bert_tiny", tmp_path / "w", data_cfg.data_dir,
              f"--config.train.init_from={tmp_path / 'nothing'}")
    assert r.returncode == 2 and "init_from" in r.stderr and "tokenizer.model" in r.stderr


@pytest.mark.skipif(not any(os.path.isdir(os.path.join(d, "de", "LC_MESSAGES"))
                            for d in gettext_translation.locale_dirs()),
                    reason="no German gettext catalogs on this machine")
def test_translation_fine_tunes_and_reports_bleu(t5_run, tmp_path, data_cfg):  # noqa: F811
    r = train("t5_tiny", tmp_path, data_cfg.data_dir, f"--config.train.init_from={t5_run}",
              "--config.task.objective=seq2seq", "--config.data.name=gettext_translation/de",
              "--config.data.text_feature=source", "--config.train.steps=10",
              "--config.train.eval_batches=2", "--config.task.bleu_examples=16")
    assert r.returncode == 0, r.stderr[-3000:]
    final = records(tmp_path, "eval")[-1]
    assert final["step"] == 10 and 0 <= final["bleu"] <= 100
    assert "BLEU" in r.stdout
