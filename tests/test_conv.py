"""The 'decomposed' convolution lowering computes what XLA's native one does.

Forward values, input gradients and weight gradients (the custom VJP) are
compared with `lax.conv_general_dilated` + autodiff for every kernel size,
stride, padding and grouping the model families use.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets_jax import models
from nfnets_jax.models import conv

from jaxpr_helpers import all_eqns


def _inputs(n, hw, in_ch, out_ch, k, groups, dtype=jnp.float32):
  kx, kw = jax.random.split(jax.random.key(7))
  x = jax.random.normal(kx, (n, hw, hw, in_ch), dtype)
  w = jax.random.normal(kw, (k, k, in_ch // groups, out_ch), dtype) * (in_ch // groups) ** -0.5
  return x, w


def _relative(a, b):
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


def _value_and_grads(x, w, stride, padding, groups, impl):
  def loss(x, w):
    y = conv.conv2d(x, w, stride, padding, groups, impl=impl)
    return jnp.sum(jnp.sin(y.astype(jnp.float32))), y

  (_, y), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(x, w)
  return y, grads


@pytest.mark.parametrize("k,stride,padding,groups,out_mult", [
    (3, 1, "SAME", 4, 1),      # F0-style grouped 3x3
    (3, 2, "SAME", 4, 1),      # strided grouped 3x3 (first block of a stage)
    (3, 1, "VALID", 4, 2),     # more outputs than inputs per group
    (3, 2, "VALID", 1, 1),     # dense strided 3x3 (stems)
    (1, 1, "SAME", 1, 2),      # 1x1 expansion: a matmul
    (1, 2, "SAME", 1, 1),      # strided 1x1: subsample + matmul
    (3, 1, ((2, 0), (1, 1)), 2, 1),  # explicit, asymmetric padding
    (3, 1, "SAME", 32, 1),     # 4-channel groups: native forward, matmul weight gradient
])
def test_decomposed_matches_native_values_and_gradients(k, stride, padding, groups, out_mult):
  x, w = _inputs(2, 9, 128, 128 * out_mult, k, groups)
  y_dec, g_dec = _value_and_grads(x, w, stride, padding, groups, "decomposed")
  y_xla, g_xla = _value_and_grads(x, w, stride, padding, groups, "xla")
  assert y_dec.shape == y_xla.shape
  assert _relative(y_dec, y_xla) < 1e-6
  assert g_dec[0].shape == x.shape and g_dec[1].shape == w.shape
  assert _relative(g_dec[0], g_xla[0]) < 1e-6
  assert _relative(g_dec[1], g_xla[1]) < 1e-6


@pytest.mark.parametrize("k,stride,groups", [
    (3, 1, 2),  # grouped 3x3: per-group convolutions
    (1, 1, 1),  # 1x1: a matrix product accumulated in float32
    (1, 2, 1),  # strided 1x1: subsample, then that product
])
def test_decomposed_matches_native_in_bfloat16(k, stride, groups):
  x, w = _inputs(2, 8, 256, 256, k, groups, dtype=jnp.bfloat16)
  y_dec, g_dec = _value_and_grads(x, w, stride, "SAME", groups, "decomposed")
  y_xla, g_xla = _value_and_grads(x, w, stride, "SAME", groups, "xla")
  y_f32, g_f32 = _value_and_grads(x.astype(jnp.float32), w.astype(jnp.float32), stride, "SAME",
                                  groups, "xla")
  assert y_dec.dtype == g_dec[0].dtype == g_dec[1].dtype == jnp.bfloat16
  assert _relative(y_dec, y_xla) < 1e-2
  for a, b in zip(g_dec, g_xla):
    assert _relative(a, b) < 2e-2
  # Against the float32 computation on the same (bfloat16) numbers: the output
  # carries one bfloat16 rounding (relative error up to 2^-9), the gradients two
  # (their bfloat16 cotangent, then their own result).
  assert _relative(y_dec, y_f32) < 5e-3
  for a, b in zip(g_dec, g_f32):
    assert _relative(a, b) < 1e-2


def test_bfloat16_matrix_products_accumulate_in_float32():
  """A bfloat16 1x1 convolution and both its gradients are products of bfloat16
  operands that ask for float32 results: the form XLA:CPU runs at twice the
  speed of a bfloat16-returning product (benchmarks/bench_vs_timm.py, bf16)."""
  x, w = _inputs(2, 8, 64, 96, 1, 1, dtype=jnp.bfloat16)

  def loss(x, w):
    return jnp.sum(conv.conv2d(x, w, 1, "SAME", 1, impl="decomposed").astype(jnp.float32) ** 2)

  jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, w)
  dots = [e for e in all_eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
  assert len(dots) >= 3  # forward, input gradient, weight gradient
  for eqn in dots:
    assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16, jnp.bfloat16], eqn
    assert eqn.params["preferred_element_type"] == jnp.float32, eqn


@pytest.mark.parametrize("groups", [1, 2])  # a plain 2-D product per tap, a batched one
def test_kernel_gradient_is_the_weight_vjp(groups):
  """`kernel_gradient` on its own equals autodiff of the native convolution."""
  x, w = _inputs(2, 10, 64, 96, 3, groups)
  dy = jax.random.normal(jax.random.key(3), (2, 5, 5, 96))
  native = jax.vjp(lambda w: conv.conv2d(x, w, 2, "SAME", groups, impl="xla"), w)[1](dy)[0]
  ours = conv.kernel_gradient(x, dy, w.shape, 2, "SAME", groups)
  assert ours.shape == w.shape
  assert _relative(ours, native) < 1e-6


def test_auto_decomposes_on_cpu_only():
  assert conv.resolve_impl("auto", backend="cpu") == "decomposed"
  assert conv.resolve_impl("auto", backend="gpu") == "xla"
  assert conv.resolve_impl("auto", backend="tpu") == "xla"
  assert conv.resolve_impl("xla", backend="cpu") == "xla"
  assert conv.resolve_impl("decomposed", backend="gpu") == "decomposed"


def test_the_environment_is_the_default_read_when_a_model_is_built(monkeypatch):
  monkeypatch.setenv(conv.ENV_VAR, "xla")
  assert conv.default_impl() == "xla"
  assert conv.resolve_impl(backend="cpu") == "xla"
  assert conv.resolve_impl("decomposed", backend="gpu") == "decomposed"
  monkeypatch.setenv(conv.ENV_VAR, "fast")
  with pytest.raises(ValueError, match=r"'fast'.*NFNETS_JAX_CONV_IMPL.*auto, xla, decomposed"):
    models.transform("nfnet:nano", 10)
  monkeypatch.delenv(conv.ENV_VAR)
  assert conv.default_impl() == "auto"
  with pytest.raises(ValueError, match=r"'cudnn'.*conv_impl.*auto, xla, decomposed"):
    models.transform("nfnet:nano", 10, conv_impl="cudnn")
  with pytest.raises(ValueError, match=r"'cudnn'.*auto, xla, decomposed"):
    conv.conv2d(jnp.zeros((1, 4, 4, 2)), jnp.zeros((1, 1, 2, 2)), impl="cudnn")


def test_the_lowering_is_visible_in_the_compiled_program():
  x, w = _inputs(1, 4, 256, 256, 3, 2)
  hlo = {impl: jax.jit(lambda x, w, impl=impl: conv.conv2d(x, w, 1, "SAME", 2, impl=impl))
         .lower(x, w).as_text() for impl in ("xla", "decomposed")}
  assert "feature_group_count = 2" in hlo["xla"]
  assert "feature_group_count = 2" not in hlo["decomposed"]
  assert hlo["decomposed"].count("stablehlo.convolution") == 2
  x1, w1 = _inputs(1, 4, 64, 32, 1, 1)
  hlo_1x1 = jax.jit(lambda x, w: conv.conv2d(x, w, impl="decomposed")).lower(x1, w1).as_text()
  assert "stablehlo.convolution" not in hlo_1x1 and "stablehlo.dot_general" in hlo_1x1


@pytest.mark.slow
def test_nfnet_outputs_and_gradients_agree_across_lowerings():
  """A whole model (nfnet:nano: 1x1, 3x3, strided and grouped convs) with either lowering."""
  lowered = {impl: models.transform("nfnet:nano", 10, stochdepth_rate=0.0, drop_rate=0.0,
                                    conv_impl=impl) for impl in ("xla", "decomposed")}
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  params = jax.jit(lowered["xla"].init, static_argnames="is_training")(
      jax.random.key(0), images, is_training=False)
  params = jax.tree_util.tree_map(lambda p: p + 0.1 if p.ndim == 0 else p, params)  # skip gains on

  def loss(params, impl):
    logits = lowered[impl].apply(params, None, images, is_training=False)["logits"]
    return jnp.sum(logits ** 2), logits

  grad_fn = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)  # op-by-op takes a minute
  results = {impl: grad_fn(params, impl) for impl in ("xla", "decomposed")}
  np.testing.assert_allclose(results["decomposed"][1], results["xla"][1], rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(results["decomposed"][0]),
                  jax.tree_util.tree_leaves(results["xla"][0])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
