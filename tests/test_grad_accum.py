"""Gradient accumulation (`config.grad_accum_steps`, `steps.accumulated`).

NF networks have no batch statistics, so one step over micro-batches is the
step over the whole batch: parameters, optimizer state, EMA and metrics agree
to float32 round-off (dropout and stochastic depth off, so no randomness
differs); and a bad value is one config error naming the field.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets_jax import models, optim
from nfnets_jax.train import config as config_lib
from nfnets_jax.train import steps

NUM_CLASSES = 10
BATCH = 8


def _batch():
  rng = np.random.default_rng(0)
  return {"images": rng.standard_normal((BATCH, 16, 16, 3)).astype(np.float32),
          "labels": rng.integers(0, NUM_CLASSES, BATCH).astype(np.int32),
          # A mixed batch: every per-example leaf must be sliced alike.
          "mix_labels": rng.integers(0, NUM_CLASSES, BATCH).astype(np.int32),
          "ratio": rng.uniform(0.2, 0.9, BATCH).astype(np.float32)}


def _setup():
  """nano (XLA's own convolutions: the lowering is not what is compared here, and they
  compile quicker), its optimizer, EMA and one initial state, on one device."""
  model = models.transform("nfnet:nano", NUM_CLASSES, stochdepth_rate=0.0, drop_rate=0.0,
                           conv_impl="xla")
  schedule = optim.nfnet_lr_schedule(0.4, batch_size=BATCH, total_steps=10, warmup_steps=0)
  opt = optim.nfnet_optimizer(schedule, record_clip_fraction=True, clipping=0.05)
  ema = optim.params_ema(0.9)
  mesh = steps.make_mesh(jax.devices()[:1])
  state = steps.init_state(model, opt, ema, jax.random.key(0), (16, 16), mesh)
  # Skip gains on, so that every block's branch (and gradient) is in play.
  state = state._replace(params=jax.tree_util.tree_map(
      lambda p: p + 0.3 if p.ndim == 0 else p, state.params))
  return model, schedule, opt, ema, mesh, state


def _one_step(setup, grad_accum_steps: int):
  model, schedule, opt, ema, mesh, state = setup
  # Each run its own copy of the state (a step donates it), in the same placement.
  state = jax.device_put(jax.device_get(state), jax.tree_util.tree_map(lambda x: x.sharding, state))
  config = steps.StepConfig(num_classes=NUM_CLASSES, grad_accum_steps=grad_accum_steps)
  step = steps.make_train_step(model, opt, ema, schedule, config, mesh, jax.random.key(1))
  state, metrics = step(state, steps.global_batch(mesh, _batch()))
  return jax.device_get(state), jax.device_get(metrics)


@pytest.mark.slow
def test_micro_batches_make_the_whole_batch_step():
  setup = _setup()
  whole, whole_metrics = _one_step(setup, 1)
  for k in (2, 4):
    state, metrics = _one_step(setup, k)
    assert metrics.keys() == whole_metrics.keys()
    for key in whole_metrics:
      np.testing.assert_allclose(metrics[key], whole_metrics[key], rtol=2e-5, atol=1e-7,
                                 err_msg=f"K={k} {key}")
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(whole)):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6, err_msg=f"K={k}")


def test_accumulated_averages_slices_and_gives_each_its_own_randomness():
  """The wrapper alone, on a function whose gradient shows which rows it saw."""
  def grad_fn(params, batch, rng):
    noise = jax.random.uniform(rng)
    return ({"w": params["w"] * jnp.sum(batch["x"])}, {"loss": jnp.mean(batch["x"]) + 0 * noise,
                                                       "noise": noise})
  params = {"w": jnp.ones(3)}
  batch = {"x": jnp.arange(8.0)}
  grads, aux = steps.accumulated(grad_fn, 4)(params, batch, jax.random.key(0))
  np.testing.assert_allclose(grads["w"], np.full(3, np.arange(8.0).sum() / 4))
  np.testing.assert_allclose(aux["loss"], np.mean(np.arange(8.0)))
  draws = [float(jax.random.uniform(jax.random.fold_in(jax.random.key(0), i))) for i in range(4)]
  np.testing.assert_allclose(aux["noise"], np.mean(draws), rtol=1e-6)
  assert steps.accumulated(grad_fn, 1) is grad_fn


def test_a_count_that_does_not_divide_the_batch_is_a_config_error():
  config = config_lib.base_config()
  config.train_batch_size, config.grad_accum_steps = 96, 5
  with pytest.raises(config_lib.ConfigError,
                     match=r"config.grad_accum_steps = 5 is invalid: expected a divisor of "
                           r"train_batch_size = 96"):
    config_lib.validate(config)
  config.grad_accum_steps = 0
  with pytest.raises(config_lib.ConfigError, match="grad_accum_steps = 0 is invalid"):
    config_lib.validate(config)
  config.grad_accum_steps = 4
  config_lib.validate(config)
