#!/usr/bin/env bash
# Train on every host of a Cloud TPU VM pod slice. JAX finds the other hosts by itself
# (jax.distributed.initialize() with no arguments on TPU).
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/clip_vitb32.py gs://bucket/runs/clip_vitb32 [--config.x=...]
#
# The repo must be checked out at ~/clipjax on every host with `pip install -r requirements.txt`
# done (e.g. by the same gcloud command with --command="cd clipjax && pip install -r ...").
set -euo pipefail
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
# Every argument quoted for the remote shell, so that an override may hold spaces.
args=$(printf ' %q' --distributed "--config=$config" "--workdir=$workdir" "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all \
  --command="cd ~/clipjax && python -m clipjax.main$args"
