"""`hk.transform` with an `init` that compiles in seconds, giving the same weights.

Haiku initialises parameters one by one: each `hk.next_rng_key()` splits the
previous key, and each random initialiser is its own threefry-and-`erf_inv`
computation. Inside `jit` that is one chain of dependent splits plus one
kernel per parameter, and XLA:CPU compiles them one by one: for NFNet-F7
the jitted init compiles for far longer than its train step
(`benchmarks/bench_compile.py --init`; docs/performance.md).

`transform(fn)` changes how the same numbers are computed, not which:

* the key chain `hk.next_rng_key()` walks (`key, sub = split(key)` per
  draw, Haiku's default) is computed in one `jax.lax.scan` and handed to
  Haiku's sequence up front (`hk.replace_rng_sequence_state`), so every draw
  gets the key it would have got;
* `hk.initializers.RandomNormal` and `TruncatedNormal` draws are deferred
  (a `hk.custom_creator` records each one's key and shape) and then made
  together, one `vmap`ped draw per group of equal size. With JAX's
  partitionable threefry (the default) a draw's numbers depend only on the
  key and each element's flat index, so a `(3, 3, 64, 128)` draw equals a
  flat draw of 73,728 numbers from the same key, reshaped: F7's 586 random
  arrays come from 20 draws (`tests/test_fast_init.py` checks bit equality
  with plain `hk.transform` for NFNets and NF-ResNets; NF-RegNets are built
  from the same layers).

Anything else (other initialisers, complex dtypes, array-valued bounds, a
changed `rng_reserve_size`) is created the usual way. `fn` must create its
parameters outside JAX transformations (`hk.vmap`, `hk.scan`, ...), as every
model here does: the recorded keys are used after `fn` returns. While `init`
traces `fn`, deferred arrays read as zeros (the forward pass's outputs are
discarded; an initialiser computed from another parameter's value would see
the zeros, and none of this project's models has one). `apply` is Haiku's.
"""

import dataclasses
import threading
from collections.abc import Callable
from typing import Any, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

#: Keys computed up front for an `init`; one that uses them all is traced
#: again with four times as many (the values are the same either way).
#: NFNet-F7's init draws 682.
INIT_KEYS = 1024


@dataclasses.dataclass(frozen=True)
class _Draw:
  """One deferred initialiser call: `shift + scale * normal(key)` (or truncated)."""
  module: str
  name: str
  key: jax.Array
  shape: tuple[int, ...]
  dtype: Any
  kind: str  # "normal" or "truncated"
  scale: np.ndarray
  shift: np.ndarray
  bounds: tuple[float, float] = (0.0, 0.0)

  @property
  def group(self) -> tuple:
    return (self.kind, int(np.prod(self.shape, dtype=np.int64)), jnp.dtype(self.dtype),
            self.bounds)


def _scalar(value: Any, dtype: Any) -> Optional[np.ndarray]:
  """`value` rounded to `dtype` as `lax.convert_element_type` rounds it, or
  None for traced or non-scalar values (those initialisers are not deferred)."""
  try:
    value = np.asarray(value)
  except jax.errors.TracerArrayConversionError:
    return None
  return value.astype(dtype) if value.ndim == 0 else None


def _deferrable(init: Any, dtype: Any) -> Optional[dict[str, Any]]:
  """What `_Draw` needs to reproduce `init`, or None to create it as usual."""
  if not jnp.issubdtype(dtype, jnp.floating):
    return None
  if type(init) is hk.initializers.RandomNormal:
    fields = dict(kind="normal", scale=_scalar(init.stddev, dtype),
                  shift=_scalar(init.mean, dtype))
  elif type(init) is hk.initializers.TruncatedNormal:
    bounds = (_scalar(init.lower, np.float64), _scalar(init.upper, np.float64))
    if any(b is None for b in bounds):
      return None
    fields = dict(kind="truncated", scale=_scalar(init.stddev, dtype),
                  shift=_scalar(init.mean, dtype), bounds=tuple(float(b) for b in bounds))
  else:
    return None
  return None if fields["scale"] is None or fields["shift"] is None else fields


def _haiku_keys(key: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
  """The first `count` keys Haiku's sequence hands out from `key` (with
  `rng_reserve_size` 1: `key, sub = split(key)` per draw) and its key after them."""
  def step(carry, _):
    carry, sub = jax.random.split(carry)
    return carry, sub
  return jax.lax.scan(step, key, None, length=count)


def _default_reserve_size() -> bool:
  """Whether Haiku splits one key at a time (its default), the chain `_haiku_keys` computes."""
  size = hk.experimental.rng_reserve_size(1)  # Haiku can only read it by setting it
  hk.experimental.rng_reserve_size(size)
  return size == 1


def _draw_group(draws: list[_Draw]) -> jax.Array:
  """One batched draw for same-size draws: row i is `draws[i]`'s values, flat."""
  first = draws[0]
  size, dtype = first.group[1], first.dtype
  keys = jnp.stack([d.key for d in draws])
  if first.kind == "normal":
    rows = jax.vmap(lambda k: jax.random.normal(k, (size,), dtype))(keys)
  else:
    lower, upper = first.bounds
    rows = jax.vmap(lambda k: jax.random.truncated_normal(k, lower, upper, (size,), dtype))(keys)
  scale = jnp.asarray(np.stack([d.scale for d in draws]))[:, None]
  shift = jnp.asarray(np.stack([d.shift for d in draws]))[:, None]
  rows = shift + scale * rows if first.kind == "normal" else scale * rows + shift
  # Without the barrier XLA may fuse the whole draw into each row's slice,
  # which is the one-kernel-per-parameter program this module avoids.
  return jax.lax.optimization_barrier(rows)


def _fill(params: hk.Params, draws: list[_Draw]) -> hk.Params:
  """`params` with each deferred draw's placeholder replaced by its values."""
  groups: dict[tuple, list[_Draw]] = {}
  for draw in draws:
    groups.setdefault(draw.group, []).append(draw)
  values = {}
  for group in groups.values():
    rows = _draw_group(group)
    for i, draw in enumerate(group):
      values[(draw.module, draw.name)] = rows[i].reshape(draw.shape)
  return {module: {name: values.get((module, name), leaf) for name, leaf in leaves.items()}
          for module, leaves in params.items()}


class _Trace:
  """What one traced `init` shares with the transformed function."""

  def __init__(self, keys: int):
    self.keys = keys  # how many of Haiku's keys to compute up front
    self.draws: list[_Draw] = []
    self.exhausted = False  # all precomputed keys used: maybe more were needed


def transform(fn: Callable[..., Any], init_keys: int = INIT_KEYS) -> hk.Transformed:
  """`hk.transform(fn)`, with the same `apply` and an `init` that returns the
  same parameters for the same key but, jitted, compiles in a fraction of the
  time for deep networks (see the module docstring).

  `init_keys`: Haiku keys computed up front; an `init` that uses them all is
  traced again with four times as many (the values are the same either way).
  """
  local = threading.local()  # the _Trace of the init being traced, per thread

  def creator(next_creator, shape, dtype, init, context):
    fields = _deferrable(init, dtype)
    if fields is None:
      return next_creator(shape, dtype, init)

    def placeholder(shape, dtype):
      local.trace.draws.append(_Draw(context.module_name, context.name, hk.next_rng_key(),
                                     tuple(shape), dtype, **fields))
      return jnp.zeros(shape, dtype)
    return next_creator(shape, dtype, placeholder)

  def wrapped(*args, **kwargs):
    trace = getattr(local, "trace", None)
    if trace is None:  # apply, or an init not called through ours
      return fn(*args, **kwargs)
    state = hk.maybe_get_rng_sequence_state()
    presplit = state is not None and not tuple(state[1]) and _default_reserve_size()
    if presplit:
      last, subs = _haiku_keys(state[0], trace.keys)
      hk.replace_rng_sequence_state((last, tuple(subs[i] for i in range(trace.keys))))
    with hk.custom_creator(creator):
      out = fn(*args, **kwargs)
    trace.exhausted = presplit and not tuple(hk.maybe_get_rng_sequence_state()[1])
    return out

  transformed = hk.transform(wrapped)

  def init(rng, *args, **kwargs) -> hk.Params:
    keys = init_keys
    while True:
      local.trace = trace = _Trace(keys)
      try:
        params = transformed.init(rng, *args, **kwargs)
      finally:
        local.trace = None
      if not trace.exhausted:
        return _fill(params, trace.draws)
      keys *= 4

  return hk.Transformed(init=init, apply=transformed.apply)
