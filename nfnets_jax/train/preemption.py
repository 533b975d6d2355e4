"""Stopping a run at an announced interruption (preemption, requeue, Ctrl-C) without losing steps.

Schedulers announce an eviction with SIGTERM and a grace period (SLURM's
`--signal`, spot TPU VMs, Kubernetes); a user presses Ctrl-C (SIGINT). While
`StopSignals` is active, the first such signal only records a stop request,
and later ones are logged and ignored, so a second signal can never interrupt
a checkpoint being written (SIGKILL still can; orbax's temporary-directory
commit keeps the finished checkpoints intact even then).

Every process of a job must stop at the same step, or their collectives
would hang: `StopPoll` combines the processes' requests with a one-element
all-reduce over the job's devices. The poll of step s is dispatched after that
step and read after the next one is dispatched, so the host never waits on it
while the device is idle, and every process reads the same value at the same
boundary. JAX's own preemption sync manager (`multihost_utils.
reached_preemption_sync_point`, what orbax's `reached_preemption` asks) also
hears SIGTERM, on CPU too, but it exists only after `jax.distributed.
initialize`, knows nothing of SIGINT, and agrees some steps later; the trainer
takes both signals itself (replacing that manager's SIGTERM handler while
training) so that one process and many follow the same path.
"""

import signal
import threading
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

#: Exit status of a run that stopped on a signal after saving its step
#: (sysexits' EX_TEMPFAIL: rerun the same command to resume). Not a signal's
#: 128+n, so a wrapper (launch/slurm.sbatch) can tell "saved, requeue me" from a kill.
EXIT_PREEMPTED = 75

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """The run stopped on a signal at `step`, whose checkpoint is complete on disk."""

  def __init__(self, step: int, signal_name: str, directory: str, during: str = "training"):
    self.step = step
    self.signal_name = signal_name
    self.directory = directory
    super().__init__(
        f"Stopped on {signal_name} during {during} at step {step}: its checkpoint is complete in "
        f"{directory}. Rerun the same command to resume from step {step}.")


class StopSignals:
  """A context in which SIGTERM/SIGINT request a stop instead of ending the process.

  `requested` is this process's request (set from the signal handler);
  `signal_name` names the first signal. The previous handlers come back on
  exit. Outside the main thread (where Python cannot install handlers) it
  installs nothing and never requests a stop.
  """

  def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
    self._signals = signals
    self._previous: dict[int, object] = {}
    self.requested = False
    self.signal_name: Optional[str] = None

  def _handle(self, signum: int, frame) -> None:  # pylint: disable=unused-argument
    name = signal.Signals(signum).name
    if self.requested:
      logging.warning("%s received while already stopping on %s: ignored, the checkpoint of the "
                      "stop step is being completed.", name, self.signal_name)
      return
    self.requested, self.signal_name = True, name
    logging.warning("%s received: finishing the current step, then saving a checkpoint and "
                    "stopping.", name)

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is threading.main_thread():
      for signum in self._signals:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      # None: a handler installed outside Python (which Python cannot reinstall).
      signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    self._previous.clear()


def _any_program(mesh: Mesh):
  """`flags (one per device, sharded over the mesh) -> max`, replicated: one tiny all-reduce."""
  return jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))


def _post(mesh: Mesh, program, flag: bool) -> jax.Array:
  sharding = NamedSharding(mesh, P(mesh.axis_names))
  local = np.full((len(mesh.local_devices),), int(flag), np.int32)
  return program(jax.make_array_from_process_local_data(sharding, local))


def any_process(mesh: Mesh, flag: bool) -> bool:
  """Whether `flag` is true on any process of the job (every process must call it)."""
  if jax.process_count() == 1:
    return flag
  return bool(jax.device_get(_post(mesh, _any_program(mesh), flag)))


def all_processes_reached(point: str) -> None:
  """A barrier of the job's processes (no-op in one process): none exits before every
  process has finished waiting for the stop step's checkpoint, so a launcher that ends
  the job when one process exits (`srun --kill-on-bad-exit`) cannot cut another's save."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"nfnets_jax: {point}")


class StopPoll:
  """The job-wide stop decision, polled at step (or eval batch) boundaries.

  Every process calls `poll()` the same number of times; each call returns
  the same value everywhere. In a single process that is the local request
  at once; across processes, the all-reduce of the requests posted at the
  previous call (one boundary later, with no wait on the device).
  """

  def __init__(self, mesh: Mesh, signals: StopSignals):
    self._mesh = mesh
    self._signals = signals
    self._multi = jax.process_count() > 1
    self._program = _any_program(mesh) if self._multi else None
    self._pending: Optional[jax.Array] = None

  @property
  def signal_name(self) -> str:
    return self._signals.signal_name or "a stop request from another process"

  def poll(self) -> bool:
    if not self._multi:
      return self._signals.requested
    previous, self._pending = self._pending, _post(self._mesh, self._program,
                                                   self._signals.requested)
    return previous is not None and bool(jax.device_get(previous))
