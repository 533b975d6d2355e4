"""Timing shared by the benchmarks: medians of interleaved rounds.

Each round calls every contender once, so drifting machine load (these CPUs
are shared) hits all of them alike; ratios between medians of one run are
what the benchmarks report.
"""

import statistics
import time
from typing import Callable


def alternate(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
  """Median seconds per call of each zero-argument fn, rounds interleaved.

  Each fn must block until its work is done (e.g. `jax.block_until_ready`).
  """
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}
