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
from typing import Iterator, Optional


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """One weight-standardised convolution (square kernel, SAME padding)."""
  name: str
  in_ch: int
  out_ch: int
  kernel: int
  stride: int = 1
  groups: int = 1

  def output_hw(self, h: int, w: int) -> tuple[int, int]:
    return math.ceil(h / self.stride), math.ceil(w / self.stride)

  def macs(self, h: int, w: int) -> int:
    """Multiply-adds on an h x w input (the paper's FLOP count)."""
    oh, ow = self.output_hw(h, w)
    return oh * ow * self.out_ch * self.kernel * self.kernel * (self.in_ch // self.groups)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """A pre-activation residual block, general enough for all three families.

  out = shortcut(act(x) * beta) + alpha * skip_gain * stochdepth(branch(act(x) * beta))

  branch: conv0 (1x1 to `width`) -> act -> conv1 (kxk, `groups`, `stride`)
  [-> act -> conv1b (kxk, `groups`)] [-> SE if se_position == 'bottleneck']
  -> act -> conv2 (1x1 to out_ch) [-> SE if se_position == 'output'].
  The SE gate is multiplied by 2 to keep the branch's variance at init.
  shortcut: identity, or a 1x1 conv when the shape changes; when strided,
  NFNets/NF-RegNets average-pool first (`pool_shortcut`), NF-ResNets use a
  strided 1x1 conv.
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

  def __post_init__(self):
    if self.se_position not in (None, "output", "bottleneck"):
      raise ValueError(f"se_position must be None, 'output' or 'bottleneck', got {self.se_position!r}.")
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
    return max(1, int(self.se_channels * self.se_ratio))

  @property
  def convs(self) -> tuple[ConvSpec, ...]:
    """The block's convolutions in execution order (shortcut last)."""
    convs = [
        ConvSpec("conv0", self.in_ch, self.width, 1),
        ConvSpec("conv1", self.width, self.width, self.kernel, self.stride, self.groups),
    ]
    if self.use_two_convs:
      convs.append(ConvSpec("conv1b", self.width, self.width, self.kernel, 1, self.groups))
    convs.append(ConvSpec("conv2", self.width, self.out_ch, 1))
    if self.use_projection:
      stride = 1 if self.pool_shortcut else self.stride
      convs.append(ConvSpec("conv_shortcut", self.in_ch, self.out_ch, 1, stride))
    return tuple(convs)

  def macs(self, h: int, w: int) -> int:
    """Multiply-adds of the block on an h x w input."""
    total = 0
    oh, ow = math.ceil(h / self.stride), math.ceil(w / self.stride)
    for conv in self.convs:
      # conv0 and a strided shortcut conv see the input resolution; the rest see
      # the block's output resolution (an average-pooled shortcut included).
      at_input = conv.name == "conv0" or conv.name == "conv1" or conv.stride > 1
      total += conv.macs(h, w) if at_input else conv.macs(oh, ow)
    if self.se_position is not None:
      total += 2 * self.se_hidden * self.se_channels
    return total


@dataclasses.dataclass(frozen=True)
class StemSpec:
  """Convolutions before the first block, with an activation between them.

  No activation follows the last conv: every block starts by activating its
  input. `max_pool` adds the ResNet 3x3/2 max-pool after the convs.
  """
  convs: tuple[ConvSpec, ...]
  max_pool: bool = False

  @property
  def out_ch(self) -> int:
    return self.convs[-1].out_ch


@dataclasses.dataclass(frozen=True)
class NetworkPlan:
  """Everything needed to build a normalizer-free network."""
  stem: StemSpec
  blocks: tuple[BlockSpec, ...]
  final_conv: Optional[ConvSpec]
  num_classes: int
  drop_rate: float
  activation: str
  block_name: str

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
      h, w = math.ceil(h / 2), math.ceil(w / 2)
    for block in self.blocks:
      flops.append(block.macs(h, w))
      h, w = math.ceil(h / block.stride), math.ceil(w / block.stride)
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
