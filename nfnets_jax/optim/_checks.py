"""Argument checks shared by the optimizer modules: errors name the bad value
and the valid range, so a typo in a config fails at construction, not as a NaN
thousands of steps later."""

import math
from typing import Any, Callable

import jax


def check_number(where: str, name: str, value: Any, ok: Callable[[float], bool],
                 valid: str) -> None:
  """Raises ValueError unless `value` is a finite real number with `ok(value)`.

  Array-valued hyper-parameters (e.g. injected by `optax.inject_hyperparams`,
  possibly traced) are the caller's responsibility and pass unchecked.
  """
  if isinstance(value, jax.Array):
    return
  number = math.nan
  if not isinstance(value, (str, bytes)):
    try:
      number = float(value)
    except (TypeError, ValueError):
      pass
  if not (math.isfinite(number) and ok(number)):
    raise ValueError(f"{where}: {name} must be {valid}, got {value!r}.")
