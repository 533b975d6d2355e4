"""Checkpoints and workdirs against what real disks and users do to them (issue 38).

Bit rot inside a saved array (defect 6), a truncated array file's orbax
leftovers and a missing `meta` file (defect 5), and workdirs that cannot hold a
run (defect 4). Checkpoints are real orbax steps written by the trainer's
`Checkpointer`; the trainer and the tools run as real subprocesses where what
matters is what a user sees on the terminal.
"""

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoint_helpers import abstract_target, save_steps, small_state
from demo_run import REPO, checkpoint_steps, trainer_command, trainer_env
from nfnets_jax import evaluate, weights
from nfnets_jax.train import checkpoint_recovery, steps
from nfnets_jax.weights import checksums


def _data_file(item_dir: pathlib.Path) -> pathlib.Path:
  """The item's largest array data file (orbax's OCDBT chunks)."""
  return max((p for p in item_dir.rglob("*") if p.is_file() and p.parent.name == "d"),
             key=lambda p: p.stat().st_size)


def _flip_bytes(item_dir: pathlib.Path) -> None:
  """Bit rot: four bytes in the middle of an array file inverted, its size unchanged."""
  path = _data_file(item_dir)
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 4] = bytes(b ^ 0xFF for b in data[middle:middle + 4])
  path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- checksums (6)


def test_checksums_do_not_depend_on_where_the_arrays_are_and_see_one_bit():
  rng = np.random.default_rng(0)
  tree = {"a": rng.standard_normal((6, 5)).astype(np.float32),
          "b": rng.integers(0, 9, (7,)).astype(np.int32),
          "c": jnp.asarray(rng.standard_normal((4, 4)), jnp.bfloat16),
          "d": (rng.standard_normal(3) + 1j * rng.standard_normal(3)).astype(np.complex64)}
  tree["c"] = np.asarray(tree["c"])  # a NumPy bfloat16 array
  tree["e"] = rng.integers(0, 2, (3, 1, 2)).astype(bool)
  host = checksums.tree_checksums(tree)  # NumPy, on the host
  assert host == checksums.tree_checksums(jax.tree_util.tree_map(jnp.asarray, tree))  # jitted
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  placed = jax.device_put(tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  assert host == checksums.tree_checksums(placed)
  assert set(host) == {"['a']", "['b']", "['c']", "['d']", "['e']"}
  assert all(len(value) == 16 for value in host.values())
  flipped = tree["a"].copy()
  flipped.view(np.uint32)[3, 2] ^= 1 << 7  # one bit of one element
  assert checksums.tree_checksums({**tree, "a": flipped})["['a']"] != host["['a']"]
  swapped = tree["a"][::-1].copy()  # the same values elsewhere
  assert checksums.tree_checksums({**tree, "a": swapped})["['a']"] != host["['a']"]
  assert checksums.tree_checksums({"a": np.zeros((2, 3), np.float32)}) != \
      checksums.tree_checksums({"a": np.zeros((3, 2), np.float32)})


def test_bit_rot_in_the_newest_step_is_caught_and_the_previous_step_restored(tmp_path, caplog):
  """Issue 38, defect 6: bytes flipped inside a saved array restored as NaN or wrong
  weights, and the trainer resumed from them as "the last good checkpoint"."""
  checkpointer = save_steps(tmp_path, 1, 2, 3)
  _flip_bytes(tmp_path / "checkpoints" / "3" / "params")
  state, meta, step = checkpoint_recovery.restore_newest_readable(
      checkpointer, abstract_target(), steps.make_mesh())
  assert (step, meta["step"]) == (2, 2)
  np.testing.assert_array_equal(state.params["net/~/linear_0"]["w"],
                                small_state(2).params["net/~/linear_0"]["w"])
  assert (f"Checkpoint step 3 in {tmp_path / 'checkpoints'} cannot be read "
          "(ChecksumMismatchError: 1 of the 8 arrays of 'params' differ from the checksums "
          "recorded when it was saved (['net/~/linear_") in caplog.text
  assert (tmp_path / "damaged_checkpoints" / "3" / "params").is_dir()  # moved, not deleted
  assert checkpointer.all_steps() == [1, 2]
  checkpointer.close()


def test_the_tools_refuse_a_step_whose_arrays_changed_and_read_the_others(tmp_path, capsys):
  """evaluate and classify exited 0 printing NaN; they now stop with the damaged-checkpoint
  line, which names the other steps and `--step`."""
  save_steps(tmp_path, 1, 2).close()
  _flip_bytes(tmp_path / "checkpoints" / "2" / "ema_params")
  with pytest.raises(weights.DamagedCheckpointError) as err:
    weights.load_params(str(tmp_path), ema=True)
  message = str(err.value)
  assert message.startswith(f"{tmp_path} (step 2): the 'ema_params' item cannot be read "
                            "(ChecksumMismatchError: 1 of the 8 arrays of 'ema_params' differ")
  assert message.endswith(f"Other saved steps in {tmp_path / 'checkpoints'}: [1]; read one "
                          "with step= (--step).")
  assert weights.load_params(str(tmp_path))  # the raw weights of step 2 are intact
  older = weights.load_params(str(tmp_path), ema=True, step=1)
  np.testing.assert_array_equal(older["net/~/linear_3"]["b"],
                                small_state(1).params["net/~/linear_3"]["b"])
  code = evaluate.main(["evaluate", "--compilation_cache_dir=", f"--checkpoint={tmp_path}",
                        "--ema", "--model=nfnet:nano"])
  out, stderr = capsys.readouterr()
  assert code == 1 and out == ""
  assert stderr.startswith(f"error: {tmp_path} (step 2): the 'ema_params' item cannot be read")
  assert len(stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- damaged steps (5)


def test_a_missing_meta_file_names_the_other_steps_and_the_step_flag(tmp_path):
  """It said only "File .../meta/metadata not found"."""
  save_steps(tmp_path, 1, 2, 3).close()
  (tmp_path / "checkpoints" / "3" / "meta" / "metadata").unlink()
  with pytest.raises(weights.DamagedCheckpointError,
                     match=r"\(step 3\): the 'meta' item cannot be read \(FileNotFoundError: .*"
                           r"Other saved steps in .*checkpoints: \[1, 2\]; read one with step= "
                           r"\(--step\)\."):
    weights.load_meta(str(tmp_path))
  assert weights.load_meta(str(tmp_path), step=2)["step"] == 2


_LEFTOVERS_SCRIPT = textwrap.dedent("""
    import pathlib, sys, time
    import numpy as np
    from nfnets_jax import weights
    from nfnets_jax.train import checkpoint_recovery, steps
    from checkpoint_helpers import abstract_target, save_steps
    from test_checkpoint_faults import _data_file

    root = pathlib.Path(sys.argv[1])
    rng = np.random.default_rng(0)
    tree = {f"m{i}": {"w": rng.standard_normal((64, 64)).astype(np.float32)} for i in range(32)}
    path = weights.save_params_orbax(tree, root / "tree")
    data = _data_file(path)
    data.write_bytes(data.read_bytes()[:data.stat().st_size // 3])
    failures = 0
    for _ in range(10):  # the leftovers are a race: ten reads make them near certain
      try:
        weights.load_params(path)
      except Exception as err:  # the tools' one line comes from this error
        failures += 1
    checkpointer = save_steps(root / "workdir", *range(1, 6))
    for step in range(2, 6):
      data = _data_file(root / "workdir" / "checkpoints" / str(step) / "params")
      data.write_bytes(data.read_bytes()[:data.stat().st_size // 3])
    restored = checkpoint_recovery.restore_newest_readable(
        checkpointer, abstract_target(), steps.make_mesh())
    time.sleep(1)  # the leftovers arrive after the failed read returned
    print(failures, restored[2])
""")


@pytest.mark.slow
def test_a_truncated_array_file_leaves_no_tracebacks_behind_its_one_line_error(tmp_path):
  """Issue 38, defect 5: the one-line error of a truncated array file was sometimes buried
  under hundreds to thousands of lines of orbax asyncio tracebacks ("Event loop is
  closed", "Task exception was never retrieved"), in the tools and the trainer's fallback."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2",
         "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), str(REPO / "tests"),
                                                     os.environ.get("PYTHONPATH")]))}
  proc = subprocess.run([sys.executable, "-c", _LEFTOVERS_SCRIPT, str(tmp_path)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == ["10", "1"]  # ten failed reads; the trainer fell back to 1
  for leftover in ("Traceback", "Event loop is closed", "never retrieved", "never awaited"):
    assert leftover not in proc.stderr, proc.stderr[-3000:]
  # Only the trainer's own warnings: each damaged step named, then moved aside.
  lines = [line for line in proc.stderr.splitlines()
           if not line.startswith(("I0000", "W0000", "WARNING: All log messages"))]
  assert len(lines) == 8 and all(line.startswith("WARNING:absl:") for line in lines), lines


# ----------------------------------------------------------------------------- workdirs (4)


class Immutable:
  """`chattr +i` on a directory and everything in it (what stops root too), undone on exit."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    self.unavailable = None

  def __enter__(self):
    if shutil.which("chattr") is None:
      self.unavailable = "chattr is missing"
    else:
      proc = subprocess.run(["chattr", "-R", "+i", str(self.path)], capture_output=True,
                            text=True)
      if proc.returncode != 0:
        self.unavailable = f"no immutable flag here (chattr: {proc.stderr.strip()})"
    if self.unavailable is None and os.access(self.path, os.W_OK) and os.geteuid() != 0:
      self.unavailable = "immutable but still writable"
    return self

  def __exit__(self, *exc_info):
    if self.unavailable is None:
      subprocess.run(["chattr", "-R", "-i", str(self.path)], check=True)


def _trainer(tmp_path, workdir: str, *extra: str) -> subprocess.CompletedProcess:
  dirs = {"data_dir": str(tmp_path / "tfds"), "cache": ""}
  argv = [arg for arg in trainer_command(dirs, workdir, *extra)
          if not arg.startswith(("--workdir", "--compilation_cache_dir"))]
  argv.append(f"--workdir={workdir}")
  return subprocess.run(argv, cwd=REPO, env=trainer_env(1), capture_output=True, text=True,
                        timeout=300)


def _one_fatal_line(proc: subprocess.CompletedProcess) -> str:
  lines = [line for line in proc.stderr.splitlines()
           if not line.startswith(("I0000", "W0000", "WARNING: All log messages"))]
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  return lines[0]


@pytest.mark.slow
def test_workdirs_that_cannot_hold_a_run_end_in_one_line(tmp_path):
  """Issue 38, defect 4: a read-only workdir with checkpoints trained, then died in
  TensorBoard's writer (a traceback, exit 1); a file or an empty read-only filesystem
  ended in tracebacks; `--workdir=` wrote into the current directory."""
  run = tmp_path / "run"
  save_steps(run, 1).close()
  empty = tmp_path / "readonly_fs"
  empty.mkdir()
  with Immutable(run) as read_only, Immutable(empty):
    if read_only.unavailable:
      pytest.skip(read_only.unavailable)
    proc = _trainer(tmp_path, str(run))
    assert proc.returncode == 4
    assert _one_fatal_line(proc).startswith(
        f"FATAL Cannot write to the workdir {run} (PermissionError: ")
    assert "the checkpoints already in it are intact" in proc.stderr
    proc = _trainer(tmp_path, str(empty / "run"))
    assert proc.returncode == 4
    assert _one_fatal_line(proc).startswith(
        f"FATAL Cannot write to the workdir {empty / 'run'} (PermissionError: ")
  assert checkpoint_steps(run) == [1]
  afile = tmp_path / "notes.txt"
  afile.write_text("not a directory")
  proc = _trainer(tmp_path, str(afile))
  assert proc.returncode == 1
  assert _one_fatal_line(proc) == (f"FATAL --workdir={afile}: {afile} is a file, not a "
                                   "directory; give the directory of the run (created if "
                                   "missing).")
  proc = _trainer(tmp_path, "")
  assert proc.returncode == 1
  assert _one_fatal_line(proc).startswith("FATAL --workdir is empty: give the directory of "
                                          "the run")
  assert not list(REPO.glob("checkpoints")) and not list(REPO.glob("tensorboard"))


@pytest.mark.slow
def test_a_read_only_workdir_is_still_evaluated_in_place(demo_run, tmp_path):
  """--mode=eval only reads: a read-only workdir scores as the run reported, with a warning
  that its TensorBoard scalars are not written."""
  from demo_run import SHARED_DEVICES, final_json  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / "run"
  shutil.copytree(demo_run["workdir"], workdir)
  dirs = {"data_dir": demo_run["data_dir"], "cache": demo_run["cache"]}
  with Immutable(workdir) as read_only:
    if read_only.unavailable:
      pytest.skip(read_only.unavailable)
    proc = subprocess.run(trainer_command(dirs, workdir, "--mode=eval"), cwd=REPO,
                          env=trainer_env(SHARED_DEVICES), capture_output=True, text=True,
                          timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = final_json(proc.stdout)
  assert (results["step"], results["top1"]) == (8, demo_run["reported"]["top1"])
  assert f"The workdir {workdir} cannot be written: the evaluation's TensorBoard" in proc.stderr
  eval_events = lambda root: sorted(os.listdir(pathlib.Path(root) / "tensorboard" / "eval"))  # noqa: E731
  assert eval_events(workdir) == eval_events(demo_run["workdir"])  # nothing written
