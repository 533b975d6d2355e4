"""Train-step time of a model as a Flax NNX module against the Haiku model itself.

Contenders, each one SGD step of the NFNet optimizer (AGC on) on a softmax
cross-entropy loss, in training mode (stochastic depth and dropout on), timed
in interleaved rounds on the same batch:

* haiku: `jax.jit` of a step over `(params, opt_state, key)`, buffers donated;
* nnx.jit: `nnx.jit` of a step over `(model, nnx.Optimizer)` (`nfnets_jax.nnx`),
  donated, in graph mode (the default; it walks the module graph at each call);
* nnx.jit cached: the same step through `nnx.cached_partial(step, model, opt)`,
  which walks the graph once and keeps the walk;
* nnx.jit tree: the same with `graph=False` (tree mode: modules as pytrees);
* nnx split: the same step as a pure function of `nnx.split`'s state under
  `jax.jit`, donated (the NNX pattern without `nnx.jit`'s per-call graph walk).

Prints milliseconds per step and each NNX form's time over Haiku's.

  python benchmarks/bench_nnx.py --model=nfnet:F0 --image_size=64 --batch=16
"""

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nfnets_jax import models, optim
from nfnets_jax import nnx as nf_nnx
from timing import add_cpu_tuning_flag, alternate, apply_cpu_tuning  # benchmarks/timing.py

NUM_CLASSES = 10


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def haiku_runner(name, optimizer, images, labels):
  model = models.transform(name, NUM_CLASSES)
  params = model.init(jax.random.key(0), images[:1])
  state = {"params": params, "opt": optimizer.init(params), "key": jax.random.key(1)}

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state, images, labels):
    key, sub = jax.random.split(state["key"])
    loss, grads = jax.value_and_grad(
        lambda p: cross_entropy(model.apply(p, sub, images)["logits"], labels))(state["params"])
    updates, opt = optimizer.update(grads, state["opt"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt": opt, "key": key}, loss

  def run():
    state_, loss = step(holder["state"], images, labels)
    holder["state"] = state_
    jax.block_until_ready(loss)

  holder = {"state": state}
  return run


def nnx_loss(model, images, labels):
  return cross_entropy(model(images, is_training=True), labels)


def nnx_jit_runner(name, optimizer, images, labels, graph=True, cached=False):
  model = nf_nnx.create(name, NUM_CLASSES, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, optimizer, wrt=nnx.Param)

  @nnx.jit(donate_argnames=("model", "opt"), graph=graph)
  def step(model, opt, images, labels):
    loss, grads = nnx.value_and_grad(nnx_loss)(model, images, labels)
    opt.update(model, grads)
    return loss

  if cached:
    cached_step = nnx.cached_partial(step, model, opt)
    return lambda: jax.block_until_ready(cached_step(images, labels))
  return lambda: jax.block_until_ready(step(model, opt, images, labels))


def nnx_split_runner(name, optimizer, images, labels):
  model = nf_nnx.create(name, NUM_CLASSES, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, optimizer, wrt=nnx.Param)
  graphdef, state = nnx.split((model, opt))

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state, images, labels):
    model, opt = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(nnx_loss)(model, images, labels)
    opt.update(model, grads)
    return nnx.state((model, opt)), loss

  def run():
    holder["state"], loss = step(holder["state"], images, labels)
    jax.block_until_ready(loss)

  holder = {"state": state}
  return run


RUNNERS = {"haiku": haiku_runner, "nnx.jit": nnx_jit_runner,
           "nnx.jit cached": functools.partial(nnx_jit_runner, cached=True),
           "nnx.jit tree": functools.partial(nnx_jit_runner, graph=False),
           "nnx split": nnx_split_runner}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="nfnet:nano")
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=10)
  add_cpu_tuning_flag(parser)
  args = parser.parse_args()
  tuning = apply_cpu_tuning(args)
  rng = np.random.default_rng(0)
  images = jnp.asarray(
      rng.standard_normal((args.batch, args.image_size, args.image_size, 3)), jnp.float32)
  labels = jnp.asarray(np.arange(args.batch) % NUM_CLASSES, jnp.int32)
  optimizer = optim.nfnet_optimizer(0.1, clipping=0.01)
  runs = {label: make(args.model, optimizer, images, labels) for label, make in RUNNERS.items()}
  for run in runs.values():
    run()  # compile
  times = alternate(runs, args.repeats)
  print(f"{args.model}, {args.image_size} px, batch {args.batch}, {args.repeats} rounds, "
        f"{jax.devices()[0].platform}; {tuning}")
  for label, seconds in times.items():
    ratio = seconds / times["haiku"]
    print(f"  {label:14s} {seconds * 1e3:9.2f} ms/step   x{ratio:.3f} of haiku")


if __name__ == "__main__":
  main()
