"""host_cpu: the CPU's matmul extensions, and CPU dots that take 16-bit operands in f32
where the CPU has no native dot for them (the products are exact in f32 either way)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from llm_jax import cross_entropy, host_cpu
from llm_jax.models import build, layers
from llm_jax.models.layers import ModelConfig

F32, BF16, F16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)


def cpuinfo(tmp_path, flags: str, key: str = "flags") -> str:
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: Test CPU 9000\n{key}\t\t: {flags}\n\n"
                    f"processor\t: 1\nmodel name\t: Test CPU 9000\n{key}\t\t: {flags}\n")
    return str(info)


@pytest.mark.parametrize("flags,says", [
    ("fpu sse2 avx2 fma avx512f avx512_bf16", "avx2 fma avx512f avx512_bf16 (no amx_bf16)"),
    ("fpu sse2 avx avx2 fma", "avx2 fma (no avx512f avx512_bf16 amx_bf16)"),
    ("fpu sse2 avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile",
     "avx2 fma avx512f avx512_bf16 amx_bf16")])
def test_host_cpu_names_the_matmul_extensions(tmp_path, flags, says):
    assert host_cpu.host_cpu(cpuinfo(tmp_path, flags)).split(", ", 2)[::2] == [
        "Test CPU 9000", says]
    assert "cores" in host_cpu.host_cpu(str(tmp_path / "absent"))  # not Linux: no flags


@pytest.mark.parametrize("key,flags,bf16,f16", [
    ("flags", "fpu sse2 avx avx2 fma", F32, F32),  # the AVX2-only EPYC
    ("flags", "avx2 fma avx512f avx512bw", F32, F32),  # AVX-512 without bf16
    ("flags", "avx2 fma avx512f avx512_bf16", BF16, F32),  # the AVX-512 EPYC (Zen 4)
    ("flags", "avx2 avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile", BF16, F16),  # AMX
    ("Features", "fp asimd bf16", BF16, F32),  # ARM with BF16 (e.g. Graviton3)
    ("Features", "fp asimd", F32, F32)])
def test_dot_dtype_upcasts_only_what_the_cpu_cannot_multiply(tmp_path, key, flags, bf16, f16):
    path = cpuinfo(tmp_path, flags, key)
    assert host_cpu.dot_dtype(BF16, path) == bf16
    assert host_cpu.dot_dtype(F16, path) == f16
    assert host_cpu.dot_dtype(F32, path) == F32
    assert host_cpu.dot_dtype(jnp.dtype(jnp.int8), path) == jnp.int8  # floats only


def test_dot_dtype_changes_nothing_it_cannot_read(tmp_path):
    assert host_cpu.dot_dtype(BF16, str(tmp_path / "absent")) == BF16  # not Linux
    no_flags = tmp_path / "odd"
    no_flags.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\n")
    assert host_cpu.dot_dtype(BF16, str(no_flags)) == BF16


CFG = ModelConfig(vocab_size=256, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
                  head_dim=16, mlp_dim=128, max_len=128, dtype=jnp.bfloat16,
                  scan_layers=False, document_mask=False)


def bf16_dots(hlo: str) -> int:
    """Dots (also inside fusions) of a compiled module that read a bf16 operand."""
    count, types = 0, {}
    for line in hlo.splitlines():
        if line.endswith("{"):  # a computation begins: its own instruction names
            types = {}
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) (\w[\w\-]*)\((.*?)\)", line)
        if not m:
            continue
        name, shape, op, operands = m.groups()
        types[name] = shape
        if op == "dot":
            names = re.findall(r"%([\w.\-]+)", operands)
            count += any(types.get(n, "").startswith("bf16[") for n in names)
    return count


def force(monkeypatch, upcast: bool) -> None:
    """16-bit dot operands upcast to f32, or left as they are, whatever this host's CPU."""
    monkeypatch.setattr(host_cpu, "dot_dtype", lambda d, cpuinfo=None: (
        F32 if upcast and jnp.dtype(d).itemsize == 2 else jnp.dtype(d)))


def model_grads(monkeypatch, upcast: bool):
    """The bf16 decoder's parameter gradients on CPU with 16-bit dot operands upcast to f32
    or left bf16 (whatever this host's CPU has), and the compiled module's text."""
    force(monkeypatch, upcast)
    rng = np.random.default_rng(0)
    batch = {"tokens": jnp.asarray(rng.integers(1, 256, (2, 128)), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(128), (2, 128)),
             "segment_ids": jnp.ones((2, 128), jnp.int32)}
    model = build(CFG, "decoder")
    params = model.init(jax.random.key(0), batch)
    cot = jnp.asarray(rng.normal(size=(2, 128, 256)), jnp.float32)

    def loss(p):
        return (model.apply(p, batch)["logits"].astype(jnp.float32) * cot).sum()

    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    return compiled(params), compiled.as_text()


def test_upcast_dots_change_only_the_order_of_f32_sums(monkeypatch):
    """Every dot of the bf16 model's forward and backward (projections, CPU attention, the
    tied head) reads f32 operands when upcast, and the gradients match the bf16 dots'."""
    got, hlo = model_grads(monkeypatch, upcast=True)
    assert bf16_dots(hlo) == 0
    want, hlo_bf16 = model_grads(monkeypatch, upcast=False)
    assert bf16_dots(hlo_bf16) > 0  # the check sees bf16 dots where there are some
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        scale = float(jnp.abs(w).max())
        # f32 sums in another order, rounded to bf16 where the step rounds: a few bf16 ulps
        np.testing.assert_allclose(np.asarray(g) / scale, np.asarray(w) / scale, atol=1e-2)


def head_loss(hidden, head):
    labels = jnp.arange(hidden.shape[0] * hidden.shape[1]).reshape(hidden.shape[:2]) % 64
    w = jnp.ones(hidden.shape[:2], jnp.float32)
    return cross_entropy.head_sums(hidden, head, labels, w, jnp.bfloat16)[0]


@pytest.mark.parametrize("upcast", [True, False])
def test_chunked_loss_dots_upcast_on_cpu(monkeypatch, upcast):
    """The training step's LM head and loss (chunked on CPU, gradients in the forward)."""
    force(monkeypatch, upcast)
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(2, 512, 32)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
    hlo = jax.jit(jax.grad(head_loss, (0, 1))).lower(hidden, head).compile().as_text()
    assert (bf16_dots(hlo) == 0) == upcast


def dot_operands(fn, platform, *args) -> list[str]:
    """The operand element types of every dot in fn lowered for `platform`."""
    text = export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()
    return [t for a, b in re.findall(r"stablehlo.dot_general.*: \(tensor<[^>]*x(\w+)>, "
                                     r"tensor<[^>]*x(\w+)>\)", text) for t in (a, b)]


def test_upcast_never_reaches_gpu_or_tpu(monkeypatch):
    """The decision reads the tracing host's CPU: lowered for an accelerator, the dense
    layers' and the LM head's dots (forward, dx and dw) keep their bf16 operands."""
    force(monkeypatch, True)
    x = jnp.ones((2, 512, 32), jnp.float32)
    w = jnp.ones((32, 64), jnp.float32)
    dense = jax.grad(lambda x, w: (layers.project(x, w, None, 1, jnp.bfloat16, jnp.bfloat16)
                                   .astype(jnp.float32) ** 2).sum(), (0, 1))  # fwd, dx, dw
    for platform in ("cuda", "tpu"):
        for fn, args in ((dense, (x, w)), (jax.grad(head_loss, (0, 1)), (x, w.T))):
            types = dot_operands(fn, platform, *args)
            assert len(types) >= 6 and set(types) == {"bf16"}, (platform, types)
    assert "f32" in dot_operands(dense, "cpu", x, w)  # the same code upcasts on CPU
