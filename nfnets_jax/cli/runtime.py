"""Process-level set-up shared by the command-line tools.

* Multi-host: `jax.distributed.initialize` when the job spans several
  processes (explicit flags, or a cluster JAX recognises: SLURM, TPU pods,
  ...), with gloo collectives so CPU-only multi-process runs work too.
* JAX's persistent compilation cache, on by default, so a resumed run or an
  evaluation of a model compiled before starts in seconds.
* On the CPU backend, `cpu_tuning.tune_cpu()` (on by default, `--notune_cpu`
  turns it off): without it XLA:CPU re-faults its per-step temporary memory
  from the kernel on every step.

The flags (`--distributed`, `--coordinator_address`, `--num_processes`,
`--process_id`, `--compilation_cache_dir`, `--tune_cpu`) are defined on absl's global
`flags.FLAGS` when this module is imported, for `python -m nfnets_jax.train`.
Tools that parse their own `flags.FlagValues` (so that several of them can
live in one process) register the same flags there with `define_flags(fv)`
and pass what it returns to `setup`.
"""

import dataclasses
import os
from typing import Optional

import jax
from absl import flags, logging

from nfnets_jax.cli import cpu_tuning

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "nfnets_jax", "xla")


@dataclasses.dataclass(frozen=True)
class RuntimeFlags:
  """Holders of the runtime flags on one `FlagValues`.

  The multi-host ones are None when that flag set was defined without them
  (`define_flags(..., distributed=False)`, for single-process tools).
  """
  compilation_cache_dir: flags.FlagHolder
  tune_cpu: flags.FlagHolder
  distributed: Optional[flags.FlagHolder] = None
  coordinator_address: Optional[flags.FlagHolder] = None
  num_processes: Optional[flags.FlagHolder] = None
  process_id: Optional[flags.FlagHolder] = None


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, *,
                 distributed: bool = True) -> RuntimeFlags:
  """Defines the runtime flags on `flag_values`; `distributed=False` leaves out the multi-host ones."""
  cache = flags.DEFINE_string(
      "compilation_cache_dir", DEFAULT_CACHE_DIR,
      "Directory of JAX's persistent compilation cache ('' disables it).",
      flag_values=flag_values)
  tune = flags.DEFINE_bool(
      "tune_cpu", True,
      "On the CPU backend, run computations on the calling thread and keep freed host memory "
      "for reuse, so XLA's per-step temporary buffer is not zero-filled by the kernel again "
      "every step (faster CPU training; see docs/performance.md). --notune_cpu keeps JAX's "
      "and glibc's defaults. No effect on GPU/TPU.",
      flag_values=flag_values)
  if not distributed:
    return RuntimeFlags(compilation_cache_dir=cache, tune_cpu=tune)
  return RuntimeFlags(
      compilation_cache_dir=cache,
      tune_cpu=tune,
      distributed=flags.DEFINE_enum(
          "distributed", "auto", ["auto", "on", "off"],
          "Call jax.distributed.initialize: 'auto' when --num_processes/--coordinator_address "
          "are given or a multi-process SLURM/TPU-pod environment is detected.",
          flag_values=flag_values),
      coordinator_address=flags.DEFINE_string(
          "coordinator_address", None, "host:port of process 0, for jax.distributed.initialize.",
          flag_values=flag_values),
      num_processes=flags.DEFINE_integer(
          "num_processes", None, "Total number of processes.", flag_values=flag_values),
      process_id=flags.DEFINE_integer(
          "process_id", None, "This process's index.", flag_values=flag_values),
  )


#: The flags on absl's global FLAGS (what `python -m nfnets_jax.train` parses).
GLOBAL_FLAGS = define_flags(flags.FLAGS)


def cluster_detected(environ: Optional[dict] = None) -> bool:
  """True when the environment describes a job of several processes."""
  environ = os.environ if environ is None else environ
  if int(environ.get("SLURM_NTASKS", "1") or 1) > 1:
    return True
  if "," in environ.get("TPU_WORKER_HOSTNAMES", ""):
    return True
  return bool(environ.get("JAX_COORDINATOR_ADDRESS"))


def enable_compilation_cache(directory: Optional[str]) -> None:
  """Points JAX's persistent compilation cache at `directory` (None or '' leaves it off)."""
  if directory:
    jax.config.update("jax_compilation_cache_dir", directory)


def initialize_distributed(mode: str = "auto", coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> bool:
  """Calls `jax.distributed.initialize` when `mode` says so; returns whether it did.

  'auto' initialises when a coordinator or several processes are given, or the
  environment is a multi-process cluster job; 'on' always, 'off' never. Must
  run before anything touches a JAX device.
  """
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"distributed mode must be 'auto', 'on' or 'off', got {mode!r}")
  explicit = coordinator_address is not None or (num_processes or 1) > 1
  if not (mode == "on" or (mode == "auto" and (explicit or cluster_detected()))):
    return False
  # CPU collectives across processes need gloo; harmless on GPU/TPU backends.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices.",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def setup(runtime_flags: Optional[RuntimeFlags] = None) -> None:
  """Initialises multi-host JAX (if needed), the compilation cache and CPU tuning. Call first.

  `runtime_flags` are the holders `define_flags` returned for a tool's own
  flag set; by default the global flags (the trainer's). The log's defaults
  are the CLIs' (`nfnets_jax.cli.logs`).
  """
  runtime_flags = GLOBAL_FLAGS if runtime_flags is None else runtime_flags
  enable_compilation_cache(runtime_flags.compilation_cache_dir.value)
  if runtime_flags.tune_cpu.value:
    cpu_tuning.request_sync_dispatch()  # jax.distributed.initialize creates the backends
  if runtime_flags.distributed is not None:
    initialize_distributed(runtime_flags.distributed.value,
                           runtime_flags.coordinator_address.value,
                           runtime_flags.num_processes.value,
                           runtime_flags.process_id.value)
  if runtime_flags.tune_cpu.value:
    logging.info("%s", cpu_tuning.tune_cpu().describe())
