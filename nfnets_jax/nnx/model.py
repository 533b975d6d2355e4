"""Any registered model as a Flax NNX module, computed by the Haiku model itself.

`Model` holds the Haiku parameter tree as `nnx.Param` leaves, keyed exactly as
the Haiku tree is (`module.params[module_path][name]`), and its call runs the
Haiku model's `apply` on their values. The network is written once, in
`nfnets_jax.models`; this module only moves parameters and random keys across
the seam. Because the NNX state's paths are the Haiku paths under `params/`,
the optimizer's parameter groups (`nfnets_jax.optim.groups`), AGC's stacked
layers and every tool that reads a Haiku tree apply unchanged.
"""

import functools
from typing import Any, Mapping, NamedTuple, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nfnets_jax import models
from nfnets_jax.models import conv

Params = Mapping[str, Mapping[str, Any]]

#: Side of the square images `create` traces Haiku's init with. Parameters do
#: not depend on the image size (SAME convolutions, global pooling).
INIT_IMAGE_SIZE = 32


class Model(nnx.Module):
  """A registered model (`'nfnet:F0'`, `'nf_regnet:B0'`, ...) as an `nnx.Module`.

  `model(images, is_training=..., return_metrics=False)` returns float32
  logits, or with `return_metrics` the Haiku model's dict (`logits`, `pool`
  and the signal-propagation metrics). In training, stochastic depth and
  dropout draw their key from `rngs.dropout()` (the `dropout` stream, else
  `default`). Build it with `create`, `from_haiku` or `pretrained`.

  `params` is `{module_path: {name: nnx.Param}}` in the Haiku model's own
  layout (`models.stacked_layout`: the published tree, with the scanned runs
  of deep variants stacked); `to_haiku` gives the published tree.
  """

  def __init__(self, name: str, params: Params, *, num_classes: int,
               model_kwargs: Mapping[str, Any], rngs: Optional[nnx.Rngs]):
    self.model_name = name
    self.num_classes = num_classes
    self.model_kwargs = _frozen(model_kwargs)
    self.haiku = _haiku_model(name, num_classes, self.model_kwargs)
    self.params = nnx.data({module: {leaf: nnx.Param(jnp.asarray(value))
                                     for leaf, value in leaves.items()}
                            for module, leaves in params.items()})
    self.rngs = rngs

  def __call__(self, images: jax.Array, *, is_training: bool,
               return_metrics: bool = False) -> Any:
    outputs = self.haiku.transformed.apply(self.haiku_params(), self._key(is_training), images,
                                           is_training, return_metrics)
    return outputs if return_metrics else outputs["logits"]

  def haiku_params(self) -> dict[str, dict[str, jax.Array]]:
    """The parameter values as the Haiku model's tree (same arrays, no copy)."""
    return {module: {leaf: param[...] for leaf, param in leaves.items()}
            for module, leaves in self.params.items()}

  def _key(self, is_training: bool) -> Optional[jax.Array]:
    if not (is_training and self.haiku.random):
      return None
    if self.rngs is None:
      raise ValueError(
          f"{self.model_name} drops branches (stochastic depth) or features (dropout) in "
          "training, which needs random keys, but this module has no rngs: build it with "
          "rngs=nnx.Rngs(dropout=seed), or set stochdepth_rate=0.0 and drop_rate=0.0.")
    return self.rngs.dropout()


class _HaikuModel(NamedTuple):
  """What a `Model` computes with: the Haiku model, its parameter layout, and
  whether it draws random numbers in training (stochastic depth or dropout)."""
  transformed: hk.Transformed
  layout: models.StackedLayout
  random: bool


def _frozen(model_kwargs: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
  return tuple(sorted(model_kwargs.items()))


def _haiku_model(name: str, num_classes: int,
                 model_kwargs: tuple[tuple[str, Any], ...]) -> _HaikuModel:
  """The Haiku side of `name`, built once per (name, num_classes, arguments), so that
  every module of one model shares a graph definition and `nnx.jit` compiles it once.
  An absent `conv_impl` is read from `$NFNETS_JAX_CONV_IMPL` now, as `models.transform`
  reads it, and is part of the cache key."""
  if models.is_stateful(name):
    raise ValueError(f"{name!r} keeps BatchNorm statistics as Haiku state, which "
                     "nfnets_jax.nnx does not carry; use a normalizer-free model.")
  if "conv_impl" not in dict(model_kwargs):
    model_kwargs = _frozen({**dict(model_kwargs), "conv_impl": conv.default_impl()})
  try:
    return _cached_haiku_model(name, num_classes, model_kwargs)
  except TypeError:  # an unhashable argument: built for this module alone
    return _build_haiku_model(name, num_classes, model_kwargs)


def _build_haiku_model(name: str, num_classes: int,
                       model_kwargs: tuple[tuple[str, Any], ...]) -> _HaikuModel:
  kwargs = dict(model_kwargs)
  transformed = models.transform(name, num_classes, **kwargs)
  # The layout depends on the architecture and the block loop, not on how convs lower.
  layout = models.stacked_layout(name, num_classes,
                                 **{k: v for k, v in kwargs.items() if k != "conv_impl"})
  plan = models.model_plan(name, num_classes, **{
      k: v for k, v in kwargs.items() if k not in ("fc_init", "name", "conv_impl", "block_loop")})
  random = plan.drop_rate > 0 or any(block.stochdepth_rate > 0 for block in plan.blocks)
  return _HaikuModel(transformed, layout, random)


_cached_haiku_model = functools.lru_cache(maxsize=64)(_build_haiku_model)


def create(name: str, num_classes: int = 1000, *, rngs: nnx.Rngs, **model_kwargs: Any) -> Model:
  """`name` with freshly initialised parameters: Haiku's `init` with the key
  `rngs.params()` (the same weights `models.transform(name, ...).init` gives
  for that key). `rngs` stays with the module for dropout and stochastic depth."""
  if not ("params" in rngs or "default" in rngs):
    raise ValueError(f"create({name!r}) draws the initial weights from rngs.params(), but the "
                     f"rngs have no 'params' or 'default' stream (streams: {sorted(rngs)}); "
                     "pass e.g. nnx.Rngs(0) or nnx.Rngs(params=0, dropout=1).")
  transformed = _haiku_model(name, num_classes, _frozen(model_kwargs)).transformed
  images = jnp.zeros((1, INIT_IMAGE_SIZE, INIT_IMAGE_SIZE, 3), jnp.float32)
  params = jax.jit(transformed.init)(rngs.params(), images)
  return Model(name, params, num_classes=num_classes, model_kwargs=model_kwargs, rngs=rngs)


def from_haiku(name: str, params: Params, *, rngs: Optional[nnx.Rngs] = None,
               num_classes: Optional[int] = None, **model_kwargs: Any) -> Model:
  """`name` holding `params`, a Haiku tree of `name` (published or stacked layout).

  The arrays are wrapped, not copied (NumPy arrays are put on the device
  once); a published tree of a model that stacks its scanned runs is stacked.
  `num_classes` defaults to the classifier's width in `params`. `rngs` serves
  dropout and stochastic depth in training (None: training must not need it).

  Raises `models.ParameterMismatchError`, naming every missing, unexpected
  and mis-shaped parameter, when `params` does not fit the model.
  """
  if num_classes is None:
    num_classes = models.infer_num_classes(params)
    if num_classes is None:
      raise ValueError(f"from_haiku({name!r}): the tree has no classifier "
                       "('<root>/~/linear' with a bias 'b') to take num_classes from; "
                       "pass num_classes=.")
  layout = _haiku_model(name, num_classes, _frozen(model_kwargs)).layout
  if not layout.is_identity and not layout.is_stacked_tree(params):
    params = layout.stack(params)
  _check_fits(params, name, num_classes, model_kwargs)
  return Model(name, params, num_classes=num_classes, model_kwargs=model_kwargs, rngs=rngs)


def _check_fits(params: Params, name: str, num_classes: int,
                model_kwargs: Mapping[str, Any]) -> None:
  """Raises `ParameterMismatchError` unless `params` has the model's names and shapes."""
  transformed = _haiku_model(name, num_classes, _frozen(model_kwargs)).transformed
  images = jax.ShapeDtypeStruct((1, INIT_IMAGE_SIZE, INIT_IMAGE_SIZE, 3), jnp.float32)
  expected = jax.eval_shape(transformed.init, jax.random.key(0), images)
  want = {f"{m}/{n}": tuple(x.shape) for m, leaves in expected.items() for n, x in leaves.items()}
  got = {f"{m}/{n}": tuple(np.shape(x)) for m, leaves in params.items() for n, x in leaves.items()}
  settings = ", ".join([f"num_classes={num_classes}"]
                       + [f"{k}={v!r}" for k, v in sorted(model_kwargs.items())])
  models.check_shapes(got, want, f"from_haiku: parameters vs model {name!r} ({settings})",
                      hint="Check the model name, num_classes and model arguments the "
                           "parameters were trained with.")


def to_haiku(module: Model) -> dict[str, dict[str, jax.Array]]:
  """The module's parameters as the published Haiku tree `{module_path: {name: array}}`,
  which every tool here accepts (the same arrays, except that stacked runs are unstacked)."""
  if not isinstance(module, Model):
    raise TypeError(f"to_haiku takes an nfnets_jax.nnx.Model, got {type(module).__name__}.")
  return module.haiku.layout.to_published(module.haiku_params())
