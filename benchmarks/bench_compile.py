"""Compile time of the NFNet train step: parameter layouts and block loops, same run.

For each variant, traces and compiles (nothing is executed, no weights are
allocated: the step is lowered on abstract shapes) the full train step,
forward + backward + `nfnet_optimizer` (AGC, weight decay, Nesterov), in the
form training compiles it: one program, or a gradient program and an update
program from `nfnets_jax.train.steps.SEPARATE_UPDATE_MIN_LEAVES` parameter
arrays. Compared:

* parameter layouts (`--layouts`): 'stacked', the model's own layout as
  `models.transform` gives it and training keeps it (each scanned run's
  parameters stacked, see `nfnets_jax.models.stacking`): the step a user
  writes over the public API (`models.transform` + `nfnet_optimizer`); and
  'published', the same model trained on the per-block tree of checkpoint
  files (every scanned gradient unstacked, every block's leaves updated
  separately);
* block loops (`--modes`, the models' `block_loop` argument): the default
  ('auto': runs of 6 or more identical blocks as one `jax.lax.scan`), every
  run scanned ('scan'), and every block inlined as the published code did
  ('unroll').

Prints trace and compile seconds and the published/stacked and unroll/auto
ratios. `--both-forms` also compiles the other form (one program where
training uses two, or two where it uses one) and prints its time over the
trained form's. `--run` also times the steps' execution.

`--transforms fast,haiku` compares the model built as training builds it
(`models.transform`, with `nfnets_jax.models.fast_init`) with plain
`hk.transform` of the same network (`fast_init=False`); `--init` also
compiles each one's jitted initialisation (model and optimizer), which is
where they differ: `fast_init` batches the random draws.

Usage: python benchmarks/bench_compile.py [--variants F0,F3,F7] [--batch 8] [--size 128]
                                          [--layouts stacked,published] [--modes auto,unroll]
                                          [--transforms fast,haiku] [--init]
                                          [--both-forms] [--run]
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

from nfnets_jax import models
from nfnets_jax.optim import nfnet_optimizer
from nfnets_jax.train.steps import SEPARATE_UPDATE_MIN_LEAVES
from timing import add_cpu_tuning_flag, apply_cpu_tuning  # benchmarks/timing.py

LAYOUTS = ("stacked", "published")
TRANSFORMS = ("fast", "haiku")


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variants", default="F0,F3,F7")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--size", type=int, default=128)
  parser.add_argument("--layouts", default="stacked,published",
                      help=f"comma-separated subset of {', '.join(LAYOUTS)}")
  parser.add_argument("--modes", default="auto",
                      help=f"comma-separated subset of {', '.join(models.BLOCK_LOOPS)}")
  parser.add_argument("--transforms", default="fast",
                      help=f"comma-separated subset of {', '.join(TRANSFORMS)}")
  parser.add_argument("--init", action="store_true",
                      help="also compile the jitted initialisation (model and optimizer)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--run", action="store_true",
                      help="also execute each compiled step and report ms/step (allocates weights)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--both-forms", action="store_true",
                      help="also compile the step in the form training does not use (one "
                           "program or two) and print its time over the trained form's")
  add_cpu_tuning_flag(parser)
  return parser.parse_args()


def build_step(variant: str, dtype, mode: str, layout_name: str, transform: str):
  """The train step's pieces, written over the public API: the gradient
  program, the update program, both as one program, and the initialiser
  (parameters in the model's own layout, or with `layout_name` 'published'
  in the published tree)."""
  name = f"nfnet:{variant}"
  model = models.transform(name, 1000, block_loop=mode, fast_init=transform == "fast")
  layout = models.stacked_layout(name, 1000, block_loop=mode)
  as_given = layout.to_published if layout_name == "published" else (lambda params: params)
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
    params = as_given(model.init(key, images, is_training=True))
    return params, optimizer.init(params)

  return {"grad": jax.jit(jax.grad(loss_fn)), "update": jax.jit(update, donate_argnums=(1, 2)),
          "one": jax.jit(one, donate_argnums=(0, 1))}, init


def _timed(fn, *args):
  start = time.perf_counter()
  out = fn(*args)
  return out, time.perf_counter() - start


def _compile_two(fns, params, opt_state, images, labels, key):
  grad_low, grad_trace = _timed(fns["grad"].lower, params, images, labels, key)
  update_low, update_trace = _timed(fns["update"].lower, params, params, opt_state)
  grad_step, grad_compile = _timed(grad_low.compile)
  update_step, update_compile = _timed(update_low.compile)

  def step(params, opt_state, x, y, key):
    return update_step(grad_step(params, x, y, key), params, opt_state)

  return step, grad_trace + update_trace, grad_compile + update_compile


def _compile_one(fns, params, opt_state, images, labels, key):
  low, trace = _timed(fns["one"].lower, params, opt_state, images, labels, key)
  compiled, compile_s = _timed(low.compile)
  return compiled, trace, compile_s


def measure(variant: str, mode: str, layout_name: str, transform: str, args, dtype) -> dict:
  """Trace and compile seconds of the step as trained ('trace', 'compile',
  'programs'), with --both-forms of the other form ('other_trace',
  'other_compile'), with --init of the initialisation ('init_trace', 'init_compile')."""
  fns, init = build_step(variant, dtype, mode, layout_name, transform)
  images = jax.ShapeDtypeStruct((args.batch, args.size, args.size, 3), jnp.float32)
  labels = jax.ShapeDtypeStruct((args.batch,), jnp.int32)
  key = jax.eval_shape(lambda: jax.random.key(0))
  params, opt_state = jax.eval_shape(init, key, images)
  result = {}
  if args.init:
    low, result["init_trace"] = _timed(jax.jit(init).lower, key, images)
    _, result["init_compile"] = _timed(low.compile)
  two = len(jax.tree_util.tree_leaves(params)) >= SEPARATE_UPDATE_MIN_LEAVES
  forms = [_compile_two, _compile_one] if two else [_compile_one, _compile_two]
  step, trace, compile_s = forms[0](fns, params, opt_state, images, labels, key)
  result.update(trace=trace, compile=compile_s, programs=2 if two else 1,
                leaves=len(jax.tree_util.tree_leaves(params)))
  if args.both_forms:
    _, result["other_trace"], result["other_compile"] = forms[1](
        fns, params, opt_state, images, labels, key)
  if args.run:
    params, opt_state = jax.jit(init)(jax.random.key(0), jnp.zeros(images.shape))
    x = jax.random.normal(jax.random.key(1), images.shape)
    y = jnp.arange(args.batch) % 1000
    times = []
    for i in range(args.repeats + 1):
      begin = time.perf_counter()
      params, opt_state = step(params, opt_state, x, y, jax.random.key(i))
      jax.block_until_ready(params)
      times.append(time.perf_counter() - begin)
    result["step_ms"] = 1e3 * statistics.median(times[1:])
    del params, opt_state
  return result


def main() -> None:
  args = parse_args()
  tuning = apply_cpu_tuning(args)  # before any JAX work
  sys.stdout.reconfigure(line_buffering=True)
  modes, layouts = args.modes.split(","), args.layouts.split(",")
  transforms = args.transforms.split(",")
  for given, valid, flag in ((modes, models.BLOCK_LOOPS, "--modes"),
                             (layouts, LAYOUTS, "--layouts"),
                             (transforms, TRANSFORMS, "--transforms")):
    unknown = set(given) - set(valid)
    if unknown:
      sys.exit(f"{flag}: unknown {sorted(unknown)}; choose from {', '.join(valid)}.")
  dtype = jnp.dtype(args.dtype)
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"JAX {jax.__version__} on {jax.devices()[0].device_kind}; train step "
        f"batch {args.batch} at {args.size}px, {args.dtype}; persistent cache off")
  print(tuning)
  for variant in args.variants.split(","):
    results = {(mode, layout, tf): measure(variant, mode, layout, tf, args, dtype)
               for mode in modes for layout in layouts for tf in transforms}
    total = {key: r["trace"] + r["compile"] for key, r in results.items()}
    init_total = {key: r["init_trace"] + r["init_compile"] for key, r in results.items()
                  if "init_compile" in r}
    for (mode, layout, tf), r in results.items():
      name = f"{variant:<4} {mode:<7} {layout:<9} {tf:<5}"
      line = (f"{name} {r['leaves']:5d} arrays, {r['programs']} program(s): trace "
              f"{r['trace']:6.1f} s  compile {r['compile']:6.1f} s  total "
              f"{total[mode, layout, tf]:6.1f} s")
      if "step_ms" in r:
        line += f"  step {r['step_ms']:8.1f} ms"
      print(line)
      if "other_compile" in r:
        other = r["other_trace"] + r["other_compile"]
        print(f"{name} as {3 - r['programs']} program(s): trace {r['other_trace']:6.1f} s  "
              f"compile {r['other_compile']:6.1f} s  total {other:6.1f} s; ratio to the "
              f"trained form {other / total[mode, layout, tf]:.2f}")
      if "init_compile" in r:
        print(f"{name} init: trace {r['init_trace']:6.1f} s  compile "
              f"{r['init_compile']:6.1f} s  total {init_total[mode, layout, tf]:6.1f} s")
    for mode in modes:
      for tf in transforms:
        if {(mode, "stacked", tf), (mode, "published", tf)} <= set(results):
          print(f"{variant:<4} {mode:<7} {tf:<5} published/stacked compile-time ratio "
                f"{total[mode, 'published', tf] / total[mode, 'stacked', tf]:.2f}")
      for layout in layouts:
        if {(mode, layout, "fast"), (mode, layout, "haiku")} <= set(results):
          line = (f"{variant:<4} {mode:<7} {layout:<9} haiku/fast train-step compile-time "
                  f"ratio {total[mode, layout, 'haiku'] / total[mode, layout, 'fast']:.2f}")
          if args.init:
            line += (f", init "
                     f"{init_total[mode, layout, 'haiku'] / init_total[mode, layout, 'fast']:.2f}")
          print(line)
    for fast in ("auto", "scan"):
      for layout in layouts:
        for tf in transforms:
          if {(fast, layout, tf), ("unroll", layout, tf)} <= set(results):
            line = (f"{variant:<4} {layout:<9} {tf:<5} unroll/{fast} compile-time ratio "
                    f"{total['unroll', layout, tf] / total[fast, layout, tf]:.2f}")
            if args.run:
              ratio = (results["unroll", layout, tf]["step_ms"]
                       / results[fast, layout, tf]["step_ms"])
              line += f", step-time ratio {ratio:.2f} (>1: {fast} is faster)"
            print(line)


if __name__ == "__main__":
  # The benchmark measures compilation itself: never read it from a cache.
  jax.config.update("jax_enable_compilation_cache", False)
  main()
