"""The NFNet learning-rate schedule: linear warm-up, then cosine decay.

Brock et al. 2021 (arXiv:2102.06171) scale the base learning rate linearly with
the batch size (`base_lr * batch_size / 256`, base 0.1), warm it up linearly
from 0 over the first epochs, then decay it to zero with a half cosine. The
published NF-RegNet recipe uses the same shape with an unscaled peak (0.4 at
batch 1024) and a cosine that ends at 0.001. That is exactly
`optax.warmup_cosine_decay_schedule`, so this module only works out the peak
and checks the arguments.
"""

import optax

from nfnets_jax.optim._checks import check_number

#: The batch size the base learning rate refers to.
REFERENCE_BATCH_SIZE = 256


def scaled_learning_rate(base_lr: float, batch_size: int) -> float:
  """`base_lr * batch_size / 256`, the linear scaling rule used for NFNets."""
  check_number("scaled_learning_rate", "base_lr", base_lr, lambda v: v > 0, "a number > 0")
  _check_int("scaled_learning_rate", "batch_size", batch_size, 1)
  return base_lr * batch_size / REFERENCE_BATCH_SIZE


def peak_learning_rate(base_lr: float, batch_size: int, *, scale_by_batch: bool = True) -> float:
  """The schedule's peak: `scaled_learning_rate(base_lr, batch_size)`, or `base_lr` itself.

  `scale_by_batch=False` is for recipes that give their peak directly (the
  published NF-RegNets: 0.4), so that changing the batch size does not change it.
  """
  if not isinstance(scale_by_batch, bool):
    raise ValueError(f"peak_learning_rate: scale_by_batch must be True or False, "
                     f"got {scale_by_batch!r}.")
  if scale_by_batch:
    return scaled_learning_rate(base_lr, batch_size)
  check_number("peak_learning_rate", "base_lr", base_lr, lambda v: v > 0, "a number > 0")
  _check_int("peak_learning_rate", "batch_size", batch_size, 1)
  return float(base_lr)


def _check_int(where: str, name: str, value: object, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{where}: {name} must be an integer >= {minimum}, got {value!r}.")


def nfnet_lr_schedule(base_lr: float = 0.1, *, batch_size: int, total_steps: int,
                      warmup_steps: int, min_lr: float = 0.0,
                      scale_by_batch: bool = True) -> optax.Schedule:
  """Warm-up + cosine schedule, by default with the learning rate scaled by `batch_size / 256`.

  With `peak = peak_learning_rate(base_lr, batch_size, scale_by_batch=...)`
  (`base_lr * batch_size / 256` by default), step `t` gets
  `peak * t / warmup_steps` for `t < warmup_steps`, then
  `min_lr + (peak - min_lr) * (1 + cos(pi * (t - warmup_steps) / (total_steps - warmup_steps))) / 2`
  until `total_steps`, and `min_lr` after. Step 0 has learning rate 0 when
  there is a warm-up.

  Args:
    base_lr: learning rate at batch size 256 (0.1 in the paper); with
      `scale_by_batch=False`, the peak learning rate itself.
    batch_size: global batch size (all devices together).
    total_steps: length of the whole schedule, warm-up included.
    warmup_steps: length of the linear warm-up (0 for none).
    min_lr: final learning rate.
    scale_by_batch: scale `base_lr` by `batch_size / 256` (the NFNet rule) or
      use it as the peak unscaled (the published NF-RegNet recipe).
  """
  where = "nfnet_lr_schedule"
  peak = peak_learning_rate(base_lr, batch_size, scale_by_batch=scale_by_batch)
  _check_int(where, "total_steps", total_steps, 1)
  _check_int(where, "warmup_steps", warmup_steps, 0)
  if warmup_steps >= total_steps:
    raise ValueError(f"{where}: warmup_steps ({warmup_steps}) must be smaller than "
                     f"total_steps ({total_steps}) to leave room for the cosine decay.")
  check_number(where, "min_lr", min_lr, lambda v: 0 <= v <= peak,
               f"in [0, peak learning rate = {peak}]")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
      decay_steps=total_steps, end_value=min_lr)
