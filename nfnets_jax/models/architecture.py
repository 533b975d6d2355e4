"""Pure-Python descriptions of normalizer-free networks.

Each family (NFNet, NF-ResNet, NF-RegNet) turns its variant table and
constructor arguments into a `NetworkPlan`: a list of convolutions and
residual blocks with every channel count, stride, group count and
signal-propagation constant resolved. One generic Haiku network
(`network.NormFreeNet`) is built from any plan, and FLOPs are counted from the
plan, so counting needs neither Haiku nor JAX.
"""

import dataclasses
import math
from typing import Iterator, Optional, Union

#: How a convolution or pooling window pads: 'SAME' (TensorFlow's, the published
#: models': output ceil(size / stride), the extra pixel at the end) or
#: 'symmetric' (PyTorch's: ((stride - 1) + (kernel - 1)) // 2 on each side).
PADDINGS = ("SAME", "symmetric")
#: The gates a block can apply: squeeze-excite (two linear layers) or ECA
#: (a 1-D convolution across channels, Wang et al. 2020).
ATTENTIONS = ("se", "eca")

Pads = Union[str, tuple[tuple[int, int], tuple[int, int]]]


def check_padding(padding: str) -> str:
  if padding not in PADDINGS:
    raise ValueError(f"padding must be one of {', '.join(PADDINGS)}, got {padding!r}.")
  return padding


def window_pads(padding: str, kernel: int, stride: int) -> Pads:
  """'SAME', or the explicit ((top, bottom), (left, right)) of symmetric padding."""
  if check_padding(padding) == "SAME":
    return "SAME"
  p = ((stride - 1) + (kernel - 1)) // 2
  return ((p, p), (p, p))


def window_output_size(size: int, padding: str, kernel: int, stride: int) -> int:
  """Output length of a `kernel`-wide window every `stride` pixels over `size` pixels."""
  pads = window_pads(padding, kernel, stride)
  if pads == "SAME":
    return math.ceil(size / stride)
  return (size + 2 * pads[0][0] - kernel) // stride + 1


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """One weight-standardised convolution (square kernel).

  `padding` is one of `PADDINGS`; `gain_init` the initial value of its gain
  (0 makes a residual branch start switched off when it has no SkipInit gain).
  """
  name: str
  in_ch: int
  out_ch: int
  kernel: int
  stride: int = 1
  groups: int = 1
  padding: str = "SAME"
  gain_init: float = 1.0

  def __post_init__(self):
    check_padding(self.padding)

  @property
  def pads(self) -> Pads:
    """The padding as `conv.conv2d` takes it."""
    return window_pads(self.padding, self.kernel, self.stride)

  def output_hw(self, h: int, w: int) -> tuple[int, int]:
    return (window_output_size(h, self.padding, self.kernel, self.stride),
            window_output_size(w, self.padding, self.kernel, self.stride))

  def macs(self, h: int, w: int) -> int:
    """Multiply-adds on an h x w input (the paper's FLOP count)."""
    oh, ow = self.output_hw(h, w)
    return oh * ow * self.out_ch * self.kernel * self.kernel * (self.in_ch // self.groups)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """A pre-activation residual block, general enough for all three families.

  out = shortcut(act(x) * beta) + alpha * skip_gain * stochdepth(branch(act(x) * beta))

  branch: conv0 (1x1 to `width`) -> act -> conv1 (kxk, `groups`, `stride`)
  [-> act -> conv1b (kxk, `groups`)] [-> gate if se_position == 'bottleneck']
  -> act -> conv2 (1x1 to out_ch) [-> gate if se_position == 'output'].
  The gate (`attention`: squeeze-excite or ECA) is multiplied by 2 to keep the
  branch's variance at init. shortcut: identity, or a 1x1 conv when the shape
  changes; when strided, NFNets/NF-RegNets average-pool first
  (`pool_shortcut`), NF-ResNets use a strided 1x1 conv.

  Variations timm's models need (the defaults are the published models'):
  `skip_gain=False` drops the SkipInit scalar and starts conv2's gain at 0
  instead; `rescale_stochdepth` divides kept branches by their keep
  probability in training; `padding` is every conv's (`PADDINGS`);
  `se_hidden` fixes the squeeze-excite width instead of `se_ratio` rounding down.
  """
  in_ch: int
  out_ch: int
  width: int
  groups: int
  stride: int
  beta: float
  alpha: float
  stochdepth_rate: float
  kernel: int = 3
  use_two_convs: bool = False
  se_position: Optional[str] = None  # None, 'output' or 'bottleneck'
  se_ratio: float = 0.5
  pool_shortcut: bool = True
  attention: str = "se"
  se_hidden_channels: Optional[int] = None
  skip_gain: bool = True
  rescale_stochdepth: bool = False
  padding: str = "SAME"

  def __post_init__(self):
    if self.se_position not in (None, "output", "bottleneck"):
      raise ValueError(f"se_position must be None, 'output' or 'bottleneck', got {self.se_position!r}.")
    if self.attention not in ATTENTIONS:
      raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, "
                       f"got {self.attention!r}.")
    check_padding(self.padding)
    if self.width < 1 or self.groups < 1 or self.width % self.groups:
      raise ValueError(
          f"Block width {self.width} must be a positive multiple of its group count "
          f"{self.groups}; the group size is larger than the bottleneck width.")

  @property
  def use_projection(self) -> bool:
    return self.stride > 1 or self.in_ch != self.out_ch

  @property
  def se_channels(self) -> int:
    return self.out_ch if self.se_position == "output" else self.width

  @property
  def se_hidden(self) -> int:
    if self.se_hidden_channels is not None:
      return self.se_hidden_channels
    return max(1, int(self.se_channels * self.se_ratio))

  @property
  def eca_kernel(self) -> int:
    """ECA's kernel size for `se_channels` C: floor((log2(C) + 1) / 2), made odd
    by adding 1 when even, and at least 3 (Wang et al. 2020, gamma 2 and b 1)."""
    t = int(abs(math.log2(self.se_channels) + 1) / 2)
    return max(t if t % 2 else t + 1, 3)

  @property
  def convs(self) -> tuple[ConvSpec, ...]:
    """The block's convolutions in execution order (shortcut last)."""
    pad = self.padding
    last_gain = 1.0 if self.skip_gain else 0.0
    convs = [
        ConvSpec("conv0", self.in_ch, self.width, 1, padding=pad),
        ConvSpec("conv1", self.width, self.width, self.kernel, self.stride, self.groups, pad),
    ]
    if self.use_two_convs:
      convs.append(ConvSpec("conv1b", self.width, self.width, self.kernel, 1, self.groups, pad))
    convs.append(ConvSpec("conv2", self.width, self.out_ch, 1, padding=pad, gain_init=last_gain))
    if self.use_projection:
      stride = 1 if self.pool_shortcut else self.stride
      convs.append(ConvSpec("conv_shortcut", self.in_ch, self.out_ch, 1, stride, padding=pad))
    return tuple(convs)

  def macs(self, h: int, w: int) -> int:
    """Multiply-adds of the block on an h x w input."""
    total = 0
    oh, ow = self.convs[1].output_hw(h, w)
    for conv in self.convs:
      # conv0 and a strided shortcut conv see the input resolution; the rest see
      # the block's output resolution (an average-pooled shortcut included).
      at_input = conv.name == "conv0" or conv.name == "conv1" or conv.stride > 1
      total += conv.macs(h, w) if at_input else conv.macs(oh, ow)
    if self.se_position is not None and self.attention == "se":
      total += 2 * self.se_hidden * self.se_channels
    elif self.se_position is not None:
      total += self.eca_kernel * self.se_channels
    return total


@dataclasses.dataclass(frozen=True)
class WeightStd:
  """How a convolution standardises its kernel (per output channel, over fan_in weights).

  Published: `gain * (w - mean) / sqrt(max(fan_in * var, eps))`, eps 1e-4.
  `eps_in_variance` (timm): `gain * (w - mean) / sqrt(fan_in * (var + eps))`.
  """
  eps: float = 1e-4
  eps_in_variance: bool = False


@dataclasses.dataclass(frozen=True)
class StemSpec:
  """Convolutions before the first block, with an activation between them.

  No activation follows the last conv: every block starts by activating its
  input. `max_pool` adds the ResNet 3x3/2 max-pool after the convs, padded
  as `pool_padding` says (`PADDINGS`).
  """
  convs: tuple[ConvSpec, ...]
  max_pool: bool = False
  pool_padding: str = "SAME"

  def __post_init__(self):
    check_padding(self.pool_padding)

  @property
  def out_ch(self) -> int:
    return self.convs[-1].out_ch


@dataclasses.dataclass(frozen=True)
class NetworkPlan:
  """Everything needed to build a normalizer-free network.

  `weight_std` says how every convolution standardises its kernel;
  `gamma_in_conv` moves each activation's gamma into the weight scale of the
  convolutions instead (timm's native models): the activations are then the
  plain functions, every convolution (the first, on the image, included)
  multiplies its kernel by gamma, and the pooled features are not scaled.
  """
  stem: StemSpec
  blocks: tuple[BlockSpec, ...]
  final_conv: Optional[ConvSpec]
  num_classes: int
  drop_rate: float
  activation: str
  block_name: str
  weight_std: "WeightStd" = dataclasses.field(default_factory=lambda: WeightStd())
  gamma_in_conv: bool = False

  @property
  def feature_dim(self) -> int:
    return self.final_conv.out_ch if self.final_conv else self.blocks[-1].out_ch

  def block_runs(self) -> list[range]:
    """The blocks split into maximal runs of interchangeable blocks.

    Blocks in one run have the same shapes and structure, differing only in
    `beta` and `stochdepth_rate`, and none changes its input's shape, so a
    run can execute as one loop over stacked parameters. A stage typically
    gives a run of one (its first, shape-changing block) and a run of the rest.
    """
    def key(block: BlockSpec):
      return dataclasses.replace(block, beta=0.0, stochdepth_rate=0.0)

    runs: list[range] = []
    for i, block in enumerate(self.blocks):
      # Equal keys mean equal channels and strides, so the run's first block
      # keeps its input's shape too.
      first = self.blocks[runs[-1].start] if runs else None
      same = (first is not None and not block.use_projection and key(block) == key(first)
              and (block.stochdepth_rate > 0) == (first.stochdepth_rate > 0))
      if same:
        runs[-1] = range(runs[-1].start, i + 1)
      else:
        runs.append(range(i, i + 1))
    return runs

  def count_flops(self, h: int, w: int) -> tuple[list[int], int]:
    """Per-layer multiply-adds (stem convs, blocks, final conv, classifier) and total."""
    flops = []
    for conv in self.stem.convs:
      flops.append(conv.macs(h, w))
      h, w = conv.output_hw(h, w)
    if self.stem.max_pool:
      h = window_output_size(h, self.stem.pool_padding, 3, 2)
      w = window_output_size(w, self.stem.pool_padding, 3, 2)
    for block in self.blocks:
      flops.append(block.macs(h, w))
      h, w = block.convs[1].output_hw(h, w)
    if self.final_conv is not None:
      flops.append(self.final_conv.macs(h, w))
    flops.append(self.feature_dim * self.num_classes)
    return flops, sum(flops)


@dataclasses.dataclass(frozen=True)
class BlockSlot:
  """Position and signal-propagation constants of one block in the body."""
  stage: int
  index_in_stage: int
  index: int
  stride: int
  beta: float
  stochdepth_rate: float


def block_slots(depths: tuple[int, ...] | list[int],
                strides: tuple[int, ...] | list[int],
                alpha: float,
                stochdepth_rate: float) -> Iterator[BlockSlot]:
  """Yields every block's stride, beta and stochastic-depth rate.

  beta = 1 / expected std of the block's input, so that the residual branch
  sees unit variance at init. The variance grows by alpha^2 per block and is
  reset at each stage's first block, whose projection shortcut outputs unit
  variance again (it still gets one block of growth). The drop rate grows
  linearly from 0 to `stochdepth_rate` over the network's blocks.
  """
  expected_std = 1.0
  num_blocks = sum(depths)
  index = 0
  for stage, (depth, stride) in enumerate(zip(depths, strides)):
    for i in range(depth):
      yield BlockSlot(
          stage=stage,
          index_in_stage=i,
          index=index,
          stride=stride if i == 0 else 1,
          beta=1.0 / expected_std,
          stochdepth_rate=stochdepth_rate * index / num_blocks)
      index += 1
      if i == 0:
        expected_std = 1.0
      expected_std = (expected_std ** 2 + alpha ** 2) ** 0.5
