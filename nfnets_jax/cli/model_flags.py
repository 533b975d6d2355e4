"""The flags every inference tool shares: which weights, which network, how to preprocess.

`define_model_flags(fv)` registers them on a tool's own `absl.flags.FlagValues`;
`load_model_from_flags(fv)` gives the checkpoint's `weights.LoadedModel`, and
`eval_settings_from_flags(fv, loaded)` the image size and preprocessing (and,
for evaluate, the dataset), each from its flag, else the training run's record,
else the published default. `Settings.describe()` says where each came from.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from nfnets_jax import models, weights
from nfnets_jax.weights import loading
from nfnets_jax.cli import UsageError
from nfnets_jax.data import options, preproc_spec  # The pipeline's parsers, without TF.

#: The published evaluation preprocessing (resize to test size + 32, centre-crop).
DEFAULT_EVAL_PREPROC = "resize_crop_32"
#: The published evaluation's dataset and split.
DEFAULT_DATASET, DEFAULT_SPLIT = "imagenet2012", "validation"


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
      "image_size / pct for pct <= 1, then centre-crop), 'center_crop_<fraction>' (timm's: "
      "keep the aspect ratio) or 'crop_resize'. Default: the training run's (or timm's for "
      f"timm: weights), else the published {DEFAULT_EVAL_PREPROC!r}.", flag_values=fv)
  flags.DEFINE_enum(
      "normalization", None, list(preproc_spec.NORMALIZATIONS),
      "Per-channel statistics the images are normalised with: 'imagenet' (ImageNet's mean and "
      "std) or 'inception' (0.5 and 0.5). Default: the one the weights were trained with (the "
      f"run's record, timm's for timm: weights), else "
      f"{preproc_spec.DEFAULT_NORMALIZATION!r}.", flag_values=fv)
  flags.DEFINE_enum("compute_dtype", "float32", list(models.COMPUTE_DTYPES),
                    "Precision of the forward pass (weights stay float32).", flag_values=fv)


def load_model_from_flags(fv) -> weights.LoadedModel:
  """`load_model` with the values of the flags `define_model_flags` registered."""
  if not fv.checkpoint:
    raise UsageError("--checkpoint is required (published:F0 .. published:F6, a .npz file, "
                     "orbax directory or training workdir).")
  if fv.num_classes is not None and fv.num_classes < 1:
    raise UsageError(f"--num_classes must be >= 1, got {fv.num_classes}.")
  if fv.model is not None:
    try:
      models.parse_model_name(fv.model)
    except ValueError as err:
      raise UsageError(f"--model: {err}") from None
  kwargs = parse_model_kwargs(fv.model_kwargs)
  return weights.load_model(fv.checkpoint, model=fv.model, num_classes=fv.num_classes,
                            model_kwargs=kwargs, ema=fv.ema if fv["ema"].present else None,
                            step=fv.step, trust_pickle=fv.trust_pickle)


def _pick(settings: weights.Settings, name: str, flag_value: Any, recorded: dict[str, Any],
          default: Any, use_record: bool = True) -> Any:
  """The flag's value if given, else the training run's record, else `default`."""
  if flag_value is not None:
    return settings.set(name, flag_value, loading.FLAG)
  if use_record and recorded.get(name) is not None:
    return settings.set(name, recorded[name], loading.RECORD)
  return settings.set(name, default, loading.DEFAULT)


def eval_settings_from_flags(fv, loaded: weights.LoadedModel, *,
                             dataset: bool = False) -> weights.Settings:
  """`loaded.settings` plus image_size, eval_preproc, normalization (and, with `dataset`, the dataset,
  split, data_dir and val_fraction), each from its flag, else the training run's record,
  else the published default; validated.

  The record's split, data_dir and val_fraction apply only to the dataset it names.
  """
  settings = weights.Settings(dict(loaded.settings.values), dict(loaded.settings.origins))
  recorded = loaded.eval_record
  if dataset:
    name = _pick(settings, "dataset", fv.dataset, recorded, DEFAULT_DATASET)
    same = recorded.get("dataset") is not None and \
        options.absolute_dataset_name(name) == options.absolute_dataset_name(recorded["dataset"])
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
    size = settings.set("image_size", models.default_image_size(loaded.name), loading.DEFAULT)
  if not 1 <= size <= preproc_spec.MAX_IMAGE_SIDE:
    raise UsageError(f"--image_size must be in [1, {preproc_spec.MAX_IMAGE_SIDE}], got {size}.")
  preproc = _pick(settings, "eval_preproc", fv.eval_preproc, recorded, DEFAULT_EVAL_PREPROC)
  try:
    preproc_spec.parse_eval_preproc(preproc)
  except ValueError as err:
    raise UsageError(f"--eval_preproc: {err}") from None
  normalization = _pick(settings, "normalization", fv.normalization, recorded,
                        preproc_spec.DEFAULT_NORMALIZATION)
  try:
    preproc_spec.normalization_stats(normalization)
  except ValueError as err:  # A record written by a newer version, say.
    raise UsageError(f"the record's normalization: {err}") from None
  return settings
