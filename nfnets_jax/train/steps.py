"""Data-parallel train and eval steps: `jax.shard_map` over a 1-D device mesh.

Each device runs the per-device program on its slice of the global batch
(pmap's semantics: a named axis, gradients `pmean`-ed, metrics averaged), with
parameters replicated. The same code runs on one CPU, on every device of one
host, and on every device of every host: the mesh spans `jax.devices()`, and
each process contributes its own slice of the batch
(`jax.make_array_from_process_local_data`).
"""

import dataclasses
from typing import Any, Callable, Mapping, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nfnets_jax.optim import ParamsEma, agc_clip_fraction, sam_grad
from nfnets_jax.train import sharding
from nfnets_jax.train.freeze import ParamSplit
from nfnets_jax.train.losses import cross_entropy, mixed_targets, mixed_topk_correct, topk_correct
from nfnets_jax.train.state import TrainState

DATA_AXIS = sharding.DATA_AXIS
#: How a sharded state's parameters are gathered (`StepConfig.gather_params`).
GATHER_MODES = ("step", "use")
Batch = Mapping[str, Any]
Metrics = dict[str, jax.Array]


def make_mesh(devices: Optional[list] = None) -> Mesh:
  """A 1-D mesh over every device of every process, axis `DATA_AXIS`.

  The axis is `Auto`: a sharded state's update (`shard_state`) is written as
  whole-array code that XLA's partitioner splits, collectives included.
  """
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(mesh: Mesh, local_batch: Batch) -> dict[str, jax.Array]:
  """Assembles each process's host batch into one batch sharded over the mesh.

  `local_batch` leaves have this process's examples on their leading axis;
  every process passes the same number of examples.
  """
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
          for key, value in local_batch.items()}


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """What the train step needs to know beyond the model and the optimizer."""
  num_classes: int
  label_smoothing: float = 0.1
  compute_dtype: Any = jnp.float32
  sam_rho: float = 0.0
  sam_ascent_fraction: float = 0.2
  record_clip_fraction: bool = True  # the optimizer keeps AGC's clip-fraction record
  # Gradients and update as two programs (True), one (False), or by model size
  # (None: two from SEPARATE_UPDATE_MIN_LEAVES parameter arrays); see make_train_step.
  separate_update: Optional[bool] = None
  # Micro-batches each device's share of a step is split into (see `accumulated`).
  grad_accum_steps: int = 1
  # The state split over the devices (`sharding`; ZeRO/FSDP style) instead of replicated.
  shard_state: bool = False
  # With `shard_state`: gather the whole parameters inside the differentiated
  # loss of each micro-batch ('use': the gather's transpose reduce-scatters
  # each gradient, so the accumulator is split too; no SAM, whose ascent must
  # stay local), or once per step, before the micro-batches ('step'). None:
  # 'use', the faster on CPU host devices (docs/performance.md), or 'step' under SAM.
  gather_params: Optional[str] = None

  @property
  def gather(self) -> str:
    """`gather_params` resolved: None is 'step' under SAM, else 'use'."""
    if self.gather_params is not None:
      return self.gather_params
    return "step" if self.sam_rho > 0 else "use"

  def __post_init__(self):
    if self.gather_params is not None and self.gather_params not in GATHER_MODES:
      raise ValueError(f"gather_params = {self.gather_params!r} is invalid: expected one of "
                       f"{', '.join(GATHER_MODES)}.")
    if self.shard_state and self.gather == "use" and self.sam_rho > 0:
      raise ValueError("gather_params = 'use' cannot run SAM (sam_rho > 0): its per-device "
                       "ascent gradient would be reduced across devices; use 'step'.")


#: From this many parameter arrays in the train state the update compiles as
#: its own program: XLA:CPU compiles the two halves of a step over very many
#: arrays faster than the whole, and small steps run slower split
#: (benchmarks/bench_compile.py --both-forms; docs/performance.md). Models
#: built by `models.transform` stay under it (NFNet-F7 has 165 arrays in its
#: stacked layout); an unrolled F7 (1,661) does not.
SEPARATE_UPDATE_MIN_LEAVES = 1000


def _trainable(params: Any, split: Optional[ParamSplit]) -> Any:
  return params if split is None else split.split(params)[0]


def state_from_params(params: Any, optimizer: optax.GradientTransformation, ema: ParamsEma,
                      split: Optional[ParamSplit] = None) -> TrainState:
  """A step-0 state around `params`: fresh optimizer state (for the trainable
  parameters of `split` only) and an EMA starting at `params`."""
  return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                    opt_state=optimizer.init(_trainable(params, split)), ema=ema.init(params))


def _init_state(model, optimizer, ema, rng, image_shape, split) -> TrainState:
  images = jnp.zeros((1, *image_shape, 3), jnp.float32)
  return state_from_params(model.init(rng, images, is_training=True), optimizer, ema, split)


def init_state(model: hk.Transformed, optimizer: optax.GradientTransformation, ema: ParamsEma,
               rng: jax.Array, image_shape: tuple[int, int], mesh: Mesh,
               shard: bool = False, split: Optional[ParamSplit] = None) -> TrainState:
  """Initialises parameters, optimizer and EMA state, replicated on every device
  or, with `shard`, split over them (`sharding.state_shardings`).

  Built inside `jit` from the same seed on every process, so all processes
  start from identical parameters without any transfer; a sharded state is
  created in place, each device computing only its part. The parameters are
  in the model's own layout (`models.transform`); with `split`, the
  optimizer's state covers its trainable parameters only.
  """
  init = lambda r: _init_state(model, optimizer, ema, r, image_shape, split)
  shardings = sharding.state_shardings(jax.eval_shape(init, rng), mesh, shard)
  return jax.jit(init, out_shardings=shardings)(rng)


def abstract_state(model: hk.Transformed, optimizer: optax.GradientTransformation,
                   ema: ParamsEma, image_shape: tuple[int, int], mesh: Mesh,
                   shard: bool = False, split: Optional[ParamSplit] = None) -> TrainState:
  """Shapes, dtypes and shardings of `init_state`'s result, computing nothing
  (the target a checkpoint is restored into)."""
  shapes = jax.eval_shape(lambda r: _init_state(model, optimizer, ema, r, image_shape, split),
                          jax.random.key(0))
  return jax.tree_util.tree_map(
      lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
      shapes, sharding.state_shardings(shapes, mesh, shard))


class TrainStep:
  """The train step: `step(state, batch) -> (state, metrics)`.

  `lower(state, batch)` lowers the one-program form for abstract arguments
  (shape structs with shardings), for compiled-memory and cost analyses.
  """

  def __init__(self, programs: Callable[[TrainState], tuple[Callable, Callable, Callable]],
               separate_update: Optional[bool]):
    self._programs = programs  # state -> (one_program, gradients, update), built once per tree
    self._built: dict[Any, tuple[Callable, Callable, Callable]] = {}
    self._separate = separate_update

  def _for(self, state: TrainState) -> tuple[Callable, Callable, Callable]:
    treedef = jax.tree_util.tree_structure(state)
    if treedef not in self._built:
      self._built[treedef] = self._programs(state)
    return self._built[treedef]

  def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    one_program, gradients, update = self._for(state)
    if self._separate is None:  # decided once: the state's tree is the same at every step
      self._separate = len(jax.tree_util.tree_leaves(state.params)) >= SEPARATE_UPDATE_MIN_LEAVES
    if not self._separate:
      return one_program(state, batch)
    grads, metrics = gradients(state, batch)
    return update(state, grads, metrics)

  def program(self, state: TrainState) -> Callable:
    """The one-program form (jitted) for states of `state`'s tree: what `lower`
    lowers, and what `jax.export` takes to lower it for other platforms."""
    return self._for(state)[0]

  def lower(self, state: TrainState, batch: Batch) -> Any:
    return self.program(state).lower(state, batch)


def make_train_step(model: hk.Transformed, optimizer: optax.GradientTransformation,
                    ema: ParamsEma, schedule: Callable[[jax.Array], jax.Array],
                    config: StepConfig, mesh: Mesh, base_key: jax.Array,
                    split: Optional[ParamSplit] = None) -> TrainStep:
  """Builds the jitted, state-donating data-parallel train step.

  Per device: forward/backward on its slice in `config.compute_dtype` (the
  float32 master weights are standardised in float32 and cast per layer),
  optionally SAM with a per-device ascent batch; then gradients are averaged
  across devices, the optimizer (AGC, weight decay, momentum) and the EMA are
  applied identically everywhere. Randomness is `fold_in(base_key, step,
  device index)`, reproducible on resume. Large models compile the gradient
  and the update as separate programs (`StepConfig.separate_update`).

  With `config.shard_state` the state is split over the devices
  (`sharding`): the parameters are all-gathered for the forward/backward
  (`config.gather`), the gradients' mean is reduce-scattered, and the
  optimizer and EMA update each device's part (XLA's partitioner adds the
  cross-device sums AGC's unit norms and the gradient norm need). Same
  values as the replicated step.

  With `split` (train/freeze.py), gradients are taken of the trainable
  parameters only, the optimizer updates only them, and the frozen ones (and
  their EMA) are carried over untouched. A split state is not sharded
  (`config.shard_state` with `freeze` is a config error).
  """
  loss = make_loss(model, config, split)
  apply_gradients = make_apply_gradients(optimizer, ema, schedule, config, split)
  if config.shard_state:
    programs = sharded_programs(mesh, loss, apply_gradients, config, base_key, split)
  else:
    per_device = make_per_device_gradients(make_grad_fn(loss, config), base_key, split)
    programs = replicated_programs(mesh, per_device, apply_gradients)
  return TrainStep(programs, config.separate_update)


def make_loss(model: hk.Transformed, config: StepConfig, split: Optional[ParamSplit]):
  """`loss(params, batch, rng, frozen=None) -> (mean loss, {'loss', 'top1'})` of one
  slice, in the compute dtype; `frozen` (with `split`) completes the trainable params."""
  def loss_fn(params, batch, rng, frozen=None):
    if frozen is not None:
      params = split.merge(params, frozen)
    images = batch["images"].astype(config.compute_dtype)
    logits = model.apply(params, rng, images, is_training=True)["logits"]
    targets = mixed_targets(batch["labels"], config.num_classes, config.label_smoothing,
                            batch.get("mix_labels"), batch.get("ratio"))
    loss = jnp.mean(cross_entropy(logits, targets))
    top1 = mixed_topk_correct(logits, batch["labels"], 1, batch.get("mix_labels"),
                              batch.get("ratio"))
    return loss, {"loss": loss, "top1": jnp.mean(top1)}

  return loss_fn


def make_grad_fn(loss: Callable, config: StepConfig) -> Callable:
  """`loss`'s gradient (and metrics): plain or SAM's, over the config's micro-batches."""
  if config.sam_rho > 0:
    grad_fn = sam_grad(loss, rho=config.sam_rho, ascent_fraction=config.sam_ascent_fraction)
  else:
    grad_fn = jax.grad(loss, has_aux=True)
  return accumulated(grad_fn, config.grad_accum_steps)


def device_rng(base_key: jax.Array, state: TrainState) -> jax.Array:
  """This step's and this device's key: `fold_in(base_key, step, device index)`."""
  return jax.random.fold_in(jax.random.fold_in(base_key, state.step),
                            jax.lax.axis_index(DATA_AXIS))


def make_per_device_gradients(grad_fn: Callable, base_key: jax.Array,
                              split: Optional[ParamSplit]) -> Callable:
  """`(state, batch slice) -> (gradients, metrics)` averaged over the devices (a
  replicated state; with `split`, of the trainable parameters only)."""
  def per_device(state: TrainState, batch: Batch) -> tuple[optax.Updates, Metrics]:
    rng = device_rng(base_key, state)
    if split is None:
      grads, aux = grad_fn(state.params, batch, rng)
    else:
      trainable, frozen = split.split(state.params)
      grads, aux = grad_fn(trainable, batch, rng, frozen)
    return jax.lax.pmean(grads, DATA_AXIS), jax.lax.pmean(aux, DATA_AXIS)

  return per_device


def make_apply_gradients(optimizer: optax.GradientTransformation, ema: ParamsEma,
                         schedule: Callable[[jax.Array], jax.Array], config: StepConfig,
                         split: Optional[ParamSplit]) -> Callable:
  """`(state, gradients, metrics) -> (next state, metrics)`: the optimizer and the EMA
  (frozen parameters and their EMA carried over bit for bit), plus the update's metrics."""
  def apply_gradients(state: TrainState, grads: optax.Updates,
                      metrics: Metrics) -> tuple[TrainState, Metrics]:
    trainable, frozen = (state.params, None) if split is None else split.split(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
    params = optax.apply_updates(trainable, updates)
    new_ema = ema.update(params if split is None else split.merge(params, frozen), state.ema)
    if split is not None:  # frozen parameters and their EMA stay bit for bit
      params = split.merge(params, frozen)
      new_ema = new_ema._replace(ema=split.merge(split.split(new_ema.ema)[0],
                                                 split.split(state.ema.ema)[1]))
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads),
                   learning_rate=jnp.asarray(schedule(state.step), jnp.float32))
    if config.record_clip_fraction:
      metrics["agc_clip_fraction"] = agc_clip_fraction(opt_state)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           ema=new_ema)
    return new_state, metrics

  return apply_gradients


Programs = Callable[[TrainState], tuple[Callable, Callable, Callable]]


def replicated_programs(mesh: Mesh, per_device: Callable, apply_gradients: Callable) -> Programs:
  """For a replicated state: `state -> (one program, gradients, update)`, jitted."""
  def programs(_: TrainState) -> tuple[Callable, Callable, Callable]:
    # check_vma=False gives pmap's semantics: each device's gradient is its own
    # (not implicitly summed over the replicated parameters' axis), and the
    # explicit pmean of `per_device` averages it.
    def data_parallel(fn):
      return jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=(P(), P()),
                           check_vma=False)

    one_program = jax.jit(data_parallel(lambda state, batch: apply_gradients(
        state, *per_device(state, batch))), donate_argnums=0)
    # Two programs give the same values (tests/train_step_script.py): XLA compiles
    # a large model's two halves faster than the whole (SEPARATE_UPDATE_MIN_LEAVES).
    return one_program, jax.jit(data_parallel(per_device)), jax.jit(apply_gradients,
                                                                     donate_argnums=0)

  return programs


def sharded_programs(mesh: Mesh, loss: Callable, apply_gradients: Callable, config: StepConfig,
                     base_key: jax.Array, split: Optional[ParamSplit]) -> Programs:
  """For a state split over the devices: `state -> (one program, gradients, update)`,
  jitted, the specs taken from the state's shapes."""
  grad_fn = make_grad_fn(loss, config)

  def programs(state: TrainState) -> tuple[Callable, Callable, Callable]:
    if split is not None:
      raise ValueError("A train state with frozen parameters is not sharded: set "
                       "config.shard_state = False or config.freeze = ''.")
    num_devices = mesh.size
    state_specs = sharding.state_specs(state, num_devices)
    param_specs = state_specs.params
    shardings = sharding.state_shardings(state, mesh, True)
    gathered_grad_fn = make_grad_fn(
        lambda local_params, batch, rng: loss(sharding.gather(local_params, param_specs),
                                              batch, rng), config)

    def per_device(state: TrainState, batch: Batch) -> tuple[optax.Updates, Metrics]:
      rng = device_rng(base_key, state)
      if config.gather == "step":
        grads, aux = grad_fn(sharding.gather(state.params, param_specs), batch, rng)
        grads = sharding.mean_scatter(grads, param_specs)
      else:  # the gather's transpose already summed split leaves' gradients over devices
        grads, aux = gathered_grad_fn(state.params, batch, rng)
        grads = jax.tree_util.tree_map(
            lambda g, spec: jax.lax.pmean(g, DATA_AXIS) if spec == P() else g / num_devices,
            grads, param_specs)
      return grads, jax.lax.pmean(aux, DATA_AXIS)

    gradients = jax.shard_map(per_device, mesh=mesh, in_specs=(state_specs, P(DATA_AXIS)),
                              out_specs=(param_specs, P()), check_vma=False)
    outputs = (shardings, replicated(mesh))
    one_program = jax.jit(lambda state, batch: apply_gradients(state, *gradients(state, batch)),
                          out_shardings=outputs, donate_argnums=0)
    update = jax.jit(apply_gradients, out_shardings=outputs, donate_argnums=0)
    return one_program, jax.jit(gradients), update

  return programs


def accumulated(grad_fn: Callable[..., tuple[optax.Updates, Metrics]],
                num_micro_batches: int) -> Callable[..., tuple[optax.Updates, Metrics]]:
  """`grad_fn(params, batch, rng, *args)` over `num_micro_batches` equal slices of the batch.

  NF networks have no batch statistics, so the mean of the slices' mean-loss
  gradients is the whole batch's gradient (to float32 round-off): a large
  batch fits in the memory of one slice. The slices run in a `jax.lax.scan`
  with a float32 running sum of the gradients; slice i draws its randomness
  from `fold_in(rng, i)`, and its metrics are averaged. Under SAM each slice
  takes its own ascent step on its own part, as each device does in the
  paper. One slice is `grad_fn` itself.
  """
  if num_micro_batches == 1:
    return grad_fn

  def split(leaf: jax.Array) -> jax.Array:
    return leaf.reshape(num_micro_batches, leaf.shape[0] // num_micro_batches, *leaf.shape[1:])

  def accumulated_grad_fn(params, batch, rng, *args):
    def add_slice(total, xs):
      index, micro_batch = xs
      grads, aux = grad_fn(params, micro_batch, jax.random.fold_in(rng, index), *args)
      return jax.tree_util.tree_map(lambda t, g: t + g.astype(jnp.float32), total, grads), aux

    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    slices = (jnp.arange(num_micro_batches), jax.tree_util.tree_map(split, dict(batch)))
    total, aux = jax.lax.scan(add_slice, zeros, slices)
    grads = jax.tree_util.tree_map(lambda t, p: (t / num_micro_batches).astype(p.dtype),
                                   total, params)
    return grads, jax.tree_util.tree_map(lambda a: jnp.mean(a, axis=0), aux)

  return accumulated_grad_fn


def make_eval_step(model: hk.Transformed, num_classes: int, compute_dtype: Any,
                   mesh: Mesh) -> Callable[[Mapping[str, Any], Batch], dict[str, Metrics]]:
  """Builds the jitted eval step for several parameter trees at once.

  `eval_step({name: params, ...}, batch)` returns, per name, the summed loss,
  top-1, top-5 and count over the batch's real examples: one pass over the
  data scores both the raw and the EMA weights. Padding examples (mask 0),
  which fill every process's last batch, add nothing; sums (not means) let
  the caller add batches up.
  """
  k = min(5, num_classes)

  def scores(params, batch):
    logits = model.apply(params, None, batch["images"].astype(compute_dtype),
                         is_training=False)["logits"]
    mask = batch["mask"].astype(jnp.float32)
    targets = jax.nn.one_hot(batch["labels"], num_classes, dtype=jnp.float32)
    return {
        "loss": jnp.sum(cross_entropy(logits, targets) * mask),
        "top1": jnp.sum(topk_correct(logits, batch["labels"], 1) * mask),
        "top5": jnp.sum(topk_correct(logits, batch["labels"], k) * mask),
        "count": jnp.sum(mask),
    }

  def per_device(named_params, batch):
    return jax.lax.psum({name: scores(params, batch) for name, params in named_params.items()},
                        DATA_AXIS)

  return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(DATA_AXIS)),
                               out_specs=P()))
