#!/bin/bash
# Train on a Cloud TPU pod slice: create (or reuse) a TPU VM and run the same
# command on every worker, as JAX multi-host training requires.
#
#   launch/tpu_pod.sh --name=nfnets-v4 --zone=us-central2-b --accelerator=v4-64 \
#       --repo=https://github.com/you/nfnets-jax -- \
#       --config=experiments/nfnet.py:F0 --workdir=gs://your-bucket/runs/f0
#
# Options (before `--`):
#   --name, --zone           TPU VM name and zone (required)
#   --accelerator            e.g. v4-64, v5p-128 (needed only to create the VM)
#   --version                TPU VM software version (default tpu-ubuntu2204-base)
#   --project                gcloud project (default: gcloud's configured one)
#   --repo, --ref            git repository and ref cloned on every worker
#   --spot                   create a spot (preemptible) TPU VM
#   --queued                 create it through a queued resource (waits for capacity)
#   --max_restarts=N         rerun the training after a preemption up to N times (default 20)
#   --dry_run                print the gcloud commands instead of running them
# Everything after `--` is passed to `python -m nfnets_jax.train` unchanged.
# Preemption: the workers get SIGTERM, save the step they agree on and exit
# with 75. When the command ends with 75, or the VM was preempted (state
# PREEMPTED/TERMINATED, or gone), the VM is recreated if needed and the same
# command rerun; it resumes from the latest checkpoint in the workdir.
# On TPU pods jax.distributed.initialize() needs no arguments (it asks the TPU
# metadata); the launcher adds --distributed=on so the trainer calls it. Use a gs:// workdir
# (orbax writes checkpoints there from all workers).
set -euo pipefail

NAME="" ZONE="" ACCELERATOR="" VERSION="tpu-ubuntu2204-base" PROJECT="" REPO="" REF="main" DRY_RUN=0
SPOT=0 QUEUED=0 MAX_RESTARTS=20
EXIT_PREEMPTED=75  # the trainer's status after saving the step it stopped at
usage() { sed -n '2,28p' "$0" >&2; exit 2; }
while [ "$#" -gt 0 ]; do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --accelerator=*) ACCELERATOR="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --repo=*) REPO="${1#*=}" ;;
    --ref=*) REF="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    --max_restarts=*) MAX_RESTARTS="${1#*=}" ;;
    --dry_run) DRY_RUN=1 ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "error: unknown option '$1' (trainer flags go after --)" >&2; usage ;;
  esac
  shift
done
[ -n "$NAME" ] || { echo "error: --name is required" >&2; usage; }
[ -n "$ZONE" ] || { echo "error: --zone is required" >&2; usage; }
[ -n "$REPO" ] || { echo "error: --repo is required (cloned on every worker)" >&2; usage; }
[ "$#" -gt 0 ] || { echo "error: pass the trainer's --config=... --workdir=... after --" >&2; usage; }
case "$MAX_RESTARTS" in
  ''|*[!0-9]*) echo "error: --max_restarts must be a whole number, got '$MAX_RESTARTS'" >&2; exit 2 ;;
esac

GCLOUD=(gcloud compute tpus tpu-vm)
COMMON=(--zone="$ZONE")
[ -n "$PROJECT" ] && COMMON+=(--project="$PROJECT")

run() {
  if [ "$DRY_RUN" -eq 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

SPOT_FLAG=()
[ "$SPOT" -eq 1 ] && SPOT_FLAG=(--spot)

create_vm() {
  [ -n "$ACCELERATOR" ] || { echo "error: TPU VM $NAME not found; pass --accelerator to create it" >&2; exit 2; }
  if [ "$QUEUED" -eq 1 ]; then
    run gcloud compute tpus queued-resources create "$NAME" "${COMMON[@]}" --node-id="$NAME" \
        --accelerator-type="$ACCELERATOR" --runtime-version="$VERSION" "${SPOT_FLAG[@]}"
    [ "$DRY_RUN" -eq 1 ] && return
    echo "Waiting for queued resource $NAME to become active..." >&2
    until [ "$(gcloud compute tpus queued-resources describe "$NAME" "${COMMON[@]}" \
               --format='value(state.state)')" = "ACTIVE" ]; do sleep 60; done
  else
    run "${GCLOUD[@]}" create "$NAME" "${COMMON[@]}" --accelerator-type="$ACCELERATOR" \
        --version="$VERSION" "${SPOT_FLAG[@]}"
  fi
}

delete_vm() {  # a preempted VM (or its queued resource) must go before it can be recreated
  if [ "$QUEUED" -eq 1 ]; then
    run gcloud compute tpus queued-resources delete "$NAME" "${COMMON[@]}" --force --quiet || true
  else
    run "${GCLOUD[@]}" delete "$NAME" "${COMMON[@]}" --quiet || true
  fi
}

vm_state() {  # READY, PREEMPTED, TERMINATED, ... or MISSING
  "${GCLOUD[@]}" describe "$NAME" "${COMMON[@]}" --format='value(state)' 2>/dev/null || echo MISSING
}

if [ "$DRY_RUN" -eq 1 ]; then
  # No gcloud calls in a dry run: show the create command when it would be needed.
  [ -n "$ACCELERATOR" ] && create_vm
elif [ "$(vm_state)" != "MISSING" ]; then
  echo "Using existing TPU VM $NAME." >&2
else
  create_vm
fi

# Every worker runs the same command; --distributed=on makes each join the job.
TRAIN_ARGS=$(printf '%q ' "$@" --distributed=on)
WORKER_CMD="set -e; if [ ! -d nfnets-jax ]; then git clone $(printf '%q' "$REPO") nfnets-jax; fi; \
cd nfnets-jax && git fetch --all --quiet && git checkout --quiet $(printf '%q' "$REF") && \
python3 -m pip install --quiet -e '.[all]' 'jax[tpu]' && \
python3 -m nfnets_jax.train $TRAIN_ARGS"
if [ "$DRY_RUN" -eq 1 ]; then
  run "${GCLOUD[@]}" ssh "$NAME" "${COMMON[@]}" --worker=all --command="$WORKER_CMD"
  exit 0
fi

# The rerun loop: a preempted run resumes from its latest checkpoint.
restarts=0
while :; do
  status=0
  "${GCLOUD[@]}" ssh "$NAME" "${COMMON[@]}" --worker=all --command="$WORKER_CMD" || status=$?
  [ "$status" -eq 0 ] && exit 0
  state=$(vm_state)
  case "$state" in
    READY) [ "$status" -eq "$EXIT_PREEMPTED" ] || {
             echo "training failed with status $status (TPU VM $NAME is $state); not rerunning" >&2
             exit "$status"; } ;;
  esac
  if [ "$restarts" -ge "$MAX_RESTARTS" ]; then
    echo "preempted again after $restarts restarts (--max_restarts=$MAX_RESTARTS); stopping" >&2
    exit "$status"
  fi
  restarts=$((restarts + 1))
  echo "training stopped (status $status, TPU VM $NAME is $state); restart $restarts of $MAX_RESTARTS" >&2
  case "$state" in
    READY) ;;
    MISSING) create_vm ;;
    *) delete_vm; create_vm ;;
  esac
done
