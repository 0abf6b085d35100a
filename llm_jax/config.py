"""The full config schema with defaults, and its validation.

Every experiment file in configs/ starts from `base_config()` and overrides what it
needs, so every key exists everywhere and `--config.a.b=v` can always be checked.
"""
from __future__ import annotations

import difflib
import json
import os
from typing import Any

import ml_collections

from llm_jax import files
from llm_jax.data.spans import NUM_SENTINELS, noise_spans, raw_length

# What each model family can be trained on (objectives.py implements them).
FAMILY_OBJECTIVES = {
    "decoder": ("next_token",),
    "encoder": ("mlm", "classification", "next_token"),  # next_token: left-to-right ablation
    "encoder_decoder": ("span_corruption", "seq2seq"),
}

# Logical axis name -> mesh axes. One table; changing the parallelism is a config edit.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
)


class ConfigError(ValueError):
    """A user error in the config: reported in one line, exit code 2."""


def base_config() -> ml_collections.ConfigDict:
    """Every key the trainer reads, with defaults for a small CPU run."""
    c = ml_collections.ConfigDict()

    c.model = m = ml_collections.ConfigDict()
    m.family = "decoder"  # decoder (GPT/LLaMA) | encoder (BERT) | encoder_decoder (T5)
    m.num_layers = 4
    m.d_model = 256
    m.num_heads = 4
    m.num_kv_heads = 0  # 0: same as num_heads (multi-head); fewer: grouped-query attention
    m.head_dim = 0  # 0: d_model // num_heads
    m.mlp_dim = 1024
    m.activation = "gelu"  # gelu | swiglu | relu
    m.norm = "layernorm"  # layernorm | rmsnorm
    m.positions = "learned"  # learned | rope
    m.rope_theta = 10000.0
    m.max_len = 0  # learned positions table size; 0: the longest row (seq_len, target_seq_len)
    m.dropout = 0.0
    m.tie_embeddings = True
    m.use_bias = False
    m.dtype = "bfloat16"  # compute dtype
    m.param_dtype = "float32"
    m.scan_layers = True
    m.remat = "none"  # none | full | dots | dots_no_batch | dots_attention
    m.qkv_conv = 0  # >0: causal depthwise conv of this width on q, k, v (Primer); 0: off
    m.attention_impl = "auto"  # auto | xla | cudnn  (cudnn: flash attention on NVIDIA GPUs)
    # | cudnn_packed (decoder, experimental): cuDNN's packed-sequence attention on Hopper or
    # later, which skips the pairs across documents instead of masking them; needs
    # data.max_segments_per_row; elsewhere it runs as auto (README, Performance)
    # decoder: False attends across the documents packed in a row, at row positions 0..T-1
    # (GPT-2 style); cuDNN then runs plain causal attention, no [t, t] mask (README)
    m.document_mask = True
    m.num_decoder_layers = 0  # encoder_decoder: decoder depth; 0: num_layers
    m.left_to_right = False  # encoder: causal attention (BERT's left-to-right ablation)
    m.num_classes = 2  # encoder: classes of the classification head

    c.data = d = ml_collections.ConfigDict()
    d.name = "stdlib_source"
    d.data_dir = "./data"
    d.text_feature = "text"
    d.train_split = "train"
    d.eval_split = "validation"
    d.seq_len = 256  # rows of tokens; the encoder side for encoder_decoder
    d.target_seq_len = 0  # encoder_decoder: decoder side length; 0: seq_len
    d.vocab_size = 8192
    d.tokenizer_path = ""  # empty: train on the train split on first use and cache
    d.tokenizer_train_bytes = 8_000_000
    d.tokenizer_pieces = "spans"  # spans: pieces may cross spaces ("):\n    ") | words
    d.worker_threads = 2
    d.prefetch = 2
    d.max_segments_per_row = 0  # decoder: pack at most this many documents per row; 0: any

    c.task = k = ml_collections.ConfigDict()
    k.objective = "next_token"  # next_token | mlm | classification | span_corruption | seq2seq
    k.nsp = True  # mlm: B follows A in half the pairs, and an NSP head learns which
    k.mlm_prob = 0.15  # mlm: share of non-special tokens chosen (80% [MASK], 10% random)
    k.whole_word = False  # mlm: choose whole words (pieces glued by letters/digits/_)
    k.noise_density = 0.15  # span_corruption: share of tokens dropped into spans
    k.mean_span_length = 3.0  # span_corruption
    k.inputs_feature = "source"  # seq2seq: the dataset features read as input and output
    k.targets_feature = "target"
    k.text_a_feature = "text_a"  # classification: the sentence pair and its label
    k.text_b_feature = "text_b"
    k.label_feature = "label"
    k.bleu_examples = 0  # seq2seq: greedy-decode this many eval examples for BLEU; 0: off

    c.train = t = ml_collections.ConfigDict()
    t.steps = 1000
    t.batch_size = 32  # global, in sequences
    t.microbatches = 1  # gradient accumulation: batch_size is split into this many parts
    t.seed = 0
    t.log_every = 50
    t.eval_every = 500
    t.eval_batches = 0  # batches per periodic eval; 0: whole split. The final eval is whole.
    t.checkpoint_every = 500
    t.max_to_keep = 3
    t.keep_every = 0  # also keep every K-th step's checkpoint (milestones); 0: off
    t.on_nonfinite = "stop"  # stop | skip
    t.peak_flops = 0.0  # FLOP/s of the host for MFU on CPU; 0: measure (start, evals)
    t.progress = "auto"  # auto (bar on a terminal) | bar | lines
    t.compilation_cache_dir = "~/.cache/llm_jax/xla"  # persistent XLA cache; "": off
    t.init_from = ""  # a pretrained run's workdir: start from its matching parameters

    c.optim = o = ml_collections.ConfigDict()
    o.learning_rate = 1e-3
    o.warmup_steps = 100
    o.schedule = "cosine"  # cosine | linear | rsqrt | constant
    o.end_lr_ratio = 0.1  # final lr as a fraction of the peak (cosine, linear)
    o.b1 = 0.9
    o.b2 = 0.95
    o.eps = 1e-8
    o.weight_decay = 0.1
    o.grad_clip = 1.0  # global-norm clipping; 0: off

    c.mesh = s = ml_collections.ConfigDict()
    s.data = -1  # -1: all remaining devices
    s.fsdp = 1
    s.tensor = 1
    s.rules = DEFAULT_RULES
    return c


CHOICES = {
    "model.family": ("decoder", "encoder", "encoder_decoder"),
    "task.objective": ("next_token", "mlm", "classification", "span_corruption", "seq2seq"),
    "data.tokenizer_pieces": ("spans", "words"),
    "model.activation": ("gelu", "swiglu", "relu"),
    "model.norm": ("layernorm", "rmsnorm"),
    "model.positions": ("learned", "rope"),
    "model.dtype": ("bfloat16", "float32", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "dots", "dots_no_batch", "dots_attention"),
    "model.attention_impl": ("auto", "xla", "cudnn", "cudnn_packed"),
    "train.on_nonfinite": ("stop", "skip"),
    "train.progress": ("auto", "bar", "lines"),
    "optim.schedule": ("cosine", "linear", "rsqrt", "constant"),
}
POSITIVE = (
    "model.num_layers", "model.d_model", "model.num_heads", "model.mlp_dim",
    "data.seq_len", "data.vocab_size", "data.tokenizer_train_bytes", "data.prefetch",
    "train.steps", "train.batch_size", "train.microbatches", "train.log_every",
    "train.eval_every", "train.checkpoint_every", "train.max_to_keep", "model.num_classes",
)
NON_NEGATIVE = (
    "model.num_kv_heads", "model.head_dim", "model.num_decoder_layers", "data.target_seq_len",
    "task.bleu_examples", "model.qkv_conv", "model.max_len", "model.dropout",
    "data.worker_threads", "data.max_segments_per_row", "train.eval_batches", "train.keep_every",
    "train.peak_flops",
    "optim.learning_rate", "optim.warmup_steps", "optim.end_lr_ratio", "optim.weight_decay",
    "optim.grad_clip", "optim.eps",
)


def load_file(path: str) -> ml_collections.ConfigDict:
    """get_config() of a config file, e.g. for a fine-tuning config that starts from its
    pretraining config (so the model matches by construction)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All leaf keys as dotted paths, e.g. 'train.steps'."""
    keys = []
    for k, v in config.items():
        path = f"{prefix}{k}"
        if isinstance(v, ml_collections.ConfigDict):
            keys += flat_keys(v, path + ".")
        else:
            keys.append(path)
    return keys


def closest_keys(key: str, config: ml_collections.ConfigDict) -> str:
    """A hint listing the valid keys closest to a mistyped one."""
    keys = flat_keys(config)
    near = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
    if not near:  # fall back to keys sharing the last component or the section
        last = key.split(".")[-1]
        near = difflib.get_close_matches(last, keys, n=3, cutoff=0.3) or keys[:3]
    return ", ".join(near)


def get(config: ml_collections.ConfigDict, key: str) -> Any:
    """The value at a dotted key, e.g. get(c, 'train.steps')."""
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks values a user can get wrong; raises ConfigError with one line."""
    for key, allowed in CHOICES.items():
        if get(config, key) not in allowed:
            raise ConfigError(f"config.{key}={get(config, key)!r} is not one of {allowed}")
    for key in POSITIVE:
        if not get(config, key) > 0:
            raise ConfigError(f"config.{key}={get(config, key)!r} must be > 0")
    for key in NON_NEGATIVE:
        if not get(config, key) >= 0:
            raise ConfigError(f"config.{key}={get(config, key)!r} must be >= 0")
    m, t, k = config.model, config.train, config.task
    allowed = FAMILY_OBJECTIVES[m.family]
    if k.objective not in allowed:
        raise ConfigError(f"config.task.objective={k.objective!r} does not train model.family="
                          f"{m.family!r}; use one of {allowed}")
    if m.family == "encoder" and k.objective == "next_token" and not m.left_to_right:
        raise ConfigError("config.task.objective='next_token' on the encoder needs "
                          "model.left_to_right=True (causal attention)")
    if not m.document_mask and m.family != "decoder":
        raise ConfigError(f"config.model.document_mask=False applies to decoders only, not "
                          f"model.family={m.family!r}; leave it True")
    if m.attention_impl == "cudnn_packed" and not (
            m.family == "decoder" and m.document_mask and config.data.max_segments_per_row):
        raise ConfigError(
            f"config.model.attention_impl='cudnn_packed' needs model.family='decoder' (now "
            f"{m.family!r}), model.document_mask=True (now {m.document_mask}) and "
            f"data.max_segments_per_row > 0 (now {config.data.max_segments_per_row}), e.g. 16: "
            "cuDNN takes a fixed number of documents per row")
    if k.objective == "mlm" and m.left_to_right:
        raise ConfigError("config.task.objective='mlm' needs model.left_to_right=False: a "
                          "causal encoder cannot see the context after a masked token")
    for key in ("task.mlm_prob", "task.noise_density"):
        if not 0 < get(config, key) < 1:
            raise ConfigError(f"config.{key}={get(config, key)!r} must be in (0, 1)")
    if k.mean_span_length < 1:
        raise ConfigError(f"config.task.mean_span_length={k.mean_span_length} must be >= 1")
    target = config.data.target_seq_len
    if m.family == "encoder_decoder" and 0 < target < 3:
        raise ConfigError(f"config.data.target_seq_len={target} must be 0 or >= 3 (bos, a "
                          "token, eos)")
    if m.family == "encoder" and config.data.seq_len < 5:
        raise ConfigError(f"config.data.seq_len={config.data.seq_len} must be >= 5 for "
                          "[CLS] A [SEP] B [SEP]")
    if k.objective == "span_corruption":
        n = raw_length(config.data.seq_len, (target or config.data.seq_len) - 1,
                       k.noise_density, k.mean_span_length)
        if noise_spans(n, k.noise_density, k.mean_span_length) > NUM_SENTINELS:
            raise ConfigError(
                f"config.data.seq_len={config.data.seq_len} with task.noise_density="
                f"{k.noise_density} and task.mean_span_length={k.mean_span_length} makes "
                f"more noise spans than the {NUM_SENTINELS} sentinels; shorten the rows or "
                "lengthen the spans")
    if m.d_model % m.num_heads and not m.head_dim:
        raise ConfigError(
            f"config.model.d_model={m.d_model} is not divisible by model.num_heads="
            f"{m.num_heads}; change one or set model.head_dim")
    kv = m.num_kv_heads or m.num_heads
    if m.num_heads % kv:
        raise ConfigError(
            f"config.model.num_heads={m.num_heads} is not a multiple of "
            f"model.num_kv_heads={kv}")
    if m.positions == "rope" and (m.head_dim or m.d_model // m.num_heads) % 2:
        raise ConfigError("config.model.positions='rope' needs an even head_dim")
    longest = max(config.data.seq_len, config.data.target_seq_len)
    if m.positions == "learned" and m.max_len and m.max_len < longest:
        raise ConfigError(f"config.model.max_len={m.max_len} is below the longest row, "
                          f"{longest} (data.seq_len, data.target_seq_len)")
    if m.dropout >= 1:
        raise ConfigError(f"config.model.dropout={m.dropout} must be < 1")
    if t.batch_size % t.microbatches:
        raise ConfigError(
            f"config.train.batch_size={t.batch_size} is not divisible by "
            f"train.microbatches={t.microbatches}")
    if config.data.seq_len < 2:
        raise ConfigError("config.data.seq_len must be >= 2 to predict a next token")
    sizes = [config.mesh.data, config.mesh.fsdp, config.mesh.tensor]
    if sizes.count(-1) > 1:
        raise ConfigError(f"config.mesh has more than one size of -1: {sizes}; set all but one")
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"config.mesh sizes {sizes} must be positive or -1")


# What fixes a run: the model, the data, and the order the data comes in. Where the
# data lives and how fast it is read may change between the runs of one workdir.
SAME_RUN = ("model.", "data.", "task.", "train.seed", "train.batch_size", "train.init_from")
RESUMABLE_DIFFERENCES = ("data.data_dir", "data.worker_threads", "data.prefetch",
                         "task.bleu_examples")


def check_same_run(config: ml_collections.ConfigDict, saved: dict, workdir: str) -> None:
    """Refuses a config whose model or data differ from the checkpoints in the workdir.

    A key the saved config lacks (added to llm_jax since) is compared with its default.
    """
    saved_cfg, defaults = ml_collections.ConfigDict(saved), base_config()
    diffs = []
    for key in flat_keys(config):
        if not key.startswith(SAME_RUN) or key in RESUMABLE_DIFFERENCES:
            continue
        try:
            old = get(saved_cfg, key)
        except (KeyError, AttributeError):
            old = get(defaults, key)
        new = get(config, key)
        if isinstance(old, (list, tuple)) or isinstance(new, (list, tuple)):
            old, new = json.loads(json.dumps(old)), json.loads(json.dumps(new))
        if old != new:
            diffs.append(f"{key}: {old!r} in the checkpoints, {new!r} now")
    if diffs:
        raise ConfigError(f"{workdir} holds a run with a different model or data: "
                          f"{'; '.join(diffs)}; use a new --workdir or the same config")


def to_json(config: ml_collections.ConfigDict) -> str:
    """The config as sorted, indented JSON (tuples become lists)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def write_json(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Writes the resolved config atomically to WORKDIR/config.json."""
    path = os.path.join(workdir, "config.json")
    files.write_atomic(path, to_json(config))
    return path
