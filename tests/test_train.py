"""The training job end to end, as a user runs it: `python -m nfnets_jax.train ...`.

Every run is a real subprocess on the embedded digits dataset with real orbax
checkpoints. Runs share a persistent compilation cache, so identical programs
compile once per test session. The session's shared demo run
(tests/demo_run.py) serves the first two tests.
"""

import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from data_helpers import digits_data_dir  # noqa: F401  (a fixture)
from demo_run import (REPO, SHARED_DEVICES, SHARED_EXTRA, checkpoint_steps, final_json,
                      run_trainer, trainer_args, trainer_command, trainer_env)
from nfnets_jax.train import config as config_lib


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  """A data dir and a compilation cache shared by this module's own runs."""
  root = tmp_path_factory.mktemp("train_shared")
  return {"data_dir": str(root / "tfds"), "cache": str(root / "xla_cache")}


@pytest.mark.slow
def test_train_eval_on_four_devices_reports_metrics_and_writes_checkpoints_and_tensorboard(
    demo_run):
  """The session's shared demo run (tests/demo_run.py): 8 steps on 4 devices, then eval."""
  results, workdir = demo_run["reported"], pathlib.Path(demo_run["workdir"])
  assert results["step"] == 8
  assert results["num_examples"] == 355  # the whole digits test split, each example once
  for key in ("top1", "top5", "ema_top1", "loss"):
    assert 0.0 <= results[key] and np.isfinite(results[key])
  assert "eval top-1" in demo_run["stdout"]
  assert f"global batch 16 on {SHARED_DEVICES} devices (1 processes)" in demo_run["stderr"]
  assert checkpoint_steps(workdir) == [8]  # keep_checkpoints=1 removed step 4
  events = list((workdir / "tensorboard").rglob("events.out.tfevents.*"))
  assert {p.parent.name for p in events} == {"train", "eval"}
  # Training progress lines carry the per-step metrics.
  for metric in ("loss", "learning_rate", "grad_norm", "agc_clip_fraction", "images_per_sec"):
    assert metric in demo_run["stderr"]


@pytest.mark.slow
def test_killed_run_resumes_bitwise_equal_to_uninterrupted(demo_run, tmp_path):
  """SIGKILL a copy of the shared run after its first checkpoint, rerun the same
  command: the same parameters (fingerprint) and evaluation as the uninterrupted run."""
  dirs = {"data_dir": demo_run["data_dir"], "cache": demo_run["cache"]}
  workdir = tmp_path / "killed"
  victim = subprocess.Popen(trainer_command(dirs, workdir, *SHARED_EXTRA), cwd=REPO,
                            env=trainer_env(SHARED_DEVICES), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while not checkpoint_steps(workdir) and time.time() < deadline and victim.poll() is None:
    time.sleep(0.05)
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  saved = checkpoint_steps(workdir)
  assert saved and saved[-1] < 8, f"the run was not interrupted mid-way: {saved}"

  resumed = run_trainer(dirs, workdir, *SHARED_EXTRA, devices=SHARED_DEVICES)
  assert f"Resumed from step {saved[-1]}" in resumed.stderr
  got, want = final_json(resumed.stdout), dict(demo_run["reported"])
  for results in (got, want):
    del results["seconds"]  # wall time of the evaluation
  assert got == want


@pytest.mark.slow
def test_two_processes_two_devices_each_agree(two_process_run):
  """A real multi-host job on localhost: jax.distributed + gloo, as launch/local.py runs it
  (the session's shared two-process run, tests/demo_run.py)."""
  lines = [dict(line) for line in two_process_run["reported"]]
  assert len(lines) == 2
  for line in lines:
    del line["seconds"]  # wall time of each process's evaluation
  assert lines[0] == lines[1]  # same metrics and bitwise-identical parameters everywhere
  assert lines[0]["num_examples"] == 355
  assert checkpoint_steps(two_process_run["workdir"]) == [4, 8]


@pytest.mark.slow
def test_published_f0_config_runs_one_step_at_tiny_resolution(shared, tmp_path):
  """The paper's full recipe (bf16, mixup+CutMix+RandAugment, SAM off, EMA) on real data.

  With XLA's own convolutions (NFNETS_JAX_CONV_IMPL=xla): the same network and
  numbers (tests/test_conv.py compares the lowerings on NFNet), and F0's bf16 train
  step compiles faster (see docs/performance.md).
  """
  proc = run_trainer(
      shared, tmp_path, "--config.dataset.name=digits",
      "--config.dataset.train_split=train", "--config.dataset.eval_split=test",
      "--config.num_classes=10", "--config.dataset.image_size=32",
      "--config.dataset.eval_image_size=32", "--config.train_batch_size=4",
      "--config.num_train_steps=1", "--config.log_every_steps=1",
      "--config.checkpoint_every_steps=1", "--mode=train",
      config="--config=experiments/nfnet.py:F0", timeout=900,
      env={"NFNETS_JAX_CONV_IMPL": "xla"})
  assert final_json(proc.stdout)["step"] == 1
  assert "loss" in proc.stderr and checkpoint_steps(tmp_path) == [1]


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(shared, tmp_path):
  proc = run_trainer(shared, tmp_path, "--config.optimizer.base_lr=1e30",
                     "--config.optimizer.clipping=0", "--config.checkpoint_every_steps=1",
                     "--config.num_train_steps=50", "--mode=train", check=False)
  assert proc.returncode == 3, proc.stderr[-3000:]
  assert "Non-finite training metrics at step" in proc.stderr
  assert "last good checkpoint (step" in proc.stderr
  steps = checkpoint_steps(tmp_path)
  assert steps and steps[-1] < 50


@pytest.mark.parametrize("flag,message", [
    ("--config.train_batch_szie=8", "FATAL Flags parsing error: --config.train_batch_szie: the "
     "config has no field 'train_batch_szie'. Did you mean \"train_batch_size\""),
    ("--config.compute_dtype=float64", "config.compute_dtype = 'float64' is invalid"),
    ("--config.train_batch_size=6", "must be divisible by the number of devices (4"),
    ("--config.model=nfnet:F9", "Unknown model 'nfnet:F9'"),
    ("--config.dataset.augment_name=mixup_bogus", "Unknown augmentation 'mixup_bogus'"),
    ("--config.dataset.train_preproc=crop",
     "FATAL config error: config.dataset.train_preproc: Unknown train_preproc 'crop'; valid: "
     "inception_crop, resize."),
    ("--config.dataset.eval_preproc=resize_crop_x", "Unknown eval_preproc 'resize_crop_x'"),
    ("--mode=fit", "--mode"),
    ("--config.seed=None", "FATAL config error: config.seed = None is not allowed: expected an "
     "integer. None is allowed only for config.dataset.augment_name, config.dataset.classes, "
     "config.dataset.data_dir, config.freeze, config.init_from, config.model_kwargs.*."),
    ("--config.model=none", "config.model = None is not allowed: expected a model name"),
    ("--config.dataset.autotune=None", "config.dataset.autotune = None is not allowed: "
     "expected true or false"),
    ("--config.label_smoothing=None", "config.label_smoothing = None is not allowed: expected a "
     "number in [0, 1)"),
    ("--config.dataset.val_fraction=1.0", "config.dataset.val_fraction = 1.0 is invalid: "
     "expected a number in [0, 1) (0: hold nothing out)"),
])
def test_bad_flags_are_clear_errors(shared, tmp_path, flag, message):
  proc = run_trainer(shared, tmp_path, flag, devices=4, check=False, timeout=300)
  assert proc.returncode != 0
  assert message in proc.stderr, proc.stderr[-3000:]
  assert "initialising" not in proc.stderr  # refused before any model is built
  assert "Traceback" not in proc.stderr  # one line naming the field, not a stack
  assert not checkpoint_steps(tmp_path)


def test_accumulation_must_divide_each_devices_share(shared, tmp_path):
  proc = run_trainer(shared, tmp_path, "--config.train_batch_size=8",
                     "--config.grad_accum_steps=4", devices=4, check=False, timeout=300)
  assert proc.returncode == 1
  assert ("config.grad_accum_steps = 4 must divide each device's share of the batch "
          "(8 / 4 devices = 2)") in proc.stderr, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr


def test_none_is_accepted_where_a_field_may_be_none(shared, tmp_path):
  """None for the placeholders and a model argument passes the flags and the config
  checks: the run gets as far as the device check of the batch size."""
  proc = run_trainer(shared, tmp_path, "--config.dataset.augment_name=None",
                     "--config.dataset.data_dir=none", "--config.model_kwargs.drop_rate=None",
                     "--config.train_batch_size=6", devices=4, check=False, timeout=300)
  assert proc.returncode == 1
  assert "config.train_batch_size = 6 must be divisible by the number of devices" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_none_overrides_parse_to_none_and_other_values_as_before():
  """The trainer's override parsing, in this process: ml_collections' config flag with
  the None-aware parsers the trainer registers."""
  config_lib.accept_none_overrides()
  spec = importlib.util.spec_from_file_location("demo_config", REPO / "experiments" / "demo.py")
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  argv = ["train", "--config.dataset.augment_name=None", "--config.dataset.data_dir=none",
          "--config.model_kwargs.drop_rate=None", "--config.seed=3",
          "--config.optimizer.base_lr=0.2", "--config.dataset.autotune=true",
          "--noconfig.dataset.deterministic", "--config.model=nfnet:F0"]
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_dict("config", demo.get_config(), flag_values=fv,
                                           sys_argv=argv)
  fv(argv)
  config = config_lib.validate(holder.value)
  assert config.dataset.augment_name is None and config.dataset.data_dir is None
  assert config.model_kwargs.drop_rate is None
  assert (config.seed, config.optimizer.base_lr, config.model) == (3, 0.2, "nfnet:F0")
  assert config.dataset.autotune is True and config.dataset.deterministic is False


def test_the_lowering_is_a_model_argument_of_the_config():
  """`model_kwargs.conv_impl` / `block_loop` reach the model's constructor; a bad one
  is refused by the config check, naming the field and the choices."""
  from nfnets_jax import models  # pylint: disable=import-outside-toplevel
  from nfnets_jax.train import experiment  # pylint: disable=import-outside-toplevel
  config = config_lib.base_config()
  config.model = "nf_resnet:ResNet50"
  config.model_kwargs.conv_impl, config.model_kwargs.block_loop = "xla", "scan"
  config_lib.validate(config)
  kwargs = experiment.model_kwargs(config)
  assert (kwargs["conv_impl"], kwargs["block_loop"]) == ("xla", "scan")
  assert not models.stacked_layout(config.model, **kwargs).is_identity
  for field, value, choices in (("conv_impl", "fast", "auto, xla, decomposed"),
                                ("block_loop", "fused", "auto, scan, unroll")):
    bad = config_lib.base_config()
    bad.model_kwargs[field] = value
    with pytest.raises(config_lib.ConfigError,
                       match=f"config.model_kwargs.{field} = '{value}'.*{choices}"):
      config_lib.validate(bad)


def _base_config_with(**fields):
  """`base_config()` with dotted fields set, e.g. `**{"optimizer.min_lr": 1.0}`."""
  config = config_lib.base_config()
  config.update_from_flattened_dict(fields)
  return config


@pytest.mark.parametrize("fields,message", [
    ({"optimizer.base_lr": 0.0}, "config.optimizer.base_lr = 0.0 is invalid: expected a number > 0."),
    ({"optimizer.min_lr": -0.1}, "config.optimizer.min_lr = -0.1 is invalid: expected a number >= 0."),
    # The default peak: 0.1 x 4096 / 256 = 1.6.
    ({"optimizer.min_lr": 2.0}, "config.optimizer.min_lr = 2.0 is invalid: expected a number in "
     "[0, the peak learning rate 1.6] (the peak is optimizer.base_lr x train_batch_size / 256 = "
     "0.1 x 4096 / 256)."),
    ({"optimizer.min_lr": 0.2, "optimizer.scale_lr_by_batch": False},
     "config.optimizer.min_lr = 0.2 is invalid: expected a number in [0, the peak learning rate "
     "0.1] (the peak is optimizer.base_lr, as optimizer.scale_lr_by_batch is False)."),
    ({"optimizer.scale_lr_by_batch": None}, "config.optimizer.scale_lr_by_batch = None is not "
     "allowed: expected true or false."),
    ({"dataset.augment_before_mix": None}, "config.dataset.augment_before_mix = None is not "
     "allowed: expected true or false."),
])
def test_learning_rate_and_augmentation_order_fields_are_checked(fields, message):
  """A bad peak/floor of the schedule or augmentation order is refused by the config check
  (before TensorFlow's import), with one message naming the field and what is valid."""
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(_base_config_with(**fields))
  assert str(err.value).startswith(message)


def test_unscaled_peak_allows_a_floor_the_scaled_one_would_not():
  """min_lr is checked against the peak the schedule will have: with scale_lr_by_batch
  False and a batch below 256, a floor above the scaled peak is still valid."""
  fields = {"train_batch_size": 64, "optimizer.base_lr": 0.4, "optimizer.min_lr": 0.2}
  with pytest.raises(config_lib.ConfigError, match="optimizer.min_lr = 0.2"):
    config_lib.validate(_base_config_with(**fields))  # scaled peak: 0.1
  config_lib.validate(_base_config_with(**fields, **{"optimizer.scale_lr_by_batch": False}))


@pytest.mark.slow
def test_recipe_fields_reach_the_schedule_and_the_input_pipeline(digits_data_dir, tmp_path):
  """The experiment builds its schedule and training stream from the config's
  scale_lr_by_batch, min_lr and augment_before_mix: its batches are those of the
  pipeline with RandAugment after mixing, not before."""
  from nfnets_jax.data import load  # pylint: disable=import-outside-toplevel
  from nfnets_jax.train import experiment  # pylint: disable=import-outside-toplevel
  config = _base_config_with(**{
      "model": "nfnet:nano", "num_classes": 10, "dataset.name": "digits",
      "dataset.data_dir": digits_data_dir, "dataset.eval_split": "test",
      "dataset.image_size": 16, "dataset.train_preproc": "resize", "dataset.deterministic": True,
      "dataset.autotune": False, "dataset.augment_before_mix": False,
      "train_batch_size": 8, "num_epochs": 1.0, "warmup_epochs": 0.5,
      "optimizer.base_lr": 0.4, "optimizer.scale_lr_by_batch": False,
      "optimizer.min_lr": 0.001, "compute_dtype": "float32", "async_checkpoints": False})
  config_lib.finalize(config)
  run = experiment.Experiment(config, str(tmp_path))
  try:
    warmup = int(0.5 * run.steps_per_epoch)
    assert float(run.schedule(warmup)) == pytest.approx(0.4)  # unscaled: not 0.4 x 8 / 256
    assert float(run.schedule(run.total_steps)) == pytest.approx(0.001)
    got = next(run._train_batches(0))  # pylint: disable=protected-access
  finally:
    run.close()
  stream = dict(is_training=True, batch_dims=(8,), image_size=16,
                augment_name=config.dataset.augment_name, data_dir=digits_data_dir,
                train_preproc="resize", seed=config.seed, deterministic=True, autotune=False)
  after = next(load("digits", "train", augment_before_mix=False, **stream))
  before = next(load("digits", "train", augment_before_mix=True, **stream))
  np.testing.assert_array_equal(got["images"], after["images"])
  assert not np.allclose(got["images"], before["images"], atol=0.1)


@pytest.mark.slow
def test_data_parallel_step_equals_single_device_step_and_one_program():
  """Averaged per-device gradients on 4 devices == the full-batch gradient on 1
  (a gradient summed instead of averaged would be 4x too large); the step as
  two programs (gradients, then update) == one program of the same pieces; and
  either form writes the new state into the old one's buffers (never two copies)."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, str(REPO / "tests" / "train_step_script.py")],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["step"] == 3
  assert out["grad_norm_4"] == pytest.approx(out["grad_norm_1"], rel=1e-4)
  assert out["devices_rel_diff"] < 1e-4
  assert out["one_program_rel_diff"] < 1e-5
  assert out["metrics_rel_diff"] < 1e-5
  assert out["moved"] > 1e-3  # the comparisons are between states that trained
  assert out["donated"]
