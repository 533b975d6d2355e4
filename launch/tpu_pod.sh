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
#   --dry_run                print the gcloud commands instead of running them
# Everything after `--` is passed to `python -m nfnets_jax.train` unchanged.
# On TPU pods jax.distributed.initialize() needs no arguments (it asks the TPU
# metadata); the launcher adds --distributed=on so the trainer calls it. Use a gs:// workdir
# (orbax writes checkpoints there from all workers).
set -euo pipefail

NAME="" ZONE="" ACCELERATOR="" VERSION="tpu-ubuntu2204-base" PROJECT="" REPO="" REF="main" DRY_RUN=0
usage() { sed -n '2,20p' "$0" >&2; exit 2; }
while [ "$#" -gt 0 ]; do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --accelerator=*) ACCELERATOR="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --repo=*) REPO="${1#*=}" ;;
    --ref=*) REF="${1#*=}" ;;
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

GCLOUD=(gcloud compute tpus tpu-vm)
COMMON=(--zone="$ZONE")
[ -n "$PROJECT" ] && COMMON+=(--project="$PROJECT")

run() {
  if [ "$DRY_RUN" -eq 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

if [ "$DRY_RUN" -eq 1 ]; then
  # No gcloud calls in a dry run: show the create command when it would be needed.
  [ -n "$ACCELERATOR" ] && run "${GCLOUD[@]}" create "$NAME" "${COMMON[@]}" \
      --accelerator-type="$ACCELERATOR" --version="$VERSION"
elif "${GCLOUD[@]}" describe "$NAME" "${COMMON[@]}" >/dev/null 2>&1; then
  echo "Using existing TPU VM $NAME." >&2
else
  [ -n "$ACCELERATOR" ] || { echo "error: TPU VM $NAME not found; pass --accelerator to create it" >&2; exit 2; }
  run "${GCLOUD[@]}" create "$NAME" "${COMMON[@]}" --accelerator-type="$ACCELERATOR" --version="$VERSION"
fi

# Every worker runs the same command; --distributed=on makes each join the job.
TRAIN_ARGS=$(printf '%q ' "$@" --distributed=on)
WORKER_CMD="set -e; if [ ! -d nfnets-jax ]; then git clone $(printf '%q' "$REPO") nfnets-jax; fi; \
cd nfnets-jax && git fetch --all --quiet && git checkout --quiet $(printf '%q' "$REF") && \
python3 -m pip install --quiet -e '.[all]' 'jax[tpu]' && \
python3 -m nfnets_jax.train $TRAIN_ARGS"
run "${GCLOUD[@]}" ssh "$NAME" "${COMMON[@]}" --worker=all --command="$WORKER_CMD"
