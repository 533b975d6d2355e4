"""Process settings that make XLA:CPU steps stop paying for fresh memory every call.

XLA:CPU asks the C allocator for one temporary buffer per execution of a
compiled program (a train step's is large) and frees it when the call ends.
With JAX's defaults that buffer is allocated on a PjRt worker thread, i.e. from
one of glibc's secondary arenas, whose heaps are capped at 64 MiB, so glibc
serves it with `mmap` and returns it with `munmap`. The kernel then zero-fills
every page again on the next step, a large share of a CPU train step's time
(measurements: see docs/performance.md).

`tune_cpu()` removes that cost with two settings, both needed:

* `jax_cpu_enable_async_dispatch=False`: computations on one local CPU device
  run on the calling (main) thread, so their buffers come from glibc's main
  arena. Computations over several local devices are unaffected (JAX still
  runs them concurrently, one per device); so is cross-process communication.
* `mallopt(M_MMAP_MAX, 0)` and `M_TRIM_THRESHOLD` -1 (never trim): the main arena
  serves large blocks from its heap and keeps freed memory for the next call
  instead of handing it back to the kernel.

The cost: memory freed by the process is kept in the process (resident size
stays at its high-water mark), and Python no longer runs ahead of the CPU
computation it dispatched. Neither matters for a training or evaluation job;
a library user who imports AGC into their own program is not affected unless
they call `tune_cpu()` themselves.
"""

import ctypes
import ctypes.util
import dataclasses
import platform
from typing import Optional

import jax

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# glibc documents a trim threshold of -1 as "never trim" (it becomes the largest
# size_t). The largest positive int, 2 GiB, is not: the freed buffer of a
# program whose temporaries exceed it (an NFNet-F1 train step's do) would be
# handed back at the end of every call and faulted in again on the next.
_NEVER_TRIM = -1


@dataclasses.dataclass(frozen=True)
class CpuTuning:
  """What `tune_cpu` changed, for the log."""
  sync_dispatch: bool
  retain_freed_memory: bool
  reason: str = ""

  def describe(self) -> str:
    if self.sync_dispatch and self.retain_freed_memory:
      return "CPU tuning: synchronous dispatch, freed host memory kept for reuse."
    if self.sync_dispatch or self.retain_freed_memory:
      return f"CPU tuning partly applied: {self.reason}"
    return f"CPU tuning not applied: {self.reason}"


def _glibc() -> Optional[ctypes.CDLL]:
  """The process's glibc, or None on other C libraries (musl, macOS), whose mallopt differs."""
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  except OSError:
    return None
  return libc if hasattr(libc, "mallopt") else None


def retain_freed_memory() -> bool:
  """Makes glibc serve large blocks from the heap and keep freed memory; False where it cannot.

  Affects blocks allocated on the main thread (glibc's main arena); see the
  module docstring for why that is the one that matters here.
  """
  libc = _glibc()
  if libc is None:
    return False
  libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  libc.mallopt.restype = ctypes.c_int
  # mallopt returns 1 on success, 0 on error.
  return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))


def _cpu_client_exists() -> bool:
  """Whether JAX has created its backends already (then the dispatch mode is fixed).

  JAX has no public query for this; `jax.distributed.initialize` uses the same
  private one. If a JAX release drops it, assume not created.
  """
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  query = getattr(xla_bridge, "backends_are_initialized", None)
  return bool(query and query())


def request_sync_dispatch() -> bool:
  """Asks for synchronous CPU dispatch without creating JAX's backends.

  Safe before `jax.distributed.initialize` (which creates them), so that a
  multi-process job gets the setting too. False when the CPU client already
  exists with asynchronous dispatch (then it is too late).
  """
  if _cpu_client_exists():
    return not jax.config.read("jax_cpu_enable_async_dispatch")
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  return True


def tune_cpu() -> CpuTuning:
  """Applies the settings of the module docstring when JAX's default backend is the CPU.

  Call before the first JAX computation: the dispatch mode is read when JAX
  creates its CPU client, which this function triggers. A multi-process job
  calls `request_sync_dispatch()` before `jax.distributed.initialize` and this
  after it (as `runtime.setup` does). Called too late, or on a GPU/TPU
  backend, it changes nothing and says why.
  """
  if not request_sync_dispatch():
    # The allocator half alone would only keep memory (the big buffers come
    # from worker threads' arenas), so it is skipped too.
    return CpuTuning(False, False, "JAX's CPU client already existed with asynchronous "
                     "dispatch; call tune_cpu() before the first JAX computation.")
  backend = jax.default_backend()  # creates the clients, with synchronous CPU dispatch
  if backend != "cpu":
    return CpuTuning(False, False, f"default backend is {backend!r}, not CPU.")
  retained = retain_freed_memory()
  return CpuTuning(True, retained,
                   "" if retained else f"C library {platform.libc_ver()[0] or 'unknown'!r} is "
                   "not glibc, so freed memory is returned to the system as usual.")
