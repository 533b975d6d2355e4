"""2-D convolution with a lowering chosen per backend.

XLA:CPU is slow on two things NF networks do in every block
(benchmarks/bench_conv.py times them):

* grouped convolutions (`feature_group_count > 1`): slower forward than the
  same work as one dense convolution per group;
* weight gradients: autodiff turns dL/dW into a convolution whose "batch" is
  the input channels and whose window is the whole image, after transposing
  both operands, where a matrix product per kernel tap does the same sums.

So `conv2d` has two lowerings with the same parameters and the same sums:

* `"xla"`: one `lax.conv_general_dilated` with `feature_group_count`, plain
  autodiff. The reference, and the fast path on GPU and TPU.
* `"decomposed"`: forward and input gradient as one dense convolution per
  group (a matrix product for 1x1 kernels); weight gradient, via a custom
  VJP, as one matrix product per kernel tap, contracting over batch and
  space (`sum_nhw x[n, s*h+i, s*w+j, c] * dy[n, h, w, d]`), batched over
  groups.

In bfloat16/float16 the decomposed lowering's matrix products (1x1 kernels
and their gradients) take low-precision operands and return float32, rounded
once: XLA:CPU runs that form faster than a product returning bfloat16.

`"auto"` picks `"decomposed"` on CPU and `"xla"` elsewhere. The choice is
an argument fixed where a model is built (`models.transform(...,
conv_impl=...)`, `WSConv2D(..., conv_impl=...)`); left unset there, it is read
from `NFNETS_JAX_CONV_IMPL` at that moment (`default_impl`), never while a
function is traced. The kernel stays one HWIO array either way, so parameters
and checkpoints are unchanged. Measurements: docs/performance.md.
"""

import functools
import os
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp

IMPLS = ("auto", "xla", "decomposed")
ENV_VAR = "NFNETS_JAX_CONV_IMPL"
# Forward per-group splitting pays off from groups of 8 channels (NF-RegNet)
# upwards; narrower groups (depthwise) keep XLA's grouped kernel for the
# forward pass and input gradient, and still get the matmul weight gradient.
MIN_SPLIT_GROUP_WIDTH = 8

Padding = Union[str, Sequence[tuple[int, int]]]
_DIMS = ("NHWC", "HWIO", "NHWC")


def check_impl(impl: str, source: str) -> str:
  """`impl` if it is one of `IMPLS`, else a ValueError naming `source` and the choices."""
  if impl not in IMPLS:
    raise ValueError(f"Unknown convolution implementation {impl!r} from {source}; "
                     f"expected one of {', '.join(IMPLS)}.")
  return impl


def default_impl() -> str:
  """`$NFNETS_JAX_CONV_IMPL` as it is now, or 'auto' when unset.

  Read by the model builders when they are not given a `conv_impl`, so the
  variable fixes the lowering of models built after it is set.
  """
  return check_impl(os.environ.get(ENV_VAR, "auto"), f"${ENV_VAR}")


def resolve_impl(impl: Optional[str] = None, backend: Optional[str] = None) -> str:
  """'xla' or 'decomposed': `impl` (None: `default_impl()`), 'auto' resolved for `backend`
  (default: JAX's default backend)."""
  impl = default_impl() if impl is None else check_impl(impl, "the conv_impl argument")
  if impl != "auto":
    return impl
  backend = backend or jax.default_backend()
  return "decomposed" if backend == "cpu" else "xla"


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1, padding: Padding = "SAME",
           groups: int = 1, impl: str = "auto") -> jax.Array:
  """NHWC x HWIO convolution with `groups` feature groups (kernel I = in_channels / groups).

  `impl` is 'xla', 'decomposed' or 'auto' (by JAX's default backend); no
  environment variable is read here.
  """
  if isinstance(padding, str):
    padding = padding.upper()
  else:
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  impl = check_impl(impl, "the impl argument")
  if impl == "auto":
    impl = resolve_impl("auto")
  if impl == "xla":
    return _xla_conv(x, kernel, stride, padding, groups)
  return _decomposed_conv(x, kernel, stride, padding, groups)


def _xla_conv(x, kernel, stride, padding, groups, lhs_dilation=1):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                      lhs_dilation=(lhs_dilation, lhs_dilation),
                                      dimension_numbers=_DIMS, feature_group_count=groups)


def _explicit_pads(in_hw, kernel_hw, stride, padding):
  """((lo, hi), (lo, hi)) for the height and width of `padding` (a name or explicit)."""
  if isinstance(padding, str):
    return jax.lax.padtype_to_pads(in_hw, kernel_hw, (stride, stride), padding)
  return padding


# Inputs narrower than float32, whose products XLA:CPU runs twice as fast when
# asked for float32 results (see `_pixel_matmul`).
_LOW_PRECISION = (jnp.bfloat16, jnp.float16)


def _low_precision_product(a: jax.Array, b: jax.Array, dims) -> jax.Array:
  """`dot_general(a, b, dims)` accumulated and returned in float32."""
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _low_precision_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  return _low_precision_product(x, w, (((1,), (0,)), ((), ()))).astype(x.dtype)


def _low_precision_matmul_fwd(x, w):
  return _low_precision_matmul(x, w), (x, w)


def _low_precision_matmul_bwd(residuals, dy):
  x, w = residuals
  dx = _low_precision_product(dy, w, (((1,), (1,)), ((), ()))).astype(x.dtype)
  # `_decomposed_conv` uses only dx (its weight gradient is `kernel_gradient`'s)
  # and jit drops this product there; any other caller that differentiates
  # `_dense_conv` gets a true dw.
  dw = _low_precision_product(x, dy, (((0,), (0,)), ((), ()))).astype(w.dtype)
  return dx, dw


_low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)


def _pixel_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """`einsum('nhwc,cd->nhwd', x, w)`; in bfloat16/float16 with float32 accumulation.

  XLA:CPU runs a bfloat16 product that returns bfloat16 at float32 speed, and
  faster when the product returns float32, which it then rounds once (see
  docs/performance.md). Autodiff of that form would multiply the float32
  cotangent by the bfloat16 kernel, the slow way, hence the custom VJP: both
  gradients are products of the low-precision operands, accumulated in float32.
  """
  if x.dtype not in _LOW_PRECISION or w.dtype != x.dtype:
    return jnp.einsum("nhwc,cd->nhwd", x, w)
  n, h, wd, c = x.shape
  return _low_precision_matmul(x.reshape(n * h * wd, c), w).reshape(n, h, wd, w.shape[1])


def _dense_conv(x, kernel, stride, padding, lhs_dilation=1):
  """One group: a matrix product for 1x1 kernels, else XLA's dense convolution."""
  if (kernel.shape[:2] == (1, 1) and lhs_dilation == 1
      and (isinstance(padding, str) or not any(sum(padding, ())))):
    # A 1x1 kernel never pads under SAME or VALID; striding is subsampling.
    return _pixel_matmul(x[:, ::stride, ::stride], kernel[0, 0])
  return _xla_conv(x, kernel, stride, padding, 1, lhs_dilation)


def _split_forward(x, kernel, stride, padding, groups, lhs_dilation=1):
  in_width, out_width = kernel.shape[2], kernel.shape[3] // groups
  if groups == 1:
    return _dense_conv(x, kernel, stride, padding, lhs_dilation)
  if in_width < MIN_SPLIT_GROUP_WIDTH:
    return _xla_conv(x, kernel, stride, padding, groups, lhs_dilation)
  return jnp.concatenate([
      _dense_conv(x[..., g * in_width:(g + 1) * in_width],
                  kernel[..., g * out_width:(g + 1) * out_width], stride, padding, lhs_dilation)
      for g in range(groups)], axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _decomposed_conv(x, kernel, stride, padding, groups):
  return _split_forward(x, kernel, stride, padding, groups)


def _decomposed_fwd(x, kernel, stride, padding, groups):
  return _split_forward(x, kernel, stride, padding, groups), (x, kernel)


def _decomposed_bwd(stride, padding, groups, residuals, dy):
  x, kernel = residuals
  if kernel.shape[:2] == (1, 1):
    # Matrix products (and a strided scatter): autodiff's own transpose is optimal.
    _, x_vjp = jax.vjp(lambda x: _split_forward(x, kernel, stride, padding, groups), x)
    (dx,) = x_vjp(dy)
  else:
    dx = input_gradient(dy, kernel, x.shape, stride, padding, groups)
  return dx, kernel_gradient(x, dy, kernel.shape, stride, padding, groups).astype(kernel.dtype)


def _transposed_kernel(kernel: jax.Array, groups: int) -> jax.Array:
  """The kernel of the input gradient: taps reversed, each group's I and O swapped.

  Materialised behind an optimisation barrier: otherwise XLA folds the swap
  into the convolution's dimension labels ('01oi'), a form XLA:CPU's fast
  convolution path does not take inside a `lax.scan` body.
  """
  kh, kw, in_width, out_ch = kernel.shape
  k = kernel[::-1, ::-1].reshape(kh, kw, in_width, groups, out_ch // groups)
  k = jnp.transpose(k, (0, 1, 4, 3, 2)).reshape(kh, kw, out_ch // groups, groups * in_width)
  return jax.lax.optimization_barrier(k)


def input_gradient(dy: jax.Array, kernel: jax.Array, x_shape: Sequence[int], stride: int,
                   padding: Padding, groups: int) -> jax.Array:
  """dL/dx of a grouped NHWC x HWIO convolution, as a (per-group) convolution of dy.

  The classic transposed convolution: dy dilated by the stride, padded so the
  result has x's size, convolved with `_transposed_kernel`.
  """
  kh, kw = kernel.shape[:2]
  in_hw, out_hw = x_shape[1:3], dy.shape[1:3]
  pads = _explicit_pads(in_hw, (kh, kw), stride, padding)
  grad_pads = []
  for size_in, size_out, k, (lo, _) in zip(in_hw, out_hw, (kh, kw), pads):
    before = k - 1 - lo
    grad_pads.append((before, size_in + k - 1 - ((size_out - 1) * stride + 1) - before))
  return _split_forward(dy, _transposed_kernel(kernel, groups), 1, tuple(grad_pads), groups,
                        lhs_dilation=stride)


_decomposed_conv.defvjp(_decomposed_fwd, _decomposed_bwd)


def kernel_gradient(x: jax.Array, dy: jax.Array, kernel_shape: Sequence[int], stride: int,
                    padding: Padding, groups: int) -> jax.Array:
  """dL/dW of a grouped NHWC x HWIO convolution, as one matmul per kernel tap.

  Tap (i, j) of the kernel only ever multiplies the input window that starts
  at (i, j) of the padded input, taken every `stride` pixels, so its gradient
  is that window contracted with `dy` over batch and space. Accumulates in
  float32 whatever the input dtype.

  Without groups each tap is a plain 2-D product contracting the leading
  (batch x space) axis of both operands, which XLA:CPU runs on the operands
  as they lie; written with a size-1 group axis it became a batched product
  for which XLA first copied an operand into (channels, batch x space) order,
  one copy per tap.
  """
  kh, kw, in_width, out_ch = kernel_shape
  n, oh, ow, _ = dy.shape
  pads = _explicit_pads(x.shape[1:3], (kh, kw), stride, padding)
  xp = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
  dyg = dy.reshape(n * oh * ow, out_ch) if groups == 1 else dy.reshape(
      n, oh, ow, groups, out_ch // groups)
  taps = []
  for i in range(kh):
    for j in range(kw):
      window = jax.lax.slice(xp, (0, i, j, 0),
                             (n, i + stride * (oh - 1) + 1, j + stride * (ow - 1) + 1,
                              xp.shape[3]), (1, stride, stride, 1))
      if groups == 1:
        taps.append(jax.lax.dot_general(window.reshape(n * oh * ow, in_width), dyg,
                                        (((0,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32))
        continue
      window = window.reshape(n, oh, ow, groups, in_width)
      taps.append(jnp.einsum("nhwgc,nhwgd->cgd", window, dyg,
                             preferred_element_type=jnp.float32).reshape(in_width, out_ch))
  return jnp.stack(taps).reshape(kh, kw, in_width, out_ch)
