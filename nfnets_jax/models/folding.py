"""Inference-only form of a trained normalizer-free network: every constant folded once.

At inference the parameters are fixed, so what the training-form network
recomputes on every call can be computed once:

* scaled weight standardisation and its `gain` become a plain HWIO kernel;
* each activation's gamma (and a block's `beta`, which scales the same
  activation) moves into the kernel of the convolution that reads it (or the
  classifier, after the last activation), leaving the unscaled nonlinearity;
* a block's `alpha * skip_gain` moves into its last convolution, unless a
  squeeze-excite gate sits after that convolution (the gate reads the unscaled
  branch, so there the product stays one scalar multiply after the gate).

What is left is a plain convolutional network (same layers, kernels and
biases, no per-call standardisation) whose logits equal the training form's
up to float32 round-off. Its parameters are a plain pytree, so the folded
forward pass can be jitted, exported (`nfnets_jax.export`) or served as is.
"""

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp

from nfnets_jax.models import activations, conv as conv_lib, network, registry, tree
from nfnets_jax.models.architecture import BlockSpec, ConvSpec, NetworkPlan
from nfnets_jax.models.layers import (PUBLISHED_STANDARDIZATION, Standardization, max_pool_3x3,
                                      standardize_weight)

_SEP = "/~/"
# Model arguments that fix how a network is lowered or named, not what its plan is.
_NOT_PLAN_KWARGS = ("fc_init", "name", "conv_impl", "block_loop")

Params = Mapping[str, Mapping[str, Any]]
FoldedParams = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class FoldedModel:
  """A folded network: `apply(params, images) -> logits` and its folded `params`.

  `apply` is pure (jit it, or export it with `params` closed over or passed
  in); images are NHWC with 3 channels in any float dtype, and the logits are
  float32, as the training form's. `conv_impl` ('xla' or 'decomposed') and
  `block_loop` fix how it is lowered, as in `models.transform`.
  """
  name: str
  plan: NetworkPlan
  params: FoldedParams
  conv_impl: str
  block_loop: str

  def apply(self, params: FoldedParams, images: jax.Array) -> jax.Array:
    return folded_forward(self.plan, params, images, self.conv_impl, self.block_loop)

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.apply(self.params, images)


def fold_for_inference(name: str, params: Params, num_classes: Optional[int] = None, *,
                       conv_impl: Optional[str] = None, block_loop: Optional[str] = None,
                       check: bool = True, **model_kwargs: Any) -> FoldedModel:
  """Folds the parameters of model `name` (e.g. 'nfnet:F0') into a `FoldedModel`.

  Args:
    name: a normalizer-free model name (`models.list_models()`).
    params: its parameters, in the published tree or the stacked layout of
      `models.transform(name).init`.
    num_classes: the classifier's width (default: read from `params`).
    conv_impl, block_loop: the folded network's lowering (see `models.transform`;
      `conv_impl=None` reads `$NFNETS_JAX_CONV_IMPL` now).
    check: check `params` against the model first; False where the caller has
      already (`nfnets_jax.weights.load_model` checks what it loads).
    **model_kwargs: the model's constructor arguments (e.g. `width`), as given
      to `models.transform`.

  Raises:
    ValueError: an unknown or stateful model, or (`tree.ParameterMismatchError`)
      parameters that do not fit it.
  """
  if registry.is_stateful(name):
    raise ValueError(f"Model {name!r} keeps BatchNorm statistics and has no weight "
                     "standardisation to fold; fold a normalizer-free model "
                     "(nfnet, nf_resnet or nf_regnet).")
  if num_classes is None:
    num_classes = tree.infer_num_classes(params) or 1000
  plan_kwargs = {k: v for k, v in model_kwargs.items() if k not in _NOT_PLAN_KWARGS}
  plan = registry.model_plan(name, num_classes, **plan_kwargs)
  published = dict(registry.published_tree(name, params, num_classes, **model_kwargs))
  if check:
    tree.check_params(published, name, num_classes=num_classes, model_kwargs=model_kwargs,
                      source="the parameters to fold")
  impl = conv_lib.resolve_impl(conv_impl)
  loop = network.check_block_loop(block_loop)
  # One compiled program: op by op, every kernel shape would compile its own.
  folded = jax.jit(fold_params, static_argnums=0)(plan, published)
  return FoldedModel(name, plan, _stack_runs(plan, folded, loop), impl, loop)


def fold_params(plan: NetworkPlan, params: Params) -> FoldedParams:
  """The folded parameters of a published tree, every block separate.

  {'stem': [conv, ...], 'blocks': [block, ...], 'final_conv': conv or None,
  'linear': {'w', 'b'}}, where a conv is {'w': kernel, 'b': bias} and a block
  holds its convs by name, its gate's ('squeeze_excite' or 'eca') parameters and, when its
  output is gated, 'scale'. Everything is float32.
  """
  # A plan with gamma in its convolutions' weight scale has plain activations
  # (and unscaled features): its standardisation already holds gamma.
  _, standardization = network.activation_and_standardization(plan)
  gamma = (1.0 if plan.gamma_in_conv
           else activations.GAMMAS[activations.canonical_name(plan.activation)])
  root = _root_module(params)

  def fold_conv(p, input_scale, output_scale=1.0):
    return _fold_conv(p, input_scale, output_scale, standardization)

  stem = [fold_conv(params[f"{root}{_SEP}{spec.name}"], 1.0 if i == 0 else gamma)
          for i, spec in enumerate(plan.stem.convs)]
  blocks = [_fold_block(spec, params, f"{root}{_SEP}{_block_module(plan.block_name, i)}", gamma,
                        fold_conv)
            for i, spec in enumerate(plan.blocks)]
  final_conv = (fold_conv(params[f"{root}{_SEP}{plan.final_conv.name}"], 1.0)
                if plan.final_conv else None)
  linear = params[f"{root}{_SEP}linear"]
  return {"stem": stem, "blocks": blocks, "final_conv": final_conv,
          "linear": {"w": _f32(linear["w"]) * gamma, "b": _f32(linear["b"])}}


def _root_module(params: Params) -> str:
  roots = {module.partition(_SEP)[0] for module in params}
  if len(roots) != 1:
    raise ValueError(f"Expected the parameters of one network, found the top-level modules "
                     f"{sorted(roots)}.")
  return roots.pop()


def _block_module(block_name: str, index: int) -> str:
  """Haiku's name for the `index`-th module called `block_name`."""
  return block_name if index == 0 else f"{block_name}_{index}"


def _f32(x: Any) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _fold_conv(p: Mapping[str, Any], input_scale: Any, output_scale: Any = 1.0,
               standardization: Standardization = PUBLISHED_STANDARDIZATION
               ) -> dict[str, jax.Array]:
  """conv(input_scale * x) * output_scale as a plain kernel and bias."""
  kernel = standardize_weight(_f32(p["w"]), _f32(p["gain"]), standardization.eps,
                              eps_in_variance=standardization.eps_in_variance,
                              scale=standardization.scale)
  return {"w": kernel * (input_scale * output_scale), "b": _f32(p["bias"]) * output_scale}


def _fold_block(spec: BlockSpec, params: Params, module: str, gamma: float,
                fold_conv: Callable[..., dict[str, jax.Array]]) -> dict[str, Any]:
  def conv(name, input_scale, output_scale=1.0):
    return fold_conv(params[f"{module}{_SEP}{name}"], input_scale, output_scale)

  skip = (_f32(params[module]["skip_gain"]) * spec.alpha if spec.skip_gain
          else _f32(spec.alpha))
  gated = spec.se_position == "output"
  names = {c.name for c in spec.convs}
  block = {
      "conv0": conv("conv0", gamma * spec.beta),
      "conv1": conv("conv1", gamma),
      "conv2": conv("conv2", gamma, 1.0 if gated else skip),
  }
  if "conv1b" in names:
    block["conv1b"] = conv("conv1b", gamma)
  if "conv_shortcut" in names:
    block["conv_shortcut"] = conv("conv_shortcut", gamma * spec.beta)
  if spec.se_position and spec.attention == "eca":
    block["eca"] = {"w": _f32(params[f"{module}{_SEP}eca"]["w"])}
  elif spec.se_position:
    se = f"{module}{_SEP}squeeze_excite{_SEP}"
    block["squeeze_excite"] = {
        layer: {k: _f32(v) for k, v in params[se + layer].items()}
        for layer in ("linear", "linear_1")}
  if gated:
    block["scale"] = skip
  return block


def _stack_runs(plan: NetworkPlan, folded: FoldedParams, block_loop: str) -> FoldedParams:
  """`folded` with the blocks of each run `block_loop` scans stacked into one entry."""
  blocks = []
  for run in plan.block_runs():
    if network.scans_run(block_loop, run):
      blocks.append(jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves),
                                           *[folded["blocks"][i] for i in run]))
    else:
      blocks.extend(folded["blocks"][i] for i in run)
  return {**folded, "blocks": blocks}


# ----------------------------------------------------------------------------- forward


def _conv(p: Mapping[str, jax.Array], x: jax.Array, spec: ConvSpec, impl: str) -> jax.Array:
  out = conv_lib.conv2d(x, p["w"].astype(x.dtype), spec.stride, spec.pads, spec.groups, impl=impl)
  return out + p["b"].astype(x.dtype)


def folded_block(spec: BlockSpec, act: Callable[[jax.Array], jax.Array], p: Mapping[str, Any],
                 x: jax.Array, impl: str) -> jax.Array:
  """One folded block (`network.block_forward` at inference, constants folded)."""
  specs = {c.name: c for c in spec.convs}

  def conv(name, inputs):
    return _conv(p[name], inputs, specs[name], impl)

  out, shortcut = network.residual_branch(spec, act, conv, p.get(network.attention_key(spec)),
                                          act(x), x)
  if spec.se_position == "output":
    out = out * p["scale"].astype(out.dtype)
  return out + shortcut


def folded_forward(plan: NetworkPlan, params: FoldedParams, images: jax.Array,
                   conv_impl: str = "xla", block_loop: str = "auto") -> jax.Array:
  """The logits (float32) of the folded network on NHWC `images`."""
  if images.ndim != 4 or images.shape[-1] != network.INPUT_CHANNELS:
    raise ValueError(f"Expected a 4-D NHWC batch of RGB images, got shape {tuple(images.shape)}.")
  base = activations.unscaled_activation(plan.activation)
  out = images
  for i, (spec, p) in enumerate(zip(plan.stem.convs, params["stem"])):
    out = _conv(p, base(out) if i else out, spec, conv_impl)
  if plan.stem.max_pool:
    out = max_pool_3x3(out, plan.stem.pool_padding)
  entry = iter(params["blocks"])
  for run in plan.block_runs():
    if network.scans_run(block_loop, run):
      template = plan.blocks[run.start]

      def body(carry, block_params, template=template):
        return folded_block(template, base, block_params, carry, conv_impl), None

      out, _ = jax.lax.scan(body, out, next(entry))
      continue
    for i in run:
      out = folded_block(plan.blocks[i], base, next(entry), out, conv_impl)
  if plan.final_conv is not None:
    out = _conv(params["final_conv"], out, plan.final_conv, conv_impl)
  pool = jnp.mean(base(out).astype(jnp.float32), axis=(1, 2))
  return pool @ params["linear"]["w"] + params["linear"]["b"]
