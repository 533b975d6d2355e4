"""Results computed once per test session, however many xdist workers ask for them.

pytest-xdist runs a session or module fixture once in every worker that runs
one of its tests, so an expensive fixture (a training run, a 35 s compile)
would run twice on a 2-core CI machine. `once` keeps the result in a
directory that all workers share, behind a file lock: the first worker
computes it while the others wait, then they read it (the pattern the
pytest-xdist documentation gives for session fixtures).
"""

import json
import os
import pathlib
from typing import Callable

import filelock


def session_root(tmp_path_factory) -> pathlib.Path:
  """A directory every xdist worker of this session sees (the workers' common basetemp)."""
  root = tmp_path_factory.getbasetemp()
  return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


def once(directory: pathlib.Path, build: Callable[[pathlib.Path], dict]) -> dict:
  """`build(directory)`'s JSON-serialisable result, computed by the session's first caller."""
  directory.mkdir(parents=True, exist_ok=True)
  done = directory / "result.json"
  with filelock.FileLock(str(directory) + ".lock"):
    if not done.exists():
      done.write_text(json.dumps(build(directory)))
  return json.loads(done.read_text())
