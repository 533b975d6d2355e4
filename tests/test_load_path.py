"""The way from `--checkpoint` to a runnable model goes down and back once (issue 37).

Following a tool's load (`model_flags.load_model_from_flags`, then the folded
network export serves) under a profiler: no module of the package is entered
more than twice, and the tree is checked against its network exactly once.
"""

import sys

import numpy as np
import pytest

from nfnets_jax import export, models, weights
from nfnets_jax.cli import model_flags
from nfnets_jax.export import command as export_command
from test_eval_defaults import write_workdir

PACKAGE = "nfnets_jax"
#: The modules the load goes through (the network's own construction, traced once to
#: know its shapes, calls its layers many times over and is not part of the path).
PATH_MODULES = ("nfnets_jax.cli", "nfnets_jax.weights", "nfnets_jax.models.tree",
                "nfnets_jax.models.folding")


class CallTrace:
  """Counts, per module on the load path, how often a call from another module of the
  package enters it, and how often `models.check_params` runs."""

  def __init__(self):
    self.entries: dict[str, int] = {}
    self.checks = 0

  def __call__(self, frame, event, arg):
    if event != "call":
      return
    module = frame.f_globals.get("__name__", "")
    if not module.startswith(PACKAGE):
      return
    if frame.f_code is models.check_params.__code__:
      self.checks += 1
    caller = frame.f_back.f_globals.get("__name__", "") if frame.f_back else ""
    if module.startswith(PATH_MODULES) and caller.startswith(PACKAGE) and caller != module:
      self.entries[module] = self.entries.get(module, 0) + 1

  def run(self, fn):
    sys.setprofile(self)
    try:
      return fn()
    finally:
      sys.setprofile(None)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  root = tmp_path_factory.mktemp("load_path")
  workdir = write_workdir(root / "run", {"model": "nfnet:nano", "num_classes": 3,
                                         "model_kwargs": {}, "eval": {"ema": True}})
  npz = root / "nano.npz"
  weights.save_params_npz(weights.load_params(workdir), npz)
  return {"workdir": workdir, "npz": str(npz)}


@pytest.mark.parametrize("source", ["workdir", "npz"])
def test_a_tool_loads_a_checkpoint_down_and_back_checking_it_once(sources, source):
  fv = export_command._define_flags()  # pylint: disable=protected-access
  fv(["export", f"--checkpoint={sources[source]}", "--model=nfnet:nano"])
  trace = CallTrace()
  loaded = trace.run(lambda: model_flags.load_model_from_flags(fv))
  folded = trace.run(lambda: loaded.fold(conv_impl="xla", block_loop="unroll"))
  assert trace.checks == 1, trace.checks
  over = {module: n for module, n in trace.entries.items() if n > 2}
  assert not over, f"modules entered more than twice: {over} (all: {trace.entries})"
  assert "nfnets_jax.weights.loading" in trace.entries  # the trace saw the load itself
  assert loaded.settings["ema"] is (source == "workdir")  # the record's choice, read once
  images = np.zeros((1, 32, 32, 3), np.float32)
  assert folded(images).shape == (1, 3)
  assert export.FORMATS  # the export package's face needs no command-line import
