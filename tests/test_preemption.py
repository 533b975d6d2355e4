"""Preemption, damaged checkpoints and failed saves (issue 28).

In this process: the signal handling and stop agreement of
nfnets_jax/train/preemption.py, and nfnets_jax/train/checkpoint_recovery.py on
real orbax checkpoints of a small train state. In subprocesses (slow): the
trainer signalled at exact moments (tests/preemption_hook.py), resumed, and
compared bitwise with the session's uninterrupted runs (tests/demo_run.py).
"""

import os
import pathlib
import shutil
import signal
import subprocess

import numpy as np
import pytest

from checkpoint_helpers import LINEARS, abstract_target, save_steps, small_state
from demo_run import (REPO, SHARED_DEVICES, SHARED_EXTRA, checkpoint_steps, final_json,
                      local_launch, trainer_command, trainer_env)
from nfnets_jax.train import checkpoint_recovery, preemption, steps
from nfnets_jax.train.checkpoints import Checkpointer

HOOK = REPO / "tests" / "preemption_hook.py"


# ----------------------------------------------------------------------------- signals


def test_first_signal_requests_a_stop_later_ones_are_ignored_and_handlers_come_back():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.StopSignals() as signals:
    poll = preemption.StopPoll(steps.make_mesh(), signals)
    assert not poll.poll()
    os.kill(os.getpid(), signal.SIGTERM)  # real signals; the default would end pytest
    os.kill(os.getpid(), signal.SIGINT)
    assert signals.requested and signals.signal_name == "SIGTERM"
    assert poll.poll() and poll.signal_name == "SIGTERM"
  assert signal.getsignal(signal.SIGTERM) is before


def test_preempted_message_names_the_step_and_how_to_resume():
  err = preemption.Preempted(6, "SIGTERM", "/w/checkpoints", "evaluation")
  assert str(err) == ("Stopped on SIGTERM during evaluation at step 6: its checkpoint is complete "
                      "in /w/checkpoints. Rerun the same command to resume from step 6.")


# ----------------------------------------------------------------------------- checkpoints


def _largest_file(directory: pathlib.Path) -> pathlib.Path:
  return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate_array_file(step_dir: pathlib.Path) -> None:
  path = _largest_file(step_dir / "params")
  path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 3])


def _remove_item(step_dir: pathlib.Path) -> None:
  shutil.rmtree(step_dir / "opt_state")


def _garble_metadata(step_dir: pathlib.Path) -> None:
  (step_dir / "params" / "_METADATA").write_text("{not json")


@pytest.mark.parametrize("damage", [_truncate_array_file, _remove_item, _garble_metadata])
def test_damaged_newest_checkpoint_is_named_set_aside_and_the_next_older_restored(
    tmp_path, damage, caplog):
  checkpointer = save_steps(tmp_path, 1, 2, 3)
  damage(tmp_path / "checkpoints" / "3")
  state, meta, step = checkpoint_recovery.restore_newest_readable(
      checkpointer, abstract_target(), steps.make_mesh())
  assert (step, meta["step"]) == (2, 2)
  np.testing.assert_array_equal(state.params[LINEARS[0]]["w"],
                                small_state(2).params[LINEARS[0]]["w"])
  assert f"Checkpoint step 3 in {tmp_path / 'checkpoints'} cannot be read" in caplog.text
  assert (tmp_path / "damaged_checkpoints" / "3" / "params").is_dir()  # moved, not deleted
  assert checkpointer.all_steps() == [1, 2]
  checkpointer.save(small_state(3), {"model": "test"})  # the resumed run can save step 3 again
  assert checkpointer.all_steps() == [1, 2, 3]
  checkpointer.close()


def test_no_readable_checkpoint_lists_every_step_and_moves_nothing(tmp_path):
  checkpointer = save_steps(tmp_path, 1, 2)
  for step in (1, 2):
    _remove_item(tmp_path / "checkpoints" / str(step))
  with pytest.raises(checkpoint_recovery.NoReadableCheckpointError,
                     match=r"None of the 2 checkpoints in .*checkpoints can be restored \(step 2: "
                           r".*; step 1: .*\)\. Nothing was moved or deleted"):
    checkpoint_recovery.restore_newest_readable(checkpointer, abstract_target(), steps.make_mesh())
  assert checkpoint_steps(tmp_path) == [1, 2] and not (tmp_path / "damaged_checkpoints").exists()
  checkpointer.close()


def test_tools_reading_a_damaged_step_get_a_clear_error_naming_the_other_steps(tmp_path):
  """Evaluate/convert/classify read workdirs through weights.load_params."""
  from nfnets_jax import weights  # pylint: disable=import-outside-toplevel
  save_steps(tmp_path, 1, 2).close()
  _truncate_array_file(tmp_path / "checkpoints" / "2")
  with pytest.raises(weights.DamagedCheckpointError,
                     match=r"\(step 2\): the 'params' item cannot be read \(.*\); the checkpoint may "
                           r"be damaged .* Other saved steps in .*checkpoints: \[1\]; read one with "
                           r"step= \(--step\)\."):
    weights.load_params(tmp_path)
  np.testing.assert_array_equal(weights.load_params(tmp_path, step=1)[LINEARS[0]]["w"],
                                small_state(1).params[LINEARS[0]]["w"])


class ReadOnly:
  """Makes a directory unwritable, for root too: chmod for others, `chattr +i` as root.

  `unavailable` says why it could not (root on a filesystem without the
  immutable flag); the directory is then left as it was.
  """

  def __init__(self, path: pathlib.Path):
    self.path = path
    self.unavailable = None

  def __enter__(self):
    if os.geteuid() != 0:
      self.path.chmod(0o555)
    elif shutil.which("chattr") is None:
      self.unavailable = "running as root, where chmod does not stop writes, and chattr is missing"
    else:
      proc = subprocess.run(["chattr", "+i", str(self.path)], capture_output=True, text=True)
      if proc.returncode != 0:
        self.unavailable = ("running as root, where chmod does not stop writes, on a filesystem "
                            f"without the immutable flag (chattr +i: {proc.stderr.strip()})")
    return self

  def __exit__(self, *exc_info):
    if os.geteuid() != 0:
      self.path.chmod(0o755)
    elif self.unavailable is None:
      subprocess.run(["chattr", "-i", str(self.path)], check=True)


def test_failed_save_names_directory_step_and_cause_and_keeps_previous(tmp_path):
  checkpointer = save_steps(tmp_path, 1)
  ckpt = tmp_path / "checkpoints"
  with ReadOnly(ckpt) as read_only:
    if read_only.unavailable:
      pytest.skip(read_only.unavailable)
    with pytest.raises(checkpoint_recovery.CheckpointSaveError) as err:
      checkpointer.save(small_state(2), {"model": "test"})
  message = str(err.value)
  assert message.startswith(f"Saving the checkpoint of step 2 in {ckpt} failed (PermissionError")
  assert "it was not saved" in message and "\n" not in message
  assert checkpoint_steps(tmp_path) == [1]
  _, meta, step = checkpoint_recovery.restore_newest_readable(
      Checkpointer(str(tmp_path), async_save=False), abstract_target(), steps.make_mesh())
  assert (step, meta["step"]) == (1, 1)


# ----------------------------------------------------------------------------- the trainer


def _hooked(dirs, workdir, moment: str, *extra: str) -> subprocess.CompletedProcess:
  """The shared demo's command (keeping 3 checkpoints), run through preemption_hook
  signalling at `moment`; without one, the trainer itself."""
  argv = trainer_command(dirs, workdir, *SHARED_EXTRA, "--config.keep_checkpoints=3", *extra)
  env = trainer_env(SHARED_DEVICES)
  if moment:
    argv[1:3] = [str(HOOK)]  # `python -m nfnets_jax.train` -> `python tests/preemption_hook.py`
    env.update(NFNETS_TEST_SIGNAL=moment,
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), str(REPO / "tests"),
                                                        env.get("PYTHONPATH")])))
  return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _stopped_line(step: int, during: str = "training", signal_name: str = "SIGTERM") -> str:
  return (f"Stopped on {signal_name} during {during} at step {step}: its checkpoint is complete "
          "in ")


def _without_seconds(results: dict) -> dict:
  return {key: value for key, value in results.items() if key != "seconds"}


@pytest.mark.slow
def test_sigterm_in_a_step_a_save_and_an_evaluation_loses_no_step(demo_run, tmp_path):
  """One workdir, stopped three times (during step 2; while step 4's async save is written,
  with a second signal on top; in the evaluation at step 6), then refused a save (a
  read-only checkpoint directory), then resumed past a damaged newest checkpoint:
  it ends bitwise equal to the session's uninterrupted run."""
  dirs = {"data_dir": demo_run["data_dir"], "cache": demo_run["cache"]}
  workdir, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"
  stops = [("step:2", 2, "training", []), ("save:4", 4, "training", []),
           ("eval:1", 6, "evaluation", ["--config.eval_every_steps=6"])]
  for moment, step, during, extra in stops:
    proc = _hooked(dirs, workdir, moment, *extra)
    assert proc.returncode == preemption.EXIT_PREEMPTED, proc.stderr[-3000:]
    assert _stopped_line(step, during) + str(ckpt) in proc.stderr
    assert checkpoint_steps(workdir)[-1] == step
    if moment.startswith("save"):
      assert "SIGINT received while already stopping on SIGTERM: ignored" in proc.stderr
  assert checkpoint_steps(workdir) == [2, 4, 6]

  with ReadOnly(ckpt) as read_only:  # resumes from 6, then cannot save step 8
    if not read_only.unavailable:  # (the in-process test reports the skip)
      proc = _hooked(dirs, workdir, "")
  if not read_only.unavailable:
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert (f"FATAL Saving the checkpoint of step 8 in {ckpt} failed (PermissionError"
            in proc.stderr)
    assert checkpoint_steps(workdir) == [2, 4, 6] and "eval top-1" not in proc.stdout

  _truncate_array_file(ckpt / "6")
  proc = _hooked(dirs, workdir, "")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"Checkpoint step 6 in {ckpt} cannot be read" in proc.stderr
  assert "Resumed from step 4" in proc.stderr
  assert (workdir / "damaged_checkpoints" / "6").is_dir()
  assert _without_seconds(final_json(proc.stdout)) == _without_seconds(demo_run["reported"])


@pytest.mark.slow
def test_two_processes_signal_one_both_stop_at_the_same_step_and_resume_bitwise(
    two_process_run, tmp_path):
  # The shared run's compilation cache: JAX writes it from process 0 only, but both
  # processes read it, and the train, eval and init programs have one key in both
  # (checked with JAX_EXPLAIN_CACHE_MISSES=1: each process compiles only small
  # programs of its own devices), so neither waits in a collective, past gloo's
  # 30 s, while the other compiles a large program alone.
  dirs = {"data_dir": two_process_run["data_dir"], "cache": two_process_run["cache"]}
  outputs = local_launch(dirs, tmp_path, module="preemption_hook",
                         env={"NFNETS_TEST_SIGNAL": "step:2", "NFNETS_TEST_SIGNAL_PROCESS": "1"})
  for status, _, stderr in outputs:
    assert status == preemption.EXIT_PREEMPTED, stderr[-3000:]
  # The agreement is read one boundary after the signal: both stop after step 3.
  assert _stopped_line(3) in outputs[1][2]
  assert _stopped_line(3, signal_name="a stop request from another process") in outputs[0][2]
  assert checkpoint_steps(tmp_path) == [3]

  outputs = local_launch(dirs, tmp_path)
  for status, _, stderr in outputs:
    assert status == 0, stderr[-3000:]
    assert "Resumed from step 3" in stderr
  want = [_without_seconds(line) for line in two_process_run["reported"]]
  assert [_without_seconds(final_json(stdout)) for _, stdout, _ in outputs] == want


# ----------------------------------------------------------------------------- bounded stops


@pytest.fixture(scope="module")
def own_dirs(tmp_path_factory):
  """A data dir and an empty compilation cache for the one-device runs signalled before
  their first step: they need the seconds the programs take to compile (a cache filled
  by an earlier run would leave the signal racing the first step)."""
  root = tmp_path_factory.mktemp("bounded_stops")
  return {"data_dir": str(root / "tfds"), "cache": str(root / "xla_cache")}


def _signalled(dirs, workdir, wait_for: str, *signals: tuple[float, int], moment: str = "",
               env: dict | None = None, devices: int = 1) -> tuple[int, str, float]:
  """Runs the demo on `devices` (through preemption_hook at `moment`), sends `signals`
  ((seconds after the line, signal)) once a stderr line contains `wait_for`; returns
  the exit status, stderr and the seconds from the first signal to the exit."""
  import threading  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  argv = trainer_command(dirs, workdir)
  run_env = trainer_env(devices, **(env or {}))
  if moment:
    argv[1:3] = [str(HOOK)]
    run_env.update(NFNETS_TEST_SIGNAL=moment, PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO), str(REPO / "tests"), run_env.get("PYTHONPATH")])))
  proc = subprocess.Popen(argv, cwd=REPO, env=run_env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  lines, seen = [], threading.Event()

  def read():
    for line in proc.stderr:
      lines.append(line)
      if wait_for in line:
        seen.set()
    seen.set()

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  assert seen.wait(300) and proc.poll() is None, "".join(lines)[-3000:]
  start = time.monotonic()
  sent_at = start
  for delay, signum in signals:
    time.sleep(max(0.0, start + delay - time.monotonic()))
    if proc.poll() is None:
      proc.send_signal(signum)
  try:
    proc.wait(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  reader.join(10)
  return proc.returncode, "".join(lines), time.monotonic() - sent_at


@pytest.mark.slow
@pytest.mark.parametrize("wait_for, signum", [
    ("initialising nfnet:nano", signal.SIGTERM),  # the init program compiles next
    ("Training nfnet:nano for", signal.SIGINT),  # the train step compiles next
])
def test_a_signal_before_the_first_step_ends_the_run_at_once(own_dirs, tmp_path, wait_for,
                                                             signum):
  """Issue 38, defect 2: a signal while building, restoring or compiling was only read at a
  step boundary (and never, where the first step could not come). With nothing trained
  to save, the run ends at once with one line and the status that says "rerun me"."""
  status, stderr, seconds = _signalled(own_dirs, tmp_path, wait_for, (0.0, signum))
  name = signal.Signals(signum).name
  assert status == preemption.EXIT_PREEMPTED, stderr[-3000:]
  assert seconds < 20
  assert (f"Stopped on {name} before the first training step (while reading the data, "
          "restoring or compiling): no step had been trained since the last checkpoint, so "
          f"nothing was lost (the checkpoints in {tmp_path / 'checkpoints'}, if any, are as "
          "they were). Rerun the same command to resume.") in stderr
  assert "Traceback" not in stderr and not checkpoint_steps(tmp_path)


def _shared_dirs(demo_run) -> dict:
  """The session's demo data and compilation cache: a stuck-step run on the demo's devices
  compiles nothing (its programs are the demo's); the cache is only read."""
  return {"data_dir": demo_run["data_dir"], "cache": demo_run["cache"]}


@pytest.mark.slow
def test_a_step_that_cannot_finish_ends_the_run_after_the_grace_period(demo_run, tmp_path):
  """Step 2 never returns (a stuck input pipeline or device) after its SIGTERM: the stop,
  read only at a step boundary, would wait forever. After the grace period (3 s here)
  the run ends with one line; the checkpoints it saved are kept."""
  status, stderr, seconds = _signalled(
      _shared_dirs(demo_run), tmp_path, "SIGTERM received: finishing the current step",
      moment="stuck:2", env={"NFNETS_TEST_MIN_GRACE": "3"}, devices=SHARED_DEVICES)
  assert status == 128 + signal.SIGTERM, stderr[-3000:]
  assert seconds < 30
  assert ("Stopped on SIGTERM: the running step did not end within 3 s of the signal (0 x the "
          "longest step so far, at least 3 s; the input pipeline or a device may be stuck), so "
          "its progress since the last checkpoint is lost; the complete checkpoints in "
          f"{tmp_path / 'checkpoints'} are kept.") in stderr
  assert "Traceback" not in stderr


@pytest.mark.slow
def test_a_second_signal_ends_the_run_at_once_unless_it_is_the_same_delivered_twice(
    demo_run, tmp_path):
  """The first SIGTERM asks step 2 to end, which it never does; a SIGINT 0.5 s later is
  the same request delivered twice (a launcher forwarding Ctrl-C), one 3 s later ends
  the run at once, where the default grace period (60 s) would still be waiting."""
  status, stderr, seconds = _signalled(
      _shared_dirs(demo_run), tmp_path, "SIGTERM received: finishing the current step",
      (0.5, signal.SIGINT), (3.0, signal.SIGINT), moment="stuck:2", devices=SHARED_DEVICES)
  assert status == 128 + signal.SIGINT, stderr[-3000:]
  assert 3.0 <= seconds < 20
  assert ("SIGINT received while already stopping on SIGTERM: ignored, as the same stop "
          "request delivered twice") in stderr
  assert ("Stopped on a second signal (SIGINT, after SIGTERM) without finishing the stop: a "
          "checkpoint being written is left incomplete; the complete ones in "
          f"{tmp_path / 'checkpoints'} are kept.") in stderr
  assert "Traceback" not in stderr
