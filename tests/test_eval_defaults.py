"""A checkpoint remembers how to evaluate it: evaluate and classify take the model,
eval image size and preprocessing, dataset, split, EMA choice and class names from a
training run's record, flags override it, and checkpoints without it keep the
published defaults.

The fast tests resolve settings from orbax workdirs laid out as the trainer lays them
out (nothing compiles); the slow ones run the README's command on the session's demo
run, and evaluate and classify a folder of real JPEGs from the record the trainer's
Experiment makes for it.
"""

import importlib.util
import json
import logging
import re
import shlex

import numpy as np
import orbax.checkpoint as ocp
import pytest

from data_helpers import encode, random_image, write_folder
from demo_run import REPO
from nfnets_jax import classify, cli, evaluate, models, weights
from nfnets_jax.cli import model_flags
from nfnets_jax.train import config as config_lib
from nfnets_jax.train import experiment, init_from
from nfnets_jax.data.sources import open_source

RECORD = {"dataset": "digits", "data_dir": "/data/tfds", "val_fraction": 0.0, "split": "test",
          "image_size": 24, "eval_preproc": "resize_crop_1", "normalization": "inception",
          "ema": True}


def write_workdir(path, meta, num_classes=3):
  """A workdir as the trainer lays it out: zero nano weights (raw and EMA) and `meta`."""
  params = {m: {n: np.zeros(leaf.shape, np.float32) for n, leaf in g.items()}
            for m, g in models.param_shapes("nfnet:nano", num_classes).items()}
  with weights.checkpoint_manager(path) as manager:
    manager.save(5, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), ema_params=ocp.args.StandardSave(params),
        meta=ocp.args.JsonSave({"step": 5, **meta})))
    manager.wait_until_finished()
  return str(path)


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  """A run that records how it evaluates, one from before such records, an ImageNet one."""
  root = tmp_path_factory.mktemp("eval_defaults")
  synsets = [synset for synset, _ in classify.imagenet_classes()]
  return {
      "recorded": write_workdir(root / "recorded", {
          "model": "nfnet:nano", "num_classes": 3, "eval": RECORD,
          "class_names": ["cat", "dog", "emu"]}),
      "old": write_workdir(root / "old", {"model": "nfnet:nano", "num_classes": 3,
                                          "model_kwargs": {}}),
      "imagenet": write_workdir(root / "imagenet", {
          "model": "nfnet:nano", "num_classes": 1000, "class_names": synsets},
          num_classes=1000)}


def resolve(*args, dataset=True):
  fv, _ = evaluate._define_flags()  # pylint: disable=protected-access
  fv(["evaluate", *args])
  loaded = model_flags.load_model_from_flags(fv)
  return loaded, model_flags.eval_settings_from_flags(fv, loaded, dataset=dataset)


def test_recorded_settings_are_the_defaults_and_flags_override_them(workdirs):
  workdir = workdirs["recorded"]
  loaded, settings = resolve(f"--checkpoint={workdir}")
  assert settings.values == {"model": "nfnet:nano", "num_classes": 3, "ema": True,
                             "dataset": "digits", "split": "test", "data_dir": "/data/tfds",
                             "image_size": 24, "eval_preproc": "resize_crop_1",
                             "normalization": "inception"}
  assert set(settings.origins.values()) == {"checkpoint"}
  assert "  eval_preproc   resize_crop_1  [checkpoint]" in settings.describe().splitlines()
  assert loaded.class_names == ["cat", "dog", "emu"]
  assert loaded.normalization == "inception"  # what evaluate_params/classify_images default to

  _, settings = resolve(f"--checkpoint={workdir}", "--noema", "--image_size=32",
                        "--eval_preproc=crop_resize", "--split=train", "--normalization=imagenet")
  assert (settings["ema"], settings["image_size"], settings["eval_preproc"],
          settings["split"], settings["normalization"]) == (
              False, 32, "crop_resize", "train", "imagenet")
  assert {k: v for k, v in settings.origins.items() if v == "flag"} == {
      "ema": "flag", "image_size": "flag", "eval_preproc": "flag", "split": "flag",
      "normalization": "flag"}
  assert settings.origins["dataset"] == settings.origins["data_dir"] == "checkpoint"
  # Another dataset: the record's split and data_dir were the recorded dataset's.
  _, settings = resolve(f"--checkpoint={workdir}", "--dataset=cifar10")
  assert (settings["split"], settings["data_dir"], settings["image_size"]) == (
      "validation", None, 24)
  assert settings.origins["split"] == "default" and settings.origins["image_size"] == "checkpoint"


def test_checkpoints_without_a_record_keep_the_published_defaults(workdirs, tmp_path):
  old = workdirs["old"]
  loaded, settings = resolve(f"--checkpoint={old}")
  assert settings.values == {"model": "nfnet:nano", "num_classes": 3, "ema": False,
                             "dataset": "imagenet2012", "split": "validation", "data_dir": None,
                             "image_size": models.default_image_size("nfnet:nano"),
                             "eval_preproc": "resize_crop_32", "normalization": "imagenet"}
  assert [settings.origins[k] for k in ("model", "ema", "dataset", "image_size",
                                        "normalization")] == [
      "checkpoint", "default", "default", "default", "default"]
  assert loaded.class_names is None and classify.class_table(loaded) == (None, "default")
  assert loaded.normalization == "imagenet"
  npz = weights.save_params_npz(weights.load_params(old), tmp_path / "p.npz")
  _, settings = resolve(f"--checkpoint={npz}", "--image_size=16", dataset=False)
  assert settings.origins == {"model": "weights", "num_classes": "weights", "ema": "default",
                              "image_size": "flag", "eval_preproc": "default",
                              "normalization": "default"}
  with pytest.raises(cli.UsageError, match=r"--val_fraction must be a number in \[0, 1\)"):
    resolve(f"--checkpoint={old}", "--val_fraction=1.5")


def test_a_recorded_normalization_no_tool_knows_is_refused_by_name(tmp_path):
  newer = write_workdir(tmp_path / "newer", {  # as a newer version might record
      "model": "nfnet:nano", "num_classes": 3, "eval": {**RECORD, "normalization": "clip"}})
  with pytest.raises(cli.UsageError, match="Unknown normalization 'clip'; valid: imagenet"):
    resolve(f"--checkpoint={newer}")


def test_init_from_warns_when_the_run_normalises_otherwise_than_its_weights(workdirs, caplog):
  fresh = models.param_shapes("nfnet:nano", 3)
  with caplog.at_level(logging.WARNING):
    init_from.prepare(workdirs["recorded"], fresh, normalization="inception")
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
  with caplog.at_level(logging.WARNING):
    init_from.prepare(workdirs["recorded"], fresh, normalization="imagenet")
  warning, = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert "normalised with 'inception'" in warning
  assert "config.dataset.normalization = 'imagenet'; set it to 'inception'" in warning


def test_class_table_names_recorded_classes_and_imagenet_synsets(workdirs):
  named = weights.load_model(workdirs["recorded"])
  classes, origin = classify.class_table(named)
  assert classes == [(None, "cat"), (None, "dog"), (None, "emu")] and origin == "checkpoint"
  top = classify.top_predictions(np.array([0.1, 0.7, 0.2]), 2, classes)
  assert [p.label() for p in top] == ["dog", "emu"]
  imagenet = weights.load_model(workdirs["imagenet"])
  classes, origin = classify.class_table(imagenet)
  assert classes[0] == ("n01440764", "tench") and origin == "checkpoint"


def readme_evaluate_args(workdir):
  """The README's evaluate command for `make demo`'s workdir, pointed at `workdir`."""
  readme = (REPO / "README.md").read_text()
  command = re.search(r"`(python -m nfnets_jax\.evaluate --checkpoint=workdirs/demo[^`]*)`",
                      readme)[1]
  return [arg.replace("workdirs/demo", workdir) for arg in shlex.split(command)[3:]]


@pytest.mark.slow
def test_readme_command_scores_the_demo_as_training_did(demo_run, capsys):
  args = readme_evaluate_args(demo_run["workdir"])
  assert not [a for a in args if a.startswith(("--eval_preproc", "--image_size", "--ema"))]
  code = evaluate.main(["evaluate", *args, "--compilation_cache_dir="])
  out, err = capsys.readouterr()
  assert code == 0, err
  results = json.loads(out.strip().splitlines()[-1])
  assert results["num_examples"] == 355
  assert results["top1"] == demo_run["reported"]["top1"]
  assert results["top5"] == demo_run["reported"]["top5"]
  assert results["settings_from"]["eval_preproc"] == "checkpoint"
  assert results["eval_preproc"] == "resize_crop_1" and results["ema"] is False
  assert "  dataset        digits  [flag]" in err.splitlines()


def demo_config(**fields):
  spec = importlib.util.spec_from_file_location("demo_config", REPO / "experiments" / "demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.update_from_flattened_dict(fields)
  return config_lib.validate(config)


@pytest.mark.slow
def test_folder_run_is_evaluated_and_classified_from_its_record(tmp_path, capsys):
  """The trainer reads a folder of JPEGs with a held-out part and records how to score it;
  evaluate and classify then need only the checkpoint."""
  images = tmp_path / "shapes"
  write_folder(images, {"circle": 5, "square": 5, "triangle": 5})
  broken = images / "square" / "broken.jpg"
  broken.write_bytes(encode(random_image(7))[:200])
  config = demo_config(**{
      "dataset.name": f"folder:{images}", "dataset.val_fraction": 0.4,
      "dataset.eval_split": "validation", "dataset.image_size": 24,
      "dataset.eval_image_size": 24, "num_classes": 3, "train_batch_size": 4,
      "async_checkpoints": False})
  run = experiment.Experiment(config, str(tmp_path / "run"))
  try:
    meta = run._meta()  # pylint: disable=protected-access
    batch = next(run._train_batches(0))  # pylint: disable=protected-access
  finally:
    run.close()
  assert batch["images"].shape == (4, 24, 24, 3)
  assert meta["class_names"] == ["circle", "square", "triangle"]
  assert meta["eval"] == {"dataset": f"folder:{images}", "data_dir": None, "val_fraction": 0.4,
                          "split": "validation", "image_size": 24,
                          "eval_preproc": "resize_crop_1", "normalization": "imagenet",
                          "ema": False}
  workdir = write_workdir(tmp_path / "ckpt", meta)

  code = evaluate.main(["evaluate", f"--checkpoint={workdir}", "--compilation_cache_dir="])
  out, err = capsys.readouterr()
  assert code == 0, err
  results = json.loads(out.strip().splitlines()[-1])
  held_out = [path for path, _ in open_source(f"folder:{images}", "validation",
                                              val_fraction=0.4).splits["validation"]]
  assert len(held_out) == 6  # two of each class
  assert (results["dataset"], results["split"]) == (f"folder:{images}", "validation")
  assert results["num_examples"] == 6 - held_out.count(str(broken))
  assert results["skipped_files"] == held_out.count(str(broken))
  assert "  val_fraction   0.4  [checkpoint]" in err.splitlines()

  code = classify.main(["classify", f"--checkpoint={workdir}", "--compilation_cache_dir=",
                        "--top_k=3", str(images / "circle" / "img_0.jpg")])
  out, err = capsys.readouterr()
  assert code == 0, err
  labels = [line.split()[-1] for line in out.splitlines()[1:]]
  assert sorted(labels) == ["circle", "square", "triangle"]
  assert "  class_names    3: circle, square, triangle  [checkpoint]" in err.splitlines()
