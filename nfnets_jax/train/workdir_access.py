"""Whether `--workdir` can hold a run, checked before anything is built.

A workdir that cannot be written used to fail late and loudly: a read-only
one with checkpoints resumed, trained, then died in TensorBoard's writer with a
traceback (exit 1); a workdir that is a file, or one on an empty read-only
filesystem, ended in tracebacks too; `--workdir=` (empty) wrote into the
current directory. `check` turns each into one line and the trainer's exit
status: 1 for a value that names no usable directory, 4 (as for a checkpoint
that cannot be saved) for a directory that cannot be written. Nothing is
written or changed but a probe file, removed at once. Object-store paths
(`gs://...`) are left to the writers.
"""

import os
import tempfile

#: Exit statuses (the trainer's, see nfnets_jax/train/__main__.py).
EXIT_BAD_VALUE = 1
EXIT_CANNOT_WRITE = 4
#: The workdir's sub-directories probed when they exist (`checkpoints/` is not: a save
#: that fails there stops the run with its own line and exit 4, naming the step).
WRITTEN_SUBDIRS = ("tensorboard",)


class WorkdirError(Exception):
  """The workdir cannot be used; `exit_code` is the status the trainer ends with."""

  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code


def check(workdir: str, *, writes: bool = True) -> str:
  """The absolute workdir, created if missing when `writes`; a `WorkdirError` if it cannot
  be used (and, with `writes`, written: it and the sub-directories that exist)."""
  if not workdir or not workdir.strip():
    raise WorkdirError(
        "--workdir is empty: give the directory of the run (created if missing), e.g. "
        "--workdir=runs/demo; it would have written into the current directory.",
        EXIT_BAD_VALUE)
  if "://" in workdir:
    return workdir
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(
        f"--workdir={workdir}: {path} is a file, not a directory; give the directory of the "
        "run (created if missing).", EXIT_BAD_VALUE)
  if not writes:
    if not os.path.isdir(path):
      raise WorkdirError(f"--workdir={workdir}: {path} does not exist; there is nothing to "
                         "evaluate (train first: --mode=train or train_eval).", EXIT_BAD_VALUE)
    return path
  try:
    os.makedirs(path, exist_ok=True)
    for directory in [path] + [os.path.join(path, sub) for sub in WRITTEN_SUBDIRS
                               if os.path.isdir(os.path.join(path, sub))]:
      _probe(directory)
  except OSError as err:
    cause = " ".join(f"{type(err).__name__}: {err}".split())
    raise WorkdirError(
        f"Cannot write to the workdir {path} ({cause}): the run saves its checkpoints and "
        "TensorBoard logs there. Nothing was written; the checkpoints already in it are "
        "intact. Make it writable, or give another --workdir (--config.init_from=<this "
        "workdir> starts a new run from its weights).", EXIT_CANNOT_WRITE) from None
  return path


def is_writable(workdir: str) -> bool:
  """Whether a probe file can be written in `workdir` (an existing directory)."""
  try:
    _probe(workdir)
  except OSError:
    return False
  return True


def _probe(directory: str) -> None:
  """Creates and removes a uniquely named file in `directory` (raises OSError if it cannot)."""
  with tempfile.NamedTemporaryFile(dir=directory, prefix=".nfnets_jax_write_probe_"):
    pass
