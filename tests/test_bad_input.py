"""The trainer and the evaluator against a user's bad input (issue 38): each ends early in
one line that names the number or the files, or says in the log what it took.

Data are the embedded digits and tiny folders of real JPEGs written here; the
trainer runs as a real subprocess where the behaviour is about the process.
"""

import logging
import pathlib

import numpy as np
import pytest

from data_helpers import digits_data_dir, encode, random_image, write_folder  # noqa: F401
from demo_run import REPO, run_trainer
from nfnets_jax import evaluate, models, weights
from nfnets_jax.train import config as config_lib


def _config(**fields):
  """The demo's recipe on a nano model, with `fields` set (dotted names), validated."""
  config = config_lib.base_config()
  config.update_from_flattened_dict({
      "model": "nfnet:nano", "num_classes": 10, "dataset.name": "digits",
      "dataset.eval_split": "test", "dataset.image_size": 16, "dataset.eval_image_size": 16,
      "dataset.train_preproc": "resize", "dataset.augment_name": None,
      "dataset.autotune": False, "train_batch_size": 8, "eval_batch_size": 8,
      "num_train_steps": 2, "compute_dtype": "float32", "async_checkpoints": False,
      **fields})
  return config_lib.finalize(config)


# ----------------------------------------------------------------------------- classes (1)


def test_num_classes_other_than_the_datasets_is_a_config_error(digits_data_dir, tmp_path):
  """Issue 38, defect 1: `num_classes=5` on the 10 digits trained, labels past the head
  getting all-zero targets. The trainer names both numbers before building anything."""
  from nfnets_jax.train import experiment  # pylint: disable=import-outside-toplevel
  for wanted in (5, 1000):
    config = _config(**{"num_classes": wanted, "dataset.data_dir": digits_data_dir})
    with pytest.raises(config_lib.ConfigError) as err:
      experiment.Experiment(config, str(tmp_path / "run"))
    assert str(err.value) == (
        f"config.num_classes = {wanted} does not match dataset 'digits', which has 10 "
        "classes: set config.num_classes = 10, or 0 to take the dataset's number (a new "
        "classifier then has that many outputs).")
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_trainer_refuses_num_classes_5_on_the_digits_in_one_line(digits_data_dir, tmp_path):
  """The issue's command, `--config=experiments/demo.py --config.num_classes=5`, exited 0."""
  dirs = {"data_dir": digits_data_dir, "cache": str(tmp_path / "cache")}
  proc = run_trainer(dirs, tmp_path / "run", "--config.num_classes=5", check=False,
                     timeout=300)
  assert proc.returncode == 1
  assert ("FATAL config error: config.num_classes = 5 does not match dataset 'digits', which "
          "has 10 classes: set config.num_classes = 10") in proc.stderr, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and "Training" not in proc.stderr


def test_finetune_takes_the_folders_classes_and_says_so(tmp_path, caplog):
  """Fine-tuning on a 3-class folder with num_classes left out trained a 1000-way head,
  and classify printed "class 934". experiments/finetune.py's num_classes 0 takes the
  folder's 3 classes, says so in the log, and records them for the tools."""
  import importlib.util  # pylint: disable=import-outside-toplevel

  from nfnets_jax.train import experiment  # pylint: disable=import-outside-toplevel
  images = tmp_path / "pets"
  write_folder(images / "train", {"cat": 2, "dog": 2, "fox": 2})
  write_folder(images / "val", {"cat": 1, "dog": 1, "fox": 1}, seed=9)
  spec = importlib.util.spec_from_file_location("finetune", REPO / "experiments/finetune.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("nfnet:nano")
  assert config.num_classes == 0 and config.init_from is None  # nano: nothing published
  config.unlock()
  config.update_from_flattened_dict({
      "dataset.name": f"folder:{images}", "train_batch_size": 2, "eval_batch_size": 2,
      "dataset.image_size": 16, "dataset.eval_image_size": 16})
  caplog.set_level(logging.INFO)
  run = experiment.Experiment(config_lib.finalize(config), str(tmp_path / "run"))
  try:
    assert run.num_classes == 3
    head = run._abstract_state().params["NFNet/~/linear"]  # pylint: disable=protected-access
    assert head["w"].shape[-1] == head["b"].shape[-1] == 3
    meta = run._meta()  # pylint: disable=protected-access
  finally:
    run.close()
  assert meta["num_classes"] == 3 and meta["class_names"] == ["cat", "dog", "fox"]
  assert (f"config.num_classes = 0: the classifier has 3 outputs, the classes of dataset "
          f"'folder:{images}' (cat, dog, fox).") in caplog.text


def test_num_classes_0_is_valid_and_negative_is_named():
  assert _config(num_classes=0).num_classes == 0
  with pytest.raises(config_lib.ConfigError, match=r"config.num_classes = -1 is invalid: "
                     r"expected 0 \(the dataset's number of classes\) or a positive integer"):
    _config(num_classes=-1)
  # With a class subset, 0 takes the subset's size (a number set must be it, as before).
  assert _config(**{"num_classes": 0, "dataset.classes": "5-9"}).dataset.classes == "5-9"


# ----------------------------------------------------------------------------- unreadable (2)


def _broken_folder(root: pathlib.Path) -> list[pathlib.Path]:
  """Two class folders of files with image names that are no images (one under 8 bytes)."""
  names = [root / "a" / "short.jpg", root / "a" / "note.jpg", root / "b" / "cut.jpg"]
  for path in names:
    path.parent.mkdir(parents=True, exist_ok=True)
  names[0].write_bytes(b"\xff\xd8\xff")
  names[1].write_bytes(b"a text file saved with a .jpg name")
  names[2].write_bytes(encode(random_image(1))[:150])  # a truncated download
  return names


@pytest.mark.slow
def test_the_trainer_on_a_split_with_no_readable_image_stops_with_one_line(tmp_path):
  """Issue 38, defect 2: it hung at 100% CPU (and with a file under 8 bytes wrote 178 MB
  of log in 7 minutes). Now one error names how many files were tried and which."""
  images = tmp_path / "broken"
  names = _broken_folder(images)
  dirs = {"data_dir": str(tmp_path / "tfds"), "cache": str(tmp_path / "cache")}
  proc = run_trainer(dirs, tmp_path / "run", f"--config.dataset.name=folder:{images}",
                     "--config.dataset.eval_split=train", "--config.num_classes=0",
                     check=False, timeout=300)
  assert proc.returncode == 1, proc.stderr[-3000:]
  fatal = [line for line in proc.stderr.splitlines() if line.startswith("FATAL")]
  assert len(fatal) == 1 and fatal[0].startswith(
      f"FATAL None of the 3 files of folder:{images} split 'train' could be read as an image: ")
  assert all(str(name) in fatal[0] for name in names)
  assert "Traceback" not in proc.stderr and len(proc.stderr) < 50_000


# ----------------------------------------------------------------------------- no examples (8)


@pytest.fixture(scope="module")
def nano_weights(tmp_path_factory) -> str:
  """Random nano weights with 3 outputs (shapes traced, never compiled), as a .npz file."""
  rng = np.random.default_rng(0)
  params = {module: {name: (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
                     for name, leaf in group.items()}
            for module, group in models.param_shapes("nfnet:nano", 3).items()}
  return str(weights.save_params_npz(params, tmp_path_factory.mktemp("w") / "nano.npz"))


@pytest.mark.slow
def test_evaluate_over_no_readable_example_fails_instead_of_reporting_zero(
    nano_weights, tmp_path, capsys):
  """Issue 38, defect 8: it exited 0 with "top-1 0.0000 ... over 0 examples"."""
  images = tmp_path / "broken"
  _broken_folder(images)
  code = evaluate.main(["evaluate", "--compilation_cache_dir=", f"--checkpoint={nano_weights}",
                        "--model=nfnet:nano", f"--dataset=folder:{images}", "--split=train",
                        "--image_size=16", "--batch_size=2", "--progress=none"])
  out, err = capsys.readouterr()
  assert code == 1 and out == ""
  assert (f"error: No example of 'folder:{images}' split 'train' could be scored: every file "
          "was skipped as unreadable (see the warnings above) or the split is empty, so there "
          "is no top-1 to report.") in err
