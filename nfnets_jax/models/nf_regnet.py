"""NF-RegNets (Brock, De & Smith, 2021): EfficientNet-like RegNets (inverted
bottlenecks, group width 8, squeeze-excite inside the bottleneck) made
normalizer-free.
"""

from typing import Any, Optional

import jax.numpy as jnp

from nfnets_jax.models import validation
from nfnets_jax.models.architecture import BlockSpec, ConvSpec, NetworkPlan, StemSpec, block_slots
from nfnets_jax.models.network import Initializer, NormFreeNet

#: The published variants: stage widths (before the 0.75 width multiplier),
#: depths, resolutions and dropout.
VARIANTS: dict[str, dict[str, Any]] = {
    "B0": {"width": [48, 104, 208, 440], "depth": [1, 3, 6, 6], "train_imsize": 192, "test_imsize": 224, "drop_rate": 0.2},
    "B1": {"width": [48, 104, 208, 440], "depth": [2, 4, 7, 7], "train_imsize": 224, "test_imsize": 256, "drop_rate": 0.2},
    "B2": {"width": [56, 112, 232, 488], "depth": [2, 4, 8, 8], "train_imsize": 240, "test_imsize": 272, "drop_rate": 0.3},
    "B3": {"width": [56, 128, 248, 528], "depth": [2, 5, 9, 9], "train_imsize": 288, "test_imsize": 320, "drop_rate": 0.3},
    "B4": {"width": [64, 144, 288, 616], "depth": [2, 6, 11, 11], "train_imsize": 320, "test_imsize": 384, "drop_rate": 0.4},
    "B5": {"width": [80, 168, 336, 704], "depth": [3, 7, 14, 14], "train_imsize": 384, "test_imsize": 456, "drop_rate": 0.4},
    "B6": {"width": [88, 184, 376, 792], "depth": [3, 8, 16, 16], "train_imsize": 448, "test_imsize": 528, "drop_rate": 0.5},
    "B7": {"width": [96, 208, 416, 880], "depth": [4, 10, 19, 19], "train_imsize": 512, "test_imsize": 600, "drop_rate": 0.5},
    "B8": {"width": [104, 232, 456, 968], "depth": [4, 11, 22, 22], "train_imsize": 600, "test_imsize": 672, "drop_rate": 0.5},
}
# EfficientNet's head: 1280 channels for a 440-channel last stage, scaled alike.
HEAD_CHANNELS, HEAD_REFERENCE_WIDTH = 1280, 440


def nf_regnet_plan(num_classes: int, variant: str = "B0", width: float = 0.75,
                   expansion: float = 2.25, group_size: int = 8, se_ratio: float = 0.5,
                   alpha: float = 0.2, stochdepth_rate: float = 0.1,
                   drop_rate: Optional[float] = None, activation: str = "silu") -> NetworkPlan:
  """Resolves an NF-RegNet configuration into a `NetworkPlan`."""
  row, drop_rate, activation = validation.check_nf_network(
      "NF-RegNet", variant, VARIANTS, num_classes, width, stochdepth_rate, drop_rate, activation)
  validation.check_positive("expansion", expansion)
  validation.check_positive("group_size", group_size)
  validation.check_positive("se_ratio", se_ratio)

  ch = int(row["width"][0] * width)
  stem = StemSpec((ConvSpec("initial_conv", 3, ch, 3, 2),))
  blocks = []
  for slot in block_slots(row["depth"], [2, 2, 2, 2], alpha, stochdepth_rate):
    out_ch = int(row["width"][slot.stage] * width)
    # The very first block does not expand, as in EfficientNet.
    groups = int(ch * (1 if slot.index == 0 else expansion)) // group_size
    blocks.append(BlockSpec(
        in_ch=ch, out_ch=out_ch, width=group_size * groups, groups=groups,
        stride=slot.stride, beta=slot.beta, alpha=alpha,
        stochdepth_rate=slot.stochdepth_rate, se_position="bottleneck",
        se_ratio=se_ratio, pool_shortcut=True))
    ch = out_ch
  return NetworkPlan(
      stem=stem, blocks=tuple(blocks),
      final_conv=ConvSpec("final_conv", ch, int(HEAD_CHANNELS * ch // HEAD_REFERENCE_WIDTH), 1),
      num_classes=num_classes, drop_rate=drop_rate, activation=activation,
      block_name="nf_block")


class NFRegNet(NormFreeNet):
  """Normalizer-free RegNet with the published parameter tree.

  See `NormFreeNet` for the call contract. The published default activation
  was spelled 'swish' (which its own table lacked); both 'swish' and 'silu'
  work here.
  """

  def __init__(self, num_classes: int, variant: str = "B0", width: float = 0.75,
               expansion: float = 2.25, group_size: int = 8, se_ratio: float = 0.5,
               alpha: float = 0.2, stochdepth_rate: float = 0.1,
               drop_rate: Optional[float] = None, activation: str = "silu",
               fc_init: Optional[Initializer] = jnp.zeros, conv_impl: Optional[str] = None,
               block_loop: Optional[str] = None, name: Optional[str] = "NF_RegNet"):
    plan = nf_regnet_plan(num_classes, variant, width, expansion, group_size, se_ratio,
                          alpha, stochdepth_rate, drop_rate, activation)
    super().__init__(plan, fc_init=fc_init, conv_impl=conv_impl, block_loop=block_loop,
                     name=name)
    self.variant = variant
    self.train_imsize = VARIANTS[variant]["train_imsize"]
    self.test_imsize = VARIANTS[variant]["test_imsize"]
