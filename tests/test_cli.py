"""The CLI shell (`nfnets_jax.cli`): exit statuses, error lines, and quiet logs by default.

The shell's functions run on real absl flag sets in this process; the log
defaults are checked on real programs: `python -m nfnets_jax.evaluate` on the
digits dataset (it imports TensorFlow, TFDS and JAX), quiet by default and
with every library's lines back under --verbosity.
"""

import json
import logging
import os
import pathlib
import re
import subprocess
import sys
import types

import numpy as np
import pytest
from absl import flags

from nfnets_jax import cli, models, report, weights
from nfnets_jax.cli import logs as cli_logs
from session_share import once, session_root

REPO = pathlib.Path(__file__).resolve().parents[1]


def tool_flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  flags.DEFINE_integer("count", 1, "How many.", flag_values=fv)
  return fv


def run_tool(capsys, body, *args, positional=False):
  code = cli.run_tool(["tool", *args], tool_flags(), "A tool.", body, positional=positional)
  out, err = capsys.readouterr()
  return code, out, err


def test_success_is_zero_and_body_sees_positional_arguments(capsys):
  seen = []
  code, _, err = run_tool(capsys, seen.append, "--count=3", "a.jpg", "b.jpg", positional=True)
  assert (code, err, seen) == (cli.EXIT_OK, "", [["a.jpg", "b.jpg"]])
  assert run_tool(capsys, lambda _: 7)[0] == 7  # a status the body returns is kept


@pytest.mark.parametrize("args,message", [
    (["--count=x"], "flag --count=x: invalid literal for int()"),
    (["--colour=red"], "Unknown command line flag 'colour'"),
    (["stray"], "Unexpected positional arguments: stray."),
])
def test_bad_command_lines_are_usage_errors(capsys, args, message):
  code, out, err = run_tool(capsys, lambda _: None, *args)
  assert code == cli.EXIT_USAGE == 2 and out == ""
  assert err.startswith("usage error: ") and message in err
  assert err.endswith("Run with --help for the flags.\n")


def test_usage_and_failure_errors_have_their_own_statuses(capsys):
  def bad_value(_):
    with cli.usage_errors():
      raise ValueError("--count must be even, got 3.")

  code, _, err = run_tool(capsys, bad_value)
  assert code == cli.EXIT_USAGE and err.startswith("usage error: --count must be even, got 3.")

  def missing_file(_):
    raise FileNotFoundError("No checkpoint at 'x.npz'.")

  code, _, err = run_tool(capsys, missing_file)
  assert (code, err) == (cli.EXIT_FAILURE, "error: No checkpoint at 'x.npz'.\n")

  def bug(_):
    raise KeyError("not a user error")

  with pytest.raises(KeyError):  # a bug keeps its traceback
    run_tool(capsys, bug)


def test_help_shows_the_doc_the_flags_and_verbosity(capsys):
  code, out, _ = run_tool(capsys, lambda _: pytest.fail("ran"), "--help")
  assert code == cli.EXIT_OK
  assert out.startswith("A tool.") and "--count" in out and "--verbosity" in out


def test_calling_a_tool_in_process_leaves_logging_and_imports_alone(capsys):
  assert report.main(["report", "--format=json", "--models=nfnet:nano"]) == 0
  assert json.loads(capsys.readouterr().out)[0]["model"] == "nfnet:nano"
  from absl import logging as absl_logging
  handler = absl_logging.get_absl_handler()
  assert not any(isinstance(f, cli_logs.OwnInfoOnly) for f in handler.filters)
  assert not any(isinstance(f, cli_logs.QuietTensorFlowImport) for f in sys.meta_path)


def _record(pathname: str, level: int) -> logging.LogRecord:
  return logging.LogRecord("any", level, pathname, 1, "message", None, None)


def test_the_filter_keeps_our_lines_and_everyones_warnings():
  keep = cli_logs.OwnInfoOnly().filter
  ours = str(REPO / "nfnets_jax" / "train" / "experiment.py")
  tfds = "/venv/site-packages/tensorflow_datasets/core/dataset_info.py"
  deprecation = "/venv/site-packages/tensorflow/python/util/deprecation.py"
  assert keep(_record(ours, logging.INFO)) and keep(_record(ours, logging.DEBUG))
  assert not keep(_record(tfds, logging.INFO))
  assert keep(_record(tfds, logging.WARNING)) and keep(_record(tfds, logging.ERROR))
  assert not keep(_record(deprecation, logging.WARNING))


def test_tensorflow_threshold_follows_verbosity():
  assert [cli_logs.tf_cpp_min_log_level(v) for v in (2, 1, 0, -1, -2, -3, -4)] == \
      ["0", "0", "0", "1", "2", "3", "3"]


def test_stderr_without_drops_only_the_named_lines_written_to_the_descriptor(capfd):
  with cli_logs.stderr_without(["oneDNN custom operations"]):
    os.write(2, b"kept 1\nI0000 port.cc] oneDNN custom operations are on.\nkept 2\n")
  assert capfd.readouterr().err == "kept 1\nkept 2\n"


# ----------------------------------------------------------------------------- programs

# What the libraries print by default without the shell's defaults (TF 2.21,
# JAX 0.10, TFDS 4.9), each a marker of one kind of line.
NOISE = {
    "JAX's TPU probe": "Unable to initialize backend",
    "oneDNN notice": "oneDNN custom operations are on",
    "Abseil's pre-init notice": "before absl::InitializeLog()",
    "TFDS info": "Constructing tf.data.Dataset",
    "TFDS dataset info": "Load dataset info",
    "TF deprecation": "is deprecated and will be removed",
}


def _run_evaluate_twice(root: pathlib.Path) -> dict:
  """`python -m nfnets_jax.evaluate` on 40 digits with random nano weights, at
  --verbosity=0 and at the default: each run's stdout and stderr."""
  rng = np.random.default_rng(0)
  params = {module: {name: rng.normal(scale=0.1, size=leaf.shape).astype(np.float32)
                     for name, leaf in group.items()}
            for module, group in models.param_shapes("nfnet:nano", 10).items()}
  npz = weights.save_params_npz(params, root / "nano.npz")
  env = {key: value for key, value in os.environ.items()
         if key not in ("TF_CPP_MIN_LOG_LEVEL", "JAX_PLATFORMS")}

  def run(*extra: str) -> dict:
    argv = [sys.executable, "-m", "nfnets_jax.evaluate", f"--checkpoint={npz}",
            "--model=nfnet:nano", "--dataset=digits", "--split=test[:40]",
            f"--data_dir={root / 'tfds'}", "--image_size=24", "--eval_preproc=resize_crop_1",
            "--batch_size=8", f"--compilation_cache_dir={root / 'xla_cache'}",
            "--progress=lines", *extra]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"stdout": proc.stdout, "stderr": proc.stderr}

  verbose = run("--verbosity=0")  # first: it also prepares the dataset
  return {"verbose": verbose, "default": run()}


@pytest.fixture(scope="session")
def evaluate_program(tmp_path_factory):
  """The two evaluate runs, once per session (session_share), not once per xdist worker
  that runs one of the tests below; each run's output as `.stdout` and `.stderr`."""
  runs = once(session_root(tmp_path_factory) / "cli_quiet", _run_evaluate_twice)
  return {name: types.SimpleNamespace(**output) for name, output in runs.items()}


@pytest.mark.slow
def test_tools_are_quiet_by_default(evaluate_program):
  default = evaluate_program["default"]
  for what, marker in NOISE.items():
    assert marker not in default.stderr, f"{what} in the default output:\n{default.stderr}"
  # The settings block (where each setting came from) and progress lines; anything
  # else must be a warning or an error (absl's W/E prefix).
  lines = default.stderr.splitlines()
  start = lines.index(next(line for line in lines if line.startswith("settings (")))
  end = start + 1
  while end < len(lines) and lines[end].startswith("  "):
    end += 1
  assert end - start > 3  # model, image size, preprocessing, ...
  others = [line for line in lines[:start] + lines[end:] if not line.startswith("evaluating: ")]
  assert all(re.match(r"[WE]\d{4} ", line) for line in others), default.stderr
  assert "evaluating: batch 5/5 (100%), 40 examples" in default.stderr
  assert "top-1" in default.stdout.splitlines()[0]


@pytest.mark.slow
def test_verbosity_brings_the_library_lines_back(evaluate_program):
  verbose, default = evaluate_program["verbose"], evaluate_program["default"]
  assert NOISE["TFDS info"] in verbose.stderr
  assert len(verbose.stderr.splitlines()) > len(default.stderr.splitlines()) + 5
  results = [json.loads(proc.stdout.splitlines()[-1]) for proc in (verbose, default)]
  for key in ("top1", "top5", "loss", "num_examples"):
    assert results[0][key] == results[1][key]  # the logs change nothing else


@pytest.mark.slow
def test_a_bad_verbosity_is_a_usage_error():
  proc = subprocess.run([sys.executable, "-m", "nfnets_jax.report", "--verbosity=loud"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == cli.EXIT_USAGE and proc.stdout == ""
  assert proc.stderr.startswith("usage error: flag --verbosity=loud")
