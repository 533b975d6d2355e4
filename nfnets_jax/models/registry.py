"""Models by name: `'family:variant'`, e.g. `'nfnet:F0'`, `'nf_resnet:ResNet50'`,
`'timm:eca_nfnet_l0'` (timm's models by their timm names, see timm_family.py).

Command-line tools and configs name models with these strings; this module is
the single place that maps a name to its Haiku class, its variant table and its
plan function, and it answers size questions (parameters, FLOPs) without
allocating any weights.

The batch-normalised baseline `'bn_resnet:ResNet50'` is registered too. It
keeps BatchNorm statistics as Haiku state (`Family.stateful`), so it is built
with `transform_with_state`; `transform` refuses it with a pointer there.

How a model is lowered is fixed when it is built, by arguments of the
builders here (`conv_impl`, `block_loop`; see conv.py and network.py), never
by state read while a function is traced.
"""

import dataclasses
import sys
from typing import Any, Callable, Mapping, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets_jax.models import bn_resnet, conv, nf_regnet, nf_resnet, nfnet, network, timm_family
from nfnets_jax.models import fast_init as _fast_init
from nfnets_jax.models.architecture import NetworkPlan
from nfnets_jax.models.network import NormFreeNet
from nfnets_jax.models.stacking import StackedLayout


#: Precisions a forward pass may run in (parameters stay float32).
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Family:
  """A model family: its Haiku class, plan function and variant tables.

  `stateful` marks families with Haiku state (BatchNorm running statistics):
  they need `hk.transform_with_state`, and their batch statistics are only
  used with `is_training=True`.
  """
  model_class: type[hk.Module]
  plan_fn: Callable[..., NetworkPlan]
  published: Mapping[str, Mapping[str, Any]]
  variants: Mapping[str, Mapping[str, Any]]
  stateful: bool = False


FAMILIES: Mapping[str, Family] = {
    "nfnet": Family(nfnet.NFNet, nfnet.nfnet_plan, nfnet.VARIANTS, nfnet.ALL_VARIANTS),
    "nf_resnet": Family(nf_resnet.NFResNet, nf_resnet.nf_resnet_plan, nf_resnet.VARIANTS,
                        nf_resnet.VARIANTS),
    "nf_regnet": Family(nf_regnet.NFRegNet, nf_regnet.nf_regnet_plan, nf_regnet.VARIANTS,
                        nf_regnet.VARIANTS),
    "bn_resnet": Family(bn_resnet.BNResNet, bn_resnet.bn_resnet_plan, bn_resnet.VARIANTS,
                        bn_resnet.ALL_VARIANTS, stateful=True),
    # timm's normalizer-free models by their timm names, e.g. 'timm:eca_nfnet_l0'.
    "timm": Family(timm_family.TimmNFNet, timm_family.timm_plan, timm_family.CONFIGS,
                   timm_family.CONFIGS),
}


def list_models(published_only: bool = False) -> list[str]:
  """Every model name, e.g. ['nfnet:F0', ...]; tiny test variants unless `published_only`."""
  return [f"{family}:{variant}" for family, spec in FAMILIES.items()
          for variant in (spec.published if published_only else spec.variants)]


def parse_model_name(name: str) -> tuple[str, str]:
  """'nfnet:F0' -> ('nfnet', 'F0'), with an error that lists valid names."""
  family, sep, variant = name.partition(":") if isinstance(name, str) else ("", "", "")
  if not sep or family not in FAMILIES or variant not in FAMILIES[family].variants:
    raise ValueError(
        f"Unknown model {name!r}; expected 'family:variant', one of: {', '.join(list_models())}.")
  return family, variant


def create_model(name: str, num_classes: int = 1000, **kwargs: Any) -> hk.Module:
  """Instantiates the Haiku module for `name` (call inside `hk.transform[_with_state]`)."""
  family, variant = parse_model_name(name)
  return FAMILIES[family].model_class(num_classes, variant=variant, **kwargs)


def model_plan(name: str, num_classes: int = 1000, **kwargs: Any) -> NetworkPlan:
  """The resolved architecture of `name`, without Haiku or JAX."""
  family, variant = parse_model_name(name)
  return FAMILIES[family].plan_fn(num_classes, variant=variant, **kwargs)


def _lowering(name: str, conv_impl: Optional[str], block_loop: Optional[str]) -> dict[str, str]:
  """The lowering arguments of `name`'s constructor, checked and fixed now.

  `conv_impl=None` reads `$NFNETS_JAX_CONV_IMPL` at this moment. Families
  without normalizer-free blocks (the BatchNorm baseline) take none.
  """
  family = FAMILIES[parse_model_name(name)[0]]
  if not issubclass(family.model_class, NormFreeNet):
    return {}
  if conv_impl is None:
    conv_impl = conv.default_impl()
  return {"conv_impl": conv.check_impl(conv_impl, "the conv_impl argument"),
          "block_loop": network.check_block_loop(block_loop)}


def _forward(name: str, num_classes: int, kwargs: Mapping[str, Any]) -> Callable[..., Any]:
  # Validates every argument now, not at the first init inside a jit.
  model_plan(name, num_classes, **{k: v for k, v in kwargs.items()
                                   if k not in ("fc_init", "name", "conv_impl", "block_loop")})

  def forward(images, is_training: bool = True, return_metrics: bool = False):
    return create_model(name, num_classes, **kwargs)(images, is_training, return_metrics)

  return forward


def is_stateful(name: str) -> bool:
  """Whether `name` keeps Haiku state (BatchNorm) and needs `transform_with_state`."""
  return FAMILIES[parse_model_name(name)[0]].stateful


def transform(name: str, num_classes: int = 1000, *, conv_impl: Optional[str] = None,
              block_loop: Optional[str] = None, fast_init: bool = True,
              **kwargs: Any) -> hk.Transformed:
  """The model as `init(rng, images, is_training=True)` and
  `apply(params, rng, images, is_training=True, return_metrics=False)`.

  Its parameters are in the model's own layout (`stacked_layout`): the
  published tree, except that each run of blocks the model scans keeps its
  blocks' parameters stacked in one module (NFNet-F1 and deeper under the
  default `block_loop`), so that a train step over them compiles as fast as
  the model does. `apply` also takes the published tree (a loaded
  checkpoint); `stacked_layout(...).to_published` converts for files.

  `conv_impl` ('auto', 'xla', 'decomposed'; None: `$NFNETS_JAX_CONV_IMPL`,
  read now) and `block_loop` ('auto', 'scan', 'unroll') fix how the model is
  lowered, never what it computes. `fast_init=False` builds it with plain
  `hk.transform` instead of `fast_init.transform` (the same weights; an init
  that compiles far slower for deep variants).
  """
  if is_stateful(name):
    raise ValueError(
        f"Model {name!r} keeps BatchNorm statistics as Haiku state, which hk.transform "
        f"cannot carry; use transform_with_state({name!r}), whose apply is "
        "apply(params, state, rng, images, ...) -> (outputs, state).")
  lowering = _lowering(name, conv_impl, block_loop)
  forward = _forward(name, num_classes, {**kwargs, **lowering})
  published = _fast_init.transform(forward) if fast_init else hk.transform(forward)
  layout = stacked_layout(name, num_classes, **kwargs, **lowering)
  return published if layout.is_identity else _in_layout(published, layout)


def _in_layout(published: hk.Transformed, layout: StackedLayout) -> hk.Transformed:
  """`published` with its parameters in `layout` (apply also takes the published tree)."""

  def init(rng, images, is_training: bool = True, return_metrics: bool = False):
    return layout.stack(published.init(rng, images, is_training, return_metrics))

  def apply(params, rng, images, is_training: bool = True, return_metrics: bool = False):
    return published.apply(layout.to_published(params), rng, images, is_training,
                           return_metrics)

  return hk.Transformed(init=init, apply=apply)


def transform_with_state(name: str, num_classes: int = 1000, *,
                         conv_impl: Optional[str] = None, block_loop: Optional[str] = None,
                         **kwargs: Any) -> hk.TransformedWithState:
  """`hk.transform_with_state` of any model, stateful or not (then the state is empty),
  with the published parameter tree.

  `init(rng, images, is_training=...) -> (params, state)`;
  `apply(params, state, rng, images, is_training=..., return_metrics=...) -> (outputs, state)`.
  `conv_impl` and `block_loop` as in `transform`.
  """
  lowering = _lowering(name, conv_impl, block_loop)
  return hk.transform_with_state(_forward(name, num_classes, {**kwargs, **lowering}))


def stacked_layout(name: str, num_classes: int = 1000, **kwargs: Any) -> StackedLayout:
  """The parameter layout of `transform(name, num_classes, **kwargs)` (see
  `stacking.py`): the runs of blocks that model scans (under the default
  `block_loop`, the runs of 6 or more blocks: none for NFNet-F0, 4 for F7),
  one stacked module each. The identity for models without scanned runs.
  """
  def scanned_runs():
    net = create_model(name, num_classes, **kwargs)
    return net.scanned_block_names() if isinstance(net, NormFreeNet) else []

  return StackedLayout(hk.transform(scanned_runs).apply({}, None))


def published_tree(name: str, params: Mapping[str, Mapping[str, Any]], num_classes: int = 1000,
                   **kwargs: Any) -> Mapping[str, Mapping[str, Any]]:
  """`params` in the published tree, whichever block loop stacked them (as it is when
  nothing is stacked).

  'scan' stacks every run 'auto' stacks and more, so it is tried first: a
  scan-stacked tree also holds all of 'auto's stacked modules.
  """
  kwargs = {k: v for k, v in kwargs.items() if k not in ("conv_impl", "block_loop")}
  for loop in ("scan", "auto"):
    layout = stacked_layout(name, num_classes, block_loop=loop, **kwargs)
    if layout.is_stacked_tree(params):
      return layout.to_published(params)
  return params


def param_shapes(name: str, num_classes: int = 1000, image_size: int = 32,
                 **kwargs: Any) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
  """The parameter tree's shapes, traced abstractly (no weights are allocated).

  Haiku state (BatchNorm running statistics) is not a parameter and is left out.
  """
  model = transform_with_state(name, num_classes, **kwargs)
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, is_training=False)[0], images)


def count_params(name: str, num_classes: int = 1000, **kwargs: Any) -> int:
  """Number of parameters of `name`, counted from the model's own parameter tree."""
  shapes = param_shapes(name, num_classes, **kwargs)
  return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree_util.tree_leaves(shapes)))


def count_flops(name: str, height: int, width: int, num_classes: int = 1000,
                **kwargs: Any) -> tuple[list[int], int]:
  """Multiply-adds per layer and in total for one `height` x `width` image."""
  return model_plan(name, num_classes, **kwargs).count_flops(height, width)


def default_image_size(name: str) -> int:
  """The resolution `name` was published to be tested at (its variant's `test_imsize`).

  Families whose variants share one size (NF-ResNets) keep it as the module
  constant `TEST_IMSIZE` rather than in each row.
  """
  family, variant = parse_model_name(name)
  spec = FAMILIES[family]
  row = spec.variants[variant]
  if "test_imsize" in row:
    return int(row["test_imsize"])
  size = getattr(sys.modules[spec.model_class.__module__], "TEST_IMSIZE", None)
  if size is None:
    raise ValueError(f"Model {name!r} has no published test resolution; pass an image size.")
  return int(size)
