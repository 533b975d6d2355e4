"""Gamma-scaled activations.

A normalizer-free network has no BatchNorm to undo the variance change each
nonlinearity causes, so every activation is multiplied by a constant gamma
chosen such that ``Var(gamma * f(x)) = 1`` for ``x ~ N(0, 1)``. Signal variance
then stays put through the residual branches at initialisation.

The constants are those of the published NFNet code (they were estimated by
sampling, which is why, e.g., relu's is 1.71396 rather than the exact
``1/sqrt(1/2 - 1/(2 pi)) = 1.71305``). Published checkpoints were trained with
exactly these numbers, so they are kept bit for bit. Note that they normalise the
*variance*, not the raw second moment: relu's output still has
``E[y^2] = 1.47``.

`glu` halves the channel axis and `log_softmax` mixes channels; both are here
for completeness (and for use outside the models), but the models accept only
shape-preserving activations (see `get_activation`).
"""

import functools
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

Activation = Callable[[jax.Array], jax.Array]

# name -> (unscaled function, gamma)
_BASE: Mapping[str, tuple[Activation, float]] = {
    "identity": (lambda x: x, 1.0),
    "celu": (jax.nn.celu, 1.270926833152771),
    "elu": (jax.nn.elu, 1.2716004848480225),
    "gelu": (jax.nn.gelu, 1.7015043497085571),
    # GELU evaluated exactly (with erf), as PyTorch does; timm scales it by gelu's gamma.
    "gelu_exact": (functools.partial(jax.nn.gelu, approximate=False), 1.7015043497085571),
    "glu": (jax.nn.glu, 1.8484294414520264),
    "leaky_relu": (jax.nn.leaky_relu, 1.70590341091156),
    "log_sigmoid": (jax.nn.log_sigmoid, 1.9193484783172607),
    "log_softmax": (jax.nn.log_softmax, 1.0002083778381348),
    "relu": (jax.nn.relu, 1.7139588594436646),
    "relu6": (jax.nn.relu6, 1.7131484746932983),
    "selu": (jax.nn.selu, 1.0008515119552612),
    "sigmoid": (jax.nn.sigmoid, 4.803835391998291),
    "silu": (jax.nn.silu, 1.7881293296813965),
    "soft_sign": (jax.nn.soft_sign, 2.338853120803833),
    "softplus": (jax.nn.softplus, 1.9203323125839233),
    "tanh": (jnp.tanh, 1.5939117670059204),
}

# Other spellings users reach for; the published NF-RegNet defaulted to 'swish',
# which its own table did not contain.
_ALIASES: Mapping[str, str] = {"swish": "silu"}

#: Activations that change the channel count or mix channels; a residual
#: network cannot use them between its convolutions.
NOT_ELEMENTWISE = frozenset({"glu", "log_softmax"})

#: Every activation name accepted by `get_activation` (aliases included).
ACTIVATION_NAMES = tuple(sorted(set(_BASE) | set(_ALIASES)))

#: name -> gamma, for reporting and tests.
GAMMAS: Mapping[str, float] = {name: gamma for name, (_, gamma) in _BASE.items()}


def canonical_name(name: str) -> str:
  """Resolves aliases ('swish' -> 'silu'); raises on unknown names."""
  if not isinstance(name, str) or (name not in _BASE and name not in _ALIASES):
    raise ValueError(
        f"Unknown activation {name!r}; valid activations: {', '.join(ACTIVATION_NAMES)}.")
  return _ALIASES.get(name, name)


def unscaled_activation(name: str) -> Activation:
  """The activation called `name` without its gamma (`get_activation(name)` is
  `unscaled_activation(name)(x) * GAMMAS[name]`), for networks that fold the
  gamma into the next layer (`folding.py`)."""
  return _BASE[canonical_name(name)][0]


def get_activation(name: str, *, elementwise_only: bool = False) -> Activation:
  """Returns the gamma-scaled activation called `name`.

  Args:
    name: one of `ACTIVATION_NAMES`.
    elementwise_only: reject activations that change or mix channels (what the
      models need, since they add the residual branch back onto its input).
  """
  name = canonical_name(name)
  if elementwise_only and name in NOT_ELEMENTWISE:
    valid = [n for n in ACTIVATION_NAMES if _ALIASES.get(n, n) not in NOT_ELEMENTWISE]
    raise ValueError(
        f"Activation {name!r} changes or mixes the channel axis and cannot be used "
        f"inside a residual network; use one of: {', '.join(valid)}.")
  fn, gamma = _BASE[name]
  if gamma == 1.0:
    return fn

  def scaled(x: jax.Array) -> jax.Array:
    return fn(x) * jnp.asarray(gamma, dtype=x.dtype)

  scaled.__name__ = f"scaled_{name}"
  return scaled
