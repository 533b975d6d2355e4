"""Sharded train state (`shard_state`): parameters gathered per step vs per use, against
the replicated step, on CPU host devices.

    python benchmarks/bench_shard.py [--devices=4] [--model=nfnet:nano] [--image_size=32]
        [--per_device_batch=8] [--grad_accum_steps=2] [--repeats=7]

Each form is compiled first (not timed), then the forms run in turn, one step
each per round, so load changes on a shared machine hit them alike; prints
the median step time of each and its ratio to the replicated step.
"""

import argparse
import os
import statistics
import sys
import time


def main(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument("--devices", type=int, default=4)
  parser.add_argument("--model", default="nfnet:nano")
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--per_device_batch", type=int, default=8)
  parser.add_argument("--grad_accum_steps", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args(argv)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.devices}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from nfnets_jax import models, optim  # pylint: disable=import-outside-toplevel
  from nfnets_jax.train import steps  # pylint: disable=import-outside-toplevel

  model = models.transform(args.model, 10, stochdepth_rate=0.0, drop_rate=0.0)
  batch_size = args.devices * args.per_device_batch
  schedule = optim.nfnet_lr_schedule(0.1, batch_size=batch_size, total_steps=1000,
                                     warmup_steps=1)
  optimizer = optim.nfnet_optimizer(schedule, record_clip_fraction=True)
  ema = optim.params_ema(0.99)
  mesh = steps.make_mesh()
  rng = np.random.default_rng(0)
  batch = steps.global_batch(mesh, {
      "images": rng.standard_normal((batch_size, args.image_size, args.image_size, 3)
                                    ).astype(np.float32),
      "labels": rng.integers(0, 10, batch_size).astype(np.int32)})
  forms = {"replicated": (False, "step"), "sharded, gathered per step": (True, "step"),
           "sharded, gathered per use": (True, "use")}
  runs = {}
  for name, (shard, gather) in forms.items():
    config = steps.StepConfig(num_classes=10, grad_accum_steps=args.grad_accum_steps,
                              shard_state=shard, gather_params=gather, separate_update=False)
    step = steps.make_train_step(model, optimizer, ema, schedule, config, mesh,
                                 jax.random.key(1))
    state = steps.init_state(model, optimizer, ema, jax.random.key(0),
                             (args.image_size, args.image_size), mesh, shard=shard)
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    print(f"{name}: first step (compile) {time.perf_counter() - start:.1f} s", flush=True)
    runs[name] = [step, state, []]
  for _ in range(args.repeats):
    for run in runs.values():
      start = time.perf_counter()
      run[1], metrics = run[0](run[1], batch)
      jax.block_until_ready((run[1], metrics))
      run[2].append(time.perf_counter() - start)
  base = statistics.median(runs["replicated"][2])
  print(f"{args.model}, {args.devices} devices x {args.per_device_batch} images of "
        f"{args.image_size}px, grad_accum_steps={args.grad_accum_steps}:")
  for name, run in runs.items():
    median = statistics.median(run[2])
    print(f"  {name:28s} {median * 1e3:8.1f} ms/step  x{median / base:.2f}")


if __name__ == "__main__":
  main(sys.argv[1:])
