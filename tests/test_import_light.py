"""Importing the models or the optimizers must not import TensorFlow or TFDS:
projects that only want AGC or an NFNet should not pay for the input pipelines."""

import json
import pathlib
import subprocess
import sys

import pytest

HEAVY = ("tensorflow", "tensorflow_datasets", "tf_keras", "keras")
PROBE = """
import importlib, json, sys
heavy = {heavy!r}
report = {{}}
for name in {modules!r}:
  importlib.import_module(name)
  report[name] = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
print(json.dumps(report))
"""


@pytest.mark.slow
def test_core_packages_do_not_import_tensorflow():
  modules = ["nfnets_jax", "nfnets_jax.optim", "nfnets_jax.models"]
  repo = pathlib.Path(__file__).parents[1]
  proc = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY, modules=modules)],
                        cwd=repo, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-4000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert list(report) == modules
  for name, heavy in report.items():
    assert heavy == [], f"importing {name} imported {heavy[:5]}"


VALIDATE = """
import json, sys
from nfnets_jax.train import config as config_lib
sys.path.insert(0, "experiments")
import nfnet
config = nfnet.get_config("F0")
report = {"valid": sorted(m for m in sys.modules if m.split(".")[0] in %r)}
config.unlock()
config.dataset.eval_preproc = "resize_crop_x"
try:
  config_lib.validate(config)
except config_lib.ConfigError as err:
  report["error"] = str(err)
report["after_error"] = sorted(m for m in sys.modules if m.split(".")[0] in %r)
print(json.dumps(report))
"""


def test_config_validation_does_not_import_tensorflow():
  """The trainer validates its config before importing the training stack, so that
  a misspelt value fails in a second or two rather than after TensorFlow's import."""
  repo = pathlib.Path(__file__).parents[1]
  proc = subprocess.run([sys.executable, "-c", VALIDATE % (HEAVY, HEAVY)], cwd=repo,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-4000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["error"].startswith("config.dataset.eval_preproc: Unknown eval_preproc "
                                    "'resize_crop_x'")
  assert report["valid"] == [] and report["after_error"] == []
