"""Which parameters get AGC and which get weight decay, as in the NFNet paper.

The published training setup (Brock et al. 2021, arXiv:2102.06171) splits the
parameters into three groups, by Haiku module path and parameter name:

* gains and biases (`b`, `scale`, `offset`, or a name containing `gain` or
  `bias`): AGC, no weight decay;
* the final classifier's weights (module path containing `linear` but not
  `squeeze_excite`): weight decay, no AGC (the paper found clipping the last
  layer hurts);
* every other weight: AGC and weight decay.

Note that the classifier's *bias* is a bias first, so the published rule does
clip it. The predicates are plain functions of `(module_path, name)` so a
caller can regroup parameters of other architectures.

One naming rule also says which arrays hold several layers: a module named
`<name>__x<N>` (the stacked parameters of a run of N scanned blocks, see
`nfnets_jax.models.stacking`) carries its layers on a leading axis, and AGC
clips each layer's units on their own (`stacked_layers`). Ordinary trees have
no such names.
"""

import re
from typing import Any, Callable

import jax

#: `predicate(module_path, name) -> bool`, e.g. `("NFNet/~/linear", "w")`.
ParamPredicate = Callable[[str, str], bool]

GAIN_BIAS = "gain_bias"
CLASSIFIER = "classifier"
WEIGHT = "weight"


def is_gain_or_bias(module: str, name: str) -> bool:
  """The published no-weight-decay rule: biases, gains, norm scales/offsets."""
  del module
  return name in ("b", "scale", "offset") or "gain" in name or "bias" in name


def is_classifier(module: str, name: str) -> bool:
  """The published no-AGC rule: `linear` modules outside squeeze-excite blocks."""
  del name
  return "linear" in module and "squeeze_excite" not in module


_STACKED_MODULE = re.compile(r"__x[0-9]+(?:/|$)")


def stacked_module_name(first: str, num_layers: int) -> str:
  """The module holding `num_layers` stacked layers, named after the first: `<first>__x<N>`."""
  return f"{first}__x{num_layers}"


def stacked_layers(module: str, name: str) -> int:
  """Leading axes of a parameter that index stacked layers: 1 in (or under) a module
  named by `stacked_module_name`, else 0. The default `stacked_axes` of AGC."""
  del name
  return 1 if _STACKED_MODULE.search(module) else 0


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _is_wrapper_value(key: Any) -> bool:
  """Whether `key` steps from a parameter wrapper into its array: a Flax NNX
  `Variable` (`nnx.Param`) flattens to its `.value` attribute."""
  return isinstance(key, jax.tree_util.GetAttrKey) and key.name == "value"


def split_path(path: tuple[Any, ...]) -> tuple[str, str]:
  """`(module_path, name)` of a leaf's key path.

  For a Haiku tree `{module: {name: array}}` these are the two dict keys; for
  any other nesting the last key is the name and the others, joined by `/`,
  the module path. A final `.value` step into a Flax NNX `Variable` is not
  part of the name, so an NNX state (`nnx.state(model, nnx.Param)`) groups as
  its plain-array form (`nnx.as_pure`) does.
  """
  if len(path) > 1 and _is_wrapper_value(path[-1]):
    path = path[:-1]
  names = [_key_name(k) for k in path]
  if not names:
    return "", ""
  return "/".join(names[:-1]), names[-1]


def map_params(fn: Callable[[str, str], Any], tree: Any) -> Any:
  """`tree_map` of `fn(module_path, name)` over the leaves of a parameter tree."""
  return jax.tree_util.tree_map_with_path(lambda path, _: fn(*split_path(path)), tree)


def param_labels(params: Any, *, is_gain_or_bias: ParamPredicate = is_gain_or_bias,
                 is_classifier: ParamPredicate = is_classifier) -> Any:
  """The group of every parameter: `'gain_bias'`, `'classifier'` or `'weight'`.

  Usable directly as the labels of `optax.partition` when a caller wants
  different transforms per group.
  """
  def label(module: str, name: str) -> str:
    if is_gain_or_bias(module, name):
      return GAIN_BIAS
    if is_classifier(module, name):
      return CLASSIFIER
    return WEIGHT
  return map_params(label, params)
