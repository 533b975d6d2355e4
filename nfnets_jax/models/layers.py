"""Building blocks shared by every normalizer-free family.

Parameter names (`w`, `gain`, `bias`; `squeeze_excite/~/linear{,_1}` with `w`,
`b`) are those of the published checkpoints and must not change.
"""

import dataclasses
import functools
from typing import Optional, Union

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets_jax.models import conv

# Variance floor of scaled weight standardisation (published value): keeps
# all-zero or constant filters from dividing by zero.
WS_EPS = 1e-4


def standardize_weight(w: jax.Array, gain: jax.Array, eps: float = WS_EPS, *,
                       eps_in_variance: bool = False, scale: float = 1.0) -> jax.Array:
  """Scaled weight standardisation of an HWIO kernel.

  `gain * (w - mean) / sqrt(max(fan_in * var, eps))`, with mean and variance
  over (H, W, I). Dividing by sqrt(fan_in) makes the layer variance preserving
  (like He init) for any weights, which is what lets NF networks drop
  BatchNorm. Written as `w * scale - mean * scale` so XLA fuses it into one pass.

  timm's form (`eps_in_variance`): `scale * gain * (w - mean) / sqrt(fan_in * (var + eps))`,
  where `scale` is the gamma of the activation the convolution reads when the
  network moves it into the kernel (`NetworkPlan.gamma_in_conv`).

  The statistics are taken over the rows of the kernel viewed as a
  (fan_in, O) matrix: XLA:CPU lowers the gradient of a reduction over axes
  (0, 1, 2) of a 1x1 kernel as a slow middle-axis reduction, and the same
  column sum of the 2-D view as a fast one (benchmarks/bench_conv.py).
  """
  shape = w.shape
  rows = w.reshape(-1, shape[-1])
  mean = jnp.mean(rows, axis=0)
  var = jnp.var(rows, axis=0)
  fan_in = rows.shape[0]
  if eps_in_variance:
    factor = jax.lax.rsqrt((var + eps) * fan_in) * (gain * scale)
  else:
    factor = jax.lax.rsqrt(jnp.maximum(var * fan_in, eps)) * gain
    if scale != 1.0:
      factor = factor * scale
  return (rows * factor - mean * factor).reshape(shape)


ConvParams = dict[str, jax.Array]  # {"w": HWIO kernel, "gain": (O,), "bias": (O,)}


@dataclasses.dataclass(frozen=True)
class Standardization:
  """The arguments of `standardize_weight` a network fixes for all its convolutions."""
  eps: float = WS_EPS
  eps_in_variance: bool = False
  scale: float = 1.0


#: The published models' standardisation.
PUBLISHED_STANDARDIZATION = Standardization()


def ws_conv2d(params: ConvParams, x: jax.Array, stride: int = 1, padding: conv.Padding = "SAME",
              groups: int = 1, conv_impl: str = "auto",
              standardization: Standardization = PUBLISHED_STANDARDIZATION) -> jax.Array:
  """The pure function `WSConv2D` applies: standardise in float32, convolve in x's dtype.

  Separate from the module so that a stack of identical blocks can run it
  inside `jax.lax.scan` on stacked parameters (see `network.py`). `conv_impl`
  is the convolution's lowering (see conv.py); `padding` 'SAME' or explicit pads.
  """
  kernel = standardize_weight(params["w"].astype(jnp.float32), params["gain"].astype(jnp.float32),
                              standardization.eps, eps_in_variance=standardization.eps_in_variance,
                              scale=standardization.scale)
  out = conv.conv2d(x, kernel.astype(x.dtype), stride, padding, groups, impl=conv_impl)
  return out + params["bias"].astype(x.dtype)


class WSConv2D(hk.Module):
  """2-D convolution (NHWC, HWIO) with scaled weight standardisation.

  Always has a learnable per-output-channel `gain` and `bias`. Standardisation
  runs in float32 whatever the compute dtype, then the kernel is cast to the
  input's dtype: in bfloat16 the mean/variance of a large kernel would
  otherwise lose most of their precision.

  `conv_impl` ('auto', 'xla' or 'decomposed'; None: `$NFNETS_JAX_CONV_IMPL`
  read now) fixes how the convolution is lowered, never what it computes.
  """

  def __init__(self,
               output_channels: int,
               kernel_shape: int,
               stride: int = 1,
               feature_group_count: int = 1,
               padding: conv.Padding = "SAME",
               conv_impl: Optional[str] = None,
               standardization: Standardization = PUBLISHED_STANDARDIZATION,
               gain_init: float = 1.0,
               name: Optional[str] = None):
    super().__init__(name=name)
    self.output_channels = output_channels
    self.kernel_shape = kernel_shape
    self.stride = stride
    self.feature_group_count = feature_group_count
    self.padding = padding
    self.conv_impl = conv.resolve_impl(conv_impl)
    self.standardization = standardization
    self.gain_init = gain_init

  def parameters(self, in_ch: int) -> ConvParams:
    """Creates (at init) or fetches (at apply) `w`, `gain` and `bias` for `in_ch` inputs."""
    if in_ch % self.feature_group_count:
      raise ValueError(
          f"{self.module_name}: {in_ch} input channels are not divisible by "
          f"feature_group_count={self.feature_group_count}.")
    k = self.kernel_shape
    w_shape = (k, k, in_ch // self.feature_group_count, self.output_channels)
    # Fan-in init; weight standardisation makes the result largely insensitive to it.
    # (The published VarianceScaling(1.0, "fan_in", "normal"), spelt as the
    # RandomNormal it builds, which `fast_init` can batch.)
    w_init = hk.initializers.RandomNormal(stddev=np.sqrt(1.0 / np.prod(w_shape[:-1])))
    return {
        "w": hk.get_parameter("w", w_shape, jnp.float32, init=w_init),
        "gain": hk.get_parameter("gain", (self.output_channels,), jnp.float32,
                                 init=_constant(self.gain_init)),
        "bias": hk.get_parameter("bias", (self.output_channels,), jnp.float32, init=jnp.zeros),
    }

  def __call__(self, x: jax.Array) -> jax.Array:
    return ws_conv2d(self.parameters(x.shape[-1]), x, self.stride, self.padding,
                     self.feature_group_count, self.conv_impl, self.standardization)


def _constant(value: float):
  if value == 1.0:
    return jnp.ones
  return jnp.zeros if value == 0.0 else hk.initializers.Constant(value)


class LinearParameters(hk.Module):
  """The `w` and `b` of an `hk.Linear`, created without applying the layer.

  Same names and initialisers as `hk.Linear` (truncated normal with stddev
  1/sqrt(fan_in), zero bias), and named `linear`, `linear_1`, ... the same way,
  so a parameter tree built with it is the published one.
  """

  def __init__(self, output_size: int, name: Optional[str] = "linear"):
    super().__init__(name=name)
    self.output_size = output_size

  def __call__(self, input_size: int) -> dict[str, jax.Array]:
    w_init = hk.initializers.TruncatedNormal(stddev=1.0 / np.sqrt(input_size))
    return {
        "w": hk.get_parameter("w", (input_size, self.output_size), jnp.float32, init=w_init),
        "b": hk.get_parameter("b", (self.output_size,), jnp.float32, init=jnp.zeros),
    }


def squeeze_excite(params: dict[str, dict[str, jax.Array]], x: jax.Array) -> jax.Array:
  """The pure function `SqueezeExcite` applies, on its parameter dict."""
  fc0, fc1 = params["linear"], params["linear_1"]
  h = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
  h = jax.nn.relu(h @ fc0["w"] + fc0["b"])
  h = jax.nn.sigmoid(h @ fc1["w"] + fc1["b"])
  return h[:, None, None, :].astype(x.dtype)


class SqueezeExcite(hk.Module):
  """Squeeze-and-excite gate: sigmoid(fc1(relu(fc0(mean_hw(x))))), shape (N,1,1,C).

  The gate runs in float32 (it is tiny) and is returned in the input's dtype.
  The hidden ReLU is the plain one, not gamma-scaled, as published.
  """

  def __init__(self, channels: int, hidden: int, name: Optional[str] = None):
    super().__init__(name=name)
    self.channels = channels
    self.hidden = hidden
    # Built here, not in __call__, so that they are named
    # `squeeze_excite/~/linear{,_1}` like the published checkpoints.
    self.fc0 = LinearParameters(hidden)
    self.fc1 = LinearParameters(channels)

  def parameters(self) -> dict[str, dict[str, jax.Array]]:
    """{'linear': fc0's {w, b}, 'linear_1': fc1's}, created at init, fetched at apply."""
    return {"linear": self.fc0(self.channels), "linear_1": self.fc1(self.hidden)}

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.shape[-1] != self.channels:
      raise ValueError(f"{self.module_name} was built for {self.channels} channels, "
                       f"got an input of shape {tuple(x.shape)}.")
    return squeeze_excite(self.parameters(), x)


def efficient_channel_attention(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
  """The pure function `ChannelAttention` applies, on its parameter dict {'w': (k,)}.

  Each channel's gate is sigmoid(sum_j w[j] * m[c + j - k // 2]) over the
  channels' spatial means m (zero beyond the ends): a k-tap filter sliding
  along the channel axis, shared by all channels.
  """
  w = params["w"].astype(jnp.float32)
  k = w.shape[0]
  m = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
  padded = jnp.pad(m, ((0, 0), (k // 2, k // 2)))
  channels = m.shape[-1]
  logits = sum(w[j] * padded[:, j:j + channels] for j in range(k))
  return jax.nn.sigmoid(logits)[:, None, None, :].astype(x.dtype)


class ChannelAttention(hk.Module):
  """ECA gate (Wang et al. 2020, "ECA-Net"): sigmoid(conv1d_k(mean_hw(x))), shape (N,1,1,C).

  One `w` of `kernel` taps, initialised uniformly in +-1/sqrt(kernel) (a
  PyTorch Conv1d's default, as timm's ECA models were trained).
  """

  def __init__(self, kernel: int, name: Optional[str] = "eca"):
    super().__init__(name=name)
    if kernel < 1 or kernel % 2 == 0:
      raise ValueError(f"ECA kernel size must be a positive odd number, got {kernel!r}.")
    self.kernel = kernel

  def parameters(self) -> dict[str, jax.Array]:
    bound = 1.0 / np.sqrt(self.kernel)
    return {"w": hk.get_parameter("w", (self.kernel,), jnp.float32,
                                  init=hk.initializers.RandomUniform(-bound, bound))}

  def __call__(self, x: jax.Array) -> jax.Array:
    return efficient_channel_attention(self.parameters(), x)


def stochastic_depth(x: jax.Array, drop_rate: float, is_training: bool) -> jax.Array:
  """Drops whole residual branches per example (batch-wise), without rescaling.

  The paper keeps the survivors unscaled (unlike inverted dropout), so the
  branch's expected output in training is `(1 - drop_rate)` times its
  inference output; inference uses every branch as is. Draws from
  `hk.next_rng_key()` only when it actually drops something.
  """
  if not is_training or drop_rate <= 0.0:
    return x
  return keep_branches(x, 1.0 - drop_rate, hk.next_rng_key())


def keep_branches(x: jax.Array, keep_prob: Union[float, jax.Array], key: jax.Array) -> jax.Array:
  """Zeroes each example's `x` with probability `1 - keep_prob` (the pure part of
  `stochastic_depth`; `keep_prob` may be traced, e.g. scanned over blocks)."""
  keep = jax.random.bernoulli(key, keep_prob, (x.shape[0], 1, 1, 1))
  return x * keep.astype(x.dtype)


class StochDepth(hk.Module):
  """Module form of `stochastic_depth`, for users composing their own blocks."""

  def __init__(self, drop_rate: float, name: Optional[str] = None):
    super().__init__(name=name)
    if not 0.0 <= drop_rate < 1.0:
      raise ValueError(f"StochDepth drop_rate must be in [0, 1), got {drop_rate!r}.")
    self.drop_rate = drop_rate

  def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
    return stochastic_depth(x, self.drop_rate, is_training)


def avg_pool_same(x: jax.Array, stride: int) -> jax.Array:
  """`stride` x `stride` average pooling of NHWC `x` with SAME padding.

  Equal to `hk.avg_pool(x, (1, s, s, 1), (1, s, s, 1), 'SAME')` (padding at the
  end, each window averaged over its real pixels) but written as pad + reshape +
  sum: XLA:CPU's reduce_window gave wrong sums on 1-pixel-wide maps in
  jax 0.10 (its YNNPACK path), and the reshape form is also cheaper.
  """
  n, h, w, c = x.shape
  oh, ow = -(-h // stride), -(-w // stride)
  pad_h, pad_w = oh * stride - h, ow * stride - w
  pads = ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0))

  def window_sums(a):
    return jnp.pad(a, pads).reshape(a.shape[0], oh, stride, ow, stride, a.shape[-1]).sum((2, 4))

  sums = window_sums(x)
  if not (pad_h or pad_w):
    return sums / jnp.asarray(stride * stride, x.dtype)
  counts = window_sums(jnp.ones((1, h, w, 1), x.dtype))
  return sums / counts


def max_pool_3x3(x: jax.Array, padding: str = "SAME") -> jax.Array:
  """3x3 stride-2 max pooling of NHWC `x`, padded 'SAME' or 'symmetric' (1 pixel each
  side, PyTorch's `MaxPool2d(3, 2, padding=1)`); padding never wins the max."""
  if padding == "SAME":
    return hk.max_pool(x, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1), padding="SAME")
  if padding != "symmetric":
    raise ValueError(f"padding must be 'SAME' or 'symmetric', got {padding!r}.")
  _, h, w, _ = x.shape
  oh, ow = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  # The max of the nine strided shifts of the padded map (one slice per window tap).
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  taps = [padded[:, i:i + 2 * oh - 1:2, j:j + 2 * ow - 1:2] for i in range(3) for j in range(3)]
  return functools.reduce(jnp.maximum, taps)


def signal_metrics(x: jax.Array, index: int) -> dict[str, jax.Array]:
  """Signal-propagation statistics of an NHWC activation (float32).

  `avg_sq_mean_{i}`: mean over channels of the squared channel mean;
  `avg_var_{i}`: mean over channels of the channel variance. These are the
  two curves of the NF papers' signal-propagation plots.
  """
  channel_means = jnp.mean(x.astype(jnp.float32), axis=(0, 1, 2))
  return {
      f"avg_sq_mean_{index}": jnp.mean(jnp.square(channel_means)),
      f"avg_var_{index}": average_channel_variance(x),
  }


def average_channel_variance(x: jax.Array) -> jax.Array:
  """Mean over channels of each channel's variance (the residual-branch metric)."""
  return jnp.mean(jnp.var(x.astype(jnp.float32), axis=(0, 1, 2)))

