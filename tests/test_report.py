"""The size-and-cost report: computed numbers against the NFNet paper's table."""

import contextlib
import io
import json
import pathlib
import re
import subprocess
import sys

import pytest

from nfnets_jax import models, report, timm_counts
from nfnets_jax.models import timm_family

# Brock et al. 2021 (arXiv:2102.06171): params (millions) and FLOPs (billions
# of multiply-adds) at each variant's test resolution. Our own copy, so that
# the report's PUBLISHED table is checked rather than trusted.
PAPER = {
    "nfnet:F0": (71.5, 12.38), "nfnet:F1": (132.6, 35.54), "nfnet:F2": (193.8, 62.59),
    "nfnet:F3": (254.9, 114.76), "nfnet:F4": (316.1, 215.24), "nfnet:F5": (377.2, 289.76),
    "nfnet:F6": (438.4, 377.28),
}


def _run(capsys, *flags):
  code = report.main(["report", *flags])
  out = capsys.readouterr()
  return code, out.out, out.err


@pytest.fixture(scope="module")
def f_series_json():
  """`python -m nfnets_jax.report --format=json --models=nfnet:F0,...,nfnet:F6`, parsed."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert report.main(["report", "--format=json", f"--models={','.join(PAPER)}"]) == 0
  return json.loads(out.getvalue())


@pytest.mark.slow
def test_f_series_matches_the_paper_within_a_tenth_of_a_percent(f_series_json):
  assert [row["model"] for row in f_series_json] == list(PAPER)
  for row in f_series_json:
    params_m, flops_b = PAPER[row["model"]]
    assert row["params"] / 1e6 == pytest.approx(params_m, rel=1e-3)
    assert row["test_flops"] / 1e9 == pytest.approx(flops_b, rel=1e-3)
    assert row["published_params"] == pytest.approx(params_m * 1e6)
    assert row["published_test_flops"] == pytest.approx(flops_b * 1e9)
    assert abs(row["params_diff_pct"]) < 0.1 and abs(row["test_flops_diff_pct"]) < 0.1


@pytest.mark.slow
def test_train_and_test_sizes_come_from_the_variant_table(f_series_json):
  f0 = f_series_json[0]
  assert (f0["train_size"], f0["test_size"]) == (192, 256)
  assert f0["train_flops"] == models.count_flops("nfnet:F0", 192, 192)[1]
  assert f0["test_flops"] == models.count_flops("nfnet:F0", 256, 256)[1]
  # FLOPs grow with the resolution and the variant.
  flops = [row["test_flops"] for row in f_series_json]
  assert flops == sorted(flops)
  assert all(row["train_flops"] < row["test_flops"] for row in f_series_json)


def test_default_selection_is_every_published_variant_of_every_family():
  assert report.select_models() == models.list_models(published_only=True)
  chosen = report.select_models(families=["nf_resnet", "bn_resnet"])
  assert chosen == [m for m in models.list_models(published_only=True)
                    if m.startswith(("nf_resnet:", "bn_resnet:"))]
  assert "nfnet:nano" not in report.select_models()
  assert "nfnet:F0" in report.select_models() and "nf_regnet:B8" in report.select_models()


def test_resnets_use_224_and_unpublished_figures_are_blank(capsys):
  code, out, _ = _run(capsys, "--format=json", "--models=nf_resnet:ResNet50,bn_resnet:ResNet50")
  assert code == 0
  nf, bn = json.loads(out)
  for row in (nf, bn):
    assert row["train_size"] == row["test_size"] == report.DEFAULT_IMSIZE == 224
    assert row["published_params"] is None and row["params_diff_pct"] is None
  assert nf["test_flops"] == bn["test_flops"] == models.count_flops("bn_resnet:ResNet50", 224, 224)[1]
  assert nf["params"] == models.count_params("nf_resnet:ResNet50")
  assert bn["params"] < nf["params"]  # BN scale/offset pairs are fewer than WS gain/bias pairs


def test_table_and_markdown_show_the_same_numbers(capsys):
  code, table, _ = _run(capsys, "--models=nfnet:F0")
  assert code == 0
  header, rule, row = table.splitlines()[:3]
  assert header.split()[:2] == ["model", "params"] and set(rule) <= {"-", " "}
  assert row.split()[:6] == ["nfnet:F0", "71.49M", "192", "6.98B", "256", "12.38B"]
  assert "71.50M" in row and "-0.01%" in row
  code, markdown, _ = _run(capsys, "--format=markdown", "--models=nfnet:F0")
  lines = markdown.splitlines()
  assert lines[0].startswith("| model | params |") and lines[1].startswith("|---|---:|")
  assert lines[2].startswith("| nfnet:F0 | 71.49M | 192 | 6.98B | 256 | 12.38B |")


@pytest.mark.parametrize("flags,match", [
    (["--families=nfnet,resnet"], "Unknown family 'resnet'; valid families: nfnet, nf_resnet"),
    (["--models=nfnet:F9"], "Unknown model 'nfnet:F9'.*nfnet:F0"),
    (["--format=csv"], "Unknown --format 'csv'; valid formats: table, markdown, json"),
    (["--families=nfnet", "--models=nfnet:F0"], "Give --families or --models, not both"),
    (["--colour"], "colour"),
])
def test_bad_flags_are_usage_errors(capsys, flags, match):
  code, out, err = _run(capsys, *flags)
  assert code == 2 and out == ""
  assert err.startswith("usage error:")
  assert re.search(match, err), err


@pytest.mark.slow
def test_module_runs_as_a_program():
  repo = pathlib.Path(__file__).parents[1]
  proc = subprocess.run(
      [sys.executable, "-W", "error::DeprecationWarning", "-m", "nfnets_jax.report",
       "--format=json", "--models=nf_regnet:B0"],
      cwd=repo, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (row,) = json.loads(proc.stdout)
  assert (row["model"], row["train_size"], row["test_size"]) == ("nf_regnet:B0", 192, 224)
  assert row["params"] == models.count_params("nf_regnet:B0")


# ----------------------------------------------------------------------------- --memory


@pytest.mark.parametrize("flags,message", [
    (["--devices=0"], "--devices=0 is invalid: expected a positive integer."),
    (["--per_device_batch=6", "--grad_accum_steps=4"],
     "--grad_accum_steps=4 is invalid: expected a divisor of --per_device_batch=6."),
    (["--variants=F9"], "F9"),
    (["--image_size=-3"], "--image_size=-3 is invalid"),
])
def test_memory_report_bad_values_are_usage_errors(capsys, flags, message):
  code, out, err = _run(capsys, "--memory", *flags)
  assert code == 2 and out == ""
  assert err.startswith("usage error: ") and message in err


def test_smallest_fit_names_the_smallest_accelerator_that_holds_the_peak():
  gib = 2 ** 30
  assert [report.smallest_fit(n) for n in (1, 16 * gib, 16 * gib + 1, 79 * gib, 81 * gib)] == [
      "16 GiB", "16 GiB", "24 GiB", "80 GiB", "none"]


@pytest.mark.slow
def test_memory_report_compiles_replicated_and_sharded_steps_on_host_devices(capsys):
  """This process has one device: the report reruns itself with two CPU host devices."""
  code, out, err = _run(capsys, "--memory", "--devices=2", "--variants=nano",
                        "--per_device_batch=4", "--image_size=16", "--grad_accum_steps=1",
                        "--format=json")
  assert code == 0, err
  rows = json.loads(out)
  # One micro-batch: no accumulation rows (tests/test_grad_accum.py covers accumulation).
  assert [(r["grad_accum_steps"], r["shard_state"]) for r in rows] == [(1, False), (1, True)]
  for row in rows:
    assert (row["model"], row["devices"], row["per_device_batch"], row["image_size"]) == (
        "nfnet:nano", 2, 4, 16)
    assert row["peak_bytes"] == (row["argument_bytes"] + row["temp_bytes"] + row["output_bytes"]
                                 - row["alias_bytes"]) > row["state_bytes"]
    assert row["fits"] == "16 GiB"
  whole = rows[0]["state_bytes"]
  # Two devices: half of the state each, but for nano's small replicated leaves.
  assert whole / 2 <= rows[1]["state_bytes"] < 0.6 * whole
  assert rows[1]["argument_bytes"] < 0.6 * rows[0]["argument_bytes"]
  table = report.render_memory(rows, "markdown")
  assert table.splitlines()[0].startswith("| model | px | batch/device | accum | state |")
  assert table.count("| nfnet:nano | 16 | 4 | 1 |") == 1 and "on 2 devices" in table


def test_memory_report_default_is_one_variant_and_all_is_on_request():
  """Issue 38: the default F0..F7 compiled for over 15 minutes on a 2-core machine."""
  assert report._memory_variants(None) == ["F0"]  # pylint: disable=protected-access
  assert report._memory_variants(["all"]) == [f"F{i}" for i in range(8)]  # pylint: disable=protected-access
  assert report._memory_variants(["F3", "nano"]) == ["F3", "nano"]  # pylint: disable=protected-access


@pytest.mark.slow
def test_memory_report_prints_each_row_as_soon_as_it_is_compiled():
  """Issue 38: the report printed nothing until every variant had compiled. Each
  compilation is announced on stderr and each table row printed once its two halves
  are in (here through the two-device child); the order across the two streams is not
  checked, as the child's stdout is relayed and its stderr is not."""
  repo = pathlib.Path(__file__).parents[1]
  proc = subprocess.run(
      [sys.executable, "-m", "nfnets_jax.report", "--memory", "--devices=2", "--variants=nano",
       "--per_device_batch=4", "--image_size=16", "--grad_accum_steps=2"],
      cwd=repo, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # stdout and stderr are separate pipes (one shared pipe interleaves them mid-line).
  progress = [line.split(":")[1].strip() for line in proc.stderr.splitlines()
              if line.startswith("memory report: compiling")]
  assert progress == ["compiling 1/4", "compiling 2/4", "compiling 3/4", "compiling 4/4"]
  assert "2 micro-batches, sharded state" in proc.stderr
  rows = [line.split()[3] for line in proc.stdout.splitlines() if line.startswith("nfnet:nano")]
  assert rows == ["1", "2"], proc.stdout


# ----------------------------------------------------------------------------- timm's models

#: The small timm models the report tests cost: test_nfnet (deep stem, squeeze-excite)
#: and NF-RegNet-B0 (the `reg` layout, SE inside the bottleneck), at timm's sizes.
TIMM_SMALL = ("timm:test_nfnet", "timm:nf_regnet_b0")


@pytest.fixture
def timm_peers():
  """timm, or a skip naming the extra that installs it (torch with it)."""
  why = "is an optional peer (pip install 'nfnets-jax[peers]')."
  pytest.importorskip("torch", reason=f"PyTorch {why}")
  return pytest.importorskip("timm", reason=f"timm {why}")


def test_timm_family_is_a_family_with_timms_train_and_test_sizes():
  chosen = report.select_models(families=["timm"])
  assert len(chosen) == 36 and "timm:eca_nfnet_l0" in chosen and "timm:test_nfnet" in chosen
  assert report.image_sizes("timm:eca_nfnet_l0") == (224, 288)  # timm's input/test_input_size
  assert report.image_sizes("timm:nf_regnet_b0") == (192, 256)


def test_timm_counts_agree_with_ours_exactly(timm_peers):
  """timm's model on PyTorch's meta device, counted by torch's FlopCounterMode, in this
  process (conftest imports timm first): the same parameters and the same multiply-adds,
  which are convolutions and the classifier's matrix product (2 FLOPs each) only."""
  counts = timm_counts.measure([("test_nfnet", 64), ("nf_regnet_b0", 64)])
  for count in counts:
    name = f"timm:{count.model}"
    assert count.params == models.count_params(name)
    assert count.macs == models.count_flops(name, 64, 64)[1]
    assert set(count.flops_by_op) == {"aten.convolution", "aten.addmm"}
    feature_dim = models.model_plan(name).feature_dim
    assert count.flops_by_op["aten.addmm"] == 2 * feature_dim * 1000
    row = timm_family.CONFIGS[count.model]
    assert (count.timm_train_size, count.timm_test_size) == (row["train_imsize"],
                                                             row["test_imsize"])


@pytest.mark.slow
def test_timm_rows_carry_timms_counts_measured_in_a_child(capsys, timm_peers):
  code, out, err = _run(capsys, "--format=json", f"--models={','.join(TIMM_SMALL)},nfnet:F0")
  assert code == 0, err
  rows = {row["model"]: row for row in json.loads(out)}
  for name in TIMM_SMALL:
    row = rows[name]
    train, test = report.image_sizes(name)
    assert (row["train_size"], row["test_size"]) == (train, test)
    assert row["timm_counts"] == report.MEASURED
    assert row["timm_params"] == row["params"] == models.count_params(name)
    assert (row["timm_train_flops"] == row["train_flops"]
            == models.count_flops(name, train, train)[1])
    assert row["timm_test_flops"] == row["test_flops"] == models.count_flops(name, test, test)[1]
    assert row["timm_params_diff_pct"] == row["timm_test_flops_diff_pct"] == 0.0
  f0 = rows["nfnet:F0"]
  assert f0["timm_counts"] is None and f0["timm_params"] is None
  assert f0["published_params"] == 71.5e6

  code, table, _ = _run(capsys, "--models=timm:test_nfnet,nfnet:F0")
  header, _, timm_row, f0_row = table.splitlines()[:4]
  assert header.split("  ")[-1].strip() == "vs timm" and "timm test FLOPs" in header
  assert timm_row.split() == ["timm:test_nfnet", "0.38M", "160", "0.29B", "160", "0.29B",
                              "-", "-", "-", "-", "0.38M", "0.00%", "0.29B", "0.00%",
                              "0.29B", "0.00%"]
  assert f0_row.split()[-6:] == ["-"] * 6
  assert "timm's counts, measured in this run" in table


def test_without_measuring_the_timm_columns_say_so(capsys):
  code, out, err = _run(capsys, "--format=json", "--notimm_counts", "--models=timm:test_nfnet")
  assert code == 0, err
  (row,) = json.loads(out)
  assert row["timm_counts"] == "not measured: --notimm_counts"
  assert row["timm_params"] is None and row["timm_params_diff_pct"] is None
  assert row["params"] == models.count_params("timm:test_nfnet")
  code, table, _ = _run(capsys, "--format=markdown", "--notimm_counts",
                        "--models=timm:test_nfnet")
  assert "| timm:test_nfnet | 0.38M | 160 | 0.29B | 160 | 0.29B | - | - | - | - | not measured " \
         "| - | not measured | - | not measured | - |" in table
  assert "timm's counts not measured: --notimm_counts." in table


def test_timms_dm_nfnets_are_compared_with_the_paper_too(capsys):
  code, out, err = _run(capsys, "--format=json", "--notimm_counts", "--models=timm:dm_nfnet_f0")
  assert code == 0, err
  (row,) = json.loads(out)
  assert row["published_params"] == pytest.approx(71.5e6)
  assert abs(row["params_diff_pct"]) < 0.1 and abs(row["test_flops_diff_pct"]) < 0.1


def test_without_the_peers_timm_counts_are_not_measured_and_not_an_error(capsys, monkeypatch):
  """A None entry in sys.modules is Python's own mark of a module that cannot be
  imported: find_spec then reports it missing, as on a machine without timm."""
  monkeypatch.setitem(sys.modules, "timm", None)
  assert timm_counts.missing_peers() == (
      "timm not installed (pip install 'nfnets-jax[peers]')")
  code, out, err = _run(capsys, "--format=json", "--models=timm:test_nfnet,nfnet:F0")
  assert code == 0, err
  timm_row, f0 = json.loads(out)
  assert timm_row["timm_counts"] == (
      "not measured: timm not installed (pip install 'nfnets-jax[peers]')")
  assert timm_row["timm_test_flops"] is None and f0["timm_counts"] is None


def test_timm_counts_child_rejects_bad_requests():
  with pytest.raises(ValueError, match=r"Bad request 'eca_nfnet_l0@288'.*NAME:SIZE"):
    timm_counts.parse_request("eca_nfnet_l0@288")
  with pytest.raises(ValueError, match=r"Bad request 'eca_nfnet_l0:0'"):
    timm_counts.parse_request("eca_nfnet_l0:0")
  assert timm_counts.parse_request("eca_nfnet_l0:288") == ("eca_nfnet_l0", 288)
