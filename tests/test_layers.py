"""WSConv2D, squeeze-excite and stochastic depth."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets_jax.models import SqueezeExcite, StochDepth, WSConv2D, standardize_weight
from nfnets_jax.models.layers import avg_pool_same


def _numpy_ws(w, gain, eps=1e-4):
  """Scaled WS as written in the paper: gain * (w - mean) / sqrt(max(fan_in * var, eps))."""
  fan_in = np.prod(w.shape[:-1])
  mean = w.mean(axis=(0, 1, 2), keepdims=True)
  var = w.var(axis=(0, 1, 2), keepdims=True)
  return gain * (w - mean) / np.sqrt(np.maximum(fan_in * var, eps))


def test_standardize_weight_matches_formula_and_normalises():
  rng = np.random.default_rng(0)
  w = rng.normal(3.0, 5.0, size=(3, 3, 16, 8)).astype(np.float32)
  gain = np.ones(8, np.float32)
  out = np.asarray(standardize_weight(jnp.asarray(w), jnp.asarray(gain)))
  np.testing.assert_allclose(out, _numpy_ws(w, gain), rtol=1e-5, atol=1e-6)
  # Zero mean and variance 1/fan_in per output channel: variance preserving.
  np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), 0.0, atol=1e-6)
  np.testing.assert_allclose(out.var(axis=(0, 1, 2)) * 3 * 3 * 16, 1.0, rtol=1e-4)


def test_constant_filter_hits_the_eps_floor_instead_of_nan():
  w = jnp.full((1, 1, 4, 2), 0.7)
  out = standardize_weight(w, jnp.ones(2))
  assert np.all(np.isfinite(out)) and np.allclose(out, 0.0)


def test_wsconv_grouped_shapes_bias_and_variance_preservation():
  conv = hk.without_apply_rng(hk.transform(
      lambda x: WSConv2D(64, 3, stride=2, feature_group_count=4, name="conv")(x)))
  x = jax.random.normal(jax.random.key(1), (8, 16, 16, 32))
  params = conv.init(jax.random.key(0), x)
  assert {k: v.shape for k, v in params["conv"].items()} == {
      "w": (3, 3, 8, 64), "gain": (64,), "bias": (64,)}
  out = conv.apply(params, x)
  assert out.shape == (8, 8, 8, 64)
  # Unit-variance input stays unit variance through a standardised conv (bias 0 at init).
  assert 0.7 < float(jnp.var(out)) < 1.3
  shifted = {"conv": {**params["conv"], "bias": jnp.full((64,), 2.0)}}
  np.testing.assert_allclose(conv.apply(shifted, x), out + 2.0, rtol=1e-5, atol=1e-5)


def test_wsconv_rejects_channels_not_divisible_by_groups():
  conv = hk.without_apply_rng(hk.transform(lambda x: WSConv2D(8, 3, feature_group_count=3)(x)))
  with pytest.raises(ValueError, match="not divisible by feature_group_count=3"):
    conv.init(jax.random.key(0), jnp.zeros((1, 4, 4, 8)))


def test_squeeze_excite_gate_shape_range_and_names():
  se = hk.without_apply_rng(hk.transform(lambda x: SqueezeExcite(16, 4)(x)))
  x = jax.random.normal(jax.random.key(2), (3, 5, 5, 16)).astype(jnp.bfloat16)
  params = se.init(jax.random.key(0), x)
  assert sorted(params) == ["squeeze_excite/~/linear", "squeeze_excite/~/linear_1"]
  gate = se.apply(params, x)
  assert gate.shape == (3, 1, 1, 16) and gate.dtype == jnp.bfloat16
  assert np.all((np.asarray(gate, np.float32) > 0) & (np.asarray(gate, np.float32) < 1))


def test_stochastic_depth_drops_whole_examples_without_rescaling():
  layer = hk.transform(lambda x, training: StochDepth(0.3)(x, training))
  x = jnp.ones((4000, 2, 2, 3))
  out = np.asarray(layer.apply({}, jax.random.key(0), x, True))
  per_example = out.reshape(4000, -1)
  # Each example is kept whole (all ones, no 1/keep rescale) or dropped whole.
  assert set(np.unique(per_example)) <= {0.0, 1.0}
  assert np.all(per_example.min(axis=1) == per_example.max(axis=1))
  assert abs(1 - per_example[:, 0].mean() - 0.3) < 0.03
  np.testing.assert_array_equal(out, layer.apply({}, jax.random.key(0), x, True))
  assert not np.array_equal(out, layer.apply({}, jax.random.key(1), x, True))
  np.testing.assert_array_equal(layer.apply({}, None, x, False), x)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_stochastic_depth_rejects_invalid_rates(rate):
  with pytest.raises(ValueError, match=r"drop_rate must be in \[0, 1\)"):
    hk.transform(lambda x: StochDepth(rate)(x, True)).init(jax.random.key(0), jnp.ones((1, 1, 1, 1)))


@pytest.mark.parametrize("shape", [(3, 8, 8, 5), (2, 7, 5, 4), (32, 1, 1, 128), (4, 1, 3, 8)])
def test_avg_pool_same_matches_a_numpy_reference(shape):
  """SAME 2x2/2 average pooling: end padding, windows averaged over real pixels.
  Includes 1-pixel maps, where XLA:CPU's reduce_window was wrong in jax 0.10."""
  x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  n, h, w, c = shape
  oh, ow = -(-h // 2), -(-w // 2)
  expected = np.zeros((n, oh, ow, c), np.float32)
  for i in range(oh):
    for j in range(ow):
      expected[:, i, j] = x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(axis=(1, 2))
  np.testing.assert_allclose(avg_pool_same(jnp.asarray(x), 2), expected, rtol=1e-5, atol=1e-6)
