"""Compile time of the NFNet train step: blocks scanned vs unrolled, same run.

For each variant, traces and compiles (nothing is executed, no weights are
allocated: the step is lowered on abstract shapes) the full train step,
forward + backward + `nfnet_optimizer` (AGC, weight decay, Nesterov), as
training compiles large models: one gradient program and one update program
(see `nfnets_jax.train.steps.SEPARATE_UPDATE_MIN_LEAVES`). Block loops compared: the default
('auto': runs of 6 or more identical blocks as one `jax.lax.scan`, see
`nfnets_jax.models.network.block_loop`), optionally every run scanned
('scan'), and every block inlined as the published code did ('unroll').
Prints trace and compile seconds and the unrolled/default ratio. With
`--one-program`, also compiles gradient and update as a single program and
prints its time over the two programs'. With `--run`, also times the steps'
execution, to show that the scan costs no throughput.

Usage: python benchmarks/bench_compile.py [--variants F0,F3,F7] [--batch 8] [--size 128]
                                          [--modes auto,scan,unroll] [--one-program] [--run]
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
  parser.add_argument("--one-program", action="store_true",
                      help="also compile gradient and update as one program (the published "
                           "form) and print its time over the two programs'")
  return parser.parse_args()


def build_step(variant: str, dtype):
  """The train step as `nfnets_jax.train.steps` compiles large models: a gradient
  program and an update program; and `one`, both as one program."""
  model = registry.transform(f"nfnet:{variant}", 1000)
  optimizer = nfnet_optimizer(0.1)

  def loss_fn(params, images, labels, key):
    logits = model.apply(params, key, images.astype(dtype), is_training=True)["logits"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def update(grads, params, opt_state):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def one(params, opt_state, images, labels, key):
    return update(jax.grad(loss_fn)(params, images, labels, key), params, opt_state)

  def init(key, images):
    params = model.init(key, images, is_training=True)
    return params, optimizer.init(params)

  return {"grad": jax.jit(jax.grad(loss_fn)), "update": jax.jit(update, donate_argnums=(1, 2)),
          "one": jax.jit(one, donate_argnums=(0, 1))}, init


def _timed(fn, *args):
  start = time.perf_counter()
  out = fn(*args)
  return out, time.perf_counter() - start


def measure(variant: str, mode: str, args, dtype) -> dict:
  """Trace and compile seconds of the two-program step ('trace', 'compile') and,
  with --one-program, of the single program ('one_trace', 'one_compile')."""
  with block_loop(mode):  # applies while tracing
    fns, init = build_step(variant, dtype)
    images = jax.ShapeDtypeStruct((args.batch, args.size, args.size, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((args.batch,), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    params, opt_state = jax.eval_shape(init, key, images)
    grad_low, grad_trace = _timed(fns["grad"].lower, params, images, labels, key)
    update_low, update_trace = _timed(fns["update"].lower, params, params, opt_state)
    grad_step, grad_compile = _timed(grad_low.compile)
    update_step, update_compile = _timed(update_low.compile)
    result = {"trace": grad_trace + update_trace, "compile": grad_compile + update_compile}
    if args.one_program:
      one_low, result["one_trace"] = _timed(fns["one"].lower, params, opt_state, images, labels,
                                            key)
      _, result["one_compile"] = _timed(one_low.compile)
  if args.run:
    params, opt_state = jax.jit(init)(jax.random.key(0), jnp.zeros(images.shape))
    x = jax.random.normal(jax.random.key(1), images.shape)
    y = jnp.arange(args.batch) % 1000
    times = []
    for i in range(args.repeats + 1):
      begin = time.perf_counter()
      grads = grad_step(params, x, y, jax.random.key(i))
      params, opt_state = update_step(grads, params, opt_state)
      jax.block_until_ready(params)
      times.append(time.perf_counter() - begin)
    result["step_ms"] = 1e3 * statistics.median(times[1:])
    del params, opt_state
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
      if "one_compile" in r:
        one = r["one_trace"] + r["one_compile"]
        print(f"{variant:<4} {mode:<7} one program: trace {r['one_trace']:6.1f} s  compile "
              f"{r['one_compile']:6.1f} s  total {one:6.1f} s; one/two-program ratio "
              f"{one / (r['trace'] + r['compile']):.2f}")
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
