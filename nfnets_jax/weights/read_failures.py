"""What a failed orbax read leaves behind, kept off the user's screen.

When one array of a checkpoint cannot be read (a truncated file), orbax's
restore raises at once and closes its asyncio event loop, while TensorStore
still finishes the other reads it had started. Each of those then fails to
post its result to the closed loop, and Python prints every one as an
unraisable exception ("Event loop is closed", or the read's own error with the
array's full TensorStore spec), plus asyncio's "Task/Future exception was never
retrieved" and "coroutine ... was never awaited": hundreds to thousands of lines,
after, and so burying, the one-line
error the tools and the trainer print (seen 2 of 9 evaluations; it is a race).

`reporting_failure()` wraps a restore: if the restore raises, it installs (once
per process) a filter that drops exactly those leftovers — unraisable
exceptions and never-retrieved task errors that are either "Event loop is
closed", orbax's "Encountered error while reading array" or TensorStore's
"<STATUS>: Error reading ..." (and the unawaited read coroutines' warning) — and
re-raises the restore's error unchanged. Anything else still reaches
Python's usual hooks.
"""

import contextlib
import logging
import re
import sys
import threading
import warnings
from typing import Iterator, Optional

_READ_ERROR = "Encountered error while reading array"
#: TensorStore's own read errors, an absl status code first ("OUT_OF_RANGE: Error reading
#: "m2.w/0.0" in OCDBT database at ...": the truncated file's other arrays).
_TENSORSTORE_READ = re.compile(r"^[A-Z_]+: Error reading ")
_CLOSED_LOOP = "Event loop is closed"
_lock = threading.Lock()
_installed = False


def is_leftover(error: Optional[BaseException]) -> bool:
  """Whether `error` is one of a failed restore's leftovers (see the module docstring)."""
  if error is None:
    return False
  text = str(error)
  return ((isinstance(error, RuntimeError) and text == _CLOSED_LOOP)
          or text.startswith(_READ_ERROR) or bool(_TENSORSTORE_READ.match(text)))


class _DropLeftoverRecords(logging.Filter):
  """asyncio's "Task exception was never retrieved" records of a leftover."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.exc_info and is_leftover(record.exc_info[1]))


def silence_leftovers() -> None:
  """Installs the filters on `sys.unraisablehook` and the asyncio logger (once)."""
  global _installed
  with _lock:
    if _installed:
      return
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
      if not is_leftover(unraisable.exc_value):
        previous(unraisable)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_DropLeftoverRecords())
    # The cancelled reads' coroutines, collected unawaited.
    warnings.filterwarnings("ignore", message=r"coroutine '\w*read\w*' was never awaited",
                            category=RuntimeWarning)
    _installed = True


@contextlib.contextmanager
def reporting_failure() -> Iterator[None]:
  """Around an orbax restore: on failure, its leftovers are silenced and the error re-raised."""
  try:
    yield
  except Exception:
    silence_leftovers()
    raise
