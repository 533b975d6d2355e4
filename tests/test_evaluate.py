"""`python -m nfnets_jax.evaluate`: a real training run's checkpoint, scored again.

The trainer runs once per test session (the shared demo run of
tests/demo_run.py: eight steps on the embedded digits at 24 px, four devices)
and reports its own evaluation; evaluating its workdir with the same image size
and preprocessing must give the same accuracy, for the raw and the EMA weights,
on one device and on four. The CLI runs in-process through `main(argv)` where
one device suffices, and as subprocesses where the device count differs (two
processes of two devices each: a multi-host job on localhost).
"""

import importlib.util
import json
import pathlib
import socket
import subprocess
import sys

import pytest

from demo_run import IMAGE_SIZE, REPO, trainer_env
from nfnets_jax import evaluate, models, weights
from nfnets_jax.train import experiment

# The shared run's evaluation resolution and the demo config's eval preprocessing
# (the digits are 8x8, no margin to crop).
PREPROC = "resize_crop_1"


def eval_args(demo_run, *extra):
  return [f"--checkpoint={demo_run['workdir']}", "--dataset=digits", "--split=test",
          f"--data_dir={demo_run['data_dir']}", f"--image_size={IMAGE_SIZE}",
          f"--eval_preproc={PREPROC}", *extra]


def run_in_process(capsys, *args) -> tuple[int, str, str]:
  # An empty cache dir leaves the test process's JAX configuration alone.
  code = evaluate.main(["evaluate", "--compilation_cache_dir=", *args])
  out, err = capsys.readouterr()
  return code, out, err


def last_json(stdout: str) -> dict:
  return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_workdir_scores_as_the_training_run_reported(demo_run, capsys):
  """Model, classes and arguments all come from the workdir's records: no --model needed."""
  code, out, err = run_in_process(capsys, *eval_args(demo_run, "--batch_size=64",
                                                     "--progress=lines"))
  assert code == 0, err
  results, reported = last_json(out), demo_run["reported"]
  assert results["num_examples"] == reported["num_examples"] == 355
  assert results["top1"] == reported["top1"]
  assert results["top5"] == reported["top5"]
  assert results["loss"] == pytest.approx(reported["loss"], rel=1e-5)
  assert results["model"] == "nfnet:nano" and results["step"] == reported["step"]
  assert results["images_per_sec"] > 0 and results["seconds"] > 0
  assert "top-1" in out.splitlines()[0]  # the human summary above the JSON line
  assert "evaluating: batch 6/6 (100%), 355 examples" in err


@pytest.mark.slow
def test_ema_weights_score_as_the_training_run_reported(demo_run, capsys):
  code, out, err = run_in_process(capsys, *eval_args(demo_run, "--ema", "--batch_size=32",
                                                     "--progress=bar"))
  assert code == 0, err
  results = last_json(out)
  assert results["ema"] is True and results["num_examples"] == 355
  assert results["top1"] == demo_run["reported"]["ema_top1"]
  assert results["top5"] == demo_run["reported"]["ema_top5"]
  assert "evaluating: 100%" in err and "12/12" in err  # the tqdm bar, ceil(355 / 32) batches


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_of_two_devices_score_the_same(demo_run):
  """A multi-host job on localhost: 4 devices, each process reading its half of the split."""
  port = free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "nfnets_jax.evaluate", *eval_args(demo_run, "--batch_size=64"),
       f"--compilation_cache_dir={demo_run['cache']}", "--progress=lines",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=REPO, env=trainer_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outputs = [proc.communicate(timeout=600) for proc in procs]
  for proc, (_, err) in zip(procs, outputs):
    assert proc.returncode == 0, err[-4000:]
  json_lines = [[line for line in out.splitlines() if line.startswith("{")] for out, _ in outputs]
  assert len(json_lines[0]) == 1 and not json_lines[1]  # process 0 reports, once
  assert "evaluating: batch" in outputs[0][1] and "evaluating" not in outputs[1][1]
  results = json.loads(json_lines[0][0])
  assert (results["num_devices"], results["num_processes"]) == (4, 2)
  assert results["num_examples"] == 355  # every example once, the padding masked out
  assert results["top1"] == demo_run["reported"]["top1"]
  assert results["top5"] == demo_run["reported"]["top5"]


@pytest.mark.slow
def test_batch_size_must_divide_over_devices(demo_run):
  proc = subprocess.run([sys.executable, "-m", "nfnets_jax.evaluate", *eval_args(demo_run),
                         "--batch_size=33", "--compilation_cache_dir="],
                        cwd=REPO, env=trainer_env(2), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert "--batch_size=33 must be a positive multiple of the number of devices (2" in proc.stderr
  assert not proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("flag,code,message", [
    ("--model=nfnet:F9", 2, "Unknown model 'nfnet:F9'"),
    ("--eval_preproc=resize_crop_x", 2, "Unknown eval_preproc 'resize_crop_x'"),
    ("--model_kwargs={width: 2}", 2, "--model_kwargs must be a JSON object"),
    ("--batch_size=0", 2, "--batch_size=0 must be a positive multiple"),
    ("--num_classes=7", 1, "wrong shape"),
    ("--dataset=no_such_dataset_xyz", 1, "no_such_dataset_xyz"),
    ("--bogus_flag=1", 2, "bogus_flag"),
])
def test_bad_flags_are_clear_errors(demo_run, capsys, flag, code, message):
  got, out, err = run_in_process(capsys, *eval_args(demo_run, flag, "--progress=none"))
  assert got == code, err
  assert message in err
  assert not out


def test_missing_checkpoint_is_named(tmp_path, capsys):
  missing = tmp_path / "nowhere.npz"
  code, out, err = run_in_process(capsys, f"--checkpoint={missing}", "--model=nfnet:nano")
  assert code == 1 and str(missing) in err and not out


@pytest.mark.slow
def test_load_meta_reads_the_trainers_record(demo_run, tmp_path):
  meta = weights.load_meta(demo_run["workdir"])
  assert meta["model"] == "nfnet:nano" and meta["num_classes"] == 10
  assert meta["step"] == demo_run["reported"]["step"]
  # The demo config's model arguments, as the trainer recorded them.
  spec = importlib.util.spec_from_file_location("demo_config", REPO / "experiments" / "demo.py")
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  assert meta["model_kwargs"] == experiment.model_kwargs(demo.get_config())  # None left out
  step_dir = pathlib.Path(demo_run["workdir"]) / "checkpoints" / str(meta["step"])
  assert weights.load_meta(step_dir) == meta
  # A bare parameter file records nothing.
  params = weights.load_params(demo_run["workdir"])
  npz = weights.save_params_npz(params, tmp_path / "p.npz")
  assert weights.load_meta(npz) is None
  loaded = weights.load_model(npz)  # an NFNet and its classes, told by the weights alone
  assert (loaded.name, loaded.num_classes, loaded.model_kwargs) == ("nfnet:nano", 10, {})


def test_default_image_size_is_the_published_test_size():
  assert models.default_image_size("nfnet:F0") == 256
  assert models.default_image_size("nfnet:F6+") == 576
  assert models.default_image_size("nf_regnet:B0") == 224
  assert models.default_image_size("nf_resnet:ResNet50") == 224
  with pytest.raises(ValueError, match="Unknown model 'nfnet:G0'"):
    models.default_image_size("nfnet:G0")

