"""Stopping a run at an announced interruption (preemption, requeue, Ctrl-C) without losing steps.

Schedulers announce an eviction with SIGTERM and a grace period (SLURM's
`--signal`, spot TPU VMs, Kubernetes); a user presses Ctrl-C (SIGINT). While
`StopSignals` is active, the first such signal records a stop request, read
at the next step boundary (before the first step, with nothing to save, it
ends the process at once); a stop whose step never ends (a stuck input
pipeline or device) ends the process after a grace period; a second signal
ends it at once, unless it comes so soon after the first that it is the same
request delivered twice (orbax's temporary-directory commit keeps the
finished checkpoints intact whatever cuts a save short).

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

import os
import select
import signal
import sys
import threading
import time
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

  `requested` is this process's request; `signal_name` names the first signal.
  What a signal does depends on where the run is:

  * before the first step ends (`training_started` not called, or no
    `reached_boundary` since): nothing new would be saved, so the process
    ends at once with one line and `EXIT_PREEMPTED` (the rerun resumes from
    the checkpoints as they are);
  * while training: a stop is requested, which the loop reads at its next
    step boundary (`StopPoll`) and acknowledges (`stopping`) before saving.
    If no boundary comes within `grace_factor` x the longest interval between
    boundaries seen so far (the first includes compilation), and at least
    `min_grace_s`, the step cannot finish (a stuck input pipeline or device):
    the process ends with one line and 128 + the signal's number;
  * a further signal within `repeat_window_s` of the first is the same
    request delivered twice (a launcher forwarding the terminal's Ctrl-C, a
    scheduler signalling every task and its parent) and is ignored; a later
    one ends the process at once (128 + its number). A checkpoint being
    written is then left incomplete, never the complete ones: orbax writes
    each under a temporary name first.

  A blocked main thread (a step waiting on the device or on tf.data, a
  compilation) cannot run Python's signal handlers, so a watcher thread reads
  the signals from `signal.set_wakeup_fd` and acts for it when the handler has
  not run within `HANDLER_WAIT_S`. The previous handlers come back on exit.
  Outside the main thread (where Python cannot install handlers) it installs
  nothing and never requests a stop.
  """

  #: How long the watcher leaves a signal to the main thread's handler.
  HANDLER_WAIT_S = 0.5

  def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS, *, repeat_window_s: float = 2.0,
               min_grace_s: float = 60.0, grace_factor: float = 2.0,
               before_first_step: str = "before the first training step (while reading the "
                                        "data, restoring or compiling)"):
    self._signals = signals
    self._repeat_window_s = repeat_window_s
    self._min_grace_s = min_grace_s
    self._grace_factor = grace_factor
    self._previous: dict[int, object] = {}
    self._lock = threading.RLock()
    self._deliveries = 0  # signals read from the wakeup fd
    self._processed = 0  # signals acted on, by the handler or the watcher
    self._owed = 0  # acted on by the watcher, their handler call still to come
    self._wakeup: Optional[tuple[int, int]] = None
    self._previous_wakeup = -1
    self._watcher: Optional[threading.Thread] = None
    self._first_at: Optional[float] = None
    self._last_boundary: Optional[float] = None
    self._longest_interval = 0.0
    self._boundaries = 0
    self._stopping = False
    self.requested = False
    self.signal_name: Optional[str] = None
    #: Where the run is before its first step, for the line a signal then ends it with.
    self.moment = before_first_step
    #: Said when a signal ends the process: where the complete checkpoints are.
    self.checkpoint_dir = "the workdir"

  # -- what the run tells it --------------------------------------------------

  def training_started(self) -> None:
    """The training loop begins: intervals between boundaries are timed from here."""
    with self._lock:
      self._last_boundary = time.monotonic()

  def reached_boundary(self) -> None:
    """The loop reached a step (or eval batch) boundary, where a stop request is read."""
    with self._lock:
      now = time.monotonic()
      if self._last_boundary is not None:
        self._longest_interval = max(self._longest_interval, now - self._last_boundary)
      self._last_boundary = now
      self._boundaries += 1

  def stopping(self) -> None:
    """The loop read the request and is saving: no more deadline."""
    with self._lock:
      self._stopping = True

  def grace_s(self) -> float:
    """How long a requested stop may wait for the next boundary."""
    return max(self._min_grace_s, self._grace_factor * self._longest_interval)

  # -- signals ----------------------------------------------------------------

  def _handle(self, signum: int, frame) -> None:  # pylint: disable=unused-argument
    with self._lock:
      if self._owed:  # the watcher acted on it while this thread was blocked
        self._owed -= 1
        return
      self._processed += 1
      self._act(signum)

  def _act(self, signum: int) -> None:
    name = signal.Signals(signum).name
    now = time.monotonic()
    if not self.requested:
      self.requested, self.signal_name, self._first_at = True, name, now
      if not self._boundaries:
        _exit_now(EXIT_PREEMPTED, f"Stopped on {name} {self.moment}: no step had been trained "
                                  f"since the last checkpoint, so nothing was lost (the "
                                  f"checkpoints in {self.checkpoint_dir}, if any, are as they "
                                  "were). Rerun the same command to resume.")
      logging.warning("%s received: finishing the current step, then saving a checkpoint and "
                      "stopping (another signal after %g s ends the process at once).", name,
                      self._repeat_window_s)
      return
    if now - self._first_at < self._repeat_window_s:
      logging.warning("%s received while already stopping on %s: ignored, as the same stop "
                      "request delivered twice (within %g s of it); a signal after that ends the "
                      "process at once.", name, self.signal_name, self._repeat_window_s)
      return
    _exit_now(128 + signum, f"Stopped on a second signal ({name}, after {self.signal_name}) "
                            "without finishing the stop: a checkpoint being written is left "
                            f"incomplete; the complete ones in {self.checkpoint_dir} are kept. "
                            "Rerun the same command to resume from the newest of them.")

  def _watch(self, read_fd: int) -> None:
    """The watcher thread: acts for a blocked main thread and enforces the grace period."""
    while True:
      timeout = None
      with self._lock:
        if self.requested and not self._stopping and self._first_at is not None:
          timeout = max(0.0, self._first_at + self.grace_s() - time.monotonic())
      ready, _, _ = select.select([read_fd], [], [], timeout)
      if not ready:
        self._end_if_no_boundary_came()
        continue
      data = os.read(read_fd, 64)
      if not data:
        return  # closed by __exit__
      for signum in data:
        if signum not in self._signals:
          continue
        with self._lock:
          self._deliveries += 1
        deadline = time.monotonic() + self.HANDLER_WAIT_S
        while time.monotonic() < deadline:
          with self._lock:
            if self._processed >= self._deliveries:
              break
          time.sleep(0.01)
        with self._lock:
          if self._processed < self._deliveries:
            self._processed += 1
            self._owed += 1
            self._act(signum)

  def _end_if_no_boundary_came(self) -> None:
    with self._lock:
      if self._stopping or self._first_at is None:
        return
      waited = time.monotonic() - self._first_at
      if waited < self.grace_s():
        return
      signum = signal.Signals[self.signal_name]
      _exit_now(128 + signum, f"Stopped on {self.signal_name}: the running step did not end "
                              f"within {waited:.0f} s of the signal ({self._grace_factor:g} x "
                              "the longest step so far, at least "
                              f"{self._min_grace_s:g} s; the input pipeline or a device may "
                              "be stuck), so its progress since the last checkpoint is lost; "
                              f"the complete checkpoints in {self.checkpoint_dir} are kept. Rerun "
                              "the same command to resume from the newest of them.")

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is not threading.main_thread():
      return self
    for signum in self._signals:
      self._previous[signum] = signal.signal(signum, self._handle)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    self._wakeup = (read_fd, write_fd)
    self._previous_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    self._watcher = threading.Thread(target=self._watch, args=(read_fd,), daemon=True,
                                     name="nfnets_jax stop signals")
    self._watcher.start()
    return self

  def __exit__(self, *exc_info) -> None:
    if self._wakeup is not None:
      signal.set_wakeup_fd(self._previous_wakeup)
    for signum, handler in self._previous.items():
      # None: a handler installed outside Python (which Python cannot reinstall).
      signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    self._previous.clear()
    if self._wakeup is not None:
      read_fd, write_fd = self._wakeup
      os.close(write_fd)
      self._watcher.join(timeout=5)
      os.close(read_fd)
      self._wakeup = self._watcher = None


def _exit_now(code: int, line: str) -> None:
  """Ends the process from any thread: the line on stderr, the logs flushed, no cleanup
  (the threads of a stuck step or of a save in progress would never be joined)."""
  logging.flush()
  sys.stderr.write(f"{line}\n")
  sys.stderr.flush()
  sys.stdout.flush()
  os._exit(code)  # pylint: disable=protected-access


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
    """Whether the job stops at this boundary (then the signals stop timing the step)."""
    self._signals.reached_boundary()
    if not self._multi:
      stop = self._signals.requested
    else:
      previous, self._pending = self._pending, _post(self._mesh, self._program,
                                                     self._signals.requested)
      stop = previous is not None and bool(jax.device_get(previous))
    if stop:
      self._signals.stopping()
    return stop
