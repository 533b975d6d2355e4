"""Per-device memory of the compiled train step, from abstract shapes only.

`train_step_memory` builds the trainer's own step (the paper's optimizer,
EMA, bfloat16 compute) for a model, lowers it for shape structs carrying the
state's and the batch's shardings on a mesh, compiles it and reads XLA's
memory analysis: nothing is allocated, so it sizes runs far larger than the
machine it runs on. The figures are the compiler's own for the backend the
mesh's devices belong to (on CPU host devices, XLA:CPU's buffer assignment,
which an accelerator's compiler, its fusion and its scheduling, may beat or
exceed).
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nfnets_jax import models, optim
from nfnets_jax.train import sharding, steps

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """One compiled train step's per-device buffers, in bytes (XLA's memory analysis).

  `state_bytes`: the train state's share on one device (parameters, optimizer
  state, EMA). `peak_bytes`: arguments + temporaries + outputs not written
  into donated arguments, what the step needs at once.
  """
  model: str
  devices: int
  per_device_batch: int
  image_size: int
  grad_accum_steps: int
  shard_state: bool
  state_bytes: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int

  @property
  def peak_bytes(self) -> int:
    return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes

  def as_dict(self) -> dict:
    return {**dataclasses.asdict(self), "peak_bytes": self.peak_bytes}


def abstract_batch(mesh: Mesh, per_device_batch: int, image_size: int) -> dict:
  """Shape structs of a global train batch (float32 images, int32 labels) split over `mesh`."""
  split = NamedSharding(mesh, P(steps.DATA_AXIS))
  batch = mesh.devices.size * per_device_batch
  return {"images": jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32,
                                         sharding=split),
          "labels": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=split)}


def train_step_memory(model_name: str, mesh: Mesh, per_device_batch: int, image_size: int,
                      grad_accum_steps: int = 1, shard_state: bool = False,
                      num_classes: int = 1000) -> StepMemory:
  """Compiles `model_name`'s train step on `mesh` for abstract shapes; its per-device memory.

  The model uses XLA's own convolutions (what accelerators run), its
  parameters in the trainer's layout; the step is one program (the update
  not compiled apart), as on an accelerator.
  """
  if per_device_batch % grad_accum_steps:
    raise ValueError(f"grad_accum_steps = {grad_accum_steps} must divide per_device_batch = "
                     f"{per_device_batch}.")
  model = models.transform(model_name, num_classes, conv_impl="xla")
  schedule = optim.nfnet_lr_schedule(0.1, batch_size=mesh.devices.size * per_device_batch,
                                     total_steps=1000, warmup_steps=10)
  optimizer = optim.nfnet_optimizer(schedule, record_clip_fraction=True)
  ema = optim.params_ema(0.99999)
  image_shape = (image_size, image_size)
  state = steps.abstract_state(model, optimizer, ema, image_shape, mesh, shard=shard_state)
  config = steps.StepConfig(num_classes=num_classes, compute_dtype=jnp.bfloat16,
                            grad_accum_steps=grad_accum_steps, shard_state=shard_state,
                            separate_update=False)
  train_step = steps.make_train_step(model, optimizer, ema, schedule, config, mesh,
                                     jax.random.key(0))
  batch = abstract_batch(mesh, per_device_batch, image_size)
  analysis = train_step.lower(state, batch).compile().memory_analysis()
  return StepMemory(
      model=model_name, devices=mesh.devices.size, per_device_batch=per_device_batch,
      image_size=image_size, grad_accum_steps=grad_accum_steps, shard_state=shard_state,
      state_bytes=sharding.bytes_per_device(state, mesh.devices.size),
      argument_bytes=analysis.argument_size_in_bytes,
      output_bytes=analysis.output_size_in_bytes, alias_bytes=analysis.alias_size_in_bytes,
      temp_bytes=analysis.temp_size_in_bytes)
