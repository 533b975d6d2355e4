"""The one generic normalizer-free network that every family instantiates.

A family only decides the `NetworkPlan` (see `architecture.py`); building the
Haiku modules, the forward pass, signal metrics and FLOP counting are shared
here. Module names reproduce the published checkpoints' parameter tree.
"""

from typing import Any, Callable, Optional

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets_jax.models import activations
from nfnets_jax.models.architecture import BlockSpec, NetworkPlan
from nfnets_jax.models.layers import (SqueezeExcite, WSConv2D, avg_pool_same, average_channel_variance,
                                      signal_metrics, stochastic_depth)

Initializer = Callable[[tuple[int, ...], Any], jax.Array]

INPUT_CHANNELS = 3


def _conv(spec, name: Optional[str] = None) -> WSConv2D:
  return WSConv2D(spec.out_ch, spec.kernel, stride=spec.stride,
                  feature_group_count=spec.groups, name=name or spec.name)


class NFBlock(hk.Module):
  """A normalizer-free residual block described by a `BlockSpec`."""

  def __init__(self, spec: BlockSpec, activation: Callable[[jax.Array], jax.Array],
               name: Optional[str] = None):
    super().__init__(name=name)
    self.spec = spec
    self.activation = activation
    self.convs = {conv.name: _conv(conv) for conv in spec.convs}
    self.se = (SqueezeExcite(spec.se_channels, spec.se_hidden)
               if spec.se_position else None)

  def _excite(self, out: jax.Array) -> jax.Array:
    # x2 restores the variance the sigmoid gate (about 0.5 at init) removes.
    return 2.0 * self.se(out) * out

  def __call__(self, x: jax.Array, is_training: bool) -> tuple[jax.Array, jax.Array]:
    spec, act, convs = self.spec, self.activation, self.convs
    out = act(x) * jnp.asarray(spec.beta, x.dtype)
    if not spec.use_projection:
      shortcut = x
    elif spec.stride > 1 and spec.pool_shortcut:
      shortcut = convs["conv_shortcut"](avg_pool_same(out, spec.stride))
    else:
      shortcut = convs["conv_shortcut"](out)

    out = convs["conv1"](act(convs["conv0"](out)))
    if spec.use_two_convs:
      out = convs["conv1b"](act(out))
    if spec.se_position == "bottleneck":
      out = self._excite(out)
    out = convs["conv2"](act(out))
    if spec.se_position == "output":
      out = self._excite(out)

    res_avg_var = average_channel_variance(out)
    out = stochastic_depth(out, spec.stochdepth_rate, is_training)
    # SkipInit: the branch starts switched off, so the block is the identity at init.
    skip_gain = hk.get_parameter("skip_gain", (), jnp.float32, init=jnp.zeros)
    out = out * skip_gain.astype(out.dtype)
    return out * jnp.asarray(spec.alpha, out.dtype) + shortcut, res_avg_var


class NormFreeNet(hk.Module):
  """Stem -> residual blocks -> [final conv] -> activation -> mean-pool -> dropout -> linear.

  `__call__(x, is_training=True, return_metrics=False)` takes NHWC images with
  3 channels in any float dtype and returns a dict with `logits` (float32) and
  `pool` (the pooled features before dropout); with `return_metrics` also the
  signal-propagation metrics `avg_sq_mean_{i}` / `avg_var_{i}` (i=0 after the
  stem, i=k+1 after block k) and `res_avg_var_{k}` (block k's residual branch).
  Dropout and stochastic depth are active only when `is_training`, and then
  need an rng (`transformed.apply(params, rng, x)`).
  """

  def __init__(self, plan: NetworkPlan, fc_init: Optional[Initializer] = None,
               name: Optional[str] = None):
    super().__init__(name=name)
    self.plan = plan
    self.activation = activations.get_activation(plan.activation, elementwise_only=True)
    self.stem = [_conv(conv) for conv in plan.stem.convs]
    self.blocks = [NFBlock(spec, self.activation, name=plan.block_name)
                   for spec in plan.blocks]
    self.final_conv = _conv(plan.final_conv) if plan.final_conv else None
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
      out = hk.max_pool(out, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1), padding="SAME")
    if return_metrics:
      outputs.update(signal_metrics(out, 0))

    for i, block in enumerate(self.blocks):
      out, res_avg_var = block(out, is_training=is_training)
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

  def count_flops(self, h: int, w: int) -> tuple[list[int], int]:
    """Multiply-adds per layer (stem convs, blocks, final conv, classifier) and in total."""
    return self.plan.count_flops(h, w)
