"""Compile time of the NFNet train step: blocks scanned vs unrolled, same run.

For each variant, traces and compiles (nothing is executed, no weights are
allocated: the step is lowered on abstract shapes) the full train step,
forward + backward + `nfnet_optimizer` (AGC, weight decay, Nesterov), with
the default block loop ('auto': runs of 6 or more identical blocks as one
`jax.lax.scan`, see `nfnets_jax.models.network.block_loop`), optionally with
every run scanned ('scan'), and with every block inlined as the published code
did ('unroll'). Prints trace and compile seconds and the unrolled/default ratio. Optionally also times the steps' execution (`--run`), to show that the
scan costs no throughput.

Usage: python benchmarks/bench_compile.py [--variants F0,F3,F7] [--batch 8] [--size 128]
                                          [--modes auto,scan,unroll] [--run]
"""

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

from nfnets_jax.models import registry
from nfnets_jax.models.network import BLOCK_LOOPS, block_loop
from nfnets_jax.optim import nfnet_optimizer


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variants", default="F0,F3,F7")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--size", type=int, default=128)
  parser.add_argument("--modes", default="auto,unroll",
                      help=f"comma-separated subset of {', '.join(BLOCK_LOOPS)}")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--run", action="store_true",
                      help="also execute each compiled step and report ms/step (allocates weights)")
  parser.add_argument("--repeats", type=int, default=3)
  return parser.parse_args()


def build_step(variant: str, dtype):
  model = registry.transform(f"nfnet:{variant}", 1000)
  optimizer = nfnet_optimizer(0.1)

  def loss_fn(params, images, labels, key):
    logits = model.apply(params, key, images.astype(dtype), is_training=True)["logits"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def step(params, opt_state, images, labels, key):
    grads = jax.grad(loss_fn)(params, images, labels, key)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def init(key, images):
    params = model.init(key, images, is_training=True)
    return params, optimizer.init(params)

  return jax.jit(step, donate_argnums=(0, 1)), init


def measure(variant: str, mode: str, args, dtype) -> dict:
  with block_loop(mode):  # applies while tracing
    step, init = build_step(variant, dtype)
    images = jax.ShapeDtypeStruct((args.batch, args.size, args.size, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((args.batch,), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    params, opt_state = jax.eval_shape(init, key, images)
    start = time.perf_counter()
    lowered = step.lower(params, opt_state, images, labels, key)
    trace_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
  result = {"trace": trace_s, "compile": compile_s}
  if args.run:
    state = jax.jit(init)(jax.random.key(0), jnp.zeros(images.shape))
    x = jax.random.normal(jax.random.key(1), images.shape)
    y = jnp.arange(args.batch) % 1000
    times = []
    for i in range(args.repeats + 1):
      begin = time.perf_counter()
      state = compiled(*state, x, y, jax.random.key(i))
      jax.block_until_ready(state)
      times.append(time.perf_counter() - begin)
    result["step_ms"] = 1e3 * statistics.median(times[1:])
    del state
  return result


def main() -> None:
  args = parse_args()
  sys.stdout.reconfigure(line_buffering=True)
  modes = args.modes.split(",")
  unknown = set(modes) - set(BLOCK_LOOPS)
  if unknown:
    sys.exit(f"--modes: unknown {sorted(unknown)}; choose from {', '.join(BLOCK_LOOPS)}.")
  dtype = jnp.dtype(args.dtype)
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"JAX {jax.__version__} on {jax.devices()[0].device_kind}; train step "
        f"batch {args.batch} at {args.size}px, {args.dtype}; persistent cache off")
  for variant in args.variants.split(","):
    results = {mode: measure(variant, mode, args, dtype) for mode in modes}
    for mode, r in results.items():
      line = (f"{variant:<4} {mode:<7} trace {r['trace']:6.1f} s  compile {r['compile']:6.1f} s  "
              f"total {r['trace'] + r['compile']:6.1f} s")
      if "step_ms" in r:
        line += f"  step {r['step_ms']:8.1f} ms"
      print(line)
    for fast in ("auto", "scan"):
      if not {fast, "unroll"} <= set(results):
        continue
      total = {m: results[m]["trace"] + results[m]["compile"] for m in (fast, "unroll")}
      line = (f"{variant:<4} unroll/{fast} compile-time ratio "
              f"{total['unroll'] / total[fast]:.2f}")
      if args.run:
        line += (f", step-time ratio {results['unroll']['step_ms'] / results[fast]['step_ms']:.2f}"
                 f" (>1: {fast} is faster)")
      print(line)


if __name__ == "__main__":
  # The benchmark measures compilation itself: never read it from a cache.
  jax.config.update("jax_enable_compilation_cache", False)
  main()
