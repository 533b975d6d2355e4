"""Run with 4 CPU devices: the data-parallel step must equal the 1-device step.

Prints the maximum relative parameter difference after two steps on the same
global batch (no dropout/stochastic depth, so both see identical math).
"""
import jax
import jax.numpy as jnp
import numpy as np

from nfnets_jax import models, optim
from nfnets_jax.train import steps

assert jax.device_count() == 4, jax.devices()
model = models.transform("nfnet:nano", 10, drop_rate=0.0, stochdepth_rate=0.0)
rng = np.random.default_rng(0)
batch = {"images": rng.standard_normal((8, 16, 16, 3)).astype(np.float32),
         "labels": rng.integers(0, 10, 8).astype(np.int32)}
results = []
for devices in (jax.devices()[:1], jax.devices()):
  mesh = steps.make_mesh(devices)
  schedule = optim.nfnet_lr_schedule(0.4, batch_size=8, total_steps=10, warmup_steps=1)
  opt = optim.nfnet_optimizer(schedule, record_clip_fraction=True)
  ema = optim.params_ema(0.9)
  state = steps.init_state(model, opt, ema, jax.random.key(0), (16, 16), mesh)
  step = steps.make_train_step(model, opt, ema, schedule, steps.StepConfig(num_classes=10),
                               mesh, jax.random.key(1))
  for _ in range(2):
    state, metrics = step(state, steps.global_batch(mesh, batch))
  results.append((jax.device_get(state.params), float(metrics["grad_norm"])))
(p1, g1), (p4, g4) = results
diffs = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
    lambda a, b: float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12)), p1, p4))
print(max(diffs), g1, g4)
