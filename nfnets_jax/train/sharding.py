"""Where each array of a sharded train state lives (`config.shard_state`).

ZeRO/FSDP style over the trainer's 1-D data mesh (`steps.make_mesh`): every
leaf of the parameters, the optimizer state and the EMA is split along one
axis over the `data` axis, so each device holds about 1/N of the state. The
rule is per leaf, from its path and shape alone, so the parameters, their
momentum and their EMA (same shapes, same module names) are split alike:

* the largest axis whose length the device count divides is split (the
  earliest of equal ones);
* a stacked module's axis 0 (`models.stacking`: the block axis of a scanned
  run, `<first>__x<N>`) is never split: each device keeps a slice of every
  block, so a scan over the blocks sees the same per-block layout on every
  device whatever the depth;
* leaves under `min_shard_size` elements (gains, biases, scalars such as
  step counts) and leaves with no divisible axis stay replicated: splitting
  them saves almost nothing and costs a collective each.
"""

from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nfnets_jax.optim import groups

DATA_AXIS = "data"
#: Leaves smaller than this many elements stay replicated (see the module doc).
MIN_SHARD_SIZE = 2 ** 12


def split_axis(path: tuple[Any, ...], shape: tuple[int, ...], num_devices: int,
               min_shard_size: int = MIN_SHARD_SIZE) -> Optional[int]:
  """The axis of the leaf at `path` with `shape` to split over `num_devices`, or None."""
  if num_devices <= 1 or int(np.prod(shape, dtype=np.int64)) < min_shard_size:
    return None
  module, name = groups.split_path(path)
  first = groups.stacked_layers(module, name)  # 1 under a stacked module: skip the block axis
  candidates = [axis for axis in range(first, len(shape)) if shape[axis] % num_devices == 0]
  if not candidates:
    return None
  return max(candidates, key=lambda axis: (shape[axis], -axis))


def partition_spec(path: tuple[Any, ...], shape: tuple[int, ...], num_devices: int,
                   min_shard_size: int = MIN_SHARD_SIZE) -> P:
  """`P()` (replicated) or the spec splitting `split_axis` over `DATA_AXIS`."""
  axis = split_axis(path, shape, num_devices, min_shard_size)
  if axis is None:
    return P()
  return P(*([None] * axis), DATA_AXIS)


def state_specs(tree: Any, num_devices: int, min_shard_size: int = MIN_SHARD_SIZE) -> Any:
  """`partition_spec` of every leaf of `tree` (arrays or shape structs)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: partition_spec(path, tuple(leaf.shape), num_devices, min_shard_size),
      tree)


def state_shardings(tree: Any, mesh: Mesh, shard: bool,
                    min_shard_size: int = MIN_SHARD_SIZE) -> Any:
  """A `NamedSharding` on `mesh` for every leaf: split by the rule if `shard`, else replicated."""
  if not shard:
    return jax.tree_util.tree_map(lambda _: NamedSharding(mesh, P()), tree)
  specs = state_specs(tree, mesh.size, min_shard_size)
  return jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec), specs,
                                is_leaf=lambda x: isinstance(x, P))


def splits_any(tree: Any, num_devices: int, min_shard_size: int = MIN_SHARD_SIZE) -> bool:
  """Whether the rule splits any leaf of `tree` (shapes) over `num_devices`."""
  return any(split_axis(path, tuple(leaf.shape), num_devices, min_shard_size) is not None
             for path, leaf in jax.tree_util.tree_leaves_with_path(tree))


def is_sharded(tree: Any) -> bool:
  """Whether any leaf of `tree` (arrays or shape structs with shardings) is split."""
  return any(not leaf.sharding.is_fully_replicated for leaf in jax.tree_util.tree_leaves(tree))


def gather(tree: Any, specs: Any) -> Any:
  """Inside `shard_map`: each leaf's local shard all-gathered into the whole array."""
  def whole(leaf, spec):
    axis = _split_dim(spec)
    return leaf if axis is None else jax.lax.all_gather(leaf, DATA_AXIS, axis=axis, tiled=True)
  return jax.tree_util.tree_map(whole, tree, specs)


def mean_scatter(tree: Any, specs: Any) -> Any:
  """Inside `shard_map`: the across-device mean of each leaf, left split as `specs` say.

  A split leaf is reduce-scattered (each device receives only its part of the
  sum), a replicated one all-reduced: the replicated step's `pmean`, in 1/N
  of the memory for the split leaves.
  """
  num_devices = jax.lax.axis_size(DATA_AXIS)

  def mean(leaf, spec):
    axis = _split_dim(spec)
    if axis is None:
      return jax.lax.pmean(leaf, DATA_AXIS)
    return jax.lax.psum_scatter(leaf, DATA_AXIS, scatter_dimension=axis,
                                tiled=True) / num_devices
  return jax.tree_util.tree_map(mean, tree, specs)


def _split_dim(spec: P) -> Optional[int]:
  for axis, name in enumerate(spec):
    if name == DATA_AXIS:
      return axis
  return None


def bytes_per_device(tree: Any, num_devices: int) -> int:
  """Bytes one device holds of `tree` (shape structs with shardings, or arrays)."""
  total = 0
  for leaf in jax.tree_util.tree_leaves(tree):
    nbytes = int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    total += nbytes if leaf.sharding.is_fully_replicated else nbytes // num_devices
  return total
