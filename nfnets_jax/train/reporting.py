"""Where training metrics go: the log (a progress line) and TensorBoard event files.

Only process 0 writes; every process computes the same (all-reduced) metrics.
TensorFlow's summary writer is imported lazily: TF is already a dependency of
the input pipeline, and its writer needs no running TensorBoard.
"""

import os
import time
from typing import Mapping, Optional

import jax
import numpy as np
from absl import logging


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Reporter:
  """Writes scalars to `<workdir>/tensorboard/<split>` (unless `write` is False) and prints
  progress lines."""

  def __init__(self, workdir: str, total_steps: int, global_batch_size: int, *,
               write: bool = True):
    self.total_steps = total_steps
    self.global_batch_size = global_batch_size
    self.logdir = os.path.join(os.path.abspath(workdir), "tensorboard")
    self._writers = {}
    self._last_time: Optional[float] = None
    self._last_step: Optional[int] = None
    self._writes = write and jax.process_index() == 0

  def _writer(self, split: str):
    if split not in self._writers:
      from nfnets_jax.data._tf import tf  # pylint: disable=import-outside-toplevel
      self._writers[split] = tf.summary.create_file_writer(os.path.join(self.logdir, split))
    return self._writers[split]

  def scalars(self, split: str, step: int, values: Mapping[str, float]) -> None:
    if not self._writes:
      return
    writer = self._writer(split)
    from nfnets_jax.data._tf import tf  # pylint: disable=import-outside-toplevel
    with writer.as_default():
      for name, value in values.items():
        tf.summary.scalar(name, float(value), step=step)
    writer.flush()

  def train_progress(self, step: int, metrics: Mapping[str, float]) -> dict[str, float]:
    """Logs a progress line (throughput, ETA) and writes the scalars; returns them."""
    now = time.perf_counter()
    values = {key: float(np.asarray(value)) for key, value in metrics.items()}
    if self._last_time is not None and step > self._last_step:
      steps_per_sec = (step - self._last_step) / (now - self._last_time)
      values["images_per_sec"] = steps_per_sec * self.global_batch_size
      eta = _format_duration((self.total_steps - step) / steps_per_sec)
    else:
      eta = "?"
    self._last_time, self._last_step = now, step
    self.scalars("train", step, values)
    shown = " | ".join(f"{key} {value:.4g}" for key, value in values.items())
    logging.info("step %d/%d (%.0f%%) | %s | eta %s", step, self.total_steps,
                 100.0 * step / self.total_steps, shown, eta)
    return values

  def close(self) -> None:
    for writer in self._writers.values():
      writer.close()
