"""Convolution lowerings: XLA's native convolution vs `conv2d`'s 'decomposed' one.

For the convolutions of NFNet-F0's blocks (batch 8 at 128 px, the CPU train
benchmark's setting) times, on the current JAX backend and alternating the two
lowerings in the same run:

* forward;
* training: forward + gradients for input and kernel (`value_and_grad` of
  `sum(y * cotangent)` with a fixed random cotangent, so nothing is elided).

and then, because XLA fuses and lays out a whole network differently from an
isolated convolution (on CPU the native weight gradient is far slower inside a
network than alone), the whole NFNet-F0 forward and forward+backward with each
lowering. Prints xla/decomposed time ratios (>1: decomposed is faster). This is
the measurement behind `nfnets_jax.models.conv`'s choice of lowering per backend.

With `--models` (any model names) the whole-model rows also give each program's
compile time (lowering + XLA compile, seconds).

Usage: python benchmarks/bench_conv.py [--batch 8] [--repeats 5] [--dtype bfloat16]
                                       [--variant F0] [--models nf_regnet:B0,nfnet:F0]
                                       [--models-only] [--no-model]
"""

import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from nfnets_jax.models import registry
from nfnets_jax.models.layers import standardize_weight
from timing import add_cpu_tuning_flag, alternate, apply_cpu_tuning  # benchmarks/timing.py
from nfnets_jax.models.conv import conv2d

# (name, spatial size, in channels, out channels, kernel, stride, groups) of
# F0's convs at 128 px input; NF-RegNet's 8-channel groups for comparison.
SHAPES = (
    ("stem 3x3/2 64->128", 64, 64, 128, 3, 2, 1),
    ("stage1 3x3 g1 (128-wide)", 32, 128, 128, 3, 1, 1),
    ("stage2 3x3 g2", 16, 256, 256, 3, 1, 2),
    ("stage3 3x3 g6", 8, 768, 768, 3, 1, 6),
    ("stage4 3x3 g6", 4, 768, 768, 3, 1, 6),
    ("stage1 1x1 128->256", 32, 128, 256, 1, 1, 1),
    ("stage3 1x1 1536->768", 8, 1536, 768, 1, 1, 1),
    ("stage3 1x1 768->1536", 8, 768, 1536, 1, 1, 1),
    ("regnet 3x3 g8-wide", 16, 256, 256, 3, 1, 32),
)


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--variant", default="F0", help="NFNet variant for the whole-model rows")
  parser.add_argument("--models", default="",
                      help="comma-separated model names for the whole-model rows "
                           "(e.g. nf_regnet:B0,nfnet:F0); default nfnet:<--variant>")
  parser.add_argument("--models-only", action="store_true",
                      help="only the whole-model rows (skip the single convolutions)")
  parser.add_argument("--size", type=int, default=128, help="image size for the whole-model rows")
  parser.add_argument("--no-model", action="store_true", help="skip the whole-model rows")
  add_cpu_tuning_flag(parser)
  return parser.parse_args()


def alternate_ms(fns: dict, args_: tuple, repeats: int) -> dict:
  """Median milliseconds per call of each fn on `args_` (compiled first), rounds interleaved."""
  calls = {key: (lambda fn=fn: jax.block_until_ready(fn(*args_))) for key, fn in fns.items()}
  for call in calls.values():
    call()
  return {key: seconds * 1e3 for key, seconds in alternate(calls, repeats).items()}


def _compiled(fns: dict, args_: tuple) -> tuple[dict, dict]:
  """Each jitted fn compiled for `args_`, and the seconds its lowering and compiling took."""
  compiled, seconds = {}, {}
  for key, fn in fns.items():
    start = time.perf_counter()
    compiled[key] = fn.lower(*args_).compile()
    seconds[key] = time.perf_counter() - start
  return compiled, seconds


def bench_model(args, dtype, name: str) -> None:
  """Whole-network forward and forward+backward with each lowering: compile, then run."""
  lowered = {impl: registry.transform(name, 1000, drop_rate=0.0, stochdepth_rate=0.0,
                                      conv_impl=impl)
             for impl in ("xla", "decomposed")}
  images = jax.random.normal(jax.random.key(1), (args.batch, args.size, args.size, 3))
  params = jax.jit(lowered["xla"].init, static_argnames="is_training")(
      jax.random.key(0), images[:1], is_training=False)
  fns = {}
  for impl in ("xla", "decomposed"):
    def logits(params, images, impl=impl):
      return lowered[impl].apply(params, None, images.astype(dtype), is_training=True)["logits"]

    def loss(params, images, impl=impl):
      return jnp.mean(jnp.square(logits(params, images, impl).astype(jnp.float32)))

    fns["fwd", impl] = jax.jit(logits)
    fns["train", impl] = jax.jit(jax.value_and_grad(loss))
  compiled, compile_s = _compiled(fns, (params, images))
  med = alternate_ms(compiled, (params, images), args.repeats)
  label = f"{name} {args.size}px (model)"
  print(f"{label:<26} {med['fwd', 'xla']:7.0f}ms {med['fwd', 'decomposed']:7.0f}ms "
        f"{med['fwd', 'xla'] / med['fwd', 'decomposed']:5.2f}x "
        f"{med['train', 'xla']:8.0f}ms {med['train', 'decomposed']:8.0f}ms "
        f"{med['train', 'xla'] / med['train', 'decomposed']:5.2f}x")
  print(f"{'  compile (lower+compile)':<26} {compile_s['fwd', 'xla']:8.1f}s "
        f"{compile_s['fwd', 'decomposed']:8.1f}s {'':>6} {compile_s['train', 'xla']:9.1f}s "
        f"{compile_s['train', 'decomposed']:9.1f}s")


def _standardize_4d(w, gain, eps=1e-4):
  """Weight standardisation with statistics over axes (0, 1, 2) of the HWIO kernel:
  the form `layers.standardize_weight` replaced (same values)."""
  mean = jnp.mean(w, axis=(0, 1, 2), keepdims=True)
  var = jnp.var(w, axis=(0, 1, 2), keepdims=True)
  scale = jax.lax.rsqrt(jnp.maximum(var * np.prod(w.shape[:-1]), eps)) * gain
  return w * scale - mean * scale


def bench_standardize(args) -> None:
  """Gradient of weight standardisation, 2-D statistics (ours) vs 4-D (HWIO axes)."""
  print(f"{'weight standardisation grad':<32} {'4-D axes':>9} {'2-D rows':>9} {'ratio':>6}")
  for shape in ((1, 1, 1536, 3072), (1, 1, 1536, 768), (3, 3, 128, 768)):
    w = jax.random.normal(jax.random.key(0), shape)
    cot = jax.random.normal(jax.random.key(1), shape)
    gain = jnp.ones(shape[-1])
    fns = {name: jax.jit(jax.grad(lambda w, g, fn=fn: jnp.sum(fn(w, g) * cot), (0, 1)))
           for name, fn in (("4d", _standardize_4d), ("2d", standardize_weight))}
    med = alternate_ms(fns, (w, gain), args.repeats)
    print(f"{str(shape):<32} {med['4d']:7.2f}ms {med['2d']:7.2f}ms {med['4d'] / med['2d']:5.2f}x")


def main() -> None:
  args = parse_args()
  tuning = apply_cpu_tuning(args)  # before any JAX work
  sys.stdout.reconfigure(line_buffering=True)
  dtype = jnp.dtype(args.dtype)
  print(f"backend {jax.default_backend()}: {jax.devices()[0].device_kind} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs), "
        f"JAX {jax.__version__}, {args.dtype}, batch {args.batch}")
  print(tuning)
  print(f"{'conv':<26} {'fwd xla':>9} {'fwd dec':>9} {'ratio':>6} "
        f"{'train xla':>10} {'train dec':>10} {'ratio':>6}")
  if not args.models_only:
    bench_convs(args, dtype)
    bench_standardize(args)
  if not args.no_model:
    for name in (args.models.split(",") if args.models else [f"nfnet:{args.variant}"]):
      bench_model(args, dtype, name)


def bench_convs(args, dtype) -> None:
  """Each convolution of SHAPES alone, forward and training, with each lowering."""
  totals = {"fwd": [0.0, 0.0], "train": [0.0, 0.0]}
  for name, hw, cin, cout, k, stride, groups in SHAPES:
    kx, kw, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (args.batch, hw, hw, cin), dtype)
    w = jax.random.normal(kw, (k, k, cin // groups, cout), dtype) * (k * k * cin // groups) ** -0.5
    out_hw = -(-hw // stride)
    cotangent = jax.random.normal(kc, (args.batch, out_hw, out_hw, cout), jnp.float32)
    fns = {}
    for impl in ("xla", "decomposed"):
      def fwd(x, w, impl=impl):
        return conv2d(x, w, stride, "SAME", groups, impl=impl)

      def loss(x, w, impl=impl):
        return jnp.sum(fwd(x, w).astype(jnp.float32) * cotangent)

      fns["fwd", impl] = jax.jit(fwd)
      fns["train", impl] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    med = alternate_ms(fns, (x, w), args.repeats)
    for kind in totals:
      totals[kind][0] += med[kind, "xla"]
      totals[kind][1] += med[kind, "decomposed"]
    print(f"{name:<26} {med['fwd', 'xla']:7.1f}ms {med['fwd', 'decomposed']:7.1f}ms "
          f"{med['fwd', 'xla'] / med['fwd', 'decomposed']:5.2f}x "
          f"{med['train', 'xla']:8.1f}ms {med['train', 'decomposed']:8.1f}ms "
          f"{med['train', 'xla'] / med['train', 'decomposed']:5.2f}x")
  fwd, train = totals["fwd"], totals["train"]
  print(f"{'sum':<26} {fwd[0]:7.1f}ms {fwd[1]:7.1f}ms {fwd[0] / fwd[1]:5.2f}x "
        f"{train[0]:8.1f}ms {train[1]:8.1f}ms {train[0] / train[1]:5.2f}x")
  print("ratio = xla time / decomposed time (>1: decomposed is faster)")


if __name__ == "__main__":
  main()
