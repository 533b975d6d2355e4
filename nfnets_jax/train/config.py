"""The experiment config: one schema for every experiment file.

Experiment files (`experiments/*.py`) start from `base_config()` and change
values; they never add fields. The returned config is locked, so a misspelt
field, in a file or on the command line (`--config.train_batch_szie=...`), is
an error instead of a silently ignored setting. `validate` then checks values
that have a valid range and names the field that is off. None is a value only
where the schema says so (`nullable_fields`); on the command line it is
spelt `--config.<field>=None` (see `accept_none_overrides`).
"""

import fnmatch
import re
from typing import Any, Callable, Mapping

import ml_collections
from absl import flags
from ml_collections import config_dict, config_flags

from nfnets_jax.data import preproc_spec, subsets  # TensorFlow-free, as this whole module
from nfnets_jax.models.registry import COMPUTE_DTYPES

#: Training leaves out float16: it would need loss scaling, which the trainer does not do.
TRAIN_COMPUTE_DTYPES = tuple(dtype for dtype in COMPUTE_DTYPES if dtype != "float16")


def base_config() -> ml_collections.ConfigDict:
  """The paper's NFNet-F0 ImageNet recipe (Brock et al. 2021), unlocked for editing.

  One field keeps the published data loader's default rather than the NFNet
  experiment's value: `dataset.augment_before_mix` (True; experiments/nfnet.py
  sets the published False). Call `.lock()` (or let `finalize` do it) once the
  experiment file is done.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = "nfnet:F0"
  # The classifier's outputs: the dataset's number of classes (the trainer checks it),
  # or 0 to take that number from the dataset (experiments/finetune.py's default).
  c.num_classes = 1000
  # Keyword arguments of the model's constructor (see nfnets_jax.models).
  c.model_kwargs = ml_collections.ConfigDict({"stochdepth_rate": 0.25})
  # How the model is lowered, never what it computes (models.transform): None
  # is $NFNETS_JAX_CONV_IMPL (else 'auto') and 'auto'.
  c.model_kwargs.conv_impl = config_dict.placeholder(str)
  c.model_kwargs.block_loop = config_dict.placeholder(str)

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "imagenet2012"
  c.dataset.data_dir = config_dict.placeholder(str)
  c.dataset.train_split = "train"
  c.dataset.eval_split = "validation"
  # For a single class-folder tree ('folder:<path>'): the fraction of each
  # class held out as its 'validation' split (0: none; see data/folder.py).
  c.dataset.val_fraction = 0.0
  c.dataset.image_size = 192
  c.dataset.eval_image_size = 256
  # A typed placeholder: None (no augmentation) is a valid value, from files and
  # flags alike (--config.dataset.augment_name=None).
  c.dataset.augment_name = config_dict.placeholder(str)
  c.dataset.augment_name = "cutmix_mixup_randaugment_405"
  # With mixing: RandAugment each image before it is mixed (True, the published
  # data loader's default) or each mixed image, once per output image (False,
  # the published NFNet experiment). The mixing itself is the same either way.
  c.dataset.augment_before_mix = True
  # Each mixed image's partner: 'stream' (the next image read: two decodes per
  # output, as published) or 'batch' (another image of its batch: one decode
  # per output, as timm). Same mixing statistics; see data/mixing.py.
  c.dataset.mix_source = "stream"
  c.dataset.eval_preproc = "resize_crop_32"
  c.dataset.train_preproc = "inception_crop"  # or "resize" (no crop/flip)
  # The per-channel statistics inputs are normalised with, in training and evaluation:
  # 'imagenet' (published) or 'inception' (0.5/0.5, as some of timm's weights were trained).
  c.dataset.normalization = preproc_spec.DEFAULT_NORMALIZATION
  # Deterministic: seeded, ordered input, so a resumed run replays exactly the
  # batches it would have seen. Fast mode (False) trades that for throughput.
  c.dataset.deterministic = False
  # tf.data's autotuner; off only for runs of a minute or so (see data.load).
  c.dataset.autotune = True
  # Train and evaluate on these classes only, relabelled 0..k-1 ('5-9', '0,3,7';
  # None: every class); num_classes must then be their number (data/subsets.py).
  c.dataset.classes = config_dict.placeholder(str)
  # Train on the first N examples of each class (in the split's stored order; 0: all).
  c.dataset.train_examples_per_class = 0

  c.train_batch_size = 4096  # global, across all devices and hosts
  # Each device splits its share of a step into this many micro-batches, whose
  # gradients are averaged before one update: the same step, in 1/K the memory.
  c.grad_accum_steps = 1
  # Split the parameters, optimizer state and EMA over the devices (ZeRO/FSDP
  # style, nfnets_jax/train/sharding.py): about 1/N of the state per device.
  # Needs more than one device.
  c.shard_state = False
  c.eval_batch_size = 1024
  c.num_epochs = 360.0
  c.num_train_steps = -1  # > 0 overrides num_epochs
  c.warmup_epochs = 5.0
  c.warmup_steps = -1  # >= 0 overrides warmup_epochs

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.base_lr = 0.1  # at batch 256, see scale_lr_by_batch
  # True: the peak learning rate is base_lr x train_batch_size / 256 (NFNets);
  # False: base_lr is the peak, whatever the batch (the published NF-RegNets).
  c.optimizer.scale_lr_by_batch = True
  c.optimizer.min_lr = 0.0  # where the cosine ends
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 2e-5
  c.optimizer.clipping = 0.01  # AGC; 0 disables
  c.optimizer.eps = 1e-3
  c.optimizer.exclude_classifier_from_agc = False

  c.label_smoothing = 0.1
  c.ema_decay = 0.99999
  c.compute_dtype = "bfloat16"

  # Fine-tuning (train/init_from.py, train/freeze.py). init_from: a checkpoint
  # file, a training workdir or 'published:F0'..; read only when the workdir has
  # no checkpoint yet (a resumed run restores its own state). From a workdir,
  # init_from_ema takes its EMA weights.
  c.init_from = config_dict.placeholder(str)
  c.init_from_ema = False
  # Re-initialise the classifier even where its shape fits (a new task with as
  # many classes); it always is where the shape differs.
  c.reinit_classifier = False
  # A regex searched in each parameter's published 'module/name' path
  # (e.g. 'NFNet/~/stem'); matching parameters are not trained.
  c.freeze = config_dict.placeholder(str)

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


def table_row(table: Mapping[str, Any], name: str, what: str, where: str) -> Any:
  """`table[name]` for an experiment file's variant argument; an unknown name is a
  ConfigError naming `what` it should be, `where` it was given and the valid names."""
  if name not in table:
    raise ConfigError(f"Unknown {what} {name!r} in {where}; valid: {', '.join(table)}.")
  return table[name]


def model_config(model: str, *, stochdepth_rate: float, drop_rate: float, image_size: int,
                 eval_image_size: int) -> ml_collections.ConfigDict:
  """`base_config()` for `model` with the regularisation and the train and test
  resolutions its experiment gives it, unlocked for the experiment's other changes."""
  c = base_config()
  c.model = model
  c.model_kwargs.stochdepth_rate = stochdepth_rate
  c.model_kwargs.drop_rate = drop_rate
  c.dataset.image_size = image_size
  c.dataset.eval_image_size = eval_image_size
  return c


# ----------------------------------------------------------------------------- None

#: How a command line says None: `--config.dataset.augment_name=None` (or none).
NONE_WORDS = ("none",)


class _NoneOr(flags.ArgumentParser):
  """An absl parser that reads 'None'/'none' as None and anything else as `parser` does."""

  def __init__(self, parser: flags.ArgumentParser):
    self._parser = parser
    self.syntactic_help = f"{parser.syntactic_help or 'a value'}, or None"

  def parse(self, argument: Any) -> Any:
    if isinstance(argument, str) and argument.strip().lower() in NONE_WORDS:
      return None
    return self._parser.parse(argument)

  def flag_type(self) -> str:
    return self._parser.flag_type()


def accept_none_overrides() -> None:
  """Lets `--config.<field>=None` set a field to None, whatever its type (the trainer calls it).

  ml_collections parses an override with its field's type, so 'None' becomes
  the string 'None' or an int/float/bool parse error. This registers parsers
  (ml_collections' own hook, for this process) that read None first;
  `validate` then refuses None where the schema does not allow it.
  """
  for field_type, parser in ((int, flags.IntegerParser()), (float, flags.FloatParser()),
                             (bool, flags.BooleanParser()), (str, flags.ArgumentParser())):
    config_flags.register_flag_parser_for_type(field_type, _NoneOr(parser))


def nullable_fields() -> tuple[str, ...]:
  """The fields (glob patterns) that may be None: the schema's placeholders, `model_kwargs.*`.

  A placeholder (`config_dict.placeholder(type)`) is how `base_config`
  declares "None is a valid value" (no augmentation, TFDS's data directory);
  a model keyword argument set to None is left out (the model's default).
  """
  def placeholders(config: ml_collections.ConfigDict, prefix: str) -> list[str]:
    found = []
    for key, value in config.items(preserve_field_references=True):
      if isinstance(value, ml_collections.ConfigDict):
        found += placeholders(value, f"{prefix}{key}.")
      elif isinstance(value, config_dict.FieldReference):
        found.append(prefix + key)
    return found

  wildcard = "model_kwargs.*"
  return tuple(field for field in placeholders(base_config(), "")
               if not fnmatch.fnmatchcase(field, wildcard)) + (wildcard,)


def _leaves(config: ml_collections.ConfigDict, prefix: str = "") -> list[tuple[str, Any]]:
  """(dotted field name, value) of every field that is not itself a ConfigDict.

  A field computed from others that cannot be computed (experiments/finetune.py's
  clipping from `train_batch_size = 0`) is left out: the range checks name the
  field it follows.
  """
  out = []
  for key in config.keys():
    try:
      value = config[key]
    except ArithmeticError:
      continue
    if isinstance(value, ml_collections.ConfigDict):
      out += _leaves(value, f"{prefix}{key}.")
    else:
      out.append((prefix + key, value))
  return out


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _expected(field: str) -> str:
  """What `field` takes, as the range checks below say it, else its type in the base config."""
  if field in _RANGES:
    return _RANGES[field][1]
  if field in _PARSED_FIELDS:
    return _PARSED_FIELDS[field]
  try:
    default = _get(base_config(), field)
  except KeyError:  # a field the experiment file added
    return "a value"
  return _KINDS.get(type(default), f"a value like {default!r}")


def _refuse_none(config: ml_collections.ConfigDict) -> None:
  """A ConfigError naming the first field that is None where the schema does not allow it."""
  nullable = nullable_fields()
  for field, value in _leaves(config):
    if value is None and not any(fnmatch.fnmatchcase(field, name) for name in nullable):
      raise ConfigError(
          f"config.{field} = None is not allowed: expected {_expected(field)}. None is allowed "
          f"only for {', '.join('config.' + name for name in nullable)}.")


# ----------------------------------------------------------------------------- ranges


def _is_positive_int(value: Any) -> bool:
  return not isinstance(value, bool) and isinstance(value, int) and value >= 1


#: The fields with a valid range: (check, what is valid, as the error says it).
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{field: (_is_positive_int, "a positive integer") for field in (
        "train_batch_size", "eval_batch_size", "dataset.image_size",
        "dataset.eval_image_size", "log_every_steps", "checkpoint_every_steps",
        "keep_checkpoints", "grad_accum_steps")},
    "num_classes": (lambda v: not isinstance(v, bool) and isinstance(v, int) and v >= 0,
                    "0 (the dataset's number of classes) or a positive integer"),
    "dataset.train_examples_per_class": (lambda v: not isinstance(v, bool) and isinstance(v, int)
                                         and v >= 0, "0 (every example) or an integer >= 1"),
    "num_train_steps": (lambda v: v == -1 or v >= 1, "-1 (use num_epochs) or >= 1"),
    "warmup_epochs": (lambda v: v >= 0, "a number >= 0"),
    "warmup_steps": (lambda v: v >= -1, "-1 (use warmup_epochs) or a number of steps >= 0"),
    "eval_every_steps": (lambda v: v >= 0, "0 (end only) or a step interval"),
    "compute_dtype": (lambda v: v in TRAIN_COMPUTE_DTYPES, f"one of {TRAIN_COMPUTE_DTYPES}"),
    "label_smoothing": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "ema_decay": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "sam.rho": (lambda v: v >= 0, "a number >= 0 (0 disables SAM)"),
    "sam.ascent_fraction": (lambda v: 0.0 < v <= 1.0, "a number in (0, 1]"),
    "optimizer.clipping": (lambda v: v >= 0, "a number >= 0 (0 disables AGC)"),
    "optimizer.base_lr": (lambda v: v > 0, "a number > 0"),
    "optimizer.min_lr": (lambda v: v >= 0, "a number >= 0"),
    "dataset.val_fraction": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1) (0: hold nothing out)"),
}
#: The fields a library parser checks (see `validate`) that may not be None, and what they take.
_PARSED_FIELDS = {
    "model": "a model name 'family:variant', e.g. 'nfnet:F0'",
    "dataset.train_preproc": f"one of {preproc_spec.TRAIN_PREPROCS}",
    "dataset.eval_preproc": "'crop_resize', 'resize_crop_<pct>' or 'center_crop_<fraction>', "
                            "e.g. 'resize_crop_32'",
    "dataset.normalization": f"one of {', '.join(preproc_spec.NORMALIZATIONS)}",
    "dataset.mix_source": "'stream' or 'batch'",
}


def _fail(field: str, value: Any, valid: str) -> None:
  raise ConfigError(f"config.{field} = {value!r} is invalid: {valid}.")


def _parse(field: str, parser: Callable[[Any], Any], config: ml_collections.ConfigDict) -> None:
  """Runs a value parser of the library on the field, naming the field in its error."""
  try:
    parser(_get(config, field))
  except ValueError as err:
    raise ConfigError(f"config.{field}: {err}") from None


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
  value = config
  for part in field.split("."):
    value = value[part]
  return value


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks names and value ranges; raises `ConfigError` naming the field. Returns the config."""
  from nfnets_jax import models  # pylint: disable=import-outside-toplevel
  from nfnets_jax.data import augment_spec  # pylint: disable=import-outside-toplevel
  _refuse_none(config)
  _parse("model", models.parse_model_name, config)
  # Here rather than where the input pipeline is built, after the model's
  # initialisation: a misspelt augmentation or preprocessing should not cost
  # a large run that (nor TensorFlow's import: these parsers need none).
  _parse("dataset.augment_name", augment_spec.parse_augment_name, config)
  _parse("dataset.train_preproc", preproc_spec.check_train_preproc, config)
  _parse("dataset.eval_preproc", preproc_spec.parse_eval_preproc, config)
  _parse("dataset.normalization", preproc_spec.normalization_stats, config)
  _parse("dataset.mix_source", augment_spec.check_mix_source, config)
  for field, choices in (("model_kwargs.conv_impl", models.CONV_IMPLS),
                         ("model_kwargs.block_loop", models.BLOCK_LOOPS)):
    value = _get(config, field)
    if value is not None and value not in choices:
      _fail(field, value, f"expected one of {', '.join(choices)}, or None for the default")
  # In _RANGES' order: the fields others follow come first, so that a bad
  # num_train_steps is named before the ema_decay computed from it.
  for field, (check, valid) in _RANGES.items():
    try:
      value = _get(config, field)
    except ArithmeticError as err:
      raise ConfigError(f"config.{field} cannot be computed from the fields it follows ({err}): "
                        "set it, or those fields") from None
    if not check(value):
      _fail(field, value, f"expected {valid}")
  if config.num_train_steps == -1 and not config.num_epochs > 0:
    _fail("num_epochs", config.num_epochs, "expected a number > 0")
  if config.train_batch_size % config.grad_accum_steps:
    _fail("grad_accum_steps", config.grad_accum_steps,
          f"expected a divisor of train_batch_size = {config.train_batch_size} (each step's "
          "batch is split into that many micro-batches)")
  _check_min_lr_below_peak(config)
  _check_finetuning(config)
  return config


def _check_finetuning(config: ml_collections.ConfigDict) -> None:
  """The freeze regex compiles, the class subset parses and fits num_classes."""
  if config.freeze is not None:
    try:
      re.compile(config.freeze)
    except re.error as err:
      _fail("freeze", config.freeze, f"expected a Python regular expression ({err})")
  if config.init_from == "":
    _fail("init_from", "", "expected a checkpoint path, a training workdir, 'published:F0'.., "
          "or None")
  try:
    classes = subsets.parse_classes(config.dataset.classes)
  except ValueError as err:
    raise ConfigError(f"config.dataset.classes: {err}") from None
  if classes is not None and config.num_classes and len(classes) != config.num_classes:
    _fail("num_classes", config.num_classes,
          f"expected {len(classes)}, the number of classes in config.dataset.classes = "
          f"{config.dataset.classes!r}")


def _check_min_lr_below_peak(config: ml_collections.ConfigDict) -> None:
  """The cosine ends at `optimizer.min_lr`, so it may not exceed the peak it decays from.

  Checked here rather than by the schedule, which the trainer builds only after
  TensorFlow's import and the dataset's opening.
  """
  from nfnets_jax import optim  # pylint: disable=import-outside-toplevel  (no TensorFlow)
  opt = config.optimizer
  peak = optim.peak_learning_rate(opt.base_lr, config.train_batch_size,
                                  scale_by_batch=opt.scale_lr_by_batch)
  if opt.min_lr > peak:
    how = (f"optimizer.base_lr x train_batch_size / 256 = {opt.base_lr} x "
           f"{config.train_batch_size} / 256" if opt.scale_lr_by_batch else
           "optimizer.base_lr, as optimizer.scale_lr_by_batch is False")
    _fail("optimizer.min_lr", opt.min_lr,
          f"expected a number in [0, the peak learning rate {peak:g}] (the peak is {how})")


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Locks the config against new fields and validates it."""
  config.lock()
  return validate(config)
