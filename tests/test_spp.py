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
from nfnets_jax.models import timm_family

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
    (["--model=timm:test_nfnet", "--activation=relu"],
     r"--activation=relu cannot override the activation of 'timm:test_nfnet': its family keeps "
     r"its own \(silu\)\. Families that take one: nfnet, nf_resnet, nf_regnet, bn_resnet"),
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


# ----------------------------------------------------------------------------- timm's models

#: Two cheap timm models with different layouts: a pre-activation NF-ResNet (7x7 stem and
#: max-pool, identity blocks within stages) and timm's test NFNet (deep stem, two grouped
#: 3x3 convs and squeeze-excite, one block per stage).
TIMM_RESNET, TIMM_NFNET = "timm:nf_resnet26", "timm:test_nfnet"


def _timm_depths(name: str) -> tuple[int, ...]:
  return timm_family.CONFIGS[name.partition(":")[2]]["config"].depths


def _run_timm_cli(directory: pathlib.Path) -> dict:
  out = directory / "spp_timm.png"
  argv = ["spp", f"--model={TIMM_RESNET}", f"--compare={TIMM_NFNET}", "--batch=8",
          "--image_size=64", f"--out={out}", "--seed=0"]
  assert spp.main(argv) == 0
  with open(out.with_suffix(".csv"), newline="") as f:
    return {"out": str(out), "rows": list(csv.DictReader(f))}


@pytest.fixture(scope="module")
def timm_cli_run(tmp_path_factory):
  """The CLI on two timm models (skip gain 1: every branch switched on), once per session."""
  result = once(session_root(tmp_path_factory) / "spp_timm_cli_run", _run_timm_cli)
  return pathlib.Path(result["out"]), result["rows"]


def test_timm_branches_are_switched_on_through_their_last_conv_gain():
  """timm's own models have no skip gain: each block's conv2 starts with a zero gain,
  which the skip_gain value replaces; DeepMind's form (dm_nfnet_*) keeps skip gains."""
  shapes = models.param_shapes(TIMM_NFNET, 10)
  params = jax.tree_util.tree_map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), shapes)
  plan = models.model_plan(TIMM_NFNET)
  updated, count = spp.set_branch_end_gains(params, plan, 1.0)
  assert count == sum(_timm_depths(TIMM_NFNET)) == len(plan.blocks) == 4
  assert spp.set_skip_gains(params, 1.0)[1] == 0
  for module, group in updated.items():
    for name, value in group.items():
      if name == "gain" and module.endswith("/conv2"):
        assert np.all(np.asarray(value) == 1.0), module
      else:
        assert value is params[module][name], (module, name)
  assert len(spp.branch_end_convs(models.model_plan("timm:nf_regnet_b0"))) == 16
  assert spp.branch_end_convs(models.model_plan("timm:dm_nfnet_f0")) == []
  assert spp.branch_end_convs(models.model_plan("nfnet:F0")) == []


TIMM_CHEAP = (TIMM_RESNET, TIMM_NFNET, "timm:eca_nfnet_l0", "timm:nf_regnet_b0")


@pytest.mark.parametrize("name", TIMM_CHEAP)
def test_one_spp_row_per_block_of_the_timm_config(name):
  """The rows SPP plots after the stem (`len(plan.blocks)`) are the config's depths,
  each stage starting with its projection block (a dotted transition line)."""
  plan = models.model_plan(name)
  depths = _timm_depths(name)
  assert len(plan.blocks) == sum(depths)
  starts = np.cumsum((0,) + depths[:-1])
  assert [k for k, block in enumerate(plan.blocks) if block.use_projection] == list(starts)


@pytest.mark.parametrize("name", TIMM_CHEAP)
def test_timms_own_model_has_as_many_residual_blocks(name):
  timm = pytest.importorskip("timm", reason="timm is an optional peer (pip install "
                                            "'nfnets-jax[peers]').")
  import torch  # pylint: disable=import-outside-toplevel  (timm's own dependency)
  with torch.device("meta"):  # shapes only: no weights are allocated
    timm_model = timm.create_model(name.partition(":")[2])
  timm_blocks = [m for m in timm_model.modules() if type(m).__name__ == "NormFreeBlock"]
  assert len(timm_blocks) == len(models.model_plan(name).blocks)


@pytest.mark.slow
def test_timm_csv_has_the_stem_then_one_row_per_block(timm_cli_run):
  png, rows = timm_cli_run
  with Image.open(png) as image:
    assert image.format == "PNG"
  for name in (TIMM_RESNET, TIMM_NFNET):
    mine = [r for r in rows if r["model"] == name]
    assert [int(r["block"]) for r in mine] == list(range(sum(_timm_depths(name)) + 1))
    assert mine[0]["res_avg_var"] == ""  # block 0 is the stem's output


@pytest.mark.slow
def test_timm_signal_propagates_as_in_the_papers(timm_cli_run):
  """With every branch switched on: each branch adds signal; within a stage the variance
  grows by alpha^2 * Var(branch) per block (the papers' NF design); every strided
  transition, whose shortcut average-pools on nearly uncorrelated Gaussian input, cuts
  the variance by well over half (as NFNet-F0's, docs/inspect.md); the mean shift
  stays small after the stem. The first stage starts far above 1: timm folds the
  activation's gamma into every convolution, the first one on the image too."""
  _, rows = timm_cli_run
  for name in (TIMM_RESNET, TIMM_NFNET):
    plan = models.model_plan(name)
    var, res = _series(rows, name, "avg_var"), _series(rows, name, "res_avg_var")
    assert np.all(res > 0), res
    for k, block in enumerate(plan.blocks):
      if not block.use_projection:
        assert var[k + 1] - var[k] == pytest.approx(block.alpha ** 2 * res[k], rel=0.25), k
      elif block.stride > 1:
        assert var[k + 1] < 0.5 * var[k], (k, var)
    assert np.all(_series(rows, name, "avg_sq_mean")[1:] < 0.05)
    assert var[1] > 2.0
  # The NF-ResNet's max-pooled stem output is shifted (a max of 9 is positive), its blocks' not.
  assert _series(rows, TIMM_RESNET, "avg_sq_mean")[0] > 1.0

