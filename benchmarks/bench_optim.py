"""Cost of the NFNet optimizer pieces relative to a full NFNet train step.

Reports, for one parameter tree (NFNet-F0 by default), all measured in the
same run:

* AGC: the time of `adaptive_grad_clip.update` alone (jitted, with and
  without the clip-fraction record) as a fraction of the full train step
  (with `--agc-in-step`, also the difference between steps with and without
  AGC, which is noise-prone on a shared CPU);
* SAM: the step time with `sam_grad(ascent_fraction=0.2)` and with the
  original SAM (`ascent_fraction=1`) over the plain step time (the paper's
  target: at most ~1.3x with 20% ascent, ~2x for the original).

A train step is forward + backward of `NFNet(...)(x, is_training=True)` with
softmax cross-entropy, `nfnet_optimizer.update` and `optax.apply_updates`.
Defaults are small (batch 10 at 64x64); on an idle 2-core CPU the run is
dominated by compiling the three steps (minutes). On an accelerator use e.g. `--image-size 192 --batch-size 128`. Small
batches overstate SAM's relative cost: the ascent pass has fixed per-step work
(weight standardisation of every kernel, parameter-sized gradient buffers)
that does not shrink with its batch.

Usage: python benchmarks/bench_optim.py [--variant F0] [--image-size 64]
       [--batch-size 10] [--repeats 5] [--agc-in-step]
"""

import argparse
import os
import platform
import statistics
import sys
import time

import haiku as hk
import jax
import jax.numpy as jnp
import optax

from nfnets_jax.models import NFNet
from nfnets_jax.optim import adaptive_grad_clip, ascent_batch_size, nfnet_optimizer, sam_grad
from timing import add_cpu_tuning_flag, apply_cpu_tuning  # benchmarks/timing.py


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variant", default="F0", help="NFNet variant (F0..F7, F0+.., nano)")
  parser.add_argument("--image-size", type=int, default=64)
  parser.add_argument("--batch-size", type=int, default=10, help="per-step batch")
  parser.add_argument("--num-classes", type=int, default=1000)
  parser.add_argument("--repeats", type=int, default=5, help="timed rounds per variant")
  parser.add_argument("--sam-rho", type=float, default=0.05)
  parser.add_argument("--agc-in-step", action="store_true",
                      help="also time a step without AGC (one more model compile) and report "
                           "the difference; needs a quiet machine to mean anything")
  add_cpu_tuning_flag(parser)
  return parser.parse_args()


def block(tree):
  return jax.tree_util.tree_map(lambda x: x.block_until_ready(), tree)


def main() -> None:
  args = parse_args()
  tuning = apply_cpu_tuning(args)  # before any JAX work
  sys.stdout.reconfigure(line_buffering=True)  # progress shows even when piped
  model = hk.transform(lambda x, is_training: NFNet(
      num_classes=args.num_classes, variant=args.variant)(x, is_training=is_training))
  rng = jax.random.key(0)
  images = jax.random.normal(rng, (args.batch_size, args.image_size, args.image_size, 3))
  labels = jnp.arange(args.batch_size) % args.num_classes
  batch = {"images": images, "labels": labels}
  params = block(jax.jit(model.init, static_argnums=2)(rng, images, True))
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))

  def loss_fn(params, batch, rng):
    logits = model.apply(params, rng, batch["images"], is_training=True)["logits"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    return loss, {"loss": loss}

  def make_step(grad_fn, opt):
    def step(params, opt_state, batch, rng):
      grads, aux = grad_fn(params, batch, rng)
      updates, opt_state = opt.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, aux["loss"]
    return jax.jit(step), opt.init(params)

  plain_grad = jax.grad(loss_fn, has_aux=True)
  with_agc = nfnet_optimizer(0.1)
  variants = {
      "plain step (AGC)": make_step(plain_grad, with_agc),
      "SAM 0.2 step (AGC)": make_step(
          sam_grad(loss_fn, rho=args.sam_rho, ascent_fraction=0.2), with_agc),
      "SAM 1.0 step (AGC)": make_step(
          sam_grad(loss_fn, rho=args.sam_rho, ascent_fraction=1.0), with_agc),
  }
  if args.agc_in_step:
    variants["plain step, no AGC"] = make_step(plain_grad, nfnet_optimizer(0.1, clipping=None))
  grads, _ = block(jax.jit(plain_grad)(params, batch, rng))
  for record in (False, True):
    agc = adaptive_grad_clip(0.01, record_clip_fraction=record)
    name = "AGC update alone" + (" (+clip fraction)" if record else "")
    variants[name] = (jax.jit(lambda g, s, p, agc=agc: agc.update(g, s, p)), agc.init(params))

  def call(name):
    fn, state = variants[name]
    if name.startswith("AGC"):
      return block(fn(grads, state, params))
    return block(fn(params, state, batch, rng))

  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs)")
  print(tuning)
  print(f"model: NFNet-{args.variant}, {n_params / 1e6:.1f}M parameters, batch "
        f"{args.batch_size} at {args.image_size}x{args.image_size}")
  for name in variants:
    start = time.perf_counter()
    call(name)
    print(f"  compiled {name:<28} {time.perf_counter() - start:7.1f} s")
  # Interleave the timed rounds so that drifting background load hits all alike.
  # Wall time is what a user waits; process CPU time (all of XLA's threads) is
  # much less disturbed by other processes on a shared machine.
  wall = {name: [] for name in variants}
  cpu = {name: [] for name in variants}
  for _ in range(args.repeats):
    for name in variants:
      start, start_cpu = time.perf_counter(), time.process_time()
      call(name)
      wall[name].append(time.perf_counter() - start)
      cpu[name].append(time.process_time() - start_cpu)
  print(f"over {args.repeats} rounds:           wall median (min)        CPU-time median")
  for name in variants:
    print(f"  {name:<32} {1e3 * statistics.median(wall[name]):9.1f} ms "
          f"({1e3 * min(wall[name]):9.1f})  {1e3 * statistics.median(cpu[name]):9.1f} ms")

  stats = {"wall-time medians": {k: statistics.median(t) for k, t in wall.items()},
           "wall-time minima": {k: min(t) for k, t in wall.items()},
           "CPU-time medians": {k: statistics.median(t) for k, t in cpu.items()}}
  for label, stat in stats.items():
    step = stat["plain step (AGC)"]
    print(f"ratios from the {label} (same run):")
    print(f"  AGC update alone / train step           {stat['AGC update alone'] / step:6.3f}")
    print(f"  AGC+record alone / train step           "
          f"{stat['AGC update alone (+clip fraction)'] / step:6.3f}")
    if args.agc_in_step:
      print(f"  (step with AGC - without) / step        "
            f"{(step - stat['plain step, no AGC']) / step:6.3f}")
    print(f"  SAM(ascent_fraction=0.2) / plain step   {stat['SAM 0.2 step (AGC)'] / step:6.3f}")
    print(f"  SAM(ascent_fraction=1.0) / plain step   {stat['SAM 1.0 step (AGC)'] / step:6.3f}")
  print(f"  ascent examples per step at 0.2: {ascent_batch_size(args.batch_size, 0.2)} "
        f"of {args.batch_size}")
  print(f"load average (1, 5, 15 min) at the end: {os.getloadavg()}")


if __name__ == "__main__":
  main()
