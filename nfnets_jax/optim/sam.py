"""Sharpness-Aware Minimisation (SAM) gradients, with a cheap ascent step.

SAM (Foret et al. 2021, "Sharpness-Aware Minimization for Efficiently
Improving Generalization", arXiv:2010.01412) takes the gradient at
`params + rho * g / ||g||`, where `g` is an "ascent" gradient at `params`.
The NFNet paper (Brock et al. 2021, arXiv:2102.06171, Sec. 6 and App. C) uses
it for its largest models, with two economies from the m-sharpness analysis:
the ascent gradient is computed on a fraction (20%) of each device's batch, and
it is never all-reduced across devices. That makes a SAM step cost about
`1 + ascent_fraction` plain steps rather than 2.
"""

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from nfnets_jax.optim._checks import check_number

LossFn = Callable[..., tuple[jax.Array, Any]]
GradFn = Callable[..., tuple[Any, Any]]


def _varying_axes(x: jax.Array) -> frozenset:
  """The manual mesh axes over which `x` differs per device (inside `shard_map`)."""
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(aval, "vma", ()))


def _vary_like(params: Any, batch: Any) -> Any:
  """`params` marked per-device wherever the batch is, so that differentiating
  them gives each device its own gradient.

  Inside `shard_map` (with its default `check_vma=True`), the gradient of a
  replicated parameter is summed across devices by JAX itself, which is what a
  plain step wants but exactly what SAM's ascent must avoid. Outside
  `shard_map` this is the identity.
  """
  axes = frozenset().union(*(_varying_axes(x) for x in jax.tree_util.tree_leaves(batch)))
  if not axes:
    return params

  def vary(p):
    missing = tuple(sorted(axes - _varying_axes(p), key=str))
    return jax.lax.pcast(p, missing, to="varying") if missing else p
  return jax.tree_util.tree_map(vary, params)


def _batch_size(batch: Any) -> int:
  leaves = jax.tree_util.tree_leaves(batch)
  if not leaves:
    raise ValueError("sam_grad: the batch has no arrays; it must be a pytree of arrays "
                     "with a leading batch axis.")
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
  if None in sizes or len(sizes) != 1:
    shapes = [jnp.shape(x) for x in leaves]
    raise ValueError(f"sam_grad: every array in the batch needs the same leading batch axis; "
                     f"got shapes {shapes}.")
  (size,) = sizes
  if size < 1:
    raise ValueError("sam_grad: the batch is empty (leading axis of size 0).")
  return size


def ascent_batch_size(batch_size: int, ascent_fraction: float) -> int:
  """`ceil(ascent_fraction * batch_size)`, at least 1.

  Rounded to 9 decimals first so that e.g. 0.1 * 30 (3.0000000000000004 in
  floating point) gives 3, not 4.
  """
  return min(batch_size, max(1, math.ceil(round(ascent_fraction * batch_size, 9))))


def _check_sam_args(rho: float, ascent_fraction: float) -> None:
  check_number("sam_grad", "rho", rho, lambda v: v >= 0, "a finite number >= 0")
  check_number("sam_grad", "ascent_fraction", ascent_fraction, lambda v: 0 < v <= 1,
               "in (0, 1]")


def sam_perturbation(loss_fn: LossFn, params: Any, batch: Any, *args: Any, rho: float = 0.05,
                     ascent_fraction: float = 0.2) -> Any:
  """SAM's weight perturbation `rho * g_asc / ||g_asc||` (global L2 norm).

  `g_asc` is the gradient of `loss_fn` on the first
  `ascent_batch_size(batch, ascent_fraction)` examples of `batch`, local to
  this device (never reduced across devices). A zero gradient gives a zero
  perturbation. The result has the parameters' dtypes.
  """
  _check_sam_args(rho, ascent_fraction)
  n = _batch_size(batch)
  k = ascent_batch_size(n, ascent_fraction)
  ascent = batch if k == n else jax.tree_util.tree_map(lambda x: x[:k], batch)
  g_asc, _ = jax.grad(loss_fn, has_aux=True)(_vary_like(params, batch), ascent, *args)
  g32 = optax.tree_utils.tree_cast(g_asc, jnp.float32)
  norm = optax.tree_utils.tree_norm(g32)
  # where, not max(norm, tiny): a zero gradient must give exactly no perturbation.
  scale = jnp.where(norm > 0, rho / jnp.where(norm > 0, norm, 1.0), 0.0)
  return jax.tree_util.tree_map(lambda g, p: (scale * g).astype(p.dtype), g32, params)


def sam_grad(loss_fn: LossFn, *, rho: float = 0.05, ascent_fraction: float = 0.2) -> GradFn:
  """A drop-in for `jax.grad(loss_fn, has_aux=True)` that returns SAM gradients.

  Foret et al. 2021 (arXiv:2010.01412), with the ascent economies of
  Brock et al. 2021 (arXiv:2102.06171).

  `loss_fn(params, batch, *args) -> (loss, aux)`, `batch` a pytree of arrays
  with a leading (per-device) batch axis. The returned function maps
  `(params, batch, *args)` to `(grads, aux)`, where `grads` is the full-batch
  gradient at `params + sam_perturbation(...)` and `aux` comes from that same
  (perturbed) evaluation.

  Inside `jax.shard_map` the ascent gradient is per device (no collective);
  the returned gradient is reduced across devices exactly as `jax.grad` would
  reduce a plain one: not at all with `check_vma=False` (the caller `pmean`s
  it as usual), and summed by JAX itself for replicated parameters under the
  default `check_vma=True`. Under a plain `jit` over a sharded *global* batch
  there are no devices to speak of: the ascent uses the first examples of the
  global batch; use `shard_map` for the paper's per-device ascent.

  Args:
    loss_fn: the loss, as for `jax.grad(..., has_aux=True)`.
    rho: radius of the perturbation, >= 0 (0 gives the plain gradient, at the
      cost of the ascent pass).
    ascent_fraction: fraction of the batch for the ascent gradient, in (0, 1];
      1 is the original SAM (about twice a plain step's cost).
  """
  _check_sam_args(rho, ascent_fraction)

  def grad_fn(params: Any, batch: Any, *args: Any) -> tuple[Any, Any]:
    eps = sam_perturbation(loss_fn, params, batch, *args, rho=rho,
                           ascent_fraction=ascent_fraction)

    # Differentiate with respect to `params` themselves (the perturbation is a
    # constant), so the result is typed and reduced like a plain gradient.
    def perturbed_loss(p, *rest):
      return loss_fn(jax.tree_util.tree_map(jnp.add, p, eps), *rest)
    return jax.grad(perturbed_loss, has_aux=True)(params, batch, *args)

  return grad_fn
