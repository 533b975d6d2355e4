"""Batch-normalised pre-activation ResNets (He et al., 2016, "Identity Mappings
in Deep Residual Networks"): the baseline that NF-ResNets set out to imitate.

The NF papers design their networks by comparing signal-propagation plots
against this model at initialisation, so it lives next to them. It has the
same convolutions as `nf_resnet` (same depths, widths, strides and projection
shortcuts, hence the same FLOPs), but plain He-initialised convolutions without
bias or weight standardisation, and `hk.BatchNorm` before every activation.

BatchNorm keeps running statistics as Haiku *state*, so build the model with
`registry.transform_with_state('bn_resnet:ResNet50')`. Right after `init` the
running statistics hold nothing but the init batch's: to see what BatchNorm
does to the signal, run it with `is_training=True` (batch statistics), as the
papers' plots do.
"""

from typing import Any, Callable, Optional

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets_jax.models import activations, nf_resnet, validation
from nfnets_jax.models.architecture import BlockSpec, ConvSpec, NetworkPlan
from nfnets_jax.models.layers import average_channel_variance, signal_metrics
from nfnets_jax.models.network import INPUT_CHANNELS, Initializer

#: The ResNet-v2 depths (He et al., 2016), shared with NF-ResNets so that a
#: comparison between the two is like for like.
VARIANTS: dict[str, dict[str, Any]] = {
    name: {"depth": list(nf_resnet.VARIANTS[name]["depth"])}
    for name in ("ResNet50", "ResNet101", "ResNet152", "ResNet200")
}
#: Also the very deep variants the NF-ResNets paper trains and plots
#: (its Figure 1 is a BN-ReLU ResNet-600); no standard BN reference exists.
ALL_VARIANTS: dict[str, dict[str, Any]] = {
    **VARIANTS,
    **{name: {"depth": list(nf_resnet.VARIANTS[name]["depth"])}
       for name in ("ResNet288", "ResNet600")},
}
TRAIN_IMSIZE = TEST_IMSIZE = 224

# Haiku's ResNet defaults; they only matter once the model trains.
BN_DECAY = 0.9
BN_EPS = 1e-5


def plain_activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """The *unscaled* nonlinearity called `name` (aliases such as 'swish' work).

  NF networks multiply each activation by a gamma constant to keep unit
  variance; here BatchNorm re-normalises the input of every activation, so
  the baseline uses the functions as they are, like every BN ResNet does.
  """
  name = activations.canonical_name(name)
  activations.get_activation(name, elementwise_only=True)  # rejects glu/log_softmax
  if name == "identity":
    return lambda x: x
  if name == "tanh":
    return jnp.tanh
  return getattr(jax.nn, name)


def bn_resnet_plan(num_classes: int, variant: str = "ResNet50", width: int = 4,
                   drop_rate: float = 0.0, activation: str = "relu") -> NetworkPlan:
  """Resolves a BN-ResNet configuration into a `NetworkPlan`.

  The plan's blocks carry alpha = beta = 1 and no stochastic depth: the
  block is `shortcut + branch`, normalisation does the rest. `width` scales
  the stage widths like NF-ResNets' (4 gives the standard 256..2048).
  """
  row = validation.check_variant("BN-ResNet", variant, ALL_VARIANTS)
  validation.check_num_classes(num_classes)
  validation.check_positive("width", width)
  drop_rate = validation.check_rate("drop_rate", drop_rate)
  activation = activations.canonical_name(activation)
  plain_activation(activation)

  ch = int(16 * width)
  blocks = []
  for stage, (depth, stride) in enumerate(zip(row["depth"], (1, 2, 2, 2))):
    out_ch = int(nf_resnet.STAGE_WIDTHS[stage] * width)
    for i in range(depth):
      blocks.append(BlockSpec(
          in_ch=ch, out_ch=out_ch, width=int(out_ch * nf_resnet.BOTTLENECK_RATIO), groups=1,
          stride=stride if i == 0 else 1, beta=1.0, alpha=1.0, stochdepth_rate=0.0,
          pool_shortcut=False))
      ch = out_ch
  return NetworkPlan(stem=nf_resnet.resnet_stem(width), blocks=tuple(blocks), final_conv=None,
                     num_classes=num_classes, drop_rate=drop_rate, activation=activation,
                     block_name="bn_res_block")


def _he_conv(spec: ConvSpec, gain: float = 2.0) -> hk.Conv2D:
  # He et al. (2015): Var(w) = 2 / fan_in behind a ReLU keeps the forward
  # variance; the first layer sees unrectified input and uses 1 / fan_in.
  return hk.Conv2D(spec.out_ch, spec.kernel, stride=spec.stride, padding="SAME",
                   with_bias=False, feature_group_count=spec.groups,
                   w_init=hk.initializers.VarianceScaling(gain, "fan_in", "normal"),
                   name=spec.name)


def _batch_norm(name: str) -> hk.BatchNorm:
  return hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=BN_DECAY,
                      eps=BN_EPS, name=name)


class BNResBlock(hk.Module):
  """Pre-activation bottleneck: BN -> act -> conv, three times, plus a shortcut.

  The shortcut is the input itself, or a (strided) 1x1 conv of the first
  BN -> act output when the shape changes, as in ResNet-v2.
  """

  def __init__(self, spec: BlockSpec, activation: Callable[[jax.Array], jax.Array],
               name: Optional[str] = None):
    super().__init__(name=name)
    self.spec = spec
    self.activation = activation
    self.convs = {conv.name: _he_conv(conv) for conv in spec.convs}
    self.norms = [_batch_norm(f"bn{i}") for i in range(3)]

  def __call__(self, x: jax.Array, is_training: bool) -> tuple[jax.Array, jax.Array]:
    act, convs, bn = self.activation, self.convs, self.norms
    out = act(bn[0](x, is_training))
    shortcut = convs["conv_shortcut"](out) if self.spec.use_projection else x
    out = convs["conv0"](out)
    out = convs["conv1"](act(bn[1](out, is_training)))
    out = convs["conv2"](act(bn[2](out, is_training)))
    return out + shortcut, average_channel_variance(out)


class BNResNet(hk.Module):
  """Batch-normalised pre-activation ResNet: stem -> blocks -> BN -> act -> pool -> linear.

  Same call contract as `NormFreeNet`: `__call__(x, is_training=True,
  return_metrics=False)` returns `logits` and `pool`, and with
  `return_metrics` the signal-propagation metrics `avg_sq_mean_{i}`,
  `avg_var_{i}` (i=0 after the stem, i=k+1 after block k) and
  `res_avg_var_{k}`. Needs `hk.transform_with_state`; `is_training=True`
  normalises with batch statistics and updates the running averages.
  """

  def __init__(self, num_classes: int, variant: str = "ResNet50", width: int = 4,
               drop_rate: float = 0.0, activation: str = "relu",
               fc_init: Optional[Initializer] = None, name: Optional[str] = "BN_ResNet"):
    super().__init__(name=name)
    self.plan = bn_resnet_plan(num_classes, variant, width, drop_rate, activation)
    self.variant = variant
    self.train_imsize = TRAIN_IMSIZE
    self.test_imsize = TEST_IMSIZE
    self.activation = plain_activation(self.plan.activation)
    self.initial_conv = _he_conv(self.plan.stem.convs[0], gain=1.0)
    self.blocks = [BNResBlock(spec, self.activation, name=self.plan.block_name)
                   for spec in self.plan.blocks]
    self.final_bn = _batch_norm("final_bn")
    # A zero classifier, as in the published baseline: logits start at 0.
    self.fc = hk.Linear(num_classes, w_init=jnp.zeros if fc_init is None else fc_init)

  def __call__(self, x: jax.Array, is_training: bool = True,
               return_metrics: bool = False) -> dict[str, jax.Array]:
    if x.ndim != 4 or x.shape[-1] != INPUT_CHANNELS:
      raise ValueError(
          f"{self.module_name} expects a 4-D NHWC batch with {INPUT_CHANNELS} channels, got "
          f"shape {tuple(x.shape)}; add a batch axis with x[None] for a single image and put "
          "RGB channels last.")
    if hk.running_init():
      # hk.BatchNorm creates its running statistics only in training mode;
      # this lets init(rng, x, is_training=False) work as it does for NF models.
      is_training = True
    outputs = {}
    out = self.initial_conv(x)
    out = hk.max_pool(out, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1), padding="SAME")
    if return_metrics:
      outputs.update(signal_metrics(out, 0))
    for i, block in enumerate(self.blocks):
      out, res_avg_var = block(out, is_training)
      if return_metrics:
        outputs.update(signal_metrics(out, i + 1))
        outputs[f"res_avg_var_{i}"] = res_avg_var
    out = self.activation(self.final_bn(out, is_training))
    pool = jnp.mean(out.astype(jnp.float32), axis=(1, 2))
    outputs["pool"] = pool
    if is_training and self.plan.drop_rate > 0.0:
      pool = hk.dropout(hk.next_rng_key(), self.plan.drop_rate, pool)
    outputs["logits"] = self.fc(pool)
    return outputs

  def count_flops(self, h: int, w: int) -> tuple[list[int], int]:
    """Multiply-adds per layer and in total (convolutions and classifier; BN is not counted)."""
    return self.plan.count_flops(h, w)
