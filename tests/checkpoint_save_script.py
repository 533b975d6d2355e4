"""Run with 4 CPU devices: the trainer's checkpoints of a replicated state.

Prints one JSON object (see tests/test_train_checkpoints.py):

* `save_compiles`: programs XLA compiled while the state was saved. On CPU
  each replicated array is written whole from one replica; orbax's default
  would slice it into one compiled piece per array shape and device.
* `restored_equal`: the state read back is bitwise the state saved;
  `published_equal`: `weights.load_params` (the tools' reader) reads the
  same parameters from the workdir.
* `legacy_equal`: a checkpoint written as earlier versions wrote them
  (`StandardSave` items) restores into the same state.
"""
import json
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from nfnets_jax import models, optim, weights
from nfnets_jax.train import steps
from nfnets_jax.train.checkpoints import Checkpointer

assert jax.device_count() == 4, jax.devices()
root = sys.argv[1]
model = models.transform("nfnet:nano", 10)
opt = optim.nfnet_optimizer(0.1, record_clip_fraction=True)
ema = optim.params_ema(0.99)
mesh = steps.make_mesh()
state = steps.init_state(model, opt, ema, jax.random.key(0), (16, 16), mesh)
target = steps.abstract_state(model, opt, ema, (16, 16), mesh)
meta = {"model": "nfnet:nano"}

compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **_: compiles.append(event)
    if event == "/jax/core/compile/backend_compile_duration" else None)


def equal(a, b):
  return jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and all(
      np.asarray(x).tobytes() == np.asarray(y).tobytes()
      for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


checkpointer = Checkpointer(f"{root}/new", async_save=False)
before = len(compiles)
checkpointer.save(state, meta)
save_compiles = len(compiles) - before
restored, _ = checkpointer.restore(target)
checkpointer.close()
published = weights.load_params(f"{root}/new")

with weights.checkpoint_manager(f"{root}/legacy") as manager:
  manager.save(int(state.step), args=ocp.args.Composite(**{
      weights.PARAMS_ITEM: ocp.args.StandardSave(state.params),
      weights.EMA_PARAMS_ITEM: ocp.args.StandardSave(state.ema.ema),
      "opt_state": ocp.args.StandardSave(state.opt_state),
      weights.META_ITEM: ocp.args.JsonSave({**meta, "step": int(state.step),
                                              "ema_count": int(state.ema.count)})}))
  manager.wait_until_finished()
legacy = Checkpointer(f"{root}/legacy", async_save=False)
from_legacy, _ = legacy.restore(target)
legacy.close()

print(json.dumps({
    "arrays": len(jax.tree_util.tree_leaves(state)),
    "save_compiles": save_compiles,
    "restored_equal": equal(restored, state),
    "published_equal": equal(published, jax.device_get(state.params)),
    "legacy_equal": equal(from_legacy, state),
}))
