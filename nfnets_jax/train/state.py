"""The training state: everything a resumed run needs besides the config."""

from typing import Any, NamedTuple

import jax
import optax

from nfnets_jax.optim import EmaState


class TrainState(NamedTuple):
  """`step`: optimizer steps taken (int32 scalar); `params`: float32 master
  weights; `opt_state`: the optimizer's state; `ema`: EMA of the parameters.

  The per-step randomness (dropout, stochastic depth, SAM's batch split) is
  derived from the config's seed and `step`, so the state needs no RNG of its
  own to resume exactly.
  """
  step: jax.Array
  params: Any
  opt_state: optax.OptState
  ema: EmaState
