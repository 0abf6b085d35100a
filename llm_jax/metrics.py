"""Model FLOPs and MFU, peak FLOP/s, and metric writers (jsonl, TensorBoard, console).

FLOPs (one place, used by training logs and the benchmark). Per token, with N the
parameters that take part in matmuls (attention and MLP kernels and the LM or MLM head;
not the input, position or token-type embeddings, which are lookups):
    forward  = 2·N + 4·L·T·H·d_head      (QKᵀ and AV over the full T×T matrix, as PaLM)
    training = 3 × forward = 6·N + 12·L·T·H·d_head
The encoder counts like the decoder (same matrix, no mask savings). The encoder–decoder
adds cross-attention (QKᵀ and AV over T_out×T_in, k/v projections over the T_in encoder
positions) and is reported per position of inputs plus targets.
MFU = achieved model FLOP/s ÷ peak FLOP/s of the devices used.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Any, TextIO

import jax
import jax.numpy as jnp

from llm_jax import files
from llm_jax.console import one_line
from llm_jax.models.layers import ModelConfig

# bf16 dense peak per chip, FLOP/s, keyed by a substring of jax.Device.device_kind (the
# longest matching key wins: "H100 PCIe" before "H100", the SXM part).
PEAK_FLOPS = {
    "A100": 312e12, "H100": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,
    "H200": 989e12, "H200 NVL": 835e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def _layer_params(cfg: ModelConfig, cross: bool = False) -> tuple[int, int]:
    """Matmul parameters of one block: (per query token, per key/value token).

    Self-attention and the MLP run on every token; cross-attention's q and out
    projections run on decoder tokens, its k and v on encoder tokens.
    """
    q_o = cfg.d_model * cfg.head_dim * 2 * cfg.num_heads
    k_v = cfg.d_model * cfg.head_dim * 2 * cfg.num_kv_heads
    mlp = cfg.d_model * cfg.mlp_dim * (3 if cfg.activation == "swiglu" else 2)
    return q_o + k_v + mlp + (q_o if cross else 0), k_v if cross else 0


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters of a decoder or encoder that take part in a matmul for every token."""
    # the LM / MLM output head (a classification-only encoder has none)
    heads = cfg.d_model * cfg.vocab_size if not cfg.heads or "mlm" in cfg.heads else 0
    if "mlm" in cfg.heads:
        heads += cfg.d_model * cfg.d_model  # BERT's transform before the tied logits
    return cfg.num_layers * _layer_params(cfg)[0] + heads


def flops_per_token(cfg: ModelConfig, family: str, seq_len: int, target_len: int = 0,
                    training: bool = True) -> float:
    """Model FLOPs per position (for encoder_decoder, per input and target position).

    Attention scores count the whole T×T matrix whether causal or bidirectional, as PaLM's
    6N + 12·L·H·Q·T does (the CPU attention skips most of the masked half: 4% of
    bench_small's FLOPs, benchmarks/README.md).
    """
    hd = cfg.num_heads * cfg.head_dim
    if family == "encoder_decoder":
        n_in, n_out = seq_len, target_len or seq_len
        per_q, per_kv = _layer_params(cfg, cross=True)
        enc = cfg.num_layers * (2 * _layer_params(cfg)[0] * n_in + 4 * n_in * n_in * hd)
        dec = cfg.decoder_depth * (2 * per_q * n_out + 2 * per_kv * n_in
                                        + 4 * n_out * n_out * hd + 4 * n_out * n_in * hd)
        forward = (enc + dec + 2 * cfg.d_model * cfg.vocab_size * n_out) / (n_in + n_out)
    else:
        forward = 2 * matmul_params(cfg) + 4 * cfg.num_layers * seq_len * hd
    return 3 * forward if training else forward


def by_device_kind(table: dict[str, Any], device_kind: str) -> Any:
    """The entry whose key is the longest substring of device_kind, or None."""
    for key in sorted(table, key=len, reverse=True):
        if key.lower() in device_kind.lower():
            return table[key]
    return None


def measure_cpu_peak(dtype: Any = jnp.bfloat16, n: int = 2048, repeats: int = 20) -> float:
    """Best FLOP/s of an n³ matmul (dtype inputs, f32 accumulation) on the first device."""
    dev = jax.devices()[0]
    a = jax.device_put(jnp.ones((n, n), dtype), dev)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):  # the fastest run is the least disturbed by other work
        start = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def peak_flops(configured: float, dtype: Any) -> tuple[float, str]:
    """Total peak FLOP/s of the devices in use, and where the figure came from."""
    dev = jax.devices()[0]
    if configured > 0:
        return configured, "config"
    if dev.platform == "cpu":  # fake CPU devices share the host's cores: one host peak
        peak = measure_cpu_peak(dtype)
        if jnp.dtype(dtype) != jnp.float32:  # without avx512_bf16, f32 dots run faster
            f32 = measure_cpu_peak(jnp.float32, repeats=5)
            if f32 > peak:  # a step could then beat "100%" by computing in f32
                return f32, f"measured f32, faster than {jnp.dtype(dtype).name} on this CPU"
        return peak, "measured"
    peak = by_device_kind(PEAK_FLOPS, dev.device_kind)
    if peak is None:
        return 0.0, f"unknown device kind {dev.device_kind!r}"
    source = dev.device_kind
    if jnp.dtype(dtype) != jnp.bfloat16:  # the table holds bf16 peaks only
        source += f" bf16 peak; this run computes in {jnp.dtype(dtype).name}"
    return peak * jax.device_count(), source


def remeasure_peak(peak: float, source: str, dtype: Any) -> float:
    """A CPU peak that `peak_flops` measured, raised by a short new measurement if that is
    faster: a shared VM's speed drifts, and a peak measured in a slow minute made every later
    MFU read high. Configured and table peaks come back unchanged."""
    if not source.startswith("measured"):
        return peak
    won = jnp.float32 if source.startswith("measured f32") else dtype
    return max(peak, measure_cpu_peak(won, repeats=3))


class WriteError(RuntimeError):
    """The metrics could not be written to the workdir (disk full, unwritable)."""


class Writer:
    """Writes metric records to WORKDIR/metrics.jsonl and TensorBoard (process 0 only); a
    failed write raises WriteError, in one line."""

    def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self._workdir = workdir
        self._jsonl: TextIO | None = None
        self._tb = None
        if enabled:
            path = os.path.join(workdir, "metrics.jsonl")
            _drop_records_after(path, resume_step)
            self._jsonl = open(path, "a")
            from tensorboardX import SummaryWriter  # TF-free event files
            # purge_step hides events of steps redone after a resume; a queue that never
            # fills, so a writer thread stopped by a full disk cannot block add_scalar
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                     purge_step=resume_step + 1 if resume_step else None,
                                     max_queue=1 << 20)

    def write(self, step: int, split: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split}
        record.update({k: float(v) for k, v in values.items()})
        with self._reporting(step):
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
            for k, v in values.items():
                self._tb.add_scalar(f"{split}/{k}", float(v), int(step))
            self._tb.flush()
            worker = getattr(getattr(self._tb.file_writer, "event_writer", None), "_worker", None)
            if worker is not None and not worker.is_alive():  # its error went to stderr
                raise OSError(f"TensorBoard's writer thread for {self._workdir}/tensorboard "
                              "stopped (a full disk?)")

    def close(self) -> None:
        if self.enabled:
            with self._reporting(None):
                self._jsonl.close()
                self._tb.close()

    @contextlib.contextmanager
    def _reporting(self, step: int | None):
        try:
            yield
        except OSError as e:
            at = f" at step {step}" if step is not None else ""
            raise WriteError(f"writing metrics to {self._workdir}{at} failed: "
                             f"{one_line(e)}; the checkpoints written so far are intact") from e


def _drop_records_after(path: str, step: int) -> None:
    """After a resume from `step`, the records of steps that will be redone go (atomically)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError):  # a line cut short by a kill
            continue
    if len(keep) != len(lines):
        files.write_atomic(path, "".join(keep))


def train_record(m: dict[str, Any], tokens_per_sec: float, step_time: float,
                 flops_per_tok: float, peak: float) -> dict[str, float]:
    """The logged train metrics from the step's outputs (already on the host)."""
    return {"loss": float(m["loss"]), "learning_rate": float(m["learning_rate"]),
            "grad_norm": float(m["grad_norm"]), "param_norm": float(m["param_norm"]),
            "update_norm": float(m["update_norm"]), "tokens_per_sec": tokens_per_sec,
            "step_time_s": step_time,
            "mfu": tokens_per_sec * flops_per_tok / peak if peak else 0.0,
            "peak_flops": peak,  # MFU's denominator, which an eval may raise on CPU
            "skipped_steps": float(m["skipped_steps"]),
            **{k: float(v) for k, v in m.items() if k.endswith("accuracy") or
               (k.endswith("_loss") and k != "loss")}}


class StepTimer:
    """Seconds per step between log points; restarted after compilation, eval and saves."""

    def __init__(self, step: int):
        self._time = time.perf_counter()
        self._step = step

    def restart(self, step: int) -> None:
        self._time, self._step = time.perf_counter(), step

    def per_step(self, step: int, outputs: Any) -> float:
        """Seconds per step since the last call or restart, read once step `step`'s outputs
        are computed: dispatch runs ahead, and the clock alone stopped a step early (the
        first interval after a restart read 2 steps of work as 3: MFU over 100%)."""
        jax.block_until_ready(outputs)
        now = time.perf_counter()
        dt = (now - self._time) / max(step - self._step, 1)
        self._time, self._step = now, step
        return dt


class Progress:
    """A tqdm bar with ETA on a terminal; plain log lines otherwise."""

    def __init__(self, total: int, start: int, mode: str = "auto", enabled: bool = True):
        self.bar = None
        self.enabled = enabled
        use_bar = mode == "bar" or (mode == "auto" and sys.stdout.isatty())
        if enabled and use_bar:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_record(step: int, split: str, values: dict[str, float]) -> str:
    parts = [f"{split} step {step}"]
    for k, v in values.items():
        if k.startswith("docs_") or k == "peak_flops":  # metrics.jsonl only, off the console
            continue
        if isinstance(v, float) and abs(v) >= 1000:
            parts.append(f"{k}={v:,.0f}")
        elif isinstance(v, float):
            parts.append(f"{k}={v:.4g}")
        else:
            parts.append(f"{k}={v}")
    return " ".join(parts)
