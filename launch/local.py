#!/usr/bin/env python3
"""Run the trainer as several local processes, like a multi-host job on one machine.

Each process gets --coordinator_address/--num_processes/--process_id and its
own share of the CPU devices, so the multi-host code path (jax.distributed,
gloo collectives, per-process data shards, orbax across processes) runs
exactly as on a cluster. With --num_processes=1 it is the plain command.

  python launch/local.py --num_processes=2 --devices_per_process=2 -- \
      --config=experiments/demo.py --workdir=/tmp/nfnets_demo_2x2

Everything after `--` goes to `python -m nfnets_jax.train` unchanged; XLA_FLAGS
already set are kept, ahead of the device count. Exits
with the first non-zero exit code of any process (and stops the others).
A SIGTERM or SIGINT to the launcher goes to every process: the job saves the
step it agreed on and exits with 75 (rerun the same command to resume); a
process exiting with 75 does not stop the others, which are stopping at the
same step by themselves.
"""

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

#: The trainer's exit status after a signal-triggered save (nfnets_jax.train.preemption).
EXIT_PREEMPTED = 75


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def build_commands(num_processes: int, devices_per_process: int, train_args: list[str],
                   port: int, module: str = "nfnets_jax.train",
                   python: str = sys.executable) -> list[tuple[list[str], dict[str, str]]]:
  """The (argv, extra environment) of every process."""
  commands = []
  for process_id in range(num_processes):
    argv = [python, "-m", module, *train_args]
    if num_processes > 1:
      argv += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
               f"--process_id={process_id}"]
    # The caller's own XLA flags, if any, then this process's device count.
    xla_flags = [os.environ.get("XLA_FLAGS"),
                 f"--xla_force_host_platform_device_count={devices_per_process}"]
    env = {"XLA_FLAGS": " ".join(filter(None, xla_flags)), "JAX_PLATFORMS": "cpu"}
    commands.append((argv, env))
  return commands


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  if "--" in argv:
    split = argv.index("--")
    ours, train_args = argv[:split], argv[split + 1:]
  else:
    ours, train_args = argv, []
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=1)
  parser.add_argument("--dry_run", action="store_true", help="Print the commands, run nothing.")
  args = parser.parse_args(ours)
  if args.num_processes < 1:
    parser.error(f"--num_processes must be >= 1, got {args.num_processes}")
  if args.devices_per_process < 1:
    parser.error(f"--devices_per_process must be >= 1, got {args.devices_per_process}")
  if not any(a.startswith("--config") for a in train_args) or \
      not any(a.startswith("--workdir") for a in train_args):
    parser.error("pass the trainer's --config=... and --workdir=... after `--`")
  return args, train_args


def main(argv: list[str]) -> int:
  args, train_args = parse_args(argv)
  commands = build_commands(args.num_processes, args.devices_per_process, train_args, free_port())
  if args.dry_run:
    for argv_, env in commands:
      print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(argv_))
    return 0
  procs = [subprocess.Popen(argv_, env={**os.environ, **env}) for argv_, env in commands]

  def forward(signum, frame):  # pylint: disable=unused-argument
    for proc in procs:
      proc.send_signal(signum)
  signal.signal(signal.SIGTERM, forward)
  exit_code = 0
  try:
    while procs:
      for proc in list(procs):
        code = proc.poll()
        if code is None:
          continue
        procs.remove(proc)
        if code and not exit_code:
          exit_code = code
          if code == EXIT_PREEMPTED:  # the others stop at the same step on their own
            continue
          for other in procs:  # One failed: the others would wait on it forever.
            other.send_signal(signal.SIGTERM)
      time.sleep(0.2)
  except KeyboardInterrupt:
    for proc in procs:
      proc.send_signal(signal.SIGINT)
    raise
  return exit_code


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
