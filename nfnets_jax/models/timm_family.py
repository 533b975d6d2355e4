"""timm's normalizer-free models ('timm:<timm name>'), computing what timm's compute.

Every entry of timm's `timm/models/nfnet.py` is a row of `CONFIGS`, built on
this project's generic network (`network.NormFreeNet`) from a `NetworkPlan`.
Where timm's network is the published one it uses the same blocks; where it
is not, the plan says so:

* weight standardisation divides by `sqrt(fan_in * (var + 1e-5))`
  (`WeightStd(eps_in_variance=True)`), not `sqrt(max(fan_in * var, 1e-4))`;
* timm-native models (all but `dm_nfnet_*`) move each activation's gamma into
  the convolutions' weight scale (`gamma_in_conv`), pad symmetrically (PyTorch's
  `padding=(k - 1) // 2`) instead of SAME, have no SkipInit gain (the last conv
  of each branch starts with a zero gain instead) and round every channel count
  to a multiple of 8;
* GELU is evaluated exactly (erf), SiLU and ReLU are the plain functions;
* squeeze-excite widths are rounded to multiples of 8; the `eca_*` models gate
  with ECA (a 1-D convolution across channels) instead;
* NF-RegNets (timm's `reg` layout) widen from the block's input channels and
  gate between the grouped conv and the last conv; NF-ResNets use a 7x7 stem
  with symmetric max-pooling and average-pool before their projection shortcuts;
* stochastic depth divides kept branches by their keep probability, and its
  rate grows linearly from 0 at the first block to `stochdepth_rate` at the last.

The parameter tree is this project's (module `<timm name>/~/nf_block_3/~/conv0`,
HWIO kernels); `nfnets_jax.weights.timm` converts timm's state dicts both
ways. `train_imsize`/`test_imsize` are timm's `input_size`/`test_input_size`;
the drop rates are this project's training defaults (timm's models default to
none).
"""

import dataclasses
from typing import Any, Optional

import haiku as hk

from nfnets_jax.models import validation
from nfnets_jax.models.architecture import (BlockSpec, ConvSpec, NetworkPlan, StemSpec, WeightStd,
                                            block_slots)
from nfnets_jax.models.network import Initializer, NormFreeNet

#: Channel counts are rounded to multiples of this (timm's `ch_div`).
CHANNEL_DIVISOR = 8
#: timm's `std_conv_eps`, added to each kernel's variance.
TIMM_WS_EPS = 1e-5


def make_divisible(value: float, divisor: int = CHANNEL_DIVISOR, round_limit: float = 0.9) -> int:
  """`value` rounded to the nearest multiple of `divisor` (at least `divisor`), one
  multiple up when that lost more than `1 - round_limit` of it."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < round_limit * value else rounded


@dataclasses.dataclass(frozen=True)
class TimmConfig:
  """One row of timm's `model_cfgs`, in this project's words.

  `stem`: 'deep_quad' (four 3x3 convs to `stem_width`, NFNets), '3x3' (one,
  NF-RegNets) or '7x7_pool' (ResNet's). `bottleneck`: the branch width as a
  fraction of the output channels (of the input channels when `regnet`).
  `attention`: None, 'se' (hidden width `se_ratio` of the gated channels,
  a multiple of 8) or 'eca'. `head_width`: the final 1x1 conv's width before
  `width_factor` (None: no final conv). `deepmind`: the DeepMind-compatible
  form (gamma in the activations, SAME padding, SkipInit gains).
  """
  depths: tuple[int, int, int, int]
  channels: tuple[int, int, int, int]
  stem: str
  stem_width: Optional[int]
  group_size: Optional[int]
  bottleneck: float
  activation: str
  attention: Optional[str]
  se_ratio: float = 0.5
  head_width: Optional[int] = None
  width_factor: float = 1.0
  regnet: bool = False
  extra_conv: bool = False
  deepmind: bool = False
  alpha: float = 0.2


_F_DEPTHS = {f"f{i}": (i + 1, 2 * (i + 1), 6 * (i + 1), 3 * (i + 1)) for i in range(8)}
_F_CHANNELS = (256, 512, 1536, 1536)


def _nfnet(depths, channels=_F_CHANNELS, *, head_mult=2.0, group_size=128, bottleneck=0.5,
           activation="gelu_exact", attention="se", se_ratio=0.5,
           deepmind=False) -> TimmConfig:
  """An NFNet: deep stem to 128 channels, two grouped 3x3 convs per block, output gate."""
  return TimmConfig(depths=depths, channels=channels, stem="deep_quad", stem_width=128,
                    group_size=group_size, bottleneck=bottleneck, activation=activation,
                    attention=attention, se_ratio=se_ratio,
                    head_width=int(channels[-1] * head_mult), extra_conv=True, deepmind=deepmind)


def _regnet(depths, channels=(48, 104, 208, 440)) -> TimmConfig:
  """An NF-RegNet: 3x3 stem, inverted bottlenecks of group width 8, SE inside, EfficientNet head."""
  return TimmConfig(depths=depths, channels=channels, stem="3x3", stem_width=None, group_size=8,
                    bottleneck=2.25, activation="silu", attention="se", se_ratio=0.5,
                    head_width=1280 * channels[-1] // 440, width_factor=0.75, regnet=True)


def _resnet(depths, attention=None, se_ratio=1 / 16) -> TimmConfig:
  """A pre-activation NF-ResNet: 7x7 stem and max-pool, 1/4 bottlenecks, optional gate."""
  return TimmConfig(depths=depths, channels=(256, 512, 1024, 2048), stem="7x7_pool",
                    stem_width=64, group_size=None, bottleneck=0.25, activation="relu",
                    attention=attention, se_ratio=se_ratio)


def _light(depths, head_mult, attention="eca", se_ratio=0.25) -> TimmConfig:
  """timm's 'light' NFNets: SiLU, group width 64, 1/4 bottlenecks."""
  return _nfnet(depths, head_mult=head_mult, group_size=64, bottleneck=0.25, activation="silu",
                attention=attention, se_ratio=se_ratio)


_F_DROP = {"f0": 0.2, "f1": 0.3, "f2": 0.4, "f3": 0.4, "f4": 0.5, "f5": 0.5, "f6": 0.5,
           "f7": 0.5}
_F_SIZES = {"f0": (192, 256), "f1": (224, 320), "f2": (256, 352), "f3": (320, 416),
            "f4": (384, 512), "f5": (416, 544), "f6": (448, 576), "f7": (480, 608)}


def _row(config: TimmConfig, train: int, test: int, drop: float) -> dict[str, Any]:
  return {"config": config, "depth": list(config.depths), "train_imsize": train,
          "test_imsize": test, "drop_rate": drop}


#: timm name -> row: the configuration, timm's train/test resolutions, our dropout.
CONFIGS: dict[str, dict[str, Any]] = {
    **{f"dm_nfnet_{f}": _row(_nfnet(_F_DEPTHS[f], deepmind=True), *_F_SIZES[f], _F_DROP[f])
       for f in list(_F_DEPTHS)[:7]},
    **{f"nfnet_{f}": _row(_nfnet(_F_DEPTHS[f]), *_F_SIZES[f], _F_DROP[f]) for f in _F_DEPTHS},
    "nfnet_l0": _row(_light(_F_DEPTHS["f0"], 1.5, attention="se"), 224, 288, 0.2),
    "eca_nfnet_l0": _row(_light(_F_DEPTHS["f0"], 1.5), 224, 288, 0.2),
    "eca_nfnet_l1": _row(_light(_F_DEPTHS["f1"], 2.0), 256, 320, 0.3),
    "eca_nfnet_l2": _row(_light(_F_DEPTHS["f2"], 2.0), 320, 384, 0.4),
    "eca_nfnet_l3": _row(_light(_F_DEPTHS["f3"], 2.0), 352, 448, 0.4),
    "nf_regnet_b0": _row(_regnet((1, 3, 6, 6)), 192, 256, 0.2),
    "nf_regnet_b1": _row(_regnet((2, 4, 7, 7)), 256, 288, 0.2),
    "nf_regnet_b2": _row(_regnet((2, 4, 8, 8), (56, 112, 232, 488)), 240, 272, 0.3),
    "nf_regnet_b3": _row(_regnet((2, 5, 9, 9), (56, 128, 248, 528)), 288, 320, 0.3),
    "nf_regnet_b4": _row(_regnet((2, 6, 11, 11), (64, 144, 288, 616)), 320, 384, 0.4),
    "nf_regnet_b5": _row(_regnet((3, 7, 14, 14), (80, 168, 336, 704)), 384, 456, 0.4),
    "nf_resnet26": _row(_resnet((2, 2, 2, 2)), 224, 224, 0.2),
    "nf_resnet50": _row(_resnet((3, 4, 6, 3)), 256, 288, 0.2),
    "nf_resnet101": _row(_resnet((3, 4, 23, 3)), 224, 224, 0.2),
    "nf_seresnet26": _row(_resnet((2, 2, 2, 2), "se"), 224, 224, 0.2),
    "nf_seresnet50": _row(_resnet((3, 4, 6, 3), "se"), 224, 224, 0.2),
    "nf_seresnet101": _row(_resnet((3, 4, 23, 3), "se"), 224, 224, 0.2),
    "nf_ecaresnet26": _row(_resnet((2, 2, 2, 2), "eca"), 224, 224, 0.2),
    "nf_ecaresnet50": _row(_resnet((3, 4, 6, 3), "eca"), 224, 224, 0.2),
    "nf_ecaresnet101": _row(_resnet((3, 4, 23, 3), "eca"), 224, 224, 0.2),
    "test_nfnet": _row(_nfnet((1, 1, 1, 1), (32, 64, 96, 128), head_mult=1.5, group_size=8,
                              bottleneck=0.25, activation="silu", se_ratio=0.25), 160, 160, 0.2),
}


def _stem(config: TimmConfig, padding: str) -> tuple[StemSpec, int]:
  """The stem's convolutions and its total stride."""
  width = make_divisible((config.stem_width or config.channels[0]) * config.width_factor)
  if config.stem == "deep_quad":
    layers, kernel, max_pool, stride = (
        ((width // 8, 2), (width // 4, 1), (width // 2, 1), (width, 2)), 3, False, 4)
  elif config.stem == "3x3":
    layers, kernel, max_pool, stride = ((width, 2),), 3, False, 2
  else:
    layers, kernel, max_pool, stride = ((width, 2),), 7, True, 4
  convs, in_ch = [], 3
  for i, (out_ch, conv_stride) in enumerate(layers):
    convs.append(ConvSpec(f"stem_conv{i}", in_ch, out_ch, kernel, conv_stride, padding=padding))
    in_ch = out_ch
  return StemSpec(tuple(convs), max_pool=max_pool, pool_padding=padding), stride


def _block(config: TimmConfig, in_ch: int, out_ch: int, first: bool, padding: str,
           **slot: Any) -> BlockSpec:
  """One block: its branch width and groups, and where its gate sits, as timm sizes them."""
  ratio = 1.0 if config.regnet and first else config.bottleneck
  width = make_divisible((in_ch if config.regnet else out_ch) * ratio)
  groups = width // config.group_size if config.group_size else 1
  if config.group_size and config.group_size % CHANNEL_DIVISOR == 0:
    width = config.group_size * groups
  gated = width if config.regnet else out_ch
  se_hidden = (make_divisible(gated * config.se_ratio, round_limit=0.0)
               if config.attention == "se" else None)
  return BlockSpec(
      in_ch=in_ch, out_ch=out_ch, width=width, groups=groups, use_two_convs=config.extra_conv,
      se_position=(("bottleneck" if config.regnet else "output") if config.attention else None),
      se_ratio=config.se_ratio, attention=config.attention or "se", se_hidden_channels=se_hidden,
      pool_shortcut=True, skip_gain=config.deepmind, rescale_stochdepth=True, padding=padding,
      alpha=config.alpha, **slot)


def timm_plan(num_classes: int, variant: str = "eca_nfnet_l0", stochdepth_rate: float = 0.1,
              drop_rate: Optional[float] = None) -> NetworkPlan:
  """Resolves timm model `variant` into a `NetworkPlan` (validating every argument)."""
  row = validation.check_variant("timm", variant, CONFIGS)
  validation.check_num_classes(num_classes)
  validation.check_rate("stochdepth_rate", stochdepth_rate)
  drop_rate = validation.check_rate("drop_rate", row["drop_rate"] if drop_rate is None else drop_rate)
  config: TimmConfig = row["config"]
  padding = "SAME" if config.deepmind else "symmetric"

  stem, stem_stride = _stem(config, padding)
  strides = [1 if stem_stride > 2 else 2, 2, 2, 2]
  num_blocks = sum(config.depths)
  blocks, ch = [], stem.out_ch
  for slot in block_slots(config.depths, strides, config.alpha, 0.0):
    out_ch = make_divisible(config.channels[slot.stage] * config.width_factor)
    blocks.append(_block(
        config, ch, out_ch, slot.index == 0, padding, stride=slot.stride, beta=slot.beta,
        stochdepth_rate=stochdepth_rate * slot.index / max(num_blocks - 1, 1)))
    ch = out_ch
  final_conv = None
  if config.head_width:
    final_conv = ConvSpec("final_conv", ch, make_divisible(config.head_width * config.width_factor),
                          1, padding=padding)
  return NetworkPlan(
      stem=stem, blocks=tuple(blocks), final_conv=final_conv, num_classes=num_classes,
      drop_rate=drop_rate, activation=config.activation, block_name="nf_block",
      weight_std=WeightStd(TIMM_WS_EPS, eps_in_variance=True),
      gamma_in_conv=not config.deepmind)


class TimmNFNet(NormFreeNet):
  """A timm normalizer-free model (`CONFIGS`), as this project's network.

  See `NormFreeNet` for the call contract. The module is named after the
  model (`eca_nfnet_l0/~/...`), so its parameter tree says what it holds.
  The classifier starts as timm's: normal with standard deviation 0.01.
  """

  def __init__(self, num_classes: int, variant: str = "eca_nfnet_l0",
               stochdepth_rate: float = 0.1, drop_rate: Optional[float] = None,
               fc_init: Optional[Initializer] = None, conv_impl: Optional[str] = None,
               block_loop: Optional[str] = None, name: Optional[str] = None):
    plan = timm_plan(num_classes, variant, stochdepth_rate, drop_rate)
    if fc_init is None:
      fc_init = hk.initializers.RandomNormal(stddev=0.01)
    super().__init__(plan, fc_init=fc_init, conv_impl=conv_impl, block_loop=block_loop,
                     name=name or variant)
    self.variant = variant
    self.train_imsize = CONFIGS[variant]["train_imsize"]
    self.test_imsize = CONFIGS[variant]["test_imsize"]
