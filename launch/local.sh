#!/usr/bin/env bash
# Start N clipjax processes on this machine, as if on N hosts: each gets its share of fake CPU
# devices and talks to the others through gloo CPU collectives and a coordinator listening on
# the loopback address only.
#
#   launch/local.sh 2 --config=configs/clip_vitb32.py:local --workdir=/tmp/clip_2x4
#   launch/local.sh --max_restarts=3 2 ...   # a lost process restarts the group, 3 times at most
#
# Environment: DEVICES (devices per process, default 4), PORT (the coordinator's, default a
# free one at each start), MODULE (default clipjax.main), LOGDIR (default
# /tmp/clipjax_local_<pid>). Every process's output goes to LOGDIR/process_<i>.log, and process
# 0's to this terminal too. When a process dies, the others are stopped and one line names it
# (launch/supervise.py). The exit status is the first non-zero one of the processes (0 when
# all succeed). Ctrl-C or SIGTERM is passed to every process, which saves a checkpoint and exits.
set -euo pipefail
restarts=0
if [[ ${1:-} =~ ^--max_restarts=([0-9]+)$ ]]; then
  restarts=${BASH_REMATCH[1]}
  shift
fi
if [[ $# -lt 1 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: launch/local.sh [--max_restarts=K] N ARGS...  (N processes of python -m clipjax.main ARGS)" >&2
  exit 2
fi
n=$1
shift
export JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES:-4}"
exec python "$(dirname "$0")/supervise.py" --processes="$n" --max_restarts="$restarts" \
  --logdir="${LOGDIR:-/tmp/clipjax_local_$$}" -- "$@"
