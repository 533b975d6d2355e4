"""`cpu_tuning.tune_cpu`: XLA:CPU's per-call temporary buffer stops being re-faulted.

Each case runs in a fresh interpreter, because the dispatch mode is fixed when
JAX creates its CPU client and mallopt changes the whole process. The probe is
a jitted program whose 4096x4096 float32 product (64 MiB) is a temporary: by
default every call maps it anew and the kernel zero-fills each page on first
touch; tuned, the memory of the previous call is reused. Page faults are
counted (getrusage), not timed.
"""

import json
import os
import platform
import socket
import subprocess
import sys

import pytest
from absl import flags

from nfnets_jax.cli import runtime

TEMP_BYTES = 4096 * 4096 * 4
# Untuned, the temporary is faulted in again on every call: one fault per 4 KiB
# page (16384), or per 2 MiB page (32) with transparent huge pages always on.
# At least this many shows the probe can see the cost at all.
MIN_UNTUNED_FAULTS = TEMP_BYTES / (2 << 20)


def _cpu_env() -> dict:
  """A fresh interpreter's environment: the CPU backend, one device."""
  return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}

# Defines faults_per_call(): minor page faults per call of a jitted program
# whose (4096, 4096) product (64 MiB) is a temporary, and the program's value.
_FAULTS = r"""
import resource
import jax, jax.numpy as jnp

@jax.jit
def _f(a, b):
  return jnp.tanh(a @ b).sum()      # the (4096, 4096) product is a temporary

def faults_per_call(calls=4):
  a, b = jnp.ones((4096, 16)), jnp.ones((16, 4096))
  for _ in range(2):
    _f(a, b).block_until_ready()
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(calls):
    value = _f(a, b).block_until_ready()
  return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls, float(value)
"""

_PROBE = _FAULTS + r"""
import json, sys
from nfnets_jax.cli import cpu_tuning
mode = sys.argv[1]
if mode == "late":
  jnp.ones(2).block_until_ready()   # creates the CPU client before tune_cpu
tuning = None if mode == "default" else cpu_tuning.tune_cpu()
faults, value = faults_per_call()
print(json.dumps({
    "faults_per_call": faults, "value": value,
    "sync": None if tuning is None else tuning.sync_dispatch,
    "retained": None if tuning is None else tuning.retain_freed_memory,
    "describe": None if tuning is None else tuning.describe()}))
"""


def _run_script(script: str, arg: str) -> dict:
  """Runs `script` in a fresh interpreter; its last stdout line, parsed as JSON."""
  proc = subprocess.run([sys.executable, "-c", script, arg], capture_output=True, text=True,
                        env=_cpu_env(), timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _probe(mode: str) -> dict:
  return _run_script(_PROBE, mode)


needs_glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                 reason="the tuning's allocator half is glibc's mallopt")


@pytest.mark.slow
@needs_glibc
def test_tuned_process_reuses_the_temporary_buffer_instead_of_refaulting_it():
  default, tuned = _probe("default"), _probe("tuned")
  assert tuned["sync"] and tuned["retained"], tuned
  assert tuned["describe"] == "CPU tuning: synchronous dispatch, freed host memory kept for reuse."
  assert tuned["value"] == default["value"] == pytest.approx(4096 * 4096 * 1.0)  # tanh(16) = 1
  assert default["faults_per_call"] >= MIN_UNTUNED_FAULTS, default
  # Tuned, the previous call's memory is reused: usually under one fault per
  # call; in about one process in six an 8 MiB buffer (2,064 faults) still
  # comes fresh each call, which is why the bound is a quarter, not zero.
  assert tuned["faults_per_call"] * 4 <= default["faults_per_call"], (tuned, default)


# A block of `size` bytes allocated, written, freed and allocated again on the
# main thread of a tuned process; prints the page faults of the second write.
_REALLOC = r"""
import ctypes, json, resource, sys
from nfnets_jax.cli import cpu_tuning
tuning = cpu_tuning.tune_cpu()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size = int(sys.argv[1])
block = libc.malloc(size)
ctypes.memset(block, 1, size)
libc.free(block)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = libc.malloc(size)
ctypes.memset(block, 2, size)
print(json.dumps({"retained": tuning.retain_freed_memory,
                  "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


@pytest.mark.slow
@needs_glibc
def test_freed_blocks_over_two_gib_are_kept_too():
  """glibc gives a freed block at the top of its heap back to the kernel when it
  is larger than the trim threshold. The largest positive threshold, 2 GiB,
  let a 2.4 GiB train-step temporary (NFNet-F1, scanned, batch 8 at 128 px) be
  faulted in again on every call; the threshold must be "never" (-1)."""
  size = 9 << 28  # 2.25 GiB
  result = _run_script(_REALLOC, str(size))
  assert result["retained"], result
  pages = size // 4096
  # Handed back, the second write faults once per page (589,824 times); kept,
  # it reuses the first block's pages.
  assert result["faults"] * 100 <= pages, result


@pytest.mark.slow
@needs_glibc
def test_late_call_changes_nothing_and_says_how_to_fix_it():
  late, default = _probe("late"), _probe("default")
  assert late["sync"] is False and late["retained"] is False, late
  assert late["describe"].startswith("CPU tuning not applied:"), late
  assert "call tune_cpu() before the first JAX computation" in late["describe"], late
  # Nothing changed, so the temporary is still faulted in on every call.
  assert late["faults_per_call"] >= default["faults_per_call"] / 2, (late, default)


_TWO_PROCESSES = _FAULTS + r"""
import json, sys
from absl import flags
from jax.experimental import multihost_utils
from nfnets_jax.cli import runtime
fv = flags.FlagValues()
held = runtime.define_flags(fv)
fv(["prog", *sys.argv[1:]])
runtime.setup(held)   # jax.distributed.initialize, then tune_cpu
faults, _ = faults_per_call()   # one-device programs
gathered = multihost_utils.process_allgather(jnp.arange(3.0) + jax.process_index())  # a collective
print(json.dumps({"sync": not jax.config.read("jax_cpu_enable_async_dispatch"),
                  "processes": jax.process_count(), "gathered": gathered.tolist(),
                  "faults_per_call": faults}))
"""


def _two_processes(*flags_: str) -> list[dict]:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  procs = [subprocess.Popen(
      [sys.executable, "-c", _TWO_PROCESSES, f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={i}", "--compilation_cache_dir=", *flags_],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_cpu_env()) for i in range(2)]
  outs = [proc.communicate(timeout=300) for proc in procs]
  for proc, (_, err) in zip(procs, outs):
    assert proc.returncode == 0, err[-3000:]
  return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


@pytest.mark.slow
def test_multi_process_job_gets_synchronous_dispatch_and_its_collectives_still_run():
  # jax.distributed.initialize creates the backends, so setup must ask for the
  # dispatch mode before it; the collective shows synchronous dispatch does not deadlock.
  tuned, untuned = _two_processes(), _two_processes("--notune_cpu")
  for result in tuned + untuned:
    assert result["processes"] == 2, result
    assert result["gathered"] == [[0.0, 1.0, 2.0], [1.0, 2.0, 3.0]], result
  assert all(r["sync"] for r in tuned) and not any(r["sync"] for r in untuned), (tuned, untuned)
  if platform.libc_ver()[0] == "glibc":  # the tuning took effect in the clients themselves
    for t, u in zip(tuned, untuned):
      assert u["faults_per_call"] >= MIN_UNTUNED_FAULTS, u
      assert t["faults_per_call"] * 4 <= u["faults_per_call"], (t, u)


def test_tools_tune_by_default_and_notune_cpu_turns_it_off():
  fv = flags.FlagValues()
  held = runtime.define_flags(fv, distributed=False)
  fv(["prog"])
  assert held.tune_cpu.value is True
  fv = flags.FlagValues()
  held = runtime.define_flags(fv)
  fv(["prog", "--notune_cpu"])
  assert held.tune_cpu.value is False
