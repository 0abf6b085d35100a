"""layers.matmul's hand-written backward (split contractions on CPU) against autodiff of
a plain einsum, for every layout the models use."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from llm_jax.models import layers
from llm_jax.models.layers import matmul

CASES = {  # name: (x shape, w shape, n_in, w_in_last, reference einsum)
    "dense": ((4, 32, 48), (48, 64), 1, False, "btd,df->btf"),
    "heads out": ((4, 32, 48), (48, 4, 16), 1, False, "btd,dhk->bthk"),
    "heads in": ((4, 32, 3, 16), (3, 16, 64), 2, False, "bthk,hkf->btf"),
    "tied head": ((4, 32, 48), (4096, 48), 1, True, "btd,vd->btv"),
    "odd sizes": ((3, 5, 7), (7, 11), 1, False, "btd,df->btf"),  # nothing divides: no split
    "one batch dim": ((64, 48), (48, 32), 1, False, "bd,df->bf"),
    "w_in_last, two in": ((4, 32, 3, 16), (64, 3, 16), 2, True, "bthk,vhk->btv"),
    # wider input than output: the CPU path contracts the other way round and transposes dw
    "mlp out": ((4, 32, 64), (64, 16), 1, False, "btf,fd->btd"),
    "heads in, wide": ((4, 32, 4, 16), (4, 16, 32), 2, False, "bthk,hkf->btf"),
}


def test_bf16_activations_get_bf16_input_grads_and_f32_weight_grads():
    x = jnp.ones((4, 32, 48), jnp.bfloat16)
    w = jnp.ones((48, 64), jnp.float32)
    dx, dw = jax.grad(lambda x, w: matmul(x, w, 1, jnp.bfloat16).sum(), (0, 1))(x, w)
    assert (dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.float32)
    np.testing.assert_array_equal(dw, 4 * 32)  # every entry: sum over batch of 1 * 1


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matmul_value_and_grads_match_einsum(name, dtype):
    xs, ws, n_in, w_in_last, spec = CASES[name]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=xs), jnp.float32)
    w = jnp.asarray(rng.normal(size=ws), jnp.float32)
    cot = jnp.asarray(rng.normal(size=jnp.einsum(spec, x, w).shape), jnp.float32)
    ours = lambda x, w: (matmul(x, w, n_in, dtype, w_in_last) * cot).sum()  # noqa: E731
    ref = lambda x, w: (jnp.einsum(spec, x, w) * cot).sum()  # noqa: E731
    y = matmul(x, w, n_in, dtype, w_in_last)
    assert y.dtype == jnp.float32
    tol = 1e-5 if dtype == jnp.float32 else 2e-2  # bf16 inputs: ~3 significant digits
    np.testing.assert_allclose(y, jnp.einsum(spec, x, w), rtol=tol, atol=tol * 10)
    got = jax.jit(jax.grad(ours, (0, 1)))(x, w)
    want = jax.grad(ref, (0, 1))(x, w)
    for g, r, inp in zip(got, want, (x, w)):
        assert g.dtype == inp.dtype  # f32 parameters get f32 weight gradients
        scale = float(jnp.abs(r).max())
        np.testing.assert_allclose(g / scale, r / scale, atol=tol)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("cpu", [True, False])
def test_both_backward_paths_match_autodiff(name, cpu):
    """The split (CPU) and plain (GPU/TPU) backward dots give the same gradients; on this
    machine jax only ever runs the CPU branch, so each is called directly."""
    xs, ws, n_in, w_in_last, spec = CASES[name]
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=xs), jnp.float32)
    w = jnp.asarray(rng.normal(size=ws), jnp.float32)
    g = jnp.asarray(rng.normal(size=jnp.einsum(spec, x, w).shape), jnp.float32)
    _, res = layers._matmul_fwd(x, w, n_in, jnp.float32, w_in_last, jnp.float32)
    got = layers._matmul_grads(n_in, jnp.float32, w_in_last, res, g, cpu)
    want = jax.vjp(lambda x, w: jnp.einsum(spec, x, w), x, w)[1](g)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("cpu", [True, False])
def test_bf16_activations_get_bf16_dx_on_both_backward_paths(cpu):
    """The GPU/TPU path writes dx in bf16 straight from the dot; both stay close to f32."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(4, 32, 48)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(48, 64)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(4, 32, 64)), jnp.float32)
    _, res = layers._matmul_fwd(x, w, 1, jnp.bfloat16, False, jnp.bfloat16)
    dx, dw = layers._matmul_grads(1, jnp.bfloat16, False, res, g, cpu)
    assert (dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.float32)
    want_dx, want_dw = jax.vjp(lambda x, w: jnp.einsum("btd,df->btf", x, w),
                               x.astype(jnp.float32), w)[1](g)
    for a, b in ((dx, want_dx), (dw, want_dw)):
        scale = float(jnp.abs(b).max())
        np.testing.assert_allclose(a.astype(jnp.float32) / scale, b / scale, atol=2e-2)


@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
def test_project_adds_the_bias_and_returns_out_dtype(out_dtype):
    """project = x·w + b, its value and gradients against the plain formula; and the dot
    in bf16 output (the GPU/TPU branch, called directly) matches too."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(4, 16, 24)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(24, 40)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(40,)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(4, 16, 40)), jnp.float32)
    ours = lambda x, w, b: (layers.project(x, w, b, 1, jnp.bfloat16, out_dtype)  # noqa: E731
                            .astype(jnp.float32) * cot).sum()
    ref = lambda x, w, b: ((jnp.einsum("btd,df->btf", x, w) + b) * cot).sum()  # noqa: E731
    y = layers.project(x, w, b, 1, jnp.bfloat16, out_dtype)
    assert y.dtype == out_dtype
    want = jnp.einsum("btd,df->btf", x, w) + b
    np.testing.assert_allclose(y.astype(jnp.float32), want, rtol=3e-2, atol=0.3)
    direct = matmul(x, w, 1, jnp.bfloat16, out_dtype=jnp.bfloat16)
    assert direct.dtype == jnp.bfloat16
    np.testing.assert_allclose(direct.astype(jnp.float32), want - b, rtol=3e-2, atol=0.3)
    for g, r in zip(jax.grad(ours, (0, 1, 2))(x, w, b), jax.grad(ref, (0, 1, 2))(x, w, b)):
        assert g.dtype == jnp.float32
        scale = float(jnp.abs(r).max())
        np.testing.assert_allclose(g / scale, r / scale, atol=2e-2)


def _dot_outputs(fn, platform, *args):
    """(shape, dtype) of every dot in fn lowered for `platform` (no such device needed)."""
    text = export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()
    return sorted(re.findall(r"stablehlo.dot_general.*-> tensor<([0-9x]+)x(\w+)>", text))


@pytest.mark.parametrize("bias", [False, True])
def test_project_writes_bf16_from_the_dot_off_cpu(bias):
    """Lowered for CUDA (or TPU) the forward dot writes bf16 and so does dx; lowered for CPU
    both write f32; weight gradients are f32 everywhere."""
    x = jnp.ones((2, 8, 16), jnp.bfloat16)
    w, b = jnp.ones((16, 32), jnp.float32), jnp.ones((32,), jnp.float32) if bias else None
    fwd = lambda x, w: layers.project(x, w, b, 1, jnp.bfloat16, jnp.bfloat16)  # noqa: E731
    grad = jax.grad(lambda x, w: fwd(x, w).astype(jnp.float32).sum(), (0, 1))
    want_fwd = {"cpu": [("2x8x32", "f32")], "cuda": [("2x8x32", "bf16")]}
    want_grad = {"cpu": [("16x32", "f32"), ("2x8x16", "f32")],
                 "cuda": [("16x32", "f32"), ("2x8x16", "bf16")]}
    for platform in ("cpu", "cuda"):
        assert _dot_outputs(fwd, platform, x, w) == want_fwd[platform]
        assert _dot_outputs(grad, platform, x, w)[-2:] == want_grad[platform]


@pytest.mark.parametrize("name", ["gelu", "silu", "relu"])
def test_activation_value_and_grad_match_autodiff(name):
    """layers.activation: f32 math, output in the compute dtype; its backward (from a copy
    of the input in that dtype) equals autodiff exactly in f32, closely in bf16."""
    fn = {"gelu": jax.nn.gelu, "silu": jax.nn.silu, "relu": jax.nn.relu}[name]
    z = jnp.asarray(np.random.default_rng(0).normal(size=(4, 64)) * 3, jnp.float32)
    cot = jnp.asarray(np.random.default_rng(1).normal(size=(4, 64)), jnp.float32)
    ref_y, ref_vjp = jax.vjp(fn, z)
    for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 3e-2)):
        y, vjp = jax.vjp(lambda z: layers.activation(z, fn, dtype), z)
        assert y.dtype == dtype
        (dz,) = vjp(cot.astype(dtype))
        assert dz.dtype == jnp.float32
        np.testing.assert_allclose(y.astype(jnp.float32), ref_y, rtol=tol, atol=tol)
        np.testing.assert_allclose(dz, ref_vjp(cot)[0], rtol=tol, atol=tol * 3)
