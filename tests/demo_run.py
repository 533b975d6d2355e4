"""Trainer subprocesses for the tests, and one demo run that the whole session shares.

Each `python -m nfnets_jax.train` costs 20-40 s of CPU on a 2-core machine:
TensorFlow's import, tracing, and XLA compiling the train, eval and init
programs. So the test session trains the demo once, as `train_eval` on four
devices, and several tests read that run: test_train checks its report and
files, and resumes a killed copy of it against its result; test_evaluate
scores its checkpoints. `session_share.once` makes it once per session, not
once per xdist worker. The run's compilation cache comes with it, so a later
run of the same programs (the killed copy, its resumption, the evaluations)
compiles nothing. `train_two_process_demo` is the same run as a job of two
processes (its numbers differ from the one-process run's: each process
reads its own shard of the data), shared the same way.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
from typing import Any, Optional

REPO = pathlib.Path(__file__).resolve().parents[1]

DEMO = "--config=experiments/demo.py"
# 24 px, not 16: at 16 px nano's last stage average-pools a 1x1 map with SAME
# padding, which XLA:CPU's YNNPACK reduce_window gets wrong for large batches
# (results would then depend on the batch per device). At 24 px every pooled
# map is at least 2x2.
IMAGE_SIZE = 24
# Eight steps of the demo: the whole training path, compiled quickly.
FAST = [
    f"--config.dataset.image_size={IMAGE_SIZE}",
    f"--config.dataset.eval_image_size={IMAGE_SIZE}",
    "--config.train_batch_size=16",
    "--config.eval_batch_size=64",
    "--config.num_train_steps=8",
    "--config.log_every_steps=4",
    "--config.checkpoint_every_steps=4",
]
# The shared run: FAST on four devices of one process, keeping one checkpoint.
SHARED_DEVICES = 4
SHARED_EXTRA = ("--config.keep_checkpoints=1",)


def trainer_env(devices: int, **extra: str) -> dict[str, str]:
  return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
          "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


def trainer_args(dirs: dict[str, str], workdir, *extra: str, config: str = DEMO) -> list[str]:
  """--config first: absl applies --config.<field> overrides to an already loaded config."""
  return [config, f"--workdir={workdir}", f"--config.dataset.data_dir={dirs['data_dir']}",
          f"--compilation_cache_dir={dirs['cache']}", *FAST, *extra]


def trainer_command(dirs: dict[str, str], workdir, *extra: str, config: str = DEMO) -> list[str]:
  return [sys.executable, "-m", "nfnets_jax.train",
          *trainer_args(dirs, workdir, *extra, config=config)]


def run_trainer(dirs: dict[str, str], workdir, *extra: str, config: str = DEMO,
                devices: int = 1, timeout: int = 600, check: bool = True,
                env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess:
  """Runs the trainer; `env` adds variables to `trainer_env(devices)`."""
  proc = subprocess.run(trainer_command(dirs, workdir, *extra, config=config), cwd=REPO,
                        env=trainer_env(devices, **(env or {})), capture_output=True, text=True,
                        timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"trainer failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return proc


def final_json(stdout: str) -> dict[str, Any]:
  return json.loads(stdout.strip().splitlines()[-1])


def checkpoint_steps(workdir) -> list[int]:
  ckpt = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.exists() else []


def local_launch(dirs: dict[str, str], workdir, *extra: str, num_processes: int = 2,
                 devices_per_process: int = 2, module: str = "nfnets_jax.train",
                 env: Optional[dict[str, str]] = None,
                 timeout: int = 900) -> list[tuple[int, str, str]]:
  """Runs a multi-host job on localhost, its processes as launch/local.py builds them;
  returns each one's (exit status, stdout, stderr).

  `module` may be one in tests/ (it is on the processes' path). Their output
  goes to files, not pipes: a process blocked on a full pipe would hold up the
  others in their collectives.
  """
  spec = importlib.util.spec_from_file_location("launch_local", REPO / "launch" / "local.py")
  local = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(local)
  commands = local.build_commands(num_processes, devices_per_process,
                                  trainer_args(dirs, workdir, *extra), local.free_port(),
                                  module=module)
  path = os.pathsep.join(filter(None, [str(REPO), str(REPO / "tests"),
                                       os.environ.get("PYTHONPATH")]))
  with tempfile.TemporaryDirectory() as logs:
    procs = []
    for i, (argv, command_env) in enumerate(commands):
      with open(f"{logs}/{i}.out", "w") as out, open(f"{logs}/{i}.err", "w") as err:
        procs.append(subprocess.Popen(
            argv, cwd=REPO, stdout=out, stderr=err,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": path, **command_env,
                 **(env or {})}))
    for proc in procs:
      proc.wait(timeout=timeout)
    return [(proc.returncode, pathlib.Path(f"{logs}/{i}.out").read_text(),
             pathlib.Path(f"{logs}/{i}.err").read_text()) for i, proc in enumerate(procs)]


def train_two_process_demo(root: pathlib.Path) -> dict[str, Any]:
  """FAST as a job of two processes with two devices each, run by launch/local.py."""
  dirs = {"data_dir": str(root / "tfds"), "cache": str(root / "xla_cache")}
  workdir = root / "workdir"
  argv = [sys.executable, "launch/local.py", "--num_processes=2", "--devices_per_process=2",
          "--", *trainer_args(dirs, workdir)]
  proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900,
                        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  if proc.returncode != 0:
    raise AssertionError(f"launch/local.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  return {**dirs, "workdir": str(workdir), "reported": lines}


def train_shared_demo(root: pathlib.Path) -> dict[str, Any]:
  """Runs the shared demo; returns its directories, report, stdout and stderr."""
  dirs = {"data_dir": str(root / "tfds"), "cache": str(root / "xla_cache")}
  workdir = root / "workdir"
  proc = run_trainer(dirs, workdir, *SHARED_EXTRA, devices=SHARED_DEVICES)
  return {**dirs, "workdir": str(workdir), "reported": final_json(proc.stdout),
          "stdout": proc.stdout, "stderr": proc.stderr}
