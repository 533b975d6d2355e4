"""What the command-line tools' logs show by default: their own lines, not the libraries'.

`nfnets_jax.cli.run` calls `quiet_libraries` once flags are parsed, for the
CLIs only (train, evaluate, classify, convert, spp, report). Without absl's
--verbosity the log keeps this project's lines and everyone's warnings and
errors; the libraries' info lines stay out. Where each comes from:

* JAX's TPU probe ("Unable to initialize backend 'tpu'") and TFDS's notes
  ("Load dataset info", "Constructing tf.data.Dataset", ...): Python info
  records, dropped by the `OwnInfoOnly` filter on absl's log handler.
* TensorFlow's "oneDNN custom operations are on", twice: its libraries log it
  through Abseil while they load, before TF_CPP_MIN_LOG_LEVEL applies, so
  `QuietTensorFlowImport` drops it from what `import tensorflow` writes.
  (TF_ENABLE_ONEDNN_OPTS=0 would prevent it, but it changes TensorFlow's CPU
  kernels and so, slightly, the input pipeline's numbers.)
* TensorFlow's other C++ info lines: TF_CPP_MIN_LOG_LEVEL, which importing
  JAX sets to 1 (warnings) unless it is set.
* TensorFlow's deprecation notices about its own API, which TFDS calls:
  addressed to that library, not to the user (as Python's DeprecationWarning).

With --verbosity every record passes and TF_CPP_MIN_LOG_LEVEL follows it.
"""

import contextlib
import importlib.abc
import importlib.util
import logging as py_logging
import os
import sys
import tempfile
from typing import Any, Iterator, Optional, Sequence

from absl import flags, logging

#: TensorFlow's C++ log threshold (0 info, 1 warnings, 2 errors, 3 fatal only),
#: read when TensorFlow is imported; importing JAX sets it to 1 unless it is set.
TF_LOG_LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
# The nfnets_jax package: this file is nfnets_jax/cli/logs.py.
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_TF_DEPRECATION_NOTICES = os.path.join("tensorflow", "python", "util", "deprecation.py")
#: What TensorFlow's libraries log while they load, before TF_CPP_MIN_LOG_LEVEL
#: applies (TF 2.21: once per library that carries the notice).
TF_IMPORT_NOTICES = ("oneDNN custom operations are on",
                     "All log messages before absl::InitializeLog() is called")


def quiet_libraries(environ: Optional[dict[str, str]] = None) -> None:
  """Sets the defaults of the module docstring from absl's --verbosity; call after parsing flags.

  With --verbosity, TF_CPP_MIN_LOG_LEVEL follows it (the flag wins over the
  environment) and nothing is filtered. Without it, other libraries' info
  records are dropped; and whenever TF_CPP_MIN_LOG_LEVEL hides info lines,
  so is the oneDNN notice of `import tensorflow`.
  """
  environ = os.environ if environ is None else environ
  verbosity = flags.FLAGS["verbosity"]
  if verbosity.present:
    environ[TF_LOG_LEVEL_VARIABLE] = tf_cpp_min_log_level(verbosity.value)
  else:
    handler = logging.get_absl_handler()
    if not any(isinstance(f, OwnInfoOnly) for f in handler.filters):
      handler.addFilter(OwnInfoOnly())
  tf_info_hidden = environ.get(TF_LOG_LEVEL_VARIABLE, "1") != "0"
  if tf_info_hidden and "tensorflow" not in sys.modules and not any(
      isinstance(finder, QuietTensorFlowImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, QuietTensorFlowImport())


def tf_cpp_min_log_level(verbosity: int) -> str:
  """TF_CPP_MIN_LOG_LEVEL (0 info ... 3 fatal) for absl's verbosity (1 debug ... -3 fatal)."""
  return str(min(3, max(0, -verbosity)))


class OwnInfoOnly(py_logging.Filter):
  """Passes this project's records and everyone's warnings and errors.

  Other libraries' info and debug records, and TensorFlow's deprecation
  notices, are dropped: they describe the libraries' internals.
  """

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.pathname.startswith(_PACKAGE_DIR):
      return True
    if record.pathname.endswith(_TF_DEPRECATION_NOTICES):
      return False
    return record.levelno >= py_logging.WARNING


class QuietTensorFlowImport(importlib.abc.MetaPathFinder):
  """Runs the first `import tensorflow` with its load-time notices dropped from stderr.

  See `TF_IMPORT_NOTICES`. Everything else TensorFlow writes to stderr while
  it loads is written out when the import ends (a crash inside it would lose
  that: run with --verbosity=0 to see it live). The finder leaves
  `sys.meta_path` once TensorFlow is imported.
  """

  def __init__(self):
    self._searching = False

  def find_spec(self, fullname: str, path: Any, target: Any = None):
    if fullname != "tensorflow" or self._searching:
      return None
    self._searching = True  # The search below asks every finder again, this one too.
    try:
      spec = importlib.util.find_spec(fullname)
    finally:
      self._searching = False
    if spec is not None and spec.loader is not None:
      spec.loader = _LoaderWithoutNotices(spec.loader, self)
    return spec


class _LoaderWithoutNotices(importlib.abc.Loader):
  """Runs `loader` inside `stderr_without(TF_IMPORT_NOTICES)`; the module keeps `loader`."""

  def __init__(self, loader: importlib.abc.Loader, finder: QuietTensorFlowImport):
    self._loader = loader
    self._finder = finder

  def create_module(self, spec):
    return self._loader.create_module(spec)

  def exec_module(self, module) -> None:
    module.__loader__ = module.__spec__.loader = self._loader
    if self._finder in sys.meta_path:
      sys.meta_path.remove(self._finder)
    with stderr_without(TF_IMPORT_NOTICES):
      self._loader.exec_module(module)


@contextlib.contextmanager
def stderr_without(dropped: Sequence[str]) -> Iterator[None]:
  """Holds back what is written to file descriptor 2 inside (C++ libraries too);
  then writes it out, less the lines that contain one of `dropped`."""
  sys.stderr.flush()
  original = os.dup(2)
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(original, 2)
      os.close(original)
      held.seek(0)
      lines = held.read().decode("utf-8", "replace").splitlines(keepends=True)
      sys.stderr.write("".join(line for line in lines if not any(d in line for d in dropped)))
      sys.stderr.flush()
