"""Timing shared by the benchmarks: medians of interleaved rounds.

Each round calls every contender once, so drifting machine load (these CPUs
are shared) hits all of them alike; ratios between medians of one run are
what the benchmarks report. Also the `--cpu-tuning` switch of the JAX
benchmarks, so that they time the process our tools would run.
"""

import argparse
import statistics
import time
from typing import Callable

from nfnets_jax.cli import cpu_tuning


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


def add_cpu_tuning_flag(parser: argparse.ArgumentParser) -> None:
  """`--cpu-tuning on|off`: whether the run uses the process settings our tools apply."""
  parser.add_argument("--cpu-tuning", choices=("on", "off"), default="on",
                      help="on (default): what nfnets_jax's command-line tools do on CPU "
                           "(nfnets_jax.cli.cpu_tuning: synchronous XLA:CPU dispatch, glibc keeps "
                           "freed memory; shared by everything in the process); off: JAX's "
                           "and glibc's defaults")


def apply_cpu_tuning(args: argparse.Namespace) -> str:
  """Applies `--cpu-tuning` (call before any JAX work); returns a line for the report."""
  if args.cpu_tuning == "off":
    return "CPU tuning off (--cpu-tuning=off): JAX's and glibc's defaults."
  return cpu_tuning.tune_cpu().describe()
