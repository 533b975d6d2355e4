"""Per-example randomness from counter-based (stateless) seeds.

Every random choice in the pipeline (crop, flip, RandAugment, mixing ratios)
draws from a seed derived from (run seed, process, example position in the
stream). That makes a seeded run reproducible no matter how tf.data schedules
its parallel maps, and lets a resumed run recreate exactly the augmentations it
would have made, just by knowing how many examples were consumed. Fast mode uses
the same ops with a fresh random run seed, so there is one code path.
"""

import secrets
from typing import Optional

from nfnets_jax.data._tf import tf


def run_seed(seed: Optional[int], process_index: int) -> tf.Tensor:
  """The [2]-int64 key of a run: the user's seed (or fresh entropy) and the process."""
  if seed is None:
    seed = secrets.randbits(62)
  if not isinstance(seed, int) or isinstance(seed, bool):
    raise ValueError(f"seed must be an int or None, got {seed!r}")
  return tf.constant([seed % (1 << 63), process_index], dtype=tf.int64)


def example_seed(key: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
  """The seed of the example at stream position `index`."""
  return tf.random.experimental.stateless_fold_in(key, tf.cast(index, tf.int64))


def split_seed(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
  """`num` independent seeds from one, for the separate random choices of an example."""
  return tf.unstack(tf.random.experimental.stateless_split(seed, num=num))


def uniform(seed: tf.Tensor, minval: float = 0.0, maxval: float = 1.0) -> tf.Tensor:
  """A scalar float32 uniform in [minval, maxval)."""
  return tf.random.stateless_uniform([], seed, minval=minval, maxval=maxval, dtype=tf.float32)


def randint(seed: tf.Tensor, maxval: tf.Tensor | int) -> tf.Tensor:
  """A scalar int32 uniform in [0, maxval)."""
  return tf.random.stateless_uniform([], seed, minval=0, maxval=maxval, dtype=tf.int32)
