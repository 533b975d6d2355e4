"""Cost of the trainer's per-step stop poll in a multi-process job (jax.distributed, gloo on CPU).

`nfnets_jax.train.preemption.StopPoll.poll()` all-reduces one flag per
device after every step. This starts a job of `--processes` local processes
with `--devices` CPU devices each and times, in the same run:

* `poll`: one `StopPoll.poll()` (posting this boundary's all-reduce and reading
  the previous one), as the training loop calls it;
* `grad_allreduce` (the peer): the mean over devices of an array the size of
  `--model`'s parameters, the all-reduce every data-parallel step makes of its
  gradients anyway.

Prints the median of each and their ratio from process 0.

Usage: python benchmarks/bench_stop_poll.py [--processes 2] [--devices 2] [--iters 200]
                                            [--model nfnet:nano]
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time


def worker(args: argparse.Namespace) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}",
                             num_processes=args.processes, process_id=args.process_id)
  from nfnets_jax import models  # pylint: disable=import-outside-toplevel
  from nfnets_jax.train import preemption, steps  # pylint: disable=import-outside-toplevel

  mesh = steps.make_mesh()
  size = sum(int(np.prod(leaf.shape)) for leaf in
             jax.tree_util.tree_leaves(models.param_shapes(args.model, 10)))
  poll = preemption.StopPoll(mesh, preemption.StopSignals())
  sharding = NamedSharding(mesh, P(steps.DATA_AXIS))
  grads = jax.make_array_from_process_local_data(
      sharding, np.ones((jax.local_device_count(), size), np.float32))
  mean = jax.jit(lambda g: jnp.mean(g, axis=0), out_shardings=NamedSharding(mesh, P()))

  def timed(fn) -> float:
    for _ in range(10):  # compile, warm up
      fn()
    times = []
    for _ in range(args.iters):
      start = time.perf_counter()
      fn()
      times.append(time.perf_counter() - start)
    return statistics.median(times)

  poll_s = timed(poll.poll)
  grad_s = timed(lambda: jax.block_until_ready(mean(grads)))
  if jax.process_index() == 0:
    print(f"{args.processes} processes x {args.devices} CPU devices, {args.model} "
          f"({size} parameters), median of {args.iters}:")
    print(f"  poll            {poll_s * 1e6:9.1f} us")
    print(f"  grad_allreduce  {grad_s * 1e6:9.1f} us")
    print(f"  poll / grad_allreduce = {poll_s / grad_s:.3f}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--devices", type=int, default=2)
  parser.add_argument("--iters", type=int, default=200)
  parser.add_argument("--model", default="nfnet:nano")
  parser.add_argument("--process_id", type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.process_id is not None:
    worker(args)
    return
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices}"}
  procs = [subprocess.Popen([sys.executable, __file__, f"--processes={args.processes}",
                             f"--devices={args.devices}", f"--iters={args.iters}",
                             f"--model={args.model}", f"--process_id={i}", f"--port={port}"],
                            env=env) for i in range(args.processes)]
  sys.exit(max(proc.wait() for proc in procs))


if __name__ == "__main__":
  main()
