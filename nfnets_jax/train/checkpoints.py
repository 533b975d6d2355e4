"""Training checkpoints with orbax: asynchronous, atomic, keep the last N.

Layout: the workdir contract of `nfnets_jax.weights.workdir` (which the evaluate and
convert tools read), `<workdir>/checkpoints/<step>/` with items `params` and
`ema_params` (Haiku trees), plus `opt_state` (the optax state) and `meta`
(JSON: step, EMA update count, model name and kwargs).

Checkpoints hold the published parameter layout whatever layout the train
state uses (`models.stacking`): a checkpoint resumes under any block loop,
and the evaluate, convert and export tools read it as it is.

Orbax writes each checkpoint into a temporary directory and renames it when
complete, so a run killed at any moment (SIGKILL, preemption) leaves only
complete checkpoints behind; `latest_step` never sees a partial one. Bytes
changed later (bit rot) are caught by the checksum of every array that `meta`
records (`weights.checksums`): `restore` raises on a mismatch, so the step is
a damaged one (`checkpoint_recovery`).

The trees are written by orbax's `PyTreeCheckpointHandler` (what `StandardSave` uses
inside; either reads the other's items). On the CPU backend each replicated array is
written whole from one replica: orbax's default splits it among replicas, which on
XLA:CPU costs a compiled slice per array and device (docs/performance.md). Other
backends keep orbax's defaults.
"""

import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from nfnets_jax.weights import checksums, read_failures
from nfnets_jax.weights import workdir as run_layout
from nfnets_jax.models.stacking import StackedLayout
from nfnets_jax.optim import EmaState
from nfnets_jax.train import sharding as sharding_lib
from nfnets_jax.train.checkpoint_recovery import save_failures
from nfnets_jax.train.state import TrainState


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), run_layout.CHECKPOINTS_SUBDIR)


_TREE_ITEMS = (run_layout.PARAMS_ITEM, run_layout.EMA_PARAMS_ITEM, "opt_state")


def _tree_handler() -> "ocp.PyTreeCheckpointHandler":
  """The handler of the state's trees: orbax's, with whole-array writes on CPU (module doc)."""
  kwargs = {}  # elsewhere, orbax's global registry of type handlers
  if jax.default_backend() == "cpu":
    kwargs["type_handler_registry"] = ocp.type_handlers.create_type_handler_registry(*[
        (ty, ocp.type_handlers.ArrayHandler(use_replica_parallel=False) if ty is jax.Array
         else ocp.type_handlers.get_type_handler(ty))
        for ty in ocp.type_handlers.supported_types()])
  # StandardCheckpointHandler's limits on data in flight.
  return ocp.PyTreeCheckpointHandler(save_concurrent_gb=96, restore_concurrent_gb=96, **kwargs)


def _scalar(value: int, sharding: jax.sharding.Sharding) -> jax.Array:
  """An int32 scalar placed like `sharding` (works across processes too)."""
  return jax.make_array_from_callback((), sharding, lambda _: np.asarray(value, np.int32))


class Checkpointer:
  """Saves and restores `TrainState`s under `<workdir>/checkpoints`.

  `layout`: the layout of the states passed to `save` and returned by
  `restore` (default: the published one); files are always published.
  A save that fails, when started or (async) when written, raises
  `checkpoint_recovery.CheckpointSaveError` naming its step.
  """

  def __init__(self, workdir: str, max_to_keep: int = 3, async_save: bool = True,
               layout: Optional[StackedLayout] = None):
    self._manager = run_layout.checkpoint_manager(
        workdir, max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
        item_handlers={**{item: _tree_handler() for item in _TREE_ITEMS},
                       run_layout.META_ITEM: ocp.JsonCheckpointHandler()})
    self._layout = layout if layout is not None and not layout.is_identity else None
    self._in_flight: Optional[int] = None  # the step of a save not known to be committed
    if self._layout is not None:
      self._to_published = jax.jit(self._layout.unstack_all)

  @property
  def directory(self) -> str:
    return str(self._manager.directory)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def reload(self) -> None:
    """Re-reads the saved steps from disk (after steps were moved)."""
    self._manager.reload()

  def save(self, state: TrainState, meta: dict[str, Any]) -> None:
    """Starts saving `state` (returns before the write finishes when async)."""
    if self._layout is not None:
      state = self._to_published(state)
    step = int(jax.device_get(state.step))
    trees = (state.params, state.ema.ema, state.opt_state)
    meta = {**meta, "step": step, "ema_count": int(jax.device_get(state.ema.count)),
            checksums.CHECKSUMS_KEY: checksums.item_checksums(dict(zip(_TREE_ITEMS, trees)))}
    self.wait()  # a failure of the previous save is reported under its own step
    self._in_flight = step
    with save_failures(self.directory, step):
      self._manager.save(step, args=ocp.args.Composite(
          **{item: ocp.args.PyTreeSave(tree) for item, tree in zip(_TREE_ITEMS, trees)},
          **{run_layout.META_ITEM: ocp.args.JsonSave(meta)}))

  def restore(self, target: TrainState, step: Optional[int] = None) -> tuple[TrainState, dict]:
    """Restores step `step` (default: the latest) into the shapes/shardings of `target`.

    Orbax reads each device's part of each array for `target`'s shardings,
    whatever the device count and sharding of the run that saved it: a
    checkpoint restores replicated or split (`shard_state`), onto any number
    of devices.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError("No complete checkpoint to restore.")
    state_target = target
    if self._layout is not None:
      target = self._published_target(target)
    trees = (target.params, target.ema.ema, target.opt_state)
    with read_failures.reporting_failure():
      restored = self._manager.restore(step, args=ocp.args.Composite(
          **{item: ocp.args.PyTreeRestore(tree, ocp.checkpoint_utils.construct_restore_args(tree))
             for item, tree in zip(_TREE_ITEMS, trees)},
          **{run_layout.META_ITEM: ocp.args.JsonRestore()}))
    meta = dict(restored[run_layout.META_ITEM])
    recorded = meta.get(checksums.CHECKSUMS_KEY, {})
    if recorded:
      computed = checksums.item_checksums({item: restored[item] for item in recorded})
      for item, expected in recorded.items():
        checksums.verify(computed[item], expected, repr(item))
    state = TrainState(
        step=_scalar(meta["step"], target.step.sharding),
        params=restored[run_layout.PARAMS_ITEM],
        opt_state=restored["opt_state"],
        ema=EmaState(count=_scalar(meta["ema_count"], target.step.sharding),
                     ema=restored[run_layout.EMA_PARAMS_ITEM]))
    if self._layout is not None:
      state = jax.jit(self._layout.stack_all, out_shardings=jax.tree_util.tree_map(
          lambda leaf: leaf.sharding, state_target))(state)
    return state, meta

  def _published_target(self, target: TrainState) -> TrainState:
    """`target` in the published layout, split by the same rule if `target` is split."""
    shapes = jax.eval_shape(self._layout.unstack_all, target)
    shardings = sharding_lib.state_shardings(shapes, target.step.sharding.mesh,
                                             sharding_lib.is_sharded(target))
    return jax.tree_util.tree_map(
        lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
        shapes, shardings)

  def wait(self) -> None:
    """Blocks until any asynchronous save has been committed."""
    step, self._in_flight = self._in_flight, None
    with save_failures(self.directory, step):
      self._manager.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self._manager.close()
