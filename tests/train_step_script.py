"""Run with 4 CPU devices: the data-parallel train step against two references.

* on 1 device, as two programs (gradients, then update: what large models
  use), against one jitted program built independently from the same pieces;
* on 4 devices, as one program (nfnet:nano's default), against the 1-device
  step (same global batch, no dropout or stochastic depth, so both see
  identical math).

Also checks that the update reuses the old state's buffers (donation). Prints
one JSON object (see tests/test_train.py).
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nfnets_jax import models, optim
from nfnets_jax.train import steps
from nfnets_jax.train.losses import cross_entropy, mixed_targets
from nfnets_jax.train.state import TrainState

assert jax.device_count() == 4, jax.devices()
NUM_CLASSES, SMOOTHING, STEPS = 10, 0.1, 3
# XLA's own convolutions: the data-parallel step is under test, not the CPU lowering
# (tests/test_conv.py compares the lowerings), and its programs compile quicker.
model = models.transform("nfnet:nano", NUM_CLASSES, drop_rate=0.0, stochdepth_rate=0.0,
                         conv_impl="xla")
rng = np.random.default_rng(0)
batch = {"images": rng.standard_normal((8, 16, 16, 3)).astype(np.float32),
         "labels": rng.integers(0, NUM_CLASSES, 8).astype(np.int32)}
# Warm-up over the steps run, so the learning rate differs at every step.
schedule = optim.nfnet_lr_schedule(0.4, batch_size=8, total_steps=10, warmup_steps=STEPS)
opt = optim.nfnet_optimizer(schedule, record_clip_fraction=True)
ema = optim.params_ema(0.9)


def one_program_step():
  """The whole step as a single jitted function (no dropout, so no keys)."""
  def loss_fn(params):
    logits = model.apply(params, None, batch["images"], is_training=True)["logits"]
    targets = mixed_targets(batch["labels"], NUM_CLASSES, SMOOTHING, None, None)
    return jnp.mean(cross_entropy(logits, targets))

  @jax.jit
  def step(state: TrainState):
    grads = jax.grad(loss_fn)(state.params)
    updates, opt_state = opt.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state.step),
               "agc_clip_fraction": optim.agc_clip_fraction(opt_state)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                      ema=ema.update(params, state.ema)), metrics

  return step


def max_rel_diff(a, b):
  diffs = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))
                         / (np.max(np.abs(np.asarray(x))) + 1e-12)), a, b))
  return max(diffs)


out = {"donated": True}
states, grad_norms = [], []
for devices in (jax.devices()[:1], jax.devices()):
  mesh = steps.make_mesh(devices)
  state = steps.init_state(model, opt, ema, jax.random.key(0), (16, 16), mesh)
  separate = True if len(devices) == 1 else None
  config = steps.StepConfig(num_classes=NUM_CLASSES, label_smoothing=SMOOTHING,
                            separate_update=separate)
  step = steps.make_train_step(model, opt, ema, schedule, config, mesh, jax.random.key(1))
  # Copies: on CPU a fetched array may be a view of the device buffer, which
  # would keep the step from donating it.
  initial = jax.tree_util.tree_map(np.array, state)
  reference, expected = one_program_step(), initial
  for _ in range(STEPS):
    # Scalars (the step count, AGC's clip fraction) may land in any output.
    old_arrays = [leaf for leaf in jax.tree_util.tree_leaves(state) if leaf.ndim]
    state, metrics = step(state, steps.global_batch(mesh, batch))
    jax.block_until_ready(state)
    out["donated"] &= len(old_arrays) > 20 and all(leaf.is_deleted() for leaf in old_arrays)
    if len(devices) == 1:
      expected, want = reference(expected)
      out["metrics_rel_diff"] = max(
          out.get("metrics_rel_diff", 0.0),
          *(abs(float(metrics[k]) - float(want[k])) / (abs(float(want[k])) + 1e-12)
            for k in want))
  if len(devices) == 1:
    out["one_program_rel_diff"] = max_rel_diff(jax.device_get(state), expected)
    out["moved"] = max_rel_diff(initial.params, jax.device_get(state.params))
  out["step"] = int(state.step)
  states.append(jax.device_get(state.params))
  grad_norms.append(float(metrics["grad_norm"]))
out["devices_rel_diff"] = max_rel_diff(*states)
out["grad_norm_1"], out["grad_norm_4"] = grad_norms
print(json.dumps(out))
