"""Adaptive Gradient Clipping (AGC), Brock et al. 2021, arXiv:2102.06171, Sec. 4.

AGC clips the gradient of every *output unit* (a row of a linear weight, a
filter of a conv kernel) so that its norm is at most `clipping` times the norm
of the unit's parameters. Unlike global-norm clipping, the threshold scales
with the weights, which is what lets NFNets train stably at large batch sizes
without BatchNorm.

The arithmetic is optax's (`optax.transforms.unitwise_norm` and
`unitwise_clip`, the primitives behind `optax.adaptive_grad_clip`). This module
adds what the optax transform lacks:

* an optional record of the fraction of units clipped at each step, kept in the
  transform's state and read back with `agc_clip_fraction(opt_state)`;
* norms computed in float32 and updates returned in the gradient's own dtype,
  so bfloat16 gradients stay bfloat16 (optax's transform returns float32 for
  any unit it clips when the parameters are float32);
* complex parameters clipped by the modulus, as optax's own clipping does
  (`numerics.abs_sq`): a unit's norm is that of its complex values and the
  clip scales real and imaginary parts alike;
* an error naming the offending parameter when a rank has no unit rule.
"""

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax
from optax import transforms as optax_transforms

from nfnets_jax.optim._checks import check_number
from nfnets_jax.optim.groups import split_path, stacked_layers

# Below this gradient norm the clipped value is computed without dividing by
# the norm (the published rule's guard; optax uses the same default).
_DIV_EPS = 1e-6

UnitAxes = tuple[int, ...]


class AdaptiveGradClipState(NamedTuple):
  """State of `adaptive_grad_clip(..., record_clip_fraction=True)`.

  `clip_fraction`: float32 scalar, the fraction of output units whose gradient
  was clipped by the most recent update (0 before the first update).
  """
  clip_fraction: jax.Array


def unit_axes(shape: tuple[int, ...]) -> UnitAxes:
  """The axes AGC reduces over to get one norm per output unit.

  The published rule (and optax's default for `unitwise_norm`):

  * scalars, vectors, and arrays with at most one axis longer than 1: one unit,
    the whole array (all axes);
  * rank 2, linear weights `(in, out)`, and rank 3, multi-head linear weights
    `(in, heads, head_dim)`: axis 0, one unit per output;
  * rank 4, HWIO conv kernels: axes (H, W, I), one unit per output channel;
  * rank 5, DHWIO conv kernels: axes (D, H, W, I).

  Raises:
    ValueError: for rank 6 or more, where no convention exists.
  """
  ndim = len(shape)
  if sum(1 for d in shape if d != 1) <= 1:
    return tuple(range(ndim))
  if ndim in (2, 3):
    return (0,)
  if ndim == 4:
    return (0, 1, 2)
  if ndim == 5:
    return (0, 1, 2, 3)
  raise ValueError(
      f"AGC has no output-unit rule for a rank-{ndim} parameter of shape {tuple(shape)}; "
      "supported: rank 0-1 (whole array), 2-3 (linear: reduce axis 0), 4 (HWIO conv: "
      "reduce H, W, I), 5 (DHWIO conv). Exclude it from AGC (e.g. with optax.masked) or "
      "reshape it.")


def _working_dtype(dtype: Any) -> jnp.dtype:
  """float32 for real values; complex64 or wider for complex ones, which a cast to
  float32 would strip of their imaginary part."""
  if jnp.issubdtype(dtype, jnp.complexfloating):
    return jnp.promote_types(dtype, jnp.complex64)
  return jnp.dtype(jnp.float32)


def _path_str(path: tuple[Any, ...]) -> str:
  module, name = split_path(path)
  return f"{module}/{name}" if module else name


def _check_positive(name: str, value: Any) -> None:
  check_number("adaptive_grad_clip", name, value, lambda v: v > 0, "a finite number > 0")


def adaptive_grad_clip(clipping: float, eps: float = 1e-3, *,
                       record_clip_fraction: bool = False,
                       stacked_axes: Optional[Callable[[str, str], int]] = None
                       ) -> optax.GradientTransformation:
  """Unit-wise adaptive gradient clipping (Brock et al. 2021, arXiv:2102.06171).

  For each output unit (see `unit_axes`) with parameters `w` and gradient `g`:
  `max_norm = clipping * max(||w||, eps)`; if `||g|| > max_norm` the gradient
  becomes `g * max_norm / max(||g||, 1e-6)`, otherwise it is left as is.
  `eps` keeps zero-initialised parameters (gains, biases, skip gains) from
  being frozen: their gradients may still reach `clipping * eps`.

  Args:
    clipping: the largest allowed ratio of gradient norm to parameter norm
      (0.01 for NFNets at batch size 4096; larger for smaller batches).
    eps: floor on the parameter norm.
    record_clip_fraction: keep in the state the fraction of units clipped by
      the last update (`agc_clip_fraction(opt_state)` reads it). Costs one
      boolean reduction per unit, nothing per element beyond the clip itself.
    stacked_axes: for parameters that stack several layers' copies on leading
      axes (a scanned layer stack), `stacked_axes(module_path, name)` gives how
      many leading axes index the copies; each copy's units are then found and
      clipped on their own, as if unstacked. None: `groups.stacked_layers`, one
      axis in modules named `<name>__x<N>` (this project's models' scanned runs),
      none anywhere else.

  Returns:
    An `optax.GradientTransformation`; its `update` needs `params`.
  """
  _check_positive("clipping", clipping)
  _check_positive("eps", eps)
  layers_axes = stacked_layers if stacked_axes is None else stacked_axes

  def init_fn(params: optax.Params) -> Union[AdaptiveGradClipState, optax.EmptyState]:
    del params
    if record_clip_fraction:
      return AdaptiveGradClipState(clip_fraction=jnp.zeros([], jnp.float32))
    return optax.EmptyState()

  def update_fn(updates: optax.Updates, state, params: Optional[optax.Params] = None):
    if params is None:
      raise ValueError(
          "adaptive_grad_clip needs the current parameters: call "
          "update(grads, opt_state, params) (AGC clips relative to the parameter norms).")
    counts = []  # (clipped units, total units) per leaf

    def clip_leaf(path, g, p):
      if g.shape != p.shape:
        raise ValueError(
            f"adaptive_grad_clip: gradient {_path_str(path)!r} has shape {g.shape} but its "
            f"parameter has shape {p.shape}; they must match.")
      lead = layers_axes(*split_path(path))
      if not 0 <= lead <= p.ndim:
        raise ValueError(
            f"adaptive_grad_clip: stacked_axes gave {lead!r} for {_path_str(path)!r} of shape "
            f"{p.shape}; expected an int from 0 to {p.ndim}.")
      try:
        axes = tuple(lead + a for a in unit_axes(p.shape[lead:]))
      except ValueError as e:
        raise ValueError(f"Parameter {_path_str(path)!r}: {e}") from None
      g32 = jnp.asarray(g, _working_dtype(g.dtype))
      g_norm = optax_transforms.unitwise_norm(g32, axis=axes)
      p_norm = optax_transforms.unitwise_norm(jnp.asarray(p, _working_dtype(p.dtype)), axis=axes)
      max_norm = clipping * jnp.maximum(p_norm, eps)
      clipped = optax_transforms.unitwise_clip(g_norm, max_norm, g32, _DIV_EPS)
      if record_clip_fraction:
        # The norms are constant over a unit: one element per unit is enough.
        first = tuple(slice(0, 1) if i in axes else slice(None) for i in range(g.ndim))
        over = (g_norm > max_norm)[first]
        counts.append((jnp.sum(over, dtype=jnp.int32), over.size))
      return clipped.astype(g.dtype)

    updates = jax.tree_util.tree_map_with_path(clip_leaf, updates, params)
    if not record_clip_fraction:
      return updates, state
    total = sum(n for _, n in counts)
    if total == 0:
      return updates, AdaptiveGradClipState(clip_fraction=jnp.zeros([], jnp.float32))
    clipped_units = sum(c for c, _ in counts)
    fraction = clipped_units.astype(jnp.float32) / jnp.float32(total)
    return updates, AdaptiveGradClipState(clip_fraction=fraction)

  return optax.GradientTransformation(init_fn, update_fn)


def agc_clip_fraction(opt_state: optax.OptState) -> jax.Array:
  """The fraction of units clipped by the last update, from any optax state.

  Finds the state of the one `adaptive_grad_clip(..., record_clip_fraction=True)`
  inside `opt_state` (chained, masked, partitioned, ...), e.g. the state of
  `nfnet_optimizer(..., record_clip_fraction=True)`.

  Raises:
    ValueError: if the state holds no such record, or more than one (then read
      them with `optax.tree_utils.tree_get_all_with_path(state, 'clip_fraction')`).
  """
  found = optax.tree_utils.tree_get_all_with_path(
      opt_state, "clip_fraction",
      filtering=lambda path, _: getattr(path[-1], "tuple_name", None) == "AdaptiveGradClipState")
  if not found:
    raise ValueError(
        "agc_clip_fraction: the optimizer state holds no clip-fraction record; build the "
        "optimizer with record_clip_fraction=True.")
  if len(found) > 1:
    raise ValueError(
        f"agc_clip_fraction: the optimizer state holds {len(found)} AGC records "
        f"(at {[p for p, _ in found]}); pick one with "
        "optax.tree_utils.tree_get_all_with_path(opt_state, 'clip_fraction').")
  return found[0][1]
