"""The launchers: argument handling and the exact commands they would run."""

import os
import signal
import pathlib
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TRAIN = ["--config=experiments/nfnet.py:F0", "--workdir=gs://bucket/f0"]


def run(argv, env=None):
  return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60,
                        env={**os.environ, **(env or {})})


def test_tpu_pod_dry_run_creates_vm_and_runs_trainer_on_every_worker():
  proc = run(["bash", "launch/tpu_pod.sh", "--name=nf", "--zone=us-central2-b",
              "--accelerator=v4-64", "--repo=https://example.com/nfnets-jax.git", "--dry_run",
              "--", *TRAIN])
  assert proc.returncode == 0, proc.stderr
  create, ssh = proc.stdout.strip().splitlines()
  assert create.split() == ["gcloud", "compute", "tpus", "tpu-vm", "create", "nf",
                            "--zone=us-central2-b", "--accelerator-type=v4-64",
                            "--version=tpu-ubuntu2204-base"]
  assert ssh.startswith("gcloud compute tpus tpu-vm ssh nf --zone=us-central2-b --worker=all")
  for piece in ("git\\ clone", "python3\\ -m\\ nfnets_jax.train", "--config=experiments/nfnet.py:F0",
                "--workdir=gs://bucket/f0", "--distributed=on"):
    assert piece in ssh


def test_tpu_pod_requires_name_zone_repo_and_trainer_flags():
  for missing in ("--name=nf", "--zone=z", "--repo=r"):
    args = [a for a in ("--name=nf", "--zone=z", "--repo=r") if a != missing]
    proc = run(["bash", "launch/tpu_pod.sh", *args, "--dry_run", "--", *TRAIN])
    assert proc.returncode == 2 and missing.split("=")[0] + " is required" in proc.stderr
  proc = run(["bash", "launch/tpu_pod.sh", "--name=nf", "--zone=z", "--repo=r", "--dry_run"])
  assert proc.returncode == 2 and "after --" in proc.stderr
  proc = run(["bash", "launch/tpu_pod.sh", "--nmae=nf"])
  assert proc.returncode == 2 and "unknown option '--nmae=nf'" in proc.stderr


def test_slurm_script_runs_the_trainer_through_srun():
  proc = run(["bash", "launch/slurm.sbatch", *TRAIN, "--config.train_batch_size=1024"],
             env={"SRUN": "echo srun", "PYTHON": "python3"})
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split() == ["srun", "--kill-on-bad-exit=1", "python3", "-m",
                                 "nfnets_jax.train", *TRAIN, "--config.train_batch_size=1024"]


def test_slurm_script_rejects_missing_flags():
  assert run(["bash", "launch/slurm.sbatch"]).returncode == 2
  proc = run(["bash", "launch/slurm.sbatch", "--config=experiments/demo.py"],
             env={"SRUN": "echo"})
  assert proc.returncode == 2 and "--workdir" in proc.stderr


def test_local_launcher_gives_each_process_its_coordinates():
  proc = run([sys.executable, "launch/local.py", "--num_processes=3", "--devices_per_process=2",
              "--dry_run", "--", "--config=experiments/demo.py", "--workdir=/tmp/w"],
             env={"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"})
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    # The caller's XLA flags are kept; the shell-quoted line can be pasted as it is.
    assert ("XLA_FLAGS='--xla_cpu_enable_fast_math=false "
            "--xla_force_host_platform_device_count=2'") in line
    assert "-m nfnets_jax.train --config=experiments/demo.py --workdir=/tmp/w" in line
    assert f"--num_processes=3 --process_id={i}" in line
    assert "--coordinator_address=127.0.0.1:" in line
  bad = run([sys.executable, "launch/local.py", "--num_processes=0", "--", "--config=x", "--workdir=y"])
  assert bad.returncode == 2 and "--num_processes must be >= 1" in bad.stderr
  bad = run([sys.executable, "launch/local.py", "--", "--workdir=y"])
  assert bad.returncode == 2 and "--config" in bad.stderr


def test_slurm_script_passes_sigterm_to_the_trainer_and_requeues_on_a_saved_stop(tmp_path):
  """SIGTERM to the batch script (what --signal=B:TERM sends) reaches srun's tasks; their
  exit status 75 (stopped after saving) makes the script requeue the job and exit 75."""
  fake_srun = tmp_path / "srun"
  fake_srun.write_text("#!/bin/bash\ntrap 'echo task got TERM; exit 75' TERM\necho started\n"
                       "while :; do sleep 0.05; done\n")
  fake_srun.chmod(0o755)
  out = tmp_path / "out"
  with open(out, "w") as stdout:
    script = subprocess.Popen(["bash", "launch/slurm.sbatch", *TRAIN], cwd=REPO, stdout=stdout,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "SRUN": str(fake_srun),
                                   "SCONTROL": "echo scontrol", "SLURM_JOB_ID": "4242"})
    deadline = time.time() + 30
    while "started" not in out.read_text() and time.time() < deadline:
      time.sleep(0.05)
    script.send_signal(signal.SIGTERM)
    _, stderr = script.communicate(timeout=30)
  assert script.returncode == 75, stderr
  assert out.read_text().splitlines() == ["started", "task got TERM", "scontrol requeue 4242"]
  assert "requeueing job 4242" in stderr


FAKE_GCLOUD = """#!/bin/bash
# Records each call; the VM's state lives in $STATE; ssh exits with the next line of $SSH_LEFT
# ('preempt': the VM goes PREEMPTED and ssh drops).
echo "$*" >> "$LOG"
case "$*" in
  *" describe "*) cat "$STATE" 2>/dev/null || exit 1 ;;
  *" delete "*) rm -f "$STATE" ;;
  *" create "*) echo READY > "$STATE" ;;
  *" ssh "*)
    status=$(sed -n 1p "$SSH_LEFT"); sed -i 1d "$SSH_LEFT"
    [ "$status" = preempt ] && { echo PREEMPTED > "$STATE"; exit 255; }
    exit "$status" ;;
esac
"""


@pytest.mark.parametrize("ssh_statuses,want_status,want_calls", [
    # Preempted mid-run (ssh drops): recreate the VM, rerun, done.
    (["preempt", "0"], 0, ["describe", "ssh", "describe", "delete", "create", "ssh"]),
    # The trainer stopped after saving (75) on a VM still up: rerun as it is.
    (["75", "0"], 0, ["describe", "ssh", "describe", "ssh"]),
    # Any other failure is not a preemption: no rerun.
    (["1"], 1, ["describe", "ssh", "describe"]),
])
def test_tpu_pod_reruns_the_training_after_a_preemption(tmp_path, ssh_statuses, want_status,
                                                        want_calls):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
  (bin_dir / "gcloud").chmod(0o755)
  (tmp_path / "state").write_text("READY\n")
  (tmp_path / "ssh_left").write_text("\n".join(ssh_statuses) + "\n")
  proc = run(["bash", "launch/tpu_pod.sh", "--name=nf", "--zone=z", "--accelerator=v4-8",
              "--spot", "--repo=r", "--", *TRAIN],
             env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(tmp_path / "log"),
                  "STATE": str(tmp_path / "state"), "SSH_LEFT": str(tmp_path / "ssh_left")})
  assert proc.returncode == want_status, proc.stderr
  calls = (tmp_path / "log").read_text().splitlines()
  assert [call.split()[3] for call in calls] == want_calls
  if "create" in want_calls:
    assert "--spot" in calls[want_calls.index("create")].split()
