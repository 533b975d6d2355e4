"""The one generic normalizer-free network that every family instantiates.

A family only decides the `NetworkPlan` (see `architecture.py`); building the
Haiku modules, the forward pass, signal metrics and FLOP counting are shared
here. Module names reproduce the published checkpoints' parameter tree.
"""

from typing import Any, Callable, Optional, Union

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets_jax.models import activations, conv as conv_lib
from nfnets_jax.models.architecture import BlockSpec, NetworkPlan
from nfnets_jax.models.layers import (PUBLISHED_STANDARDIZATION, ChannelAttention, SqueezeExcite,
                                      Standardization, WSConv2D, avg_pool_same,
                                      average_channel_variance, efficient_channel_attention,
                                      keep_branches, max_pool_3x3, signal_metrics, squeeze_excite,
                                      ws_conv2d)

Initializer = Callable[[tuple[int, ...], Any], jax.Array]

INPUT_CHANNELS = 3


def _conv(spec, conv_impl: str, standardization: Standardization,
          name: Optional[str] = None) -> WSConv2D:
  return WSConv2D(spec.out_ch, spec.kernel, stride=spec.stride,
                  feature_group_count=spec.groups, padding=spec.pads, conv_impl=conv_impl,
                  standardization=standardization, gain_init=spec.gain_init,
                  name=name or spec.name)


# {conv name: {w, gain, bias}, 'squeeze_excite' or 'eca': ..., 'skip_gain' (when the block has one)}
BlockParams = dict[str, Any]


def attention_key(spec: BlockSpec) -> str:
  """The block parameters' key (and module name) of `spec`'s gate."""
  return "squeeze_excite" if spec.attention == "se" else "eca"


def residual_branch(spec: BlockSpec, activation: Callable[[jax.Array], jax.Array],
                    conv: Callable[[str, jax.Array], jax.Array], se_params: Optional[BlockParams],
                    pre: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A block's residual branch and shortcut, before the skip gain.

  `pre` is the block's input after its activation (and beta), `x` the input
  itself; `conv(name, inputs)` applies the block's convolution `name`;
  `se_params` are the gate's (squeeze-excite or ECA, as `spec.attention` says).
  The training form (`block_forward`) and the folded one (`folding.py`) differ
  only in the convolutions and in what they scale, so both call this.
  """
  gate = squeeze_excite if spec.attention == "se" else efficient_channel_attention

  def excite(out):
    # x2 restores the variance the sigmoid gate (about 0.5 at init) removes.
    return 2.0 * gate(se_params, out) * out

  if not spec.use_projection:
    shortcut = x
  elif spec.stride > 1 and spec.pool_shortcut:
    shortcut = conv("conv_shortcut", avg_pool_same(pre, spec.stride))
  else:
    shortcut = conv("conv_shortcut", pre)

  out = conv("conv1", activation(conv("conv0", pre)))
  if spec.use_two_convs:
    out = conv("conv1b", activation(out))
  if spec.se_position == "bottleneck":
    out = excite(out)
  out = conv("conv2", activation(out))
  if spec.se_position == "output":
    out = excite(out)
  return out, shortcut


def block_forward(spec: BlockSpec, activation: Callable[[jax.Array], jax.Array],
                  params: BlockParams, x: jax.Array, beta: Union[float, jax.Array],
                  keep_prob: Union[float, jax.Array], key: Optional[jax.Array],
                  conv_impl: str = "auto",
                  standardization: Standardization = PUBLISHED_STANDARDIZATION
                  ) -> tuple[jax.Array, jax.Array]:
  """One block as a pure function of its parameters, in the published order.

  `beta` and `keep_prob` (1 - stochastic-depth rate) override `spec`'s so
  that they can be traced; `key=None` keeps every branch (inference, or a
  zero drop rate). Returns the block's output and its residual branch's
  average channel variance.
  """
  conv_specs = {c.name: c for c in spec.convs}

  def conv(name, inputs):
    c = conv_specs[name]
    return ws_conv2d(params[name], inputs, c.stride, c.pads, c.groups, conv_impl,
                     standardization)

  out, shortcut = residual_branch(spec, activation, conv, params.get(attention_key(spec)),
                                  activation(x) * jnp.asarray(beta, x.dtype), x)
  res_avg_var = average_channel_variance(out)
  if key is not None:
    out = keep_branches(out, keep_prob, key)
    if spec.rescale_stochdepth:
      out = out / jnp.asarray(keep_prob, out.dtype)
  if spec.skip_gain:
    # SkipInit: the branch starts switched off, so the block is the identity at init.
    # (Without it, conv2's gain starts at zero to the same end.)
    out = out * params["skip_gain"].astype(out.dtype)
  return out * jnp.asarray(spec.alpha, out.dtype) + shortcut, res_avg_var


class NFBlock(hk.Module):
  """A normalizer-free residual block described by a `BlockSpec`.

  `parameters()` creates the block's weights, `block_forward` is the block;
  `conv_impl` is the convolutions' lowering ('xla' or 'decomposed', see conv.py).
  """

  def __init__(self, spec: BlockSpec, activation: Callable[[jax.Array], jax.Array],
               conv_impl: str = "auto",
               standardization: Standardization = PUBLISHED_STANDARDIZATION,
               name: Optional[str] = None):
    super().__init__(name=name)
    self.spec = spec
    self.activation = activation
    self.conv_impl = conv_impl
    self.standardization = standardization
    self.convs = {c.name: _conv(c, conv_impl, standardization) for c in spec.convs}
    if not spec.se_position:
      self.se = None
    elif spec.attention == "se":
      self.se = SqueezeExcite(spec.se_channels, spec.se_hidden)
    else:
      self.se = ChannelAttention(spec.eca_kernel)

  def parameters(self) -> BlockParams:
    """Creates (at init) or fetches (at apply) every parameter of the block."""
    # Created in the order the published forward pass first used them, so that
    # a seed gives the same initial weights (each initialiser draws the next key).
    conv_specs = {c.name: c for c in self.spec.convs}
    order = list(conv_specs)
    if "conv_shortcut" in order:
      order.insert(0, order.pop(order.index("conv_shortcut")))
    params = {}
    gate = attention_key(self.spec)
    for name in order:
      if name == "conv2" and self.spec.se_position == "bottleneck":
        params[gate] = self.se.parameters()
      params[name] = self.convs[name].parameters(conv_specs[name].in_ch)
    if self.spec.se_position == "output":
      params[gate] = self.se.parameters()
    if self.spec.skip_gain:
      params["skip_gain"] = hk.get_parameter("skip_gain", (), jnp.float32, init=jnp.zeros)
    return params

  def prepare(self, x: jax.Array, is_training: bool) -> tuple[BlockParams, Optional[jax.Array]]:
    """Checks the input, then the block's parameters and its stochastic-depth key
    (None when nothing is dropped), drawn in the published order."""
    spec = self.spec
    if x.shape[-1] != spec.in_ch:
      raise ValueError(f"{self.module_name} expects {spec.in_ch} input channels, "
                       f"got shape {tuple(x.shape)}.")
    params = self.parameters()
    drops = is_training and spec.stochdepth_rate > 0.0
    return params, hk.next_rng_key() if drops else None

  def __call__(self, x: jax.Array, is_training: bool) -> tuple[jax.Array, jax.Array]:
    spec = self.spec
    params, key = self.prepare(x, is_training)
    return block_forward(spec, self.activation, params, x, spec.beta,
                         1.0 - spec.stochdepth_rate, key, self.conv_impl, self.standardization)


#: How a network runs each run of interchangeable blocks (`NormFreeNet(block_loop=...)`):
#: 'scan': one `jax.lax.scan` over each run of two or more blocks that differ only
#: in their constants (beta, drop rate; see `NetworkPlan.block_runs`), so the
#: compiled program holds one copy of the block and compile time grows with the
#: number of distinct blocks, not with depth. 'unroll': every block inlined, as
#: published. 'auto': scan runs of `AUTO_SCAN_MIN_RUN` or more blocks (NFNet-F1 and
#: deeper) and unroll shorter ones, where stacking costs more memory traffic than
#: the compile time it saves (docs/performance.md). Every mode gives the same
#: parameters for a seed, the same random draws and the same outputs.
BLOCK_LOOPS = ("auto", "scan", "unroll")
#: Under 'auto', runs of at least this many interchangeable blocks are scanned.
AUTO_SCAN_MIN_RUN = 6


def check_block_loop(mode: Optional[str]) -> str:
  """`mode` validated ('auto' when None)."""
  mode = "auto" if mode is None else mode
  if mode not in BLOCK_LOOPS:
    raise ValueError(f"Unknown block loop {mode!r}; expected one of {', '.join(BLOCK_LOOPS)}.")
  return mode


def scans_run(block_loop: str, run: range) -> bool:
  """Whether a network built with `block_loop` scans the blocks of `run`."""
  if block_loop == "unroll" or len(run) < 2:
    return False
  return block_loop == "scan" or len(run) >= AUTO_SCAN_MIN_RUN


def activation_and_standardization(
    plan: NetworkPlan) -> tuple[Callable[[jax.Array], jax.Array], Standardization]:
  """The network's activation and its convolutions' standardisation.

  The activation carries its gamma, unless the plan moves gamma into the
  convolutions' weight scale (`NetworkPlan.gamma_in_conv`).
  """
  activation = activations.get_activation(plan.activation, elementwise_only=True)
  scale = 1.0
  if plan.gamma_in_conv:
    activation = activations.unscaled_activation(plan.activation)
    scale = activations.GAMMAS[activations.canonical_name(plan.activation)]
  return activation, Standardization(plan.weight_std.eps, plan.weight_std.eps_in_variance, scale)


def _stack(trees: list[Any]) -> Any:
  return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *trees)


class NormFreeNet(hk.Module):
  """Stem -> residual blocks -> [final conv] -> activation -> mean-pool -> dropout -> linear.

  `__call__(x, is_training=True, return_metrics=False)` takes NHWC images with
  3 channels in any float dtype and returns a dict with `logits` (float32) and
  `pool` (the pooled features before dropout); with `return_metrics` also the
  signal-propagation metrics `avg_sq_mean_{i}` / `avg_var_{i}` (i=0 after the
  stem, i=k+1 after block k) and `res_avg_var_{k}` (block k's residual branch).
  Dropout and stochastic depth are active only when `is_training`, and then
  need an rng (`transformed.apply(params, rng, x)`).

  How it is lowered is fixed here, never what it computes: `conv_impl`
  ('auto', 'xla' or 'decomposed'; None reads `$NFNETS_JAX_CONV_IMPL` now, see
  conv.py) and `block_loop` ('auto', 'scan' or 'unroll'; see `BLOCK_LOOPS`).
  """

  def __init__(self, plan: NetworkPlan, fc_init: Optional[Initializer] = None,
               conv_impl: Optional[str] = None, block_loop: Optional[str] = None,
               name: Optional[str] = None):
    super().__init__(name=name)
    self.plan = plan
    self.conv_impl = conv_lib.resolve_impl(conv_impl)
    self.block_loop = check_block_loop(block_loop)
    self.activation, self.standardization = activation_and_standardization(plan)
    self.stem = [_conv(c, self.conv_impl, self.standardization) for c in plan.stem.convs]
    self.blocks = [NFBlock(spec, self.activation, self.conv_impl, self.standardization,
                           name=plan.block_name)
                   for spec in plan.blocks]
    self.final_conv = (_conv(plan.final_conv, self.conv_impl, self.standardization)
                       if plan.final_conv else None)
    self.fc = hk.Linear(plan.num_classes, w_init=fc_init)

  def __call__(self, x: jax.Array, is_training: bool = True,
               return_metrics: bool = False) -> dict[str, jax.Array]:
    if x.ndim != 4:
      raise ValueError(
          f"{self.module_name} expects a 4-D NHWC batch of images, got shape {tuple(x.shape)} "
          f"({x.ndim}-D); add a batch axis with x[None] for a single image.")
    if x.shape[-1] != INPUT_CHANNELS:
      raise ValueError(
          f"{self.module_name} expects {INPUT_CHANNELS} input channels (RGB, NHWC), got "
          f"shape {tuple(x.shape)} with {x.shape[-1]} channels; convert grayscale/RGBA to RGB "
          "and put channels last.")
    outputs = {}
    out = x
    for i, conv in enumerate(self.stem):
      if i:
        out = self.activation(out)
      out = conv(out)
    if self.plan.stem.max_pool:
      out = max_pool_3x3(out, self.plan.stem.pool_padding)
    if return_metrics:
      outputs.update(signal_metrics(out, 0))

    for run in self.plan.block_runs():
      if scans_run(self.block_loop, run):
        out = self._scan_blocks(run, out, is_training, return_metrics, outputs)
        continue
      for i in run:
        out, res_avg_var = self.blocks[i](out, is_training=is_training)
        if return_metrics:
          outputs.update(signal_metrics(out, i + 1))
          outputs[f"res_avg_var_{i}"] = res_avg_var

    if self.final_conv is not None:
      out = self.final_conv(out)
    pool = jnp.mean(self.activation(out).astype(jnp.float32), axis=(1, 2))
    outputs["pool"] = pool
    if is_training and self.plan.drop_rate > 0.0:
      pool = hk.dropout(hk.next_rng_key(), self.plan.drop_rate, pool)
    outputs["logits"] = self.fc(pool)
    return outputs

  def _scan_blocks(self, run: range, x: jax.Array, is_training: bool, return_metrics: bool,
                   outputs: dict[str, jax.Array]) -> jax.Array:
    """Runs blocks `run` (same shapes, see `NetworkPlan.block_runs`) as one scan."""
    blocks = [self.blocks[i] for i in run]
    specs = [block.spec for block in blocks]
    # Per-block parameters keep their published names; only the scan sees them
    # stacked. Parameters and stochastic-depth keys are drawn block by block,
    # interleaved as the unrolled blocks draw them, so a seed gives the same
    # initial weights and the same dropped branches either way. (Every block
    # of a run keeps its input's shape, so checking x against each is exact.)
    params, keys = zip(*(block.prepare(x, is_training) for block in blocks))
    params = _stack(list(params))
    keys = None if keys[0] is None else jnp.stack(keys)
    betas = jnp.asarray(np.array([spec.beta for spec in specs], np.float32))
    keep = jnp.asarray(np.array([1.0 - spec.stochdepth_rate for spec in specs], np.float32))
    activation, template, conv_impl = self.activation, specs[0], self.conv_impl
    standardization = self.standardization

    def body(carry, xs):
      block_params, beta, keep_prob, key = xs
      out, res_avg_var = block_forward(template, activation, block_params, carry, beta,
                                       keep_prob, key, conv_impl, standardization)
      metrics = {"res_avg_var": res_avg_var, **signal_metrics(out, 0)} if return_metrics else {}
      return out, metrics

    x, metrics = jax.lax.scan(body, x, (params, betas, keep, keys))
    if return_metrics:
      for j, i in enumerate(run):
        outputs[f"avg_sq_mean_{i + 1}"] = metrics["avg_sq_mean_0"][j]
        outputs[f"avg_var_{i + 1}"] = metrics["avg_var_0"][j]
        outputs[f"res_avg_var_{i}"] = metrics["res_avg_var"][j]
    return x

  def scanned_block_names(self) -> list[list[str]]:
    """The module names of the blocks of each run this network scans (what
    `stacking.StackedLayout` stacks)."""
    return [[self.blocks[i].module_name for i in run]
            for run in self.plan.block_runs() if scans_run(self.block_loop, run)]

  def count_flops(self, h: int, w: int) -> tuple[list[int], int]:
    """Multiply-adds per layer (stem convs, blocks, final conv, classifier) and in total."""
    return self.plan.count_flops(h, w)
