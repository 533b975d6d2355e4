"""`config.shard_state` on N CPU host devices; driven by tests/test_shard_state.py.

JAX fixes its device count at import, so each run is a fresh interpreter:

  shard_state_script.py train DEVICES OUT
      Two train steps of nfnet:nano from one seed and one batch, replicated and
      sharded (parameters gathered per use and per step), each through its
      compiled program; saves the final states, the
      compiled programs' memory analyses and the sharded state's per-device
      bytes to OUT/train.npz / OUT/train.json, and the sharded state as a
      checkpoint in OUT/ckpt_<DEVICES>.
  shard_state_script.py restore DEVICES OUT FROM
      Restores OUT/ckpt_<FROM> replicated and sharded onto DEVICES devices,
      saves each restored tree to OUT/restore_<DEVICES>_{replicated,sharded}.npz
      and the sharded one as the checkpoint OUT/ckpt_<DEVICES>.

Writes results only: the test compares them.
"""

import json
import os
import sys

DEVICES = int(sys.argv[2])
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={DEVICES}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from nfnets_jax import models, optim  # noqa: E402
from nfnets_jax.train import sharding, steps  # noqa: E402
from nfnets_jax.train.checkpoints import Checkpointer  # noqa: E402

NUM_CLASSES, IMAGE, BATCH, ACCUM = 10, 16, 16, 2
model = models.transform("nfnet:nano", NUM_CLASSES, stochdepth_rate=0.0, drop_rate=0.0,
                         conv_impl="xla")
schedule = optim.nfnet_lr_schedule(0.4, batch_size=BATCH, total_steps=10, warmup_steps=1)
optimizer = optim.nfnet_optimizer(schedule, record_clip_fraction=True, clipping=0.05)
ema = optim.params_ema(0.9)


def flat(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))}


def train(mesh, out):
  rng = np.random.default_rng(0)
  batch = steps.global_batch(mesh, {
      "images": rng.standard_normal((BATCH, IMAGE, IMAGE, 3)).astype(np.float32),
      "labels": rng.integers(0, NUM_CLASSES, BATCH).astype(np.int32)})
  arrays, report = {}, {}
  # "sharded": the default gather (per use); "sharded_step": gathered once per step.
  for name, shard, gather in (("replicated", False, None), ("sharded", True, None),
                              ("sharded_step", True, "step")):
    state = steps.init_state(model, optimizer, ema, jax.random.key(0), (IMAGE, IMAGE), mesh,
                             shard=shard)
    config = steps.StepConfig(num_classes=NUM_CLASSES, grad_accum_steps=ACCUM,
                              shard_state=shard, gather_params=gather, separate_update=False)
    train_step = steps.make_train_step(model, optimizer, ema, schedule, config, mesh,
                                       jax.random.key(1))
    compiled = train_step.lower(state, batch).compile()
    memory = compiled.memory_analysis()
    report[name] = {
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
        "alias_bytes": memory.alias_size_in_bytes,
        "batch_bytes": sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(batch)) // DEVICES,
        "state_bytes_rule": sharding.bytes_per_device(state, DEVICES),
        "state_bytes_device0": sum(leaf.addressable_data(0).nbytes
                                   for leaf in jax.tree_util.tree_leaves(state)),
        "state_bytes_whole": sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(state)),
    }
    for _ in range(2):
      state, metrics = compiled(state, batch)
    report[name]["metrics"] = {k: float(v) for k, v in jax.device_get(metrics).items()}
    report[name]["specs"] = sorted({str(leaf.sharding.spec)
                                    for leaf in jax.tree_util.tree_leaves(state)})
    arrays.update({f"{name}|{key}": value for key, value in flat(state).items()})
    if name == "sharded":
      save(state, out)
  np.savez(os.path.join(out, "train.npz"), **arrays)
  with open(os.path.join(out, "train.json"), "w") as f:
    json.dump(report, f)


def save(state, out):
  checkpointer = Checkpointer(os.path.join(out, f"ckpt_{DEVICES}"), async_save=False)
  checkpointer.save(state, {"model": "nfnet:nano"})
  checkpointer.close()


def restore(mesh, out, source):
  checkpointer = Checkpointer(os.path.join(out, f"ckpt_{source}"), async_save=False)
  for name, shard in (("replicated", False), ("sharded", True)):
    target = steps.abstract_state(model, optimizer, ema, (IMAGE, IMAGE), mesh, shard=shard)
    state, _ = checkpointer.restore(target)
    placed = all(leaf.sharding == want.sharding for leaf, want in zip(
        jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(target)))
    np.savez(os.path.join(out, f"restore_{DEVICES}_{name}.npz"),
             **{"placed_as_target": np.asarray(placed),
                "sharded": np.asarray(sharding.is_sharded(state))}, **flat(state))
    if shard:
      save(state, out)
  checkpointer.close()


def main(argv):
  assert jax.device_count() == DEVICES, jax.devices()
  mesh = steps.make_mesh()
  if argv[1] == "train":
    train(mesh, argv[3])
  else:
    restore(mesh, argv[3], int(argv[4]))


if __name__ == "__main__":
  main(sys.argv)
