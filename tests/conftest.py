"""Test-session set-up.

Import order matters for one native-library clash: importing timm (which loads
triton) after TensorFlow crashes the interpreter with a segmentation fault
(TF 2.21, torch 2.14.1, reproduced outside pytest with `import tensorflow;
import timm`); the other order works. A pytest-xdist worker may run a data test
(TensorFlow) before an interop test (timm), so when the optional PyTorch peers
are installed they are imported here, first. Without them nothing is imported.
"""

import importlib.util

if importlib.util.find_spec("timm") is not None:
  import timm  # noqa: F401  pylint: disable=unused-import

import pytest  # noqa: E402  (after the optional timm import above)

import demo_run as demo_run_lib  # noqa: E402
from session_share import once, session_root  # noqa: E402


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
  """The session's one trained demo workdir (see tests/demo_run.py); read it, never write."""
  return once(session_root(tmp_path_factory) / "shared_demo_run",
              demo_run_lib.train_shared_demo)


@pytest.fixture(scope="session")
def two_process_run(tmp_path_factory):
  """The session's one demo job of two processes (tests/demo_run.py); read it, never write."""
  return once(session_root(tmp_path_factory) / "two_process_demo_run",
              demo_run_lib.train_two_process_demo)
