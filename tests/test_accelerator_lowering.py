"""The train and eval steps lower for TPU and CUDA, not only for the CPU they run on here.

`jax.export` lowers each program the trainer builds (replicated and sharded
state, with and without gradient accumulation, and the eval step) for
platforms=('tpu', 'cuda') from abstract shapes on an abstract mesh of 4 devices:
no accelerator and no allocation, so a construct that only lowers on CPU (a
host callback, a CPU-only custom call, a sharding the partitioner refuses)
fails here rather than at a pod run. The network uses XLA's own convolutions,
which `conv_impl='auto'` picks on those platforms; the CPU's decomposed ones
are lowered too.
"""

import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P

from nfnets_jax import models, optim
from nfnets_jax.train import steps

pytestmark = pytest.mark.slow  # each export traces and lowers a whole train step

PLATFORMS = ("tpu", "cuda")
DEVICES, PER_DEVICE, SIZE, CLASSES = 4, 4, 16, 10


def _mesh() -> AbstractMesh:
  return AbstractMesh((DEVICES,), (steps.DATA_AXIS,), axis_types=(AxisType.Auto,))


def _batch(mesh, *keys: str) -> dict:
  split = NamedSharding(mesh, P(steps.DATA_AXIS))
  n = DEVICES * PER_DEVICE
  shapes = {"images": ((n, SIZE, SIZE, 3), jnp.float32), "labels": ((n,), jnp.int32),
            "mask": ((n,), jnp.int32)}
  return {key: jax.ShapeDtypeStruct(*shapes[key], sharding=split) for key in keys}


def _recipe():
  schedule = optim.nfnet_lr_schedule(0.1, batch_size=DEVICES * PER_DEVICE, total_steps=100,
                                     warmup_steps=5)
  return schedule, optim.nfnet_optimizer(schedule, record_clip_fraction=True), \
      optim.params_ema(0.999)


@pytest.mark.parametrize("shard, accum, conv_impl", [
    (False, 1, "xla"), (True, 1, "xla"), (False, 2, "xla"), (True, 2, "xla"),
    (False, 1, "decomposed")])
def test_train_step_lowers_for_tpu_and_cuda(shard, accum, conv_impl):
  mesh = _mesh()
  model = models.transform("nfnet:nano", CLASSES, conv_impl=conv_impl)
  schedule, optimizer, ema = _recipe()
  state = steps.abstract_state(model, optimizer, ema, (SIZE, SIZE), mesh, shard=shard)
  config = steps.StepConfig(num_classes=CLASSES, compute_dtype=jnp.bfloat16,
                            grad_accum_steps=accum, shard_state=shard, separate_update=False)
  train_step = steps.make_train_step(model, optimizer, ema, schedule, config, mesh,
                                     jax.random.key(0))
  batch = _batch(mesh, "images", "labels")
  exported = jax.export.export(train_step.program(state), platforms=PLATFORMS)(state, batch)
  assert exported.platforms == PLATFORMS and exported.nr_devices == DEVICES
  leaves = jax.tree_util.tree_leaves(state)
  assert [a.shape for a in exported.in_avals[:len(leaves)]] == [x.shape for x in leaves]
  module = exported.mlir_module()
  # Every state input the step reads (the previous AGC clip fraction is not) is donated:
  # aliased to its output, or a buffer donor where the outputs' placement is left to the
  # compiler. A sharded state's inputs include some split over the devices.
  read = [i for i in exported.module_kept_var_idx if i < len(leaves)]
  assert len(read) == len(leaves) - 1
  assert module.count("tf.aliasing_output") + module.count("jax.buffer_donor") == len(read)
  split_state = re.search(
      r'sdy.sharding<@mesh, \[[^\]]*\{"data"\}[^\]]*\]>, (tf.aliasing_output|jax.buffer_donor)',
      module)
  assert bool(split_state) == shard


def test_eval_step_lowers_for_tpu_and_cuda():
  mesh = _mesh()
  model = models.transform("nfnet:nano", CLASSES, conv_impl="xla")
  _, optimizer, ema = _recipe()
  params = steps.abstract_state(model, optimizer, ema, (SIZE, SIZE), mesh).params
  eval_step = steps.make_eval_step(model, CLASSES, jnp.bfloat16, mesh)
  exported = jax.export.export(eval_step, platforms=PLATFORMS)(
      {"": params, "ema_": params}, _batch(mesh, "images", "labels", "mask"))
  assert exported.platforms == PLATFORMS and exported.nr_devices == DEVICES
  sums = jax.tree_util.tree_unflatten(exported.out_tree, exported.out_avals)
  assert {name: set(values) for name, values in sums.items()} == {
      name: {"loss", "top1", "top5", "count"} for name in ("", "ema_")}
