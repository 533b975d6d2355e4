"""Shared pieces of the command-line tools (evaluate, classify, convert, spp, report).

Each tool parses its own `absl.flags.FlagValues` (so several tools can be
imported into one process) and exposes `main(argv) -> int`.
"""

from typing import Any, Sequence

HELP_FLAGS = ("-h", "--help", "-help", "--helpfull")


def print_help_if_asked(argv: Sequence[str], fv: Any, doc: str) -> bool:
  """Prints `doc` and the help of `fv` (an absl FlagValues) when argv asks for help.

  Returns whether it did. Kept free of an absl import so that the tools'
  modules import without absl (their Python APIs do not need it).
  """
  if not any(arg in HELP_FLAGS for arg in argv[1:]):
    return False
  print(doc.rstrip() + "\n")
  print(fv.get_help())
  return True
