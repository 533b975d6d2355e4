"""The experiment files against the published recipes, field by field.

The tables are written out here, from DeepMind's published NFNets code
(deepmind-research/nfnets): the experiment files experiment_nfnets.py and
experiment_nf_regnets.py, the defaults of experiment.py and dataset.py that
they keep (evaluation preprocessing, augmentation order), and the variant
tables of models.py (resolutions, dropout, RandAugment levels). They are not
read from this project, so a change to an experiment file, to `base_config` or
to a model's defaults that leaves the published recipe fails here.
"""

import importlib.util
import inspect
import operator
import os
import pathlib
import subprocess
import sys
from typing import Any

import pytest

from nfnets_jax import optim
from nfnets_jax.data.augment_spec import AugmentSpec, parse_augment_name
from nfnets_jax.models.nf_regnet import NFRegNet
from nfnets_jax.models.nfnet import NFNet
from nfnets_jax.train import config as config_lib

REPO = pathlib.Path(__file__).parents[1]
EXPERIMENTS = REPO / "experiments"

# --- published values ----------------------------------------------------------------------

#: experiment_nfnets.py, the same for every F variant. The whole ImageNet train
#: set for training and its validation set for evaluation, as published.
NFNET_RECIPE = {
    "seed": 0, "num_classes": 1000, "train_batch_size": 4096, "num_epochs": 360,
    "num_train_steps": -1, "warmup_epochs": 5,
    "dataset.name": "imagenet2012", "dataset.train_split": "train",
    "dataset.eval_split": "validation", "dataset.train_preproc": "inception_crop",
    "dataset.eval_preproc": "resize_crop_32", "dataset.augment_before_mix": False,
    "dataset.mix_source": "stream",
    "optimizer.base_lr": 0.1, "optimizer.scale_lr_by_batch": True, "optimizer.min_lr": 0.0,
    "optimizer.momentum": 0.9, "optimizer.nesterov": True, "optimizer.weight_decay": 2e-5,
    "optimizer.clipping": 0.01, "optimizer.eps": 1e-3,
    # The classifier's weights are not clipped (the optimizer's default groups);
    # its bias is, as published.
    "optimizer.exclude_classifier_from_agc": False,
    "label_smoothing": 0.1, "ema_decay": 0.99999, "compute_dtype": "bfloat16", "sam.rho": 0.0,
}
NFNET_PEAK_LR = 0.1 * 4096 / 256
#: The NFNet model's arguments in experiment_nfnets.py (drop_rate: the variant's).
NFNET_MODEL = {"width": 1.0, "se_ratio": 0.5, "alpha": 0.2, "stochdepth_rate": 0.25,
               "activation": "gelu", "final_conv_mult": 2, "final_conv_ch": None,
               "use_two_convs": True}
#: variant: (RandAugment layers, magnitude), train and test resolution, dropout.
NFNET_VARIANTS = {
    "F0": ((4, 5), 192, 256, 0.2), "F1": ((4, 10), 224, 320, 0.3),
    "F2": ((4, 10), 256, 352, 0.4), "F3": ((4, 15), 320, 416, 0.4),
    "F4": ((4, 15), 384, 512, 0.5), "F5": ((4, 15), 416, 544, 0.5),
    "F6": ((4, 15), 448, 576, 0.5), "F7": ((4, 15), 480, 608, 0.5),
}

#: experiment_nf_regnets.py, the same for every B variant; the evaluation
#: preprocessing is the published default it keeps.
NF_REGNET_RECIPE = {
    "seed": 0, "num_classes": 1000, "train_batch_size": 1024, "num_epochs": 360,
    "num_train_steps": -1, "warmup_epochs": 5,
    "dataset.name": "imagenet2012", "dataset.train_split": "train",
    "dataset.eval_split": "validation", "dataset.train_preproc": "inception_crop",
    "dataset.eval_preproc": "crop_resize",
    "optimizer.base_lr": 0.4, "optimizer.scale_lr_by_batch": False, "optimizer.min_lr": 0.001,
    "optimizer.momentum": 0.9, "optimizer.nesterov": True, "optimizer.clipping": 0.0,
    "label_smoothing": 0.1, "ema_decay": 0.99999, "compute_dtype": "float32", "sam.rho": 0.0,
}
NF_REGNET_PEAK_LR = 0.4
NF_REGNET_MODEL = {"width": 0.75, "expansion": 2.25, "se_ratio": 0.5, "alpha": 0.2,
                   "stochdepth_rate": 0.1, "activation": "silu"}
#: variant: weight decay, train and test resolution, dropout.
NF_REGNET_VARIANTS = {
    "B0": (5e-5, 192, 224, 0.2), "B1": (6e-5, 224, 256, 0.2), "B2": (7e-5, 240, 272, 0.3),
    "B3": (8e-5, 288, 320, 0.3), "B4": (9e-5, 320, 384, 0.4), "B5": (1e-4, 384, 456, 0.4),
}
#: No published weight decay: ours is B5's. Resolutions and dropout are published.
NF_REGNET_OURS = {"B6": (1e-4, 448, 528, 0.5), "B7": (1e-4, 512, 600, 0.5),
                  "B8": (1e-4, 600, 672, 0.5)}

# --- helpers -------------------------------------------------------------------------------


def load_experiment(name: str):
  """The experiment file `experiments/<name>.py` as a module."""
  spec = importlib.util.spec_from_file_location(f"experiment_{name}", EXPERIMENTS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def field(config, dotted: str) -> Any:
  """The value of a dotted field, e.g. 'optimizer.base_lr' (fields are attributes)."""
  return operator.attrgetter(dotted)(config)


def differing_fields(config, expected: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  """{field: (config's value, expected value)} of every field that differs."""
  return {name: (field(config, name), want) for name, want in expected.items()
          if field(config, name) != want}


def model_arguments(model_class, config) -> dict[str, Any]:
  """What the model is built with: its constructor's defaults, overridden by the config."""
  defaults = {name: p.default for name, p in inspect.signature(model_class).parameters.items()
              if p.default is not inspect.Parameter.empty}
  return {**defaults, **{k: v for k, v in config.model_kwargs.items() if v is not None}}


def peak_lr(config) -> float:
  return optim.peak_learning_rate(config.optimizer.base_lr, config.train_batch_size,
                                  scale_by_batch=config.optimizer.scale_lr_by_batch)


# --- NFNets --------------------------------------------------------------------------------

NFNET_ALL = {**NFNET_VARIANTS, **{f"{name}+": row for name, row in NFNET_VARIANTS.items()}}


@pytest.mark.parametrize("variant", NFNET_ALL)
def test_nfnet_configs_are_the_published_recipe(variant):
  """F0..F7 as published; F0+..F7+ the same, with their base variant's RandAugment
  level (ours: the published augmentation table has F0..F7 only)."""
  (layers, magnitude), train_size, test_size, drop_rate = NFNET_ALL[variant]
  config = load_experiment("nfnet").get_config(variant)
  assert config.model == f"nfnet:{variant}"
  assert differing_fields(config, NFNET_RECIPE) == {}
  assert peak_lr(config) == pytest.approx(NFNET_PEAK_LR)
  assert (config.dataset.image_size, config.dataset.eval_image_size) == (train_size, test_size)
  assert parse_augment_name(config.dataset.augment_name) == AugmentSpec(
      mixup=True, mixup_alpha=0.2, cutmix=True, randaugment_layers=layers,
      randaugment_magnitude=magnitude)
  arguments = model_arguments(NFNet, config)
  assert {k: arguments[k] for k in NFNET_MODEL} == NFNET_MODEL
  assert arguments["drop_rate"] == drop_rate


def test_every_nfnet_variant_has_a_published_row():
  from nfnets_jax.models import nfnet  # pylint: disable=import-outside-toplevel
  assert set(nfnet.VARIANTS) == set(NFNET_ALL)


# --- NF-RegNets ----------------------------------------------------------------------------

NF_REGNET_ALL = {**NF_REGNET_VARIANTS, **NF_REGNET_OURS}


@pytest.mark.parametrize("variant", NF_REGNET_ALL)
def test_nf_regnet_configs_are_the_published_recipe(variant):
  """B0..B5 as published; B6..B8 the same with B5's weight decay (ours)."""
  weight_decay, train_size, test_size, drop_rate = NF_REGNET_ALL[variant]
  config = load_experiment("nf_regnet").get_config(variant)
  assert config.model == f"nf_regnet:{variant}"
  assert differing_fields(config, NF_REGNET_RECIPE) == {}
  assert config.optimizer.weight_decay == weight_decay
  assert peak_lr(config) == pytest.approx(NF_REGNET_PEAK_LR)
  assert (config.dataset.image_size, config.dataset.eval_image_size) == (train_size, test_size)
  # mixup (alpha 0.2) on half of each batch and CutMix on the other; no RandAugment.
  assert parse_augment_name(config.dataset.augment_name) == AugmentSpec(
      mixup=True, mixup_alpha=0.2, cutmix=True)
  arguments = model_arguments(NFRegNet, config)
  assert {k: arguments[k] for k in NF_REGNET_MODEL} == NF_REGNET_MODEL
  assert arguments["drop_rate"] == drop_rate


def test_nf_regnet_peak_does_not_follow_the_batch_size():
  """A smaller batch keeps the published peak of 0.4 (it is not scaled by batch / 256)."""
  config = load_experiment("nf_regnet").get_config("B0")
  config.train_batch_size = 256
  assert peak_lr(config) == pytest.approx(NF_REGNET_PEAK_LR)


def test_every_nf_regnet_variant_has_a_row():
  from nfnets_jax.models import nf_regnet  # pylint: disable=import-outside-toplevel
  assert set(nf_regnet.VARIANTS) == set(NF_REGNET_ALL)
  assert not set(NF_REGNET_VARIANTS) & set(NF_REGNET_OURS)


# --- NF-ResNets: no published configuration -------------------------------------------------

#: The NFNet recipe's training fields (all but the data's) that experiments/nf_resnet.py
#: says it reuses.
REUSED_NFNET_FIELDS = [name for name in NFNET_RECIPE if not name.startswith("dataset.")]


@pytest.mark.parametrize("variant", ["ResNet50", "ResNet200"])
def test_nf_resnet_config_says_it_is_not_published_and_reuses_the_nfnet_recipe(variant):
  module = load_experiment("nf_resnet")
  assert "not a published configuration" in " ".join(module.__doc__.split())
  config = module.get_config(variant)
  nfnet_config = load_experiment("nfnet").get_config("F0")
  assert {name: field(config, name) for name in REUSED_NFNET_FIELDS} == {
      name: field(nfnet_config, name) for name in REUSED_NFNET_FIELDS}
  assert (config.dataset.image_size, config.dataset.eval_image_size) == (224, 224)


# --- the experiment files' arguments --------------------------------------------------------


@pytest.mark.parametrize("name, argument, message", [
    ("nfnet", "F99", "Unknown NFNet variant 'F99' in experiments/nfnet.py:<variant>; valid: F0, "),
    ("nf_regnet", "B9", "Unknown NF-RegNet variant 'B9' in experiments/nf_regnet.py:<variant>; "
     "valid: B0, "),
    ("nf_resnet", "ResNet51", "Unknown NF-ResNet variant 'ResNet51' in "
     "experiments/nf_resnet.py:<variant>; valid: ResNet50, "),
    ("finetune", "nfnet:F99", "experiments/finetune.py:<model> takes an NFNet, e.g. nfnet:F0; "
     "got 'nfnet:F99'. Valid: nfnet:F0, "),
    ("finetune", "nf_resnet:ResNet50", "takes an NFNet, e.g. nfnet:F0; got 'nf_resnet:ResNet50'"),
])
def test_an_unknown_experiment_argument_is_a_config_error_naming_it_and_the_valid_ones(
    name, argument, message):
  with pytest.raises(config_lib.ConfigError) as err:
    load_experiment(name).get_config(argument)
  assert message in str(err.value)


@pytest.mark.parametrize("config, message", [
    ("experiments/nfnet.py:F99", "FATAL config error: Unknown NFNet variant 'F99' in "
     "experiments/nfnet.py:<variant>; valid: F0, F1, "),
    ("experiments/finetune.py:nfnet:F99", "FATAL config error: experiments/finetune.py:<model> "
     "takes an NFNet, e.g. nfnet:F0; got 'nfnet:F99'. Valid: nfnet:F0, "),
    ("experiments/demo.py:X", "FATAL config error: --config=experiments/demo.py:X: get_config() "
     "takes 0 positional arguments but 1 was given"),
    # ml_collections reports a missing file at the config's first use, or at
    # the first override, as a traceback.
    ("experiments/nfent.py:F0", "FATAL config error: --config=experiments/nfent.py:F0: no "
     "readable experiment file 'experiments/nfent.py' (relative to "),
    ("experiments/nfent.py:F0 --config.seed=1", "FATAL config error: "
     "--config=experiments/nfent.py:F0: no readable experiment file 'experiments/nfent.py'"),
])
def test_the_trainer_reports_a_bad_experiment_argument_in_one_line(tmp_path, config, message):
  """Through the real command line: one line naming the value (and the valid
  ones), exit status 1, as any other config error; no traceback, no workdir."""
  workdir = tmp_path / "run"
  config, *overrides = config.split()
  proc = subprocess.run(
      [sys.executable, "-m", "nfnets_jax.train", f"--config={config}", *overrides,
       f"--workdir={workdir}"],
      cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
      timeout=120)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert proc.stderr.strip().startswith(message), proc.stderr[-3000:]
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]
  assert not workdir.exists()
