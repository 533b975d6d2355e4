"""The trainer's checkpoints (nfnets_jax/train/checkpoints.py) on 4 CPU devices.

tests/checkpoint_save_script.py runs in a fresh interpreter, because the
device count is fixed when JAX starts.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("checkpoint_save_script.py")


@pytest.mark.slow
def test_replicated_state_saves_without_per_device_slices_and_reads_back(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", str(SCRIPT),
                         str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["arrays"] > 200  # params, EMA and optimizer state of nfnet:nano
  # orbax's default on CPU compiled a slice per array shape and device here
  # (108 programs for the trainer's nano state on 4 devices). The one program is the
  # arrays' checksums (nfnets_jax/weights/checksums.py), compiled once per run.
  assert out["save_compiles"] == 1
  assert out["restored_equal"] and out["published_equal"]
  assert out["legacy_equal"]  # checkpoints written before this layout still resume
