"""Adaptive gradient clipping against an independent NumPy rendering of the
published rule (tests/optim_reference.py), and at its seam with optax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax import transforms as optax_transforms

import optim_reference as ref
from nfnets_jax.optim import (AdaptiveGradClipState, adaptive_grad_clip, agc_clip_fraction,
                              unit_axes)


def _reference_tree(params, grads, clipping, eps):
  out, clipped, total = {}, 0, 0
  for module, leaves in params.items():
    out[module] = {}
    for name, p in leaves.items():
      g, c, n = ref.agc(grads[module][name], p, clipping, eps)
      out[module][name] = g
      clipped, total = clipped + c, total + n
  return out, clipped / total


def _assert_trees_close(actual, expected, rtol, atol=0.0):
  jax.tree_util.tree_map_with_path(
      lambda path, a, e: np.testing.assert_allclose(
          np.asarray(a, np.float64), e, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path)),
      actual, expected)


@pytest.mark.parametrize("clipping,eps", [(0.01, 1e-3), (0.16, 1e-3), (0.04, 1e-2)])
def test_matches_published_rule_and_records_clip_fraction(clipping, eps):
  rng = np.random.default_rng(0)
  params = ref.haiku_tree(rng)
  grads = ref.random_grads(rng, params)
  agc = adaptive_grad_clip(clipping, eps, record_clip_fraction=True)
  state = agc.init(params)
  assert float(agc_clip_fraction(state)) == 0.0
  updates, state = jax.jit(agc.update)(grads, state, params)
  expected, fraction = _reference_tree(params, grads, clipping, eps)
  _assert_trees_close(updates, expected, rtol=2e-6, atol=1e-12)
  # The data exercises both branches, so the fraction is a real test.
  assert 0.0 < fraction < 1.0
  np.testing.assert_allclose(float(agc_clip_fraction(state)), fraction, rtol=1e-6)


def test_zero_initialised_parameters_are_bounded_by_eps():
  clipping, eps = 0.01, 1e-3
  params = {"m": {"w": jnp.zeros((3, 3, 2, 4)), "skip_gain": jnp.zeros(())}}
  grads = {"m": {"w": jnp.ones((3, 3, 2, 4)), "skip_gain": jnp.asarray(-5.0)}}
  updates, _ = jax.jit(adaptive_grad_clip(clipping, eps).update)(grads, optax.EmptyState(), params)
  filter_norms = np.linalg.norm(np.asarray(updates["m"]["w"]).reshape(-1, 4), axis=0)
  np.testing.assert_allclose(filter_norms, clipping * eps, rtol=1e-6)
  np.testing.assert_allclose(float(updates["m"]["skip_gain"]), -clipping * eps, rtol=1e-6)


@pytest.mark.parametrize("shape", [(), (1,), (7,), (1, 1, 1, 5), (5, 1), (4, 6), (4, 3, 2),
                                   (3, 3, 4, 8), (2, 3, 3, 4, 8)])
def test_unit_rule_is_optaxs_default(shape):
  x = jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)
  np.testing.assert_array_equal(optax_transforms.unitwise_norm(x),
                                optax_transforms.unitwise_norm(x, axis=unit_axes(shape)))


def test_equals_optax_adaptive_grad_clip_on_float32():
  """The seam: without the record, the transform is optax's, bit for bit."""
  rng = np.random.default_rng(2)
  params = ref.haiku_tree(rng)
  grads = ref.random_grads(rng, params)
  ours, _ = jax.jit(adaptive_grad_clip(0.02).update)(grads, optax.EmptyState(), params)
  theirs, _ = jax.jit(optax.adaptive_grad_clip(0.02).update)(grads, optax.EmptyState(), params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, ours, theirs)


def test_state_is_empty_without_record_and_helper_explains():
  params = {"m": {"w": jnp.ones((2, 3))}}
  agc = adaptive_grad_clip(0.01)
  state = agc.init(params)
  assert state == optax.EmptyState()
  with pytest.raises(ValueError, match="record_clip_fraction=True"):
    agc_clip_fraction(optax.chain(agc, optax.sgd(0.1)).init(params))


def test_helper_finds_record_in_chain_and_rejects_ambiguity():
  params = {"a": {"w": jnp.ones((2, 3))}, "b": {"w": jnp.ones((2, 3))}}
  grads = {"a": {"w": jnp.full((2, 3), 10.0)}, "b": {"w": jnp.full((2, 3), 1e-5)}}
  only_a = optax.masked(adaptive_grad_clip(0.01, record_clip_fraction=True),
                        {"a": {"w": True}, "b": {"w": False}})
  opt = optax.chain(only_a, optax.sgd(0.1))
  _, state = jax.jit(opt.update)(grads, opt.init(params), params)
  # Only the masked leaf's 3 units are counted, and all of them are clipped.
  assert float(agc_clip_fraction(state)) == 1.0
  assert isinstance(state[0].inner_state, AdaptiveGradClipState)
  two = optax.chain(adaptive_grad_clip(0.01, record_clip_fraction=True),
                    adaptive_grad_clip(0.02, record_clip_fraction=True))
  with pytest.raises(ValueError, match="2 AGC records"):
    agc_clip_fraction(two.init(params))


def test_update_without_params_is_a_clear_error():
  agc = adaptive_grad_clip(0.01)
  grads = {"m": {"w": jnp.ones((2, 3))}}
  with pytest.raises(ValueError, match=r"needs the current parameters.*update\(grads, opt_state, params\)"):
    agc.update(grads, agc.init(grads))


@pytest.mark.parametrize("kwargs,bad", [({"clipping": 0.0}, "clipping"),
                                        ({"clipping": -0.1}, "clipping"),
                                        ({"clipping": float("nan")}, "clipping"),
                                        ({"clipping": "0.01"}, "clipping"),
                                        ({"clipping": 0.01, "eps": 0.0}, "eps")])
def test_invalid_hyperparameters_name_value_and_range(kwargs, bad):
  with pytest.raises(ValueError, match=rf"{bad} must be a finite number > 0, got"):
    adaptive_grad_clip(**kwargs)


def test_unsupported_rank_names_the_parameter():
  params = {"weird/~/module": {"w": jnp.ones((2, 2, 2, 2, 2, 2))}}
  with pytest.raises(ValueError, match=r"weird/~/module/w.*rank-6.*\(2, 2, 2, 2, 2, 2\)"):
    adaptive_grad_clip(0.01).update(params, optax.EmptyState(), params)


def test_bfloat16_gradients_stay_bfloat16():
  rng = np.random.default_rng(3)
  params = ref.haiku_tree(rng)
  grads = jax.tree_util.tree_map(lambda g: jnp.asarray(g, jnp.bfloat16),
                                 ref.random_grads(rng, params))
  agc = adaptive_grad_clip(0.01, record_clip_fraction=True)
  updates, state = jax.jit(agc.update)(grads, agc.init(params), params)
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree_util.tree_leaves(updates))
  grads64 = jax.tree_util.tree_map(lambda g: np.asarray(g, np.float64), grads)
  expected, fraction = _reference_tree(params, grads64, 0.01, 1e-3)
  _assert_trees_close(updates, expected, rtol=1e-2, atol=1e-30)
  np.testing.assert_allclose(float(agc_clip_fraction(state)), fraction, rtol=1e-6)


def test_complex_parameters_are_clipped_by_their_modulus_as_optax_does():
  """Issue 38, defect 9: a cast to float32 dropped the imaginary part of complex gradients.
  Each unit's norm is its complex values' (optax's `abs_sq`), so the clip equals optax's
  and keeps the phase of every element."""
  rng = np.random.default_rng(3)
  cplx = lambda shape, scale: jnp.asarray(  # noqa: E731
      scale * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)), jnp.complex64)
  params = {"m": {"w": cplx((4, 6), 1.0), "b": cplx((6,), 0.1)}}
  grads = {"m": {"w": cplx((4, 6), 5.0), "b": cplx((6,), 1e-4)}}
  ours, state = jax.jit(adaptive_grad_clip(0.02, record_clip_fraction=True).update)(
      grads, adaptive_grad_clip(0.02, record_clip_fraction=True).init(params), params)
  theirs, _ = jax.jit(optax.adaptive_grad_clip(0.02, axis=(0,)).update)(
      {"w": grads["m"]["w"]}, optax.EmptyState(), {"w": params["m"]["w"]})
  assert ours["m"]["w"].dtype == jnp.complex64
  np.testing.assert_allclose(ours["m"]["w"], theirs["w"], rtol=1e-6)
  # Every unit of w is clipped to 0.02 x its parameters' norm, phases unchanged.
  unit_norms = np.linalg.norm(np.asarray(ours["m"]["w"]), axis=0)
  np.testing.assert_allclose(unit_norms, 0.02 * np.linalg.norm(params["m"]["w"], axis=0),
                             rtol=1e-5)
  np.testing.assert_allclose(np.angle(ours["m"]["w"]), np.angle(grads["m"]["w"]), atol=1e-5)
  np.testing.assert_array_equal(ours["m"]["b"], grads["m"]["b"])  # small: left as is
  assert float(agc_clip_fraction(state)) == pytest.approx(6 / 7)
