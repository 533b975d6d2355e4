"""NFNet F0-F7 and F0+..F7+ (Brock et al., 2021, "High-Performance Large-Scale
Image Recognition Without Normalization").

A new variant is a row in `VARIANTS` (or `TINY_VARIANTS`), not a class.
"""

from typing import Any, Optional

import haiku as hk

from nfnets_jax.models import validation
from nfnets_jax.models.architecture import BlockSpec, ConvSpec, NetworkPlan, StemSpec, block_slots
from nfnets_jax.models.network import Initializer, NormFreeNet

_F_WIDTHS = [256, 512, 1536, 1536]
_F_PLUS_WIDTHS = [384, 768, 2048, 2048]
# name: (depth per stage, train size, test size, RandAugment level, dropout)
_F_SERIES = {
    "F0": ([1, 2, 6, 3], 192, 256, "405", 0.2),
    "F1": ([2, 4, 12, 6], 224, 320, "410", 0.3),
    "F2": ([3, 6, 18, 9], 256, 352, "410", 0.4),
    "F3": ([4, 8, 24, 12], 320, 416, "415", 0.4),
    "F4": ([5, 10, 30, 15], 384, 512, "415", 0.5),
    "F5": ([6, 12, 36, 18], 416, 544, "415", 0.5),
    "F6": ([7, 14, 42, 21], 448, 576, "415", 0.5),
    "F7": ([8, 16, 48, 24], 480, 608, "415", 0.5),
}


def _row(widths, depth, train, test, ra_level, drop):
  return {"width": widths, "depth": depth, "train_imsize": train, "test_imsize": test,
          "RA_level": ra_level, "drop_rate": drop}


#: The published variants. Optional per-row keys: `expansion` (bottleneck ratio,
#: default 0.5 per stage), `group_width` (channels per group, default 128) and
#: `big_width` (bottleneck from the output rather than input width, default True).
VARIANTS: dict[str, dict[str, Any]] = {
    **{name: _row(_F_WIDTHS, *row) for name, row in _F_SERIES.items()},
    **{f"{name}+": _row(_F_PLUS_WIDTHS, *row) for name, row in _F_SERIES.items()},
}

#: Small variants for tests and CPU demos; not published, no checkpoints exist.
TINY_VARIANTS: dict[str, dict[str, Any]] = {
    "nano": {"width": [32, 64, 128, 128], "depth": [1, 1, 1, 1], "group_width": [16] * 4,
             "train_imsize": 32, "test_imsize": 32, "RA_level": "405", "drop_rate": 0.2},
}

ALL_VARIANTS = {**VARIANTS, **TINY_VARIANTS}

STEM_WIDTHS = (16, 32, 64)


def nfnet_plan(num_classes: int, variant: str = "F0", width: float = 1.0,
               se_ratio: Optional[float] = 0.5, alpha: float = 0.2,
               stochdepth_rate: float = 0.1, drop_rate: Optional[float] = None,
               activation: str = "gelu", final_conv_mult: Optional[float] = 2,
               final_conv_ch: Optional[int] = None, use_two_convs: bool = True) -> NetworkPlan:
  """Resolves an NFNet configuration into a `NetworkPlan` (validating every argument)."""
  row, drop_rate, activation = validation.check_nf_network(
      "NFNet", variant, ALL_VARIANTS, num_classes, width, stochdepth_rate, drop_rate, activation)
  if se_ratio is not None and se_ratio != 0:
    validation.check_positive("se_ratio", se_ratio)

  depths = row["depth"]
  expansions = row.get("expansion", [0.5] * 4)
  group_widths = row.get("group_width", [128] * 4)
  big_widths = row.get("big_width", [True] * 4)

  ch = row["width"][0] // 2
  stem_convs = [ConvSpec("stem_conv0", 3, STEM_WIDTHS[0], 3, 2)]
  for i, out in enumerate(STEM_WIDTHS[1:] + (ch,), start=1):
    stem_convs.append(ConvSpec(f"stem_conv{i}", stem_convs[-1].out_ch, out, 3, 2 if i == 3 else 1))

  blocks = []
  for slot in block_slots(depths, [1, 2, 2, 2], alpha, stochdepth_rate):
    out_ch = int(row["width"][slot.stage] * width)
    group_size = group_widths[slot.stage]
    base = out_ch if big_widths[slot.stage] else ch
    groups = int(base * expansions[slot.stage]) // group_size
    blocks.append(BlockSpec(
        in_ch=ch, out_ch=out_ch, width=group_size * groups, groups=groups,
        stride=slot.stride, beta=slot.beta, alpha=alpha,
        stochdepth_rate=slot.stochdepth_rate, use_two_convs=use_two_convs,
        se_position="output" if se_ratio else None, se_ratio=se_ratio or 0.0,
        pool_shortcut=True))
    ch = out_ch

  if final_conv_mult is None:
    if final_conv_ch is None:
      raise ValueError("NFNet needs final_conv_mult or final_conv_ch; both are None.")
    final_ch = final_conv_ch
  else:
    final_ch = int(final_conv_mult * ch)
  return NetworkPlan(
      stem=StemSpec(tuple(stem_convs)), blocks=tuple(blocks),
      final_conv=ConvSpec("final_conv", ch, final_ch, 1), num_classes=num_classes,
      drop_rate=drop_rate, activation=activation, block_name="nf_block")


class NFNet(NormFreeNet):
  """Normalizer-Free Network (NFNet-F series), with the published parameter tree.

  See `NormFreeNet` for the call contract. `train_imsize`/`test_imsize` give
  the variant's published resolutions.
  """

  def __init__(self, num_classes: int, variant: str = "F0", width: float = 1.0,
               se_ratio: Optional[float] = 0.5, alpha: float = 0.2,
               stochdepth_rate: float = 0.1, drop_rate: Optional[float] = None,
               activation: str = "gelu", fc_init: Optional[Initializer] = None,
               final_conv_mult: Optional[float] = 2, final_conv_ch: Optional[int] = None,
               use_two_convs: bool = True, conv_impl: Optional[str] = None,
               block_loop: Optional[str] = None, name: Optional[str] = "NFNet"):
    plan = nfnet_plan(num_classes, variant, width, se_ratio, alpha, stochdepth_rate,
                      drop_rate, activation, final_conv_mult, final_conv_ch, use_two_convs)
    if fc_init is None:
      fc_init = hk.initializers.RandomNormal(stddev=0.01)
    super().__init__(plan, fc_init=fc_init, conv_impl=conv_impl, block_loop=block_loop,
                     name=name)
    self.variant = variant
    self.train_imsize = ALL_VARIANTS[variant]["train_imsize"]
    self.test_imsize = ALL_VARIANTS[variant]["test_imsize"]
