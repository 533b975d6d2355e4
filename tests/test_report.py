"""The size-and-cost report: computed numbers against the NFNet paper's table."""

import contextlib
import io
import json
import pathlib
import re
import subprocess
import sys

import pytest

from nfnets_jax import models, report

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
