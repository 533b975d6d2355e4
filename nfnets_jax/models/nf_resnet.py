"""NF-ResNets (Brock, De & Smith, 2021, "Characterizing signal propagation to
close the performance gap in unnormalized ResNets"): pre-activation bottleneck
ResNets with scaled weight standardisation instead of BatchNorm.
"""

from typing import Any, Optional

import haiku as hk

from nfnets_jax.models import validation
from nfnets_jax.models.architecture import BlockSpec, ConvSpec, NetworkPlan, StemSpec, block_slots
from nfnets_jax.models.network import Initializer, NormFreeNet

#: Depth per stage. The published table has no dropout rates (its default
#: `drop_rate=None` crashed); ours grow with depth like the F-series'.
VARIANTS: dict[str, dict[str, Any]] = {
    "ResNet50": {"depth": [3, 4, 6, 3], "drop_rate": 0.2},
    "ResNet101": {"depth": [3, 4, 23, 3], "drop_rate": 0.2},
    "ResNet152": {"depth": [3, 8, 36, 3], "drop_rate": 0.3},
    "ResNet200": {"depth": [3, 24, 36, 3], "drop_rate": 0.3},
    "ResNet288": {"depth": [24, 24, 24, 24], "drop_rate": 0.4},
    "ResNet600": {"depth": [50, 50, 50, 50], "drop_rate": 0.4},
}
STAGE_WIDTHS = (64, 128, 256, 512)
BOTTLENECK_RATIO = 0.25
TRAIN_IMSIZE = TEST_IMSIZE = 224


def nf_resnet_plan(num_classes: int, variant: str = "ResNet50", width: int = 4,
                   alpha: float = 0.2, stochdepth_rate: float = 0.1,
                   drop_rate: Optional[float] = None, activation: str = "relu",
                   use_se: bool = False, se_ratio: float = 0.25) -> NetworkPlan:
  """Resolves an NF-ResNet configuration into a `NetworkPlan`."""
  row, drop_rate, activation = validation.check_nf_network(
      "NF-ResNet", variant, VARIANTS, num_classes, width, stochdepth_rate, drop_rate, activation)
  if use_se:
    validation.check_positive("se_ratio", se_ratio)

  ch = int(16 * width)
  blocks = []
  for slot in block_slots(row["depth"], [1, 2, 2, 2], alpha, stochdepth_rate):
    out_ch = int(STAGE_WIDTHS[slot.stage] * width)
    blocks.append(BlockSpec(
        in_ch=ch, out_ch=out_ch, width=int(out_ch * BOTTLENECK_RATIO), groups=1,
        stride=slot.stride, beta=slot.beta, alpha=alpha,
        stochdepth_rate=slot.stochdepth_rate,
        se_position="output" if use_se else None, se_ratio=se_ratio,
        pool_shortcut=False))
    ch = out_ch
  return NetworkPlan(stem=resnet_stem(width), blocks=tuple(blocks), final_conv=None,
                     num_classes=num_classes, drop_rate=drop_rate, activation=activation,
                     block_name="nf_res_block")


def resnet_stem(width: float) -> StemSpec:
  """The ResNet stem: a 7x7 stride-2 convolution to 16 x `width` channels, then max-pooling."""
  return StemSpec((ConvSpec("initial_conv", 3, int(16 * width), 7, 2),), max_pool=True)


class NFResNet(NormFreeNet):
  """Normalizer-free pre-activation ResNet with the published parameter tree.

  See `NormFreeNet` for the call contract; `use_se` adds squeeze-excite to
  every block.
  """

  def __init__(self, num_classes: int, variant: str = "ResNet50", width: int = 4,
               alpha: float = 0.2, stochdepth_rate: float = 0.1,
               drop_rate: Optional[float] = None, activation: str = "relu",
               fc_init: Optional[Initializer] = None, use_se: bool = False,
               se_ratio: float = 0.25, conv_impl: Optional[str] = None,
               block_loop: Optional[str] = None, name: Optional[str] = "NF_ResNet"):
    plan = nf_resnet_plan(num_classes, variant, width, alpha, stochdepth_rate, drop_rate,
                          activation, use_se, se_ratio)
    if fc_init is None:
      fc_init = hk.initializers.RandomNormal(stddev=0.01)
    super().__init__(plan, fc_init=fc_init, conv_impl=conv_impl, block_loop=block_loop,
                     name=name)
    self.variant = variant
    self.train_imsize = TRAIN_IMSIZE
    self.test_imsize = TEST_IMSIZE
