"""A trained network ready for inference, from whatever the user points at.

The evaluation and classification tools both start from "a checkpoint and
maybe a model name": this module turns that into the parameters, the model
name, its number of classes and constructor arguments, and the published test
resolution, with the same precedence everywhere:

* an explicit value (a flag) always wins;
* then the `meta` item a training workdir stores with each step (its model,
  and how the run evaluates: image size, preprocessing, dataset, split, EMA
  choice, class names);
* then what the weights themselves say (the classifier's width; for NFNets the
  variant, from stage depths and widths);
* then the published ImageNet defaults (1000 classes, the model's test
  resolution, 'resize_crop_32', imagenet2012's validation split).

`define_model_flags(fv)` registers the matching flags on a tool's own
`absl.flags.FlagValues`, `load_model_from_flags(fv)` and
`eval_settings_from_flags(fv, loaded)` read them, and `Settings.describe()`
says where each setting came from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Mapping, Optional

from nfnets_jax import checkpoint
from nfnets_jax.cli import UsageError  # The tools' bad command line (exit status 2).

#: The published evaluation preprocessing (resize to test size + 32, centre-crop).
DEFAULT_EVAL_PREPROC = "resize_crop_32"
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
#: Where a setting came from, as the tools print it.
FLAG, RECORD, WEIGHTS, DEFAULT = "flag", "checkpoint", "weights", "default"
#: The published evaluation's dataset and split.
DEFAULT_DATASET, DEFAULT_SPLIT = "imagenet2012", "validation"


@dataclasses.dataclass
class Settings:
  """The values a tool runs with, each with where it came from (FLAG, RECORD, ...)."""
  values: dict[str, Any] = dataclasses.field(default_factory=dict)
  origins: dict[str, str] = dataclasses.field(default_factory=dict)

  def set(self, name: str, value: Any, origin: str) -> Any:
    self.values[name] = value
    self.origins[name] = origin
    return value

  def __getitem__(self, name: str) -> Any:
    return self.values[name]

  def describe(self) -> str:
    """One line per setting that has a value: name, value, origin (for stderr)."""
    width = max(len(name) for name in self.values)
    lines = ["settings (flag: given; checkpoint: recorded by training; weights: read from "
             "them; default: built in):"]
    for name, value in self.values.items():
      if value is None:
        continue
      shown = value
      if isinstance(value, (list, tuple)):  # class names: how many, and the first few
        shown = f"{len(value)}: {', '.join(map(str, value[:4]))}" + (", ..." if len(value) > 4
                                                                      else "")
      lines.append(f"  {name:<{width}}  {shown}  [{self.origins[name]}]")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """Parameters and everything needed to rebuild their network.

  `source` says where the weights came from (for reports), `step` the training
  step when a workdir recorded it, `record` the checkpoint's `meta` item ({}
  without one), `settings` the model, classes and EMA choice with their origins.
  """
  name: str
  num_classes: int
  model_kwargs: dict[str, Any]
  params: checkpoint.Params
  source: str
  step: Optional[int] = None
  record: dict[str, Any] = dataclasses.field(default_factory=dict)
  settings: Settings = dataclasses.field(default_factory=Settings)

  @property
  def eval_record(self) -> dict[str, Any]:
    """How the training run evaluated these weights ({} for older or other checkpoints)."""
    return dict(self.record.get("eval") or {})

  @property
  def class_names(self) -> Optional[list[str]]:
    """The training dataset's class names, label order, if the checkpoint records them."""
    names = self.record.get("class_names")
    return [str(n) for n in names] if names else None

  def transform(self):
    """`hk.transform` of the network; a clear ValueError if the arguments do not fit."""
    from nfnets_jax import models

    if models.is_stateful(self.name):
      raise ValueError(
          f"{self.name} keeps BatchNorm running statistics (Haiku state), which parameter "
          "checkpoints do not carry; the inference tools run the normalizer-free families "
          "(nfnet, nf_resnet, nf_regnet).")
    try:
      return models.transform(self.name, self.num_classes, **self.model_kwargs)
    except TypeError as err:
      raise ValueError(f"Model arguments {self.model_kwargs} do not fit {self.name}: {err}") from None


def default_image_size(model: str) -> int:
  """The resolution `model` was published to be tested at (its variant's `test_imsize`).

  Families whose variants share one size (NF-ResNets) keep it as the module
  constant `TEST_IMSIZE` rather than in each row.
  """
  from nfnets_jax import models

  family, variant = models.parse_model_name(model)
  spec = models.FAMILIES[family]
  row = spec.variants[variant]
  if "test_imsize" in row:
    return int(row["test_imsize"])
  size = getattr(sys.modules[spec.model_class.__module__], "TEST_IMSIZE", None)
  if size is None:
    raise ValueError(f"Model {model!r} has no published test resolution; pass an image size.")
  return int(size)


def parse_model_kwargs(text: Optional[str]) -> Optional[dict[str, Any]]:
  """'{"width": 2}' -> {'width': 2}; None or '' -> None (not given)."""
  if not text:
    return None
  try:
    value = json.loads(text)
  except json.JSONDecodeError as err:
    raise UsageError(f"--model_kwargs must be a JSON object such as '{{\"width\": 2}}', got "
                     f"{text!r} ({err}).") from None
  if not isinstance(value, dict):
    raise UsageError(f"--model_kwargs must be a JSON object such as '{{\"width\": 2}}', got "
                     f"{text!r}.")
  return value


def load_model(path: checkpoint.PathLike, *, model: Optional[str] = None,
               num_classes: Optional[int] = None,
               model_kwargs: Optional[Mapping[str, Any]] = None, ema: bool = False,
               step: Optional[int] = None, trust_pickle: bool = False) -> LoadedModel:
  """Loads `path` (anything `checkpoint.load_params` reads) and works out its network.

  Args:
    path: a parameter file, orbax directory or training workdir.
    model, num_classes, model_kwargs: override what the checkpoint records or
      implies (see the module docstring for the order).
    ema, step, trust_pickle: as for `checkpoint.load_params`.

  Raises:
    ValueError: an unknown model name, or a model that cannot be inferred.
    checkpoint.ParameterMismatchError: the weights do not fit the model.
    FileNotFoundError: nothing at `path`.
  """
  from nfnets_jax import models

  if model is not None:
    models.parse_model_name(model)  # Fail on a typo before reading gigabytes.
  if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  meta = checkpoint.load_meta(path, step=step) or {}
  params = checkpoint.load_params(path, trust_pickle=trust_pickle, ema=ema, step=step)

  settings = Settings()
  name = model or meta.get("model")
  origin = FLAG if model else RECORD
  if name is None:
    origin = WEIGHTS
    from nfnets_jax import convert  # Only NFNets can be recognised from their weights.
    try:
      name = convert.infer_model(params)
    except ValueError:
      raise ValueError(
          f"Cannot tell which model {str(path)!r} holds: it records no model name and its "
          "weights are not a recognisable NFNet. Name it, e.g. --model=nfnet:F0 (one of "
          f"{', '.join(models.list_models())}).") from None
  if model_kwargs is not None:
    kwargs = dict(model_kwargs)
  elif meta.get("model") == name:
    kwargs = dict(meta.get("model_kwargs") or {})
  else:
    kwargs = {}
  settings.set("model", name, origin)
  if num_classes is not None:
    settings.set("num_classes", num_classes, FLAG)
  elif meta.get("num_classes"):
    num_classes = settings.set("num_classes", meta["num_classes"], RECORD)
  elif checkpoint.infer_num_classes(params):
    num_classes = settings.set("num_classes", checkpoint.infer_num_classes(params), WEIGHTS)
  else:
    num_classes = settings.set("num_classes", 1000, DEFAULT)
  source = str(path)
  if meta.get("step") is not None:
    source += f" (step {meta['step']}{', EMA' if ema else ''})"
  elif ema:
    source += " (EMA)"
  checkpoint.validate_params(params, name, num_classes=num_classes, model_kwargs=kwargs,
                             source=str(path))
  return LoadedModel(name=name, num_classes=int(num_classes), model_kwargs=kwargs,
                     params=params, source=source, step=meta.get("step"), record=meta,
                     settings=settings)


# ----------------------------------------------------------------------------- flags


def define_model_flags(fv) -> None:
  """Registers the checkpoint/model/preprocessing flags both inference tools share on `fv`."""
  from absl import flags

  flags.DEFINE_string(
      "checkpoint", None,
      "The weights: published:F0 .. published:F6 (the published ImageNet NFNets, downloaded "
      "once into $NFNETS_JAX_HOME), this project's .npz, a published *_haiku.npz, an orbax "
      "directory or a training workdir.", flag_values=fv)
  flags.DEFINE_string(
      "model", None,
      "Model name, e.g. nfnet:F0. Default: the one a training workdir records, else inferred "
      "from NFNet weights.", flag_values=fv)
  flags.DEFINE_integer(
      "num_classes", None,
      "Classifier size. Default: recorded by the workdir, else read from the weights.",
      flag_values=fv)
  flags.DEFINE_string(
      "model_kwargs", None,
      "Model constructor arguments as a JSON object, e.g. '{\"width\": 2}'. Default: recorded "
      "by the workdir, else none.", flag_values=fv)
  flags.DEFINE_bool("ema", False, "From a training workdir: use the EMA of the weights "
                    "(--noema the raw ones). Default: the run's record, else the raw weights.",
                    flag_values=fv)
  flags.DEFINE_integer("step", None, "From a training workdir: this step instead of the latest.",
                       flag_values=fv)
  flags.DEFINE_bool(
      "trust_pickle", False,
      "Allow full unpickling of a checkpoint that is not a plain parameter file (the published "
      "*_haiku.npz files do not need it). Unpickling runs code named inside the file: only "
      "for files from a source you trust.", flag_values=fv)
  flags.DEFINE_integer(
      "image_size", None, "Side of the network input. Default: the training run's eval size, "
      "else the model's published test resolution (e.g. 256 for nfnet:F0).", flag_values=fv)
  flags.DEFINE_string(
      "eval_preproc", None,
      "Evaluation preprocessing: 'resize_crop_<pct>' (resize to image_size + pct px, or "
      "image_size / pct for pct <= 1, then centre-crop) or 'crop_resize'. Default: the "
      f"training run's, else the published {DEFAULT_EVAL_PREPROC!r}.", flag_values=fv)
  flags.DEFINE_enum("compute_dtype", "float32", list(COMPUTE_DTYPES),
                    "Precision of the forward pass (weights stay float32).", flag_values=fv)


def load_model_from_flags(fv) -> LoadedModel:
  """`load_model` with the values of the flags `define_model_flags` registered."""
  if not fv.checkpoint:
    raise UsageError("--checkpoint is required (published:F0 .. published:F6, a .npz file, "
                     "orbax directory or training workdir).")
  if fv.num_classes is not None and fv.num_classes < 1:
    raise UsageError(f"--num_classes must be >= 1, got {fv.num_classes}.")
  if fv.model is not None:
    from nfnets_jax import models
    try:
      models.parse_model_name(fv.model)
    except ValueError as err:
      raise UsageError(f"--model: {err}") from None
  kwargs = parse_model_kwargs(fv.model_kwargs)
  recorded = (checkpoint.load_meta(fv.checkpoint, step=fv.step) or {}).get("eval") or {}
  if fv["ema"].present:
    ema, origin = fv.ema, FLAG
  elif "ema" in recorded:
    ema, origin = bool(recorded["ema"]), RECORD
  else:
    ema, origin = False, DEFAULT
  loaded = load_model(fv.checkpoint, model=fv.model, num_classes=fv.num_classes,
                      model_kwargs=kwargs, ema=ema, step=fv.step, trust_pickle=fv.trust_pickle)
  loaded.settings.set("ema", ema, origin)
  return loaded


def _pick(settings: Settings, name: str, flag_value: Any, recorded: dict[str, Any],
          default: Any, use_record: bool = True) -> Any:
  """The flag's value if given, else the training run's record, else `default`."""
  if flag_value is not None:
    return settings.set(name, flag_value, FLAG)
  if use_record and recorded.get(name) is not None:
    return settings.set(name, recorded[name], RECORD)
  return settings.set(name, default, DEFAULT)


def absolute_dataset_name(name: str) -> str:
  """'folder:<path>' with a local path made absolute (so it names the same folder from any
  directory); any other name as it is."""
  prefix = "folder:"
  if name.startswith(prefix) and "://" not in name:
    return prefix + os.path.abspath(os.path.expanduser(name[len(prefix):]))
  return name


def eval_settings_from_flags(fv, loaded: LoadedModel, *, dataset: bool = False) -> Settings:
  """`loaded.settings` plus image_size and eval_preproc (and, with `dataset`, the dataset,
  split, data_dir and val_fraction), each from its flag, else the training run's record,
  else the published default; validated.

  The record's split, data_dir and val_fraction apply only to the dataset it names.
  """
  from nfnets_jax.data import options, preproc_spec  # The pipeline's parsers, without TF.

  settings = Settings(dict(loaded.settings.values), dict(loaded.settings.origins))
  recorded = loaded.eval_record
  if dataset:
    name = _pick(settings, "dataset", fv.dataset, recorded, DEFAULT_DATASET)
    same = recorded.get("dataset") is not None and \
        absolute_dataset_name(name) == absolute_dataset_name(recorded["dataset"])
    _pick(settings, "split", fv.split, recorded, DEFAULT_SPLIT, use_record=same)
    _pick(settings, "data_dir", fv.data_dir, recorded, None, use_record=same)
    if fv.val_fraction is not None or name.startswith("folder:"):  # Else it means nothing.
      fraction = _pick(settings, "val_fraction", fv.val_fraction, recorded, 0.0,
                       use_record=same)
      try:
        options.check_val_fraction(fraction)
      except ValueError as err:
        raise UsageError(f"--{err}") from None
  size = _pick(settings, "image_size", fv.image_size, recorded, None)
  if size is None:
    size = settings.set("image_size", default_image_size(loaded.name), DEFAULT)
  if not 1 <= size <= preproc_spec.MAX_IMAGE_SIDE:
    raise UsageError(f"--image_size must be in [1, {preproc_spec.MAX_IMAGE_SIDE}], got {size}.")
  preproc = _pick(settings, "eval_preproc", fv.eval_preproc, recorded, DEFAULT_EVAL_PREPROC)
  try:
    preproc_spec.parse_eval_preproc(preproc)
  except ValueError as err:
    raise UsageError(f"--eval_preproc: {err}") from None
  return settings
