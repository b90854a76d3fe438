#!/usr/bin/env bash
# Runs `nemojax train` on every worker of a TPU VM pod slice, checkpointing to GCS.
#
#   scripts/tpu_pod_train.sh TPU_NAME ZONE gs://BUCKET/run [key=value ...]
#
# Each worker clones nothing: the repository must already be on every worker at $REPO (default ~/nemojax,
# e.g. via `gcloud compute tpus tpu-vm scp --worker=all`). JAX finds the pod's coordinator itself, so
# `nemojax train` only needs --distributed on; the data pipeline gives each host its own rows of the global
# batch and Orbax writes one checkpoint from all hosts.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE gs://BUCKET/RUN_DIR [key=value ...]" >&2
  exit 2
fi
TPU_NAME=$1; ZONE=$2; CKPT=$3; shift 3
case "$CKPT" in gs://*) ;; *) echo "checkpoint dir must be a gs:// URL so every worker sees it" >&2; exit 2;; esac
REPO=${REPO:-'~/nemojax'}
CONFIG=${CONFIG:-configs/tiny.yaml}
OVERRIDES="train.ckpt_dir=$CKPT $*"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  cd $REPO
  [ -d .venv ] || (python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]')
  .venv/bin/nemojax train --distributed on --config $CONFIG $OVERRIDES
"
