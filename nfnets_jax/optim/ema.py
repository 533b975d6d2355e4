"""Exponential moving average of the parameters, with the TF1 warm-up.

NFNets are evaluated with an EMA of their weights (Brock et al. 2021,
arXiv:2102.06171; decay 0.99999). With such a decay a plain EMA would remember
the random initialisation for ~1e5 steps, so the decay follows the TF1
`ExponentialMovingAverage(num_updates=...)` warm-up,
`decay_t = min(decay, (1 + t) / (10 + t))` at update `t = 0, 1, ...`.

`optax.ema` averages *updates* and corrects its bias by `1 - decay^t`, a
different warm-up; the moment update itself is
`optax.tree_utils.tree_update_moment`, reused here.
"""

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from nfnets_jax.optim._checks import check_number


class EmaState(NamedTuple):
  """`count`: updates applied so far (int32); `ema`: the averaged parameters."""
  count: jax.Array
  ema: Any


class ParamsEma(NamedTuple):
  """`init(params) -> EmaState`; `update(params, state) -> EmaState` (pure, jittable)."""
  init: Callable[[Any], EmaState]
  update: Callable[[Any, EmaState], EmaState]


def ema_decay(step: jax.typing.ArrayLike, decay: float) -> jax.Array:
  """The TF1 warm-up decay `min(decay, (1 + step) / (10 + step))`, float32."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


def params_ema(decay: float = 0.99999, accumulator_dtype: Optional[Any] = None) -> ParamsEma:
  """EMA of parameters with the TF1 warm-up (Brock et al. 2021, arXiv:2102.06171).

  `ema_{t+1} = decay_t * ema_t + (1 - decay_t) * params_{t+1}`, with
  `decay_t = min(decay, (1 + t) / (10 + t))`, `t` the number of previous updates
  and `ema_0 = params_0`.

  Args:
    decay: the asymptotic decay, in [0, 1).
    accumulator_dtype: dtype of the average. By default at least float32: with
      decay 0.99999 a bfloat16 average could never move.
  """
  check_number("params_ema", "decay", decay, lambda v: 0 <= v < 1, "in [0, 1)")

  def dtype_of(p):
    if accumulator_dtype is not None:
      return jnp.dtype(accumulator_dtype)
    return jnp.promote_types(p.dtype, jnp.float32)

  def init(params: Any) -> EmaState:
    ema = jax.tree_util.tree_map(lambda p: jnp.asarray(p, dtype_of(p)), params)
    return EmaState(count=jnp.zeros([], jnp.int32), ema=ema)

  def update(params: Any, state: EmaState) -> EmaState:
    d = ema_decay(state.count, decay)
    new = optax.tree_utils.tree_update_moment(params, state.ema, d, 1)
    new = jax.tree_util.tree_map(lambda n, e: n.astype(e.dtype), new, state.ema)
    return EmaState(count=state.count + 1, ema=new)

  return ParamsEma(init, update)
