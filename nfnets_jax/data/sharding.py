"""Which part of a split each host process reads, and how long evaluation runs.

Training: each process reads a disjoint, nearly equal slice of the split
(TFDS's `even_splits`, so the first `N % P` processes get one extra example).
Evaluation must see every example exactly once, and every process must run the
same number of steps (a cross-host collective would otherwise hang), so each
process pads its slice with masked-out examples up to
`ceil(largest part / per_process_batch)` full batches (`ceil(ceil(N / P) / B)`
for a plain split; TFDS splits each member of a union 'a+b' on its own, so
parts of a union can differ by more than one example).
"""

import math
from typing import Optional, Sequence

import jax


def resolve_process(process_index: Optional[int] = None,
                    process_count: Optional[int] = None) -> tuple[int, int]:
  """(index, count), defaulting to JAX's multi-host view; validated."""
  count = jax.process_count() if process_count is None else process_count
  index = jax.process_index() if process_index is None else process_index
  if not isinstance(count, int) or count < 1:
    raise ValueError(f"process_count must be a positive int, got {process_count!r}")
  if not isinstance(index, int) or not 0 <= index < count:
    raise ValueError(f"process_index must be an int in [0, {count}), got {process_index!r}")
  return index, count


def shard_sizes(num_examples: int, process_count: int) -> list[int]:
  """Examples per process when `num_examples` are spread as evenly as possible."""
  base, extra = divmod(num_examples, process_count)
  return [base + (1 if i < extra else 0) for i in range(process_count)]


def eval_steps(part_sizes: Sequence[int], per_process_batch: int) -> int:
  """Batches every process yields so that the largest part fits (the same count everywhere)."""
  return math.ceil(max(part_sizes) / per_process_batch)
