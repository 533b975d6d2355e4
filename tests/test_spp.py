"""Signal-propagation plots: the CLI's PNG and CSV, and the curves the NF papers show."""

import csv
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from session_share import once, session_root
from nfnets_jax import models, spp

NF, BN = "nf_resnet:ResNet50", "bn_resnet:ResNet50"
ALPHA = 0.2  # NF-ResNets' default alpha


def _run_cli(directory: pathlib.Path) -> dict:
  out = directory / "spp.png"
  argv = ["spp", f"--model={NF}", f"--compare={BN}", "--batch=8", "--image_size=64",
          f"--out={out}", "--seed=0"]
  assert spp.main(argv) == 0
  with open(out.with_suffix(".csv"), newline="") as f:
    return {"out": str(out), "rows": list(csv.DictReader(f))}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
  """The real CLI, NF-ResNet50 against BN-ResNet50 on a small batch of small images.

  Its two forward passes take long to compile, so it runs once per session
  even when xdist spreads this module's tests over several workers."""
  result = once(session_root(tmp_path_factory) / "spp_cli_run", _run_cli)
  return pathlib.Path(result["out"]), result["rows"]


def _series(rows, model, column):
  return np.array([float(r[column]) for r in rows if r["model"] == model and r[column] != ""])


@pytest.mark.slow
def test_png_is_valid_with_the_documented_size(cli_run):
  png, _ = cli_run
  data = png.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  with Image.open(png) as image:
    image.verify()
  with Image.open(png) as image:
    assert image.format == "PNG"
    assert image.size == (round(spp.FIGSIZE[0] * spp.DPI), round(spp.FIGSIZE[1] * spp.DPI))


@pytest.mark.slow
def test_csv_has_every_depth_of_both_models(cli_run):
  _, rows = cli_run
  assert tuple(rows[0]) == spp.CSV_COLUMNS
  for name in (NF, BN):
    blocks = len(models.model_plan(name).blocks)
    mine = [r for r in rows if r["model"] == name]
    assert [int(r["block"]) for r in mine] == list(range(blocks + 1))
    assert mine[0]["res_avg_var"] == ""  # the stem has no residual branch
    for column in spp.METRICS:
      values = _series(rows, name, column)
      assert np.all(np.isfinite(values)) and np.all(values > 0)


@pytest.mark.slow
def test_nf_resnet_variance_stays_near_one_and_grows_by_alpha_squared(cli_run):
  """Paper, Fig. 2: with the branches on, an NF-ResNet's variance grows by
  alpha^2 * Var(branch) per block (beta makes the branch see unit variance)
  and resets to about 1 at each transition."""
  _, rows = cli_run
  var = _series(rows, NF, "avg_var")
  res = _series(rows, NF, "res_avg_var")
  # Depth 0 is the max-pooled stem output, not yet a residual stream.
  assert np.all((var[1:] > 0.75) & (var[1:] < 1.35)), var
  plan = models.model_plan(NF)
  for k, block in enumerate(plan.blocks):
    if not block.use_projection:
      assert var[k + 1] - var[k] == pytest.approx(ALPHA ** 2 * res[k], abs=0.015)
  # The mean shift stays small: scaled weight standardisation removes it.
  assert np.all(_series(rows, NF, "avg_sq_mean")[1:] < 0.1)


@pytest.mark.slow
def test_bn_resnet_variance_grows_with_depth_and_resets(cli_run):
  """Paper, Fig. 1: a BN-ReLU ResNet's variance grows linearly within a stage
  and resets at every transition."""
  _, rows = cli_run
  var = _series(rows, BN, "avg_var")
  plan = models.model_plan(BN)
  starts = [k for k, block in enumerate(plan.blocks) if block.use_projection] + [len(plan.blocks)]
  for first, end in zip(starts, starts[1:]):
    stage = var[first + 1:end + 1]
    assert np.all(np.diff(stage) > 0.3), stage
  # Stage 3 (6 blocks): the last block's output has several times the first's variance.
  third = var[starts[2] + 1:starts[3] + 1]
  assert third[-1] > 2.5 * third[0]
  assert all(var[k + 1] < var[k] for k in starts[1:-1])  # reset at transitions
  assert var.max() > 2 * _series(rows, NF, "avg_var").max()


def test_skip_gains_are_all_set_and_nothing_else_changes():
  # The real parameter tree, filled with zeros (SkipInit's init) instead of drawn.
  shapes = models.param_shapes("nfnet:nano", 10)
  params = jax.tree_util.tree_map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), shapes)
  updated, count = spp.set_skip_gains(params, 1.0)
  assert count == len(models.model_plan("nfnet:nano").blocks) == 4
  for module, group in updated.items():
    for name, value in group.items():
      if name == "skip_gain":
        assert float(params[module][name]) == 0.0 and float(value) == 1.0
      else:
        assert value is params[module][name]


def test_bad_model_name_is_a_usage_error_naming_valid_ones(capsys, tmp_path):
  out = tmp_path / "never.png"
  assert spp.main(["spp", "--model=nfnet:F9", f"--out={out}"]) == 2
  err = capsys.readouterr().err
  assert "'nfnet:F9'" in err and "nfnet:F0" in err and "bn_resnet:ResNet50" in err
  assert not out.exists() and not out.with_suffix(".csv").exists()


@pytest.mark.parametrize("argv,match", [
    (["--compare=nfnet:F0,resnet50"], "'resnet50'.*nf_resnet:ResNet50"),
    (["--batch=0"], "batch must be a positive integer, got 0"),
    (["--image_size=16"], "image_size must be an integer >= 32.*got 16"),
    (["--activation=relu7"], "Unknown activation 'relu7'; valid activations: .*gelu"),
    (["--skip_gain=nan"], "skip_gain must be a finite number"),
    (["--yscale=sqrt"], "Unknown yscale 'sqrt'; valid: log, linear"),
    (["--out=spp.jpg"], r"--out must name a \.png file.*'spp.jpg'"),
    (["--batch=four"], "batch"),
])
def test_bad_flags_are_usage_errors(argv, match, capsys):
  assert spp.main(["spp", *argv]) == 2
  err = capsys.readouterr().err
  assert err.startswith("usage error:")
  assert re.search(match, err), err


@pytest.mark.slow
def test_module_runs_as_a_program_and_rejects_bad_values():
  repo = pathlib.Path(__file__).parents[1]
  proc = subprocess.run(
      [sys.executable, "-W", "error::DeprecationWarning", "-m", "nfnets_jax.spp",
       "--model=nf_resnet:ResNet50", "--batch=0"],
      cwd=repo, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and proc.stdout == ""
  assert "batch must be a positive integer, got 0" in proc.stderr
