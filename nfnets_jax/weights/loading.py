"""A checkpoint and its record -> parameters, and the network they fit.

`load_params(path)` reads any source of weights: a parameter file
(`formats`), a training workdir or one of its steps (`workdir`), or a
published name (`'published:F0'`, `published`). `load_model(path)` also works
out the network, with the same precedence in every tool:

* an explicit argument (a flag) always wins;
* then the `meta` record a training workdir stores with each step (its model,
  its EMA choice, how the run evaluates, class names);
* then what the weights themselves say (the classifier's width; for NFNets the
  variant, from stage depths and widths);
* then the published ImageNet defaults (1000 classes).

The source is located once (one look at the workdir for both the record and
the parameters), and the tree is checked against its network once, here,
where it enters; `LoadedModel.settings` says where each value came from.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Mapping, Optional

from nfnets_jax import models
from nfnets_jax.data import preproc_spec
from nfnets_jax.weights import formats, published, timm_hub, workdir

#: Where a setting came from, as the tools print it.
FLAG, RECORD, WEIGHTS, DEFAULT = "flag", "checkpoint", "weights", "default"


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
  params: formats.Params
  source: str
  step: Optional[int] = None
  record: dict[str, Any] = dataclasses.field(default_factory=dict)
  settings: Settings = dataclasses.field(default_factory=Settings)

  @property
  def eval_record(self) -> dict[str, Any]:
    """How the training run evaluated these weights ({} for older or other checkpoints)."""
    return dict(self.record.get("eval") or {})

  @property
  def normalization(self) -> str:
    """The input normalisation the weights were trained with: the record's, else the
    published 'imagenet' (`data.preproc_spec.NORMALIZATIONS`)."""
    return self.eval_record.get("normalization", preproc_spec.DEFAULT_NORMALIZATION)

  @property
  def class_names(self) -> Optional[list[str]]:
    """The training dataset's class names, label order, if the checkpoint records them."""
    names = self.record.get("class_names")
    return [str(n) for n in names] if names else None

  def transform(self):
    """`hk.transform` of the network; a clear ValueError if the arguments do not fit."""
    if models.is_stateful(self.name):
      raise ValueError(
          f"{self.name} keeps BatchNorm running statistics (Haiku state), which parameter "
          "checkpoints do not carry; the inference tools run the normalizer-free families "
          "(nfnet, nf_resnet, nf_regnet).")
    try:
      return models.transform(self.name, self.num_classes, **self.model_kwargs)
    except TypeError as err:
      raise ValueError(f"Model arguments {self.model_kwargs} do not fit {self.name}: {err}") from None

  def fold(self, **lowering: Any) -> "models.FoldedModel":
    """The folded inference network (`models.fold_for_inference`) of these weights, which
    were checked when loaded; `lowering` (conv_impl, block_loop) overrides the recorded one."""
    kwargs = {**self.model_kwargs, **lowering}
    return models.fold_for_inference(self.name, self.params, self.num_classes, check=False,
                                     **kwargs)


@dataclasses.dataclass(frozen=True)
class _Source:
  """A checkpoint, located once: a published variant, a file, or a directory's step
  (`workdir.locate`), with the record that goes with it."""
  path: formats.PathLike
  found: Optional[workdir.Found] = None
  variant: Optional[str] = None
  meta: Optional[dict[str, Any]] = None
  hub: Optional[timm_hub.HubWeight] = None

  @classmethod
  def open(cls, path: formats.PathLike, step: Optional[int]) -> "_Source":
    named = published.resolve(path)
    if named is not None:
      return cls(path, variant=named[0], meta=named[1])
    on_hub = timm_hub.resolve(path)
    if on_hub is not None:
      return cls(path, hub=on_hub[0], meta=on_hub[1])
    location = pathlib.Path(path)
    if not location.exists():
      raise FileNotFoundError(
          f"No checkpoint at {str(path)!r}: expected a .npz file, a published *_haiku.npz "
          "pickle, an orbax checkpoint directory, a training workdir, published:F0 .. "
          "published:F6 or timm's trained weights (timm:eca_nfnet_l0, ...).")
    if location.is_dir():
      found = workdir.locate(location, step=step)
      return cls(location, found=found, meta=found.meta)
    return cls(location)

  def params(self, *, ema: bool, step: Optional[int], trust_pickle: bool) -> formats.Params:
    if self.found is not None:
      return workdir.read_params(self.found, ema=ema, step=step)
    if ema or step is not None:
      what = ("names one published parameter tree" if self.variant or self.hub
              else "is a single file holding one parameter tree")
      raise ValueError(f"{str(self.path)!r} {what}; ema= and step= apply only to training "
                       "workdirs (and their checkpoint directories).")
    if self.variant:
      return published.load(self.variant)
    if self.hub:
      return timm_hub.load(self.hub.name)
    return formats.load_file(pathlib.Path(self.path), trust_pickle=trust_pickle)


def load_params(path: formats.PathLike, *, trust_pickle: bool = False,
                model: Optional[str] = None, num_classes: Optional[int] = None,
                model_kwargs: Optional[Mapping[str, Any]] = None,
                ema: bool = False, step: Optional[int] = None) -> formats.Params:
  """Loads a Haiku parameter tree from a file, orbax directory, training workdir or
  published name.

  Args:
    path: a safe `.npz`, a published pickle, an orbax params checkpoint, a
      training workdir, its `checkpoints/` directory, one step directory, or
      `'published:F0'` .. `'published:F6'` (downloaded once, verified). The
      format is read from the content, not the name.
    trust_pickle: read a pickle with full dill instead of the restricted
      unpickler. Not needed for the published `*_haiku.npz` files (plain
      dicts of arrays); for other pickles it executes code named in the
      file: only for files you trust.
    model: e.g. `'nfnet:F0'`; when given, the tree is checked against that
      model's parameter shapes and a mismatch raises `ParameterMismatchError`.
    num_classes: classifier size for that check; by default read from the
      checkpoint's final `linear` layer.
    model_kwargs: constructor arguments of the model (e.g. `{'width': 2}`) for
      that check.
    ema: from a workdir or step directory, load the EMA weights instead.
    step: from a workdir, load this step instead of the latest.

  Returns:
    `{module_path: {name: np.ndarray}}`.
  """
  params = _Source.open(path, step).params(ema=ema, step=step, trust_pickle=trust_pickle)
  if model is not None:
    models.check_params(params, model, num_classes=num_classes, model_kwargs=model_kwargs,
                        source=str(path))
  return params


def load_meta(path: formats.PathLike, *, step: Optional[int] = None) -> Optional[dict[str, Any]]:
  """The `meta` record saved with a training checkpoint step, if there is one.

  The trainer records which network the weights belong to (`model`,
  `num_classes`, `model_kwargs`, plus `step`), so that evaluation tools need
  not be told again. `path` is read like `load_params` reads it.

  Returns:
    The JSON object, or None when `path` is a file, an orbax checkpoint of a
    bare parameter tree, or a step saved without a `meta` item. For published
    weights (`'published:F0'`), what they are: `nfnet:F0`, 1000 classes.
  """
  return _Source.open(path, step).meta


def load_model(path: formats.PathLike, *, model: Optional[str] = None,
               num_classes: Optional[int] = None,
               model_kwargs: Optional[Mapping[str, Any]] = None, ema: Optional[bool] = False,
               step: Optional[int] = None, trust_pickle: bool = False) -> LoadedModel:
  """Loads `path` (anything `load_params` reads) and works out its network.

  Args:
    path: a parameter file, orbax directory, training workdir or published name.
    model, num_classes, model_kwargs: override what the checkpoint records or
      implies (see the module docstring for the order).
    ema: the EMA weights of a workdir; None: what the training run recorded
      for evaluation, else the raw weights.
    step, trust_pickle: as for `load_params`.

  Raises:
    ValueError: an unknown model name, or a model that cannot be inferred.
    ParameterMismatchError: the weights do not fit the model.
    FileNotFoundError: nothing at `path`.
  """
  if model is not None:
    models.parse_model_name(model)  # Fail on a typo before reading gigabytes.
  if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  source = _Source.open(path, step)
  meta = source.meta or {}
  settings = Settings()
  ema, ema_origin = _choose_ema(ema, meta)
  params = source.params(ema=ema, step=step, trust_pickle=trust_pickle)
  name = _choose_model(settings, model, meta, params, path)
  num_classes = _choose_num_classes(settings, num_classes, meta, params)
  settings.set("ema", ema, ema_origin)
  if model_kwargs is not None:
    kwargs = dict(model_kwargs)
  elif meta.get("model") == name:
    kwargs = dict(meta.get("model_kwargs") or {})
  else:
    kwargs = {}
  models.check_params(params, name, num_classes=num_classes, model_kwargs=kwargs,
                      source=str(path))
  return LoadedModel(name=name, num_classes=int(num_classes), model_kwargs=kwargs,
                     params=params, source=_describe_source(path, meta, ema),
                     step=meta.get("step"), record=meta, settings=settings)


def _choose_ema(ema: Optional[bool], meta: Mapping[str, Any]) -> tuple[bool, str]:
  """The EMA choice and its origin: the argument, else the run's record, else raw."""
  recorded = meta.get("eval") or {}
  if ema is not None:
    return bool(ema), FLAG
  if "ema" in recorded:
    return bool(recorded["ema"]), RECORD
  return False, DEFAULT


def _choose_model(settings: Settings, model: Optional[str], meta: Mapping[str, Any],
                  params: formats.Params, path: formats.PathLike) -> str:
  if model:
    return settings.set("model", model, FLAG)
  if meta.get("model"):
    return settings.set("model", meta["model"], RECORD)
  try:  # Only NFNets can be recognised from their weights.
    return settings.set("model", models.infer_model(params), WEIGHTS)
  except ValueError:
    raise ValueError(
        f"Cannot tell which model {str(path)!r} holds: it records no model name and its "
        "weights are not a recognisable NFNet. Name it, e.g. --model=nfnet:F0 (one of "
        f"{', '.join(models.list_models())}).") from None


def _choose_num_classes(settings: Settings, num_classes: Optional[int],
                        meta: Mapping[str, Any], params: formats.Params) -> int:
  if num_classes is not None:
    return settings.set("num_classes", num_classes, FLAG)
  if meta.get("num_classes"):
    return settings.set("num_classes", meta["num_classes"], RECORD)
  inferred = models.infer_num_classes(params)
  if inferred:
    return settings.set("num_classes", inferred, WEIGHTS)
  return settings.set("num_classes", 1000, DEFAULT)


def _describe_source(path: formats.PathLike, meta: Mapping[str, Any], ema: bool) -> str:
  source = str(path)
  if meta.get("step") is not None:
    return source + f" (step {meta['step']}{', EMA' if ema else ''})"
  return source + (" (EMA)" if ema else "")


def pretrained(name: str, *, conv_impl: Optional[str] = None, block_loop: Optional[str] = None,
               **fetch_kwargs: Any):
  """`(model, params)`: the published ImageNet weights of `name` ('nfnet:F0'..'nfnet:F6',
  or timm's trained 'timm:eca_nfnet_l0', ...) and the model they fit, its parameters
  in the model's own layout.

  The weights are downloaded once and verified (`download.fetch`, whose
  keywords pass through; timm's through huggingface_hub, `timm_hub.load`'s),
  never unpickled after the first load, and checked against the network once.
  """
  if timm_hub.is_hub_name(name):
    entry = timm_hub.lookup(name)
    return _in_model(timm_hub.model_name(entry), timm_hub.load(name, **fetch_kwargs),
                     f"hf://{entry.repo_id}", conv_impl, block_loop)
  variant = published.variant_of(name)
  return _in_model(published.model_name(variant), published.load(variant, **fetch_kwargs),
                   f"published:{variant}", conv_impl, block_loop)


def _in_model(model_name: str, params: formats.Params, source: str, conv_impl: Optional[str],
              block_loop: Optional[str]):
  """`(model, params)` for `pretrained`: the tree checked once, in the model's own layout."""
  models.check_params(params, model_name, num_classes=1000, source=source)
  model = models.transform(model_name, 1000, conv_impl=conv_impl, block_loop=block_loop)
  layout = models.stacked_layout(model_name, 1000, block_loop=block_loop)
  return model, layout.stack(params)
