"""The experiment config: one schema for every experiment file.

Experiment files (`experiments/*.py`) start from `base_config()` and change
values; they never add fields. The returned config is locked, so a misspelt
field, in a file or on the command line (`--config.train_batch_szie=...`), is
an error instead of a silently ignored setting. `validate` then checks values
that have a valid range and names the field that is off.
"""

from typing import Any, Callable

import ml_collections
from ml_collections import config_dict

COMPUTE_DTYPES = ("float32", "bfloat16")


def base_config() -> ml_collections.ConfigDict:
  """The paper's NFNet-F0 ImageNet recipe (Brock et al. 2021), unlocked for editing.

  Call `.lock()` (or let `finalize` do it) once the experiment file is done.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = "nfnet:F0"
  c.num_classes = 1000
  # Keyword arguments of the model's constructor (see nfnets_jax.models).
  c.model_kwargs = ml_collections.ConfigDict({"stochdepth_rate": 0.25})

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "imagenet2012"
  c.dataset.data_dir = config_dict.placeholder(str)
  c.dataset.train_split = "train"
  c.dataset.eval_split = "validation"
  c.dataset.image_size = 192
  c.dataset.eval_image_size = 256
  # A typed placeholder, so that None (no augmentation) stays overridable from flags.
  c.dataset.augment_name = config_dict.placeholder(str)
  c.dataset.augment_name = "cutmix_mixup_randaugment_405"
  c.dataset.eval_preproc = "resize_crop_32"
  c.dataset.train_preproc = "inception_crop"  # or "resize" (no crop/flip)
  # Deterministic: seeded, ordered input, so a resumed run replays exactly the
  # batches it would have seen. Fast mode (False) trades that for throughput.
  c.dataset.deterministic = False
  # tf.data's autotuner; off only for runs of a minute or so (see data.load).
  c.dataset.autotune = True

  c.train_batch_size = 4096  # global, across all devices and hosts
  c.eval_batch_size = 1024
  c.num_epochs = 360.0
  c.num_train_steps = -1  # > 0 overrides num_epochs
  c.warmup_epochs = 5.0

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.base_lr = 0.1  # at batch 256; scaled by train_batch_size / 256
  c.optimizer.min_lr = 0.0
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 2e-5
  c.optimizer.clipping = 0.01  # AGC; 0 disables
  c.optimizer.eps = 1e-3
  c.optimizer.exclude_classifier_from_agc = False

  c.label_smoothing = 0.1
  c.ema_decay = 0.99999
  c.compute_dtype = "bfloat16"

  c.sam = ml_collections.ConfigDict()
  c.sam.rho = 0.0  # > 0 enables the paper's modified SAM
  c.sam.ascent_fraction = 0.2

  c.log_every_steps = 100
  c.eval_every_steps = 0  # 0: evaluate at the end only
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.async_checkpoints = True
  return c


class ConfigError(ValueError):
  """An invalid config value; the message names the field and what would be valid.

  The trainer reports it as one line (no traceback) and exits with status 1.
  """


def _fail(field: str, value: Any, valid: str) -> None:
  raise ConfigError(f"config.{field} = {value!r} is invalid: {valid}.")


def _parse(field: str, parser: Callable[[Any], Any], config: ml_collections.ConfigDict) -> None:
  """Runs a value parser of the library on the field, naming the field in its error."""
  try:
    parser(_get(config, field))
  except ValueError as err:
    raise ConfigError(f"config.{field}: {err}") from None


def _positive_int(config: ml_collections.ConfigDict, field: str) -> None:
  value = config[field] if "." not in field else _get(config, field)
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    _fail(field, value, "expected a positive integer")


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
  value = config
  for part in field.split("."):
    value = value[part]
  return value


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks names and value ranges; raises `ConfigError` naming the field. Returns the config."""
  from nfnets_jax import models  # pylint: disable=import-outside-toplevel
  from nfnets_jax.data import augment_spec, preproc_spec  # pylint: disable=import-outside-toplevel
  _parse("model", models.parse_model_name, config)
  # Here rather than where the input pipeline is built, after the model's
  # initialisation: a misspelt augmentation or preprocessing should not cost
  # a large run that (nor TensorFlow's import: these parsers need none).
  _parse("dataset.augment_name", augment_spec.parse_augment_name, config)
  _parse("dataset.train_preproc", preproc_spec.check_train_preproc, config)
  _parse("dataset.eval_preproc", preproc_spec.parse_eval_preproc, config)
  for field in ("num_classes", "train_batch_size", "eval_batch_size", "dataset.image_size",
                "dataset.eval_image_size", "log_every_steps", "checkpoint_every_steps",
                "keep_checkpoints"):
    _positive_int(config, field)
  if config.num_train_steps != -1 and config.num_train_steps < 1:
    _fail("num_train_steps", config.num_train_steps, "expected -1 (use num_epochs) or >= 1")
  if config.num_train_steps == -1 and not config.num_epochs > 0:
    _fail("num_epochs", config.num_epochs, "expected a number > 0")
  if config.warmup_epochs < 0:
    _fail("warmup_epochs", config.warmup_epochs, "expected a number >= 0")
  if config.eval_every_steps < 0:
    _fail("eval_every_steps", config.eval_every_steps, "expected 0 (end only) or a step interval")
  if config.compute_dtype not in COMPUTE_DTYPES:
    _fail("compute_dtype", config.compute_dtype, f"expected one of {COMPUTE_DTYPES}")
  if not 0.0 <= config.label_smoothing < 1.0:
    _fail("label_smoothing", config.label_smoothing, "expected a number in [0, 1)")
  if not 0.0 <= config.ema_decay < 1.0:
    _fail("ema_decay", config.ema_decay, "expected a number in [0, 1)")
  if config.sam.rho < 0:
    _fail("sam.rho", config.sam.rho, "expected a number >= 0 (0 disables SAM)")
  if not 0.0 < config.sam.ascent_fraction <= 1.0:
    _fail("sam.ascent_fraction", config.sam.ascent_fraction, "expected a number in (0, 1]")
  if config.optimizer.clipping < 0:
    _fail("optimizer.clipping", config.optimizer.clipping, "expected a number >= 0 (0 disables AGC)")
  return config


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Locks the config against new fields and validates it."""
  config.lock()
  return validate(config)
