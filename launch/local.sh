#!/usr/bin/env bash
# Start N clipjax processes on this machine, as if on N hosts: each gets its share of fake CPU
# devices and talks to the others through gloo CPU collectives and a coordinator on localhost.
#
#   launch/local.sh 2 --config=configs/clip_vitb32.py:local --workdir=/tmp/clip_2x4
#
# Environment: DEVICES (devices per process, default 4), PORT (the coordinator's, default a
# free one), MODULE (default clipjax.main). Process 0 prints to this terminal; process i>0 to
# WORKDIR-less logs under LOGDIR (default /tmp/clipjax_local_<port>/process_<i>.log). The exit
# status is the first non-zero one of the processes (0 when all succeed). Ctrl-C or SIGTERM is
# passed to every process, which saves a checkpoint and exits.
set -euo pipefail
if [[ $# -lt 1 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: launch/local.sh N ARGS...  (N processes of python -m clipjax.main ARGS)" >&2
  exit 2
fi
n=$1
shift
devices=${DEVICES:-4}
port=${PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
logdir=${LOGDIR:-/tmp/clipjax_local_$port}
mkdir -p "$logdir"

export JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices"
pids=()
for ((i = 0; i < n; i++)); do
  cmd=(python -m "${MODULE:-clipjax.main}" --distributed --coordinator="localhost:$port"
    --num_processes="$n" --process_id="$i" "$@")
  if ((i == 0)); then
    "${cmd[@]}" &
  else
    "${cmd[@]}" >"$logdir/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
status=0
for pid in "${pids[@]}"; do
  code=0
  wait "$pid" || code=$?
  # A trapped signal interrupts `wait`: wait again for the process itself.
  while kill -0 "$pid" 2>/dev/null; do wait "$pid" || code=$?; done
  ((status == 0)) && status=$code
done
((n > 1)) && echo "launch/local.sh: $n processes exited (status $status); logs of 1..$((n - 1)) in $logdir" >&2
exit "$status"
