"""The shell every command-line tool shares: entry, flags, exit statuses, logs.

`python -m nfnets_jax.<tool>` ends in `cli.run(main)`. Each tool's
`main(argv) -> int` parses its own `absl.flags.FlagValues` (so that several
tools, or a test, can call them in one process) through `run_tool`, which
turns the project's user errors into a line on stderr and an exit status:

  0  `EXIT_OK`       done.
  1  `EXIT_FAILURE`  `error: ...`: the input could not be used (a missing
                     file, weights that do not fit the model, ...).
  2  `EXIT_USAGE`    `usage error: ...`: the command line is wrong (an unknown
                     flag, a bad value); the message names it and what is valid.

The trainer (`python -m nfnets_jax.train`) parses absl's global flags instead
and keeps its own statuses (see its module docstring).

Logs: by default the CLIs show warnings, errors, their progress and results;
the info lines of the libraries underneath (TensorFlow's notices, JAX's
backend probe, TFDS and orbax) stay out. absl's `--verbosity` (`-v`) brings
them back: `-v 0` every info line, `-v 1` debug too. `run` sets this up
(`cli/logs.py`) for the program only: importing `nfnets_jax` or calling a tool's
`main` leaves the process's logging and environment alone.

No absl import at module level: the tools' Python APIs work without absl.
"""

import contextlib
import sys
from typing import Any, Callable, Iterator, Optional, Sequence

from nfnets_jax.weights import WeightsError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

HELP_FLAGS = ("-h", "--help", "-help", "--helpfull")
#: What a run may fail on with a one-line `error:` (EXIT_FAILURE) instead of a
#: traceback: bad values in its inputs, files missing or unreadable, an
#: optional package not installed, published weights that cannot be had.
FAILURES = (ValueError, OSError, ImportError, WeightsError)


class UsageError(ValueError):
  """A bad command line (exit status 2), as opposed to a failure while running (1)."""


# ----------------------------------------------------------------------------- tools


def print_help_if_asked(argv: Sequence[str], fv: Any, doc: str) -> bool:
  """Prints `doc` and the help of `fv` (an absl FlagValues) when argv asks for help.

  Returns whether it did.
  """
  if not any(arg in HELP_FLAGS for arg in argv[1:]):
    return False
  print(doc.rstrip() + "\n")
  print(fv.get_help())
  print("\nabsl logging:\n  -v,--verbosity: -1 warnings (default), 0 every info line, 1 debug.")
  return True


def run_tool(argv: Optional[Sequence[str]], fv: Any, doc: str,
             body: Callable[[list[str]], Optional[int]], *, positional: bool = False) -> int:
  """Parses `argv` into `fv` and runs `body(positional_args)`; returns the exit status.

  `argv` starts with the program name (None: `sys.argv`). `body` returns an
  exit status or None (success). `positional=False` refuses positional
  arguments. A flag error or a `UsageError` ends with EXIT_USAGE, one of
  `FAILURES` with EXIT_FAILURE, each as one message on stderr.
  """
  from absl import flags

  argv = list(sys.argv if argv is None else argv)
  if print_help_if_asked(argv, fv, doc):
    return EXIT_OK
  try:
    args = fv(argv)[1:]
    if args and not positional:
      raise UsageError(f"Unexpected positional arguments: {' '.join(args)}.")
    status = body(args)
    return EXIT_OK if status is None else status
  except (flags.Error, UsageError) as err:
    return report_usage_error(err)
  except FAILURES as err:
    print(f"error: {err}", file=sys.stderr)
    return EXIT_FAILURE


def report_usage_error(err: Exception) -> int:
  """Prints `err` as a usage error with a pointer to --help; returns EXIT_USAGE."""
  print(f"usage error: {err}\nRun with --help for the flags.", file=sys.stderr)
  return EXIT_USAGE


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
  """Inside, a ValueError is a bad value the user typed (EXIT_USAGE), not a failure."""
  try:
    yield
  except UsageError:
    raise
  except ValueError as err:
    raise UsageError(str(err)) from None


# ----------------------------------------------------------------------------- program


def run(main: Callable[[list[str]], Optional[int]], *,
        flags_parser: Optional[Callable[[list[str]], list[str]]] = None) -> None:
  """Runs `main` as the program through absl's `app.run`; exits with its status.

  A tool's `main` parses its own flags: here only absl's logging flags are
  taken out of argv, and the logs stay at warnings unless --verbosity says
  otherwise. The trainer passes its `flags_parser`, which parses absl's global
  flags (its own and absl's). Either way the log defaults of
  `cli_logs.quiet_libraries` are set after parsing, before TensorFlow is imported.
  """
  from absl import app

  from nfnets_jax.cli import logs as cli_logs

  parse = _take_logging_flags if flags_parser is None else flags_parser

  def parse_then_quiet(argv: list[str]) -> list[str]:
    rest = parse(argv)
    cli_logs.quiet_libraries()
    return rest

  app.run(main, flags_parser=parse_then_quiet)


def _take_logging_flags(argv: list[str]) -> list[str]:
  """Parses absl's logging flags (--verbosity, -v, ...) out of argv; returns the rest."""
  from absl import flags, logging

  logging_flags = flags.FlagValues()
  for flag in flags.FLAGS.get_flags_for_module(logging):
    logging_flags[flag.name] = flag
  try:
    rest = logging_flags(argv, known_only=True)
  except flags.Error as err:
    sys.exit(report_usage_error(err))
  flags.FLAGS.mark_as_parsed()
  if not flags.FLAGS["verbosity"].present:
    # app.run would raise an unset verbosity to info; the tools print their
    # own progress, so their logs stay at warnings.
    flags.FLAGS.verbosity = logging.WARNING
  return rest
