"""Learning-rate schedule and parameter EMA against the published formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optim_reference as ref
from nfnets_jax.optim import (ema_decay, nfnet_lr_schedule, params_ema, peak_learning_rate,
                              scaled_learning_rate)


@pytest.mark.parametrize("base_lr,batch_size,total,warmup,min_lr", [
    (0.1, 4096, 50, 10, 0.0),
    (0.1, 128, 17, 3, 1e-3),
    (0.2, 256, 9, 0, 0.0),
])
def test_schedule_is_warmup_then_cosine(base_lr, batch_size, total, warmup, min_lr):
  schedule = nfnet_lr_schedule(base_lr, batch_size=batch_size, total_steps=total,
                               warmup_steps=warmup, min_lr=min_lr)
  peak = base_lr * batch_size / 256
  steps = np.arange(total + 3)
  got = np.asarray(jax.jit(jax.vmap(schedule))(steps))
  want = [ref.warmup_cosine(int(t), peak, warmup, total, min_lr) for t in steps]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7 * peak)
  if warmup:
    assert got[0] == 0.0
  np.testing.assert_allclose(got[warmup], peak, rtol=1e-6)
  np.testing.assert_allclose(got[total:], min_lr, atol=1e-7 * peak)


def test_learning_rate_scales_with_batch_size():
  assert scaled_learning_rate(0.1, 4096) == pytest.approx(1.6)
  assert scaled_learning_rate(0.1, 256) == pytest.approx(0.1)


@pytest.mark.parametrize("batch_size", [64, 1024, 4096])
def test_unscaled_schedule_peaks_at_base_lr_whatever_the_batch(batch_size):
  """scale_by_batch=False (the published NF-RegNet recipe: peak 0.4, cosine to 0.001):
  the same warm-up and cosine, with base_lr itself as the peak."""
  total, warmup = 40, 8
  schedule = nfnet_lr_schedule(0.4, batch_size=batch_size, total_steps=total,
                               warmup_steps=warmup, min_lr=0.001, scale_by_batch=False)
  steps = np.arange(total + 3)
  got = np.asarray(jax.jit(jax.vmap(schedule))(steps))
  want = [ref.warmup_cosine(int(t), 0.4, warmup, total, 0.001) for t in steps]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert peak_learning_rate(0.4, batch_size, scale_by_batch=False) == 0.4
  assert peak_learning_rate(0.4, batch_size) == pytest.approx(0.4 * batch_size / 256)


@pytest.mark.parametrize("kw,message", [
    (dict(batch_size=0, total_steps=10, warmup_steps=1), r"batch_size must be an integer >= 1, got 0"),
    (dict(batch_size=32.0, total_steps=10, warmup_steps=1), r"batch_size must be an integer"),
    (dict(batch_size=32, total_steps=10, warmup_steps=10), r"warmup_steps \(10\) must be smaller than total_steps \(10\)"),
    (dict(batch_size=32, total_steps=10, warmup_steps=-1), r"warmup_steps must be an integer >= 0"),
    (dict(base_lr=-0.1, batch_size=32, total_steps=10, warmup_steps=1), r"base_lr must be a number > 0, got -0.1"),
    (dict(batch_size=256, total_steps=10, warmup_steps=1, min_lr=0.5), r"min_lr must be in \[0, peak"),
    (dict(base_lr=0.4, batch_size=4096, total_steps=10, warmup_steps=1, min_lr=0.5,
          scale_by_batch=False), r"min_lr must be in \[0, peak learning rate = 0.4\]"),
    (dict(base_lr=-0.4, batch_size=32, total_steps=10, warmup_steps=1, scale_by_batch=False),
     r"base_lr must be a number > 0, got -0.4"),
    (dict(batch_size=32, total_steps=10, warmup_steps=1, scale_by_batch="no"),
     r"scale_by_batch must be True or False, got 'no'"),
])
def test_schedule_rejects_bad_arguments(kw, message):
  with pytest.raises(ValueError, match=message):
    nfnet_lr_schedule(**kw)


def test_ema_follows_tf1_warmup():
  rng = np.random.default_rng(0)
  params = {"NFNet/~/linear": {"w": rng.standard_normal((4, 3)).astype(np.float32),
                               "b": np.zeros(3, np.float32)},
            "NFNet/~/nf_block": {"skip_gain": np.asarray(0.5, np.float32)}}
  decay = 0.9
  ema = params_ema(decay)
  state = ema.init(params)
  update = jax.jit(ema.update)
  expected = jax.tree_util.tree_map(lambda p: np.asarray(p, np.float64), params)
  for t in range(25):
    params = jax.tree_util.tree_map(lambda p: p + rng.standard_normal(p.shape).astype(p.dtype),
                                    params)
    state = update(params, state)
    d = min(decay, (1 + t) / (10 + t))
    expected = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * np.asarray(p, np.float64),
                                      expected, params)
  assert int(state.count) == 25
  jax.tree_util.tree_map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6),
                         state.ema, expected)


def test_ema_default_decay_and_decay_curve():
  np.testing.assert_allclose(ema_decay(0, 0.99999), 0.1, rtol=1e-7)
  np.testing.assert_allclose(ema_decay(90, 0.99999), 91 / 100, rtol=1e-7)
  np.testing.assert_allclose(ema_decay(10 ** 7, 0.99999), 0.99999, rtol=1e-7)
  params = {"m": {"w": jnp.ones(3, jnp.bfloat16)}}
  state = params_ema().init(params)
  # A bfloat16 average could not move with decay 0.99999: it is kept in float32.
  assert state.ema["m"]["w"].dtype == jnp.float32
  new = params_ema().update({"m": {"w": jnp.full(3, 2.0, jnp.bfloat16)}}, state)
  np.testing.assert_allclose(new.ema["m"]["w"], 0.1 * 1.0 + 0.9 * 2.0, rtol=1e-6)


@pytest.mark.parametrize("decay", [1.0, -0.1, float("inf")])
def test_ema_rejects_bad_decay(decay):
  with pytest.raises(ValueError, match=r"decay must be in \[0, 1\), got"):
    params_ema(decay)
