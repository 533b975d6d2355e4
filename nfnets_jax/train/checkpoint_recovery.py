"""What real filesystems do to checkpoints: damaged steps on restore, failed saves.

* `restore_newest_readable` tries the saved steps newest first. A step that
  cannot be read (a truncated array file, a missing item, bad metadata) is
  reported by name and the next older one is tried; once one restores, the
  damaged newer steps are moved, never deleted, to
  `<workdir>/damaged_checkpoints/<step>` (otherwise the resumed run could not
  save those steps again). If no step restores, nothing is moved and the
  error lists every step with its cause: a config that no longer fits the
  checkpoints fails on all of them, and must not cost the user their files.
* `save_failures` turns any error of a save (disk full, permission denied,
  quota) into a `CheckpointSaveError` naming the directory, the step and
  the cause.

In a multi-process job every process takes part in each restore attempt and
all agree (an all-reduce) on whether it succeeded, so they resume from the
same step; process 0 moves the damaged directories.
"""

import contextlib
import os
from typing import Any, Iterator, Optional

import jax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from nfnets_jax.train.preemption import any_process

DAMAGED_SUBDIR = "damaged_checkpoints"


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written; the ones saved before are untouched."""


class NoReadableCheckpointError(RuntimeError):
  """Checkpoints exist but none of them can be restored."""


def _cause(err: BaseException) -> str:
  text = " ".join(str(err).split()) or "no message"
  return f"{type(err).__name__}: {text[:300]}"


@contextlib.contextmanager
def save_failures(directory: str, step: Optional[int]) -> Iterator[None]:
  """Re-raises any error inside as one `CheckpointSaveError` line (no-op when `step` is None)."""
  try:
    yield
  except Exception as err:  # orbax/tensorstore raise OSError, ValueError, RuntimeError, ...
    if step is None:
      raise
    raise CheckpointSaveError(
        f"Saving the checkpoint of step {step} in {directory} failed ({_cause(err)}); it was not "
        "saved. The checkpoints saved before it are intact: fix the cause (free space, "
        "permissions, quota), then rerun the same command to resume from the latest one."
    ) from err


def _move_aside(directory: str, step: int) -> str:
  """Moves step `step` of the manager in `directory` to `<workdir>/damaged_checkpoints/`."""
  damaged_root = os.path.join(os.path.dirname(directory), DAMAGED_SUBDIR)
  os.makedirs(damaged_root, exist_ok=True)
  destination, suffix = os.path.join(damaged_root, str(step)), 1
  while os.path.exists(destination):
    destination, suffix = os.path.join(damaged_root, f"{step}.{suffix}"), suffix + 1
  os.rename(os.path.join(directory, str(step)), destination)
  return destination


def restore_newest_readable(checkpointer: Any, target: Any, mesh: Mesh) -> Optional[tuple]:
  """`(state, meta, step)` of the newest step that restores, or None when none is saved.

  `checkpointer` is a `checkpoints.Checkpointer`; `target` the abstract state
  to restore into. Raises `NoReadableCheckpointError` when steps exist and
  none restores.
  """
  directory = checkpointer.directory
  saved = sorted(checkpointer.all_steps(), reverse=True)
  damaged: list[tuple[int, str]] = []
  for step in saved:
    restored, cause = None, None
    try:
      restored = checkpointer.restore(target, step)
    except Exception as err:  # anything a damaged file makes orbax or tensorstore raise
      cause = _cause(err)
    if not any_process(mesh, restored is None):
      if damaged:
        _set_aside(checkpointer, damaged, step)
      state, meta = restored
      return state, meta, step
    cause = cause or "unreadable on another process of the job"
    logging.warning("Checkpoint step %d in %s cannot be read (%s); trying the next older one.",
                    step, directory, cause)
    damaged.append((step, cause))
  if not damaged:
    return None
  listing = "; ".join(f"step {step}: {cause}" for step, cause in damaged)
  raise NoReadableCheckpointError(
      f"None of the {len(damaged)} checkpoints in {directory} can be restored ({listing}). "
      "Nothing was moved or deleted. If the config changed since they were saved, restore it; "
      "otherwise move the damaged steps away to start from scratch.")


def _set_aside(checkpointer: Any, damaged: list[tuple[int, str]], restored_step: int) -> None:
  directory = checkpointer.directory
  if jax.process_index() == 0:
    for step, cause in damaged:
      moved = _move_aside(directory, step)
      logging.warning("Damaged checkpoint step %d (%s) moved to %s, not deleted; resuming from "
                      "step %d.", step, cause, moved, restored_step)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("nfnets_jax: damaged checkpoints set aside")
  checkpointer.reload()
