#!/usr/bin/env bash
# Run N processes on this machine as one JAX job (jax.distributed over loopback, CPU
# collectives through gloo), each with 8/N virtual devices, all running the trainer with
# the same arguments:
#
#   launch/local.sh 2 --config=experiments/configs/smoke.py --workdir=/tmp/rec_llm/mp
#
# If any process fails, the others are stopped and this script exits non-zero, naming
# the failed process. PYTHON selects the interpreter; REC_LLM_TOTAL_DEVICES (default 8)
# the devices shared out among the processes.
set -u

usage() { echo "usage: $0 NUM_PROCESSES TRAINER_ARGS..." >&2; exit 2; }
[ $# -ge 1 ] || usage
n=$1; shift
total=${REC_LLM_TOTAL_DEVICES:-8}
if ! [[ "$n" =~ ^[1-9][0-9]*$ ]] || (( total % n )); then
  echo "local.sh: error: NUM_PROCESSES=$n must be a positive integer dividing $total devices" >&2
  exit 2
fi
py=${PYTHON:-python}
cd "$(dirname "$0")/.." || exit 2
port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])') || exit 2

pids=()
stop_all() {
  local p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for _ in $(seq 50); do
    local alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    (( alive )) || return
    sleep 0.1
  done
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null; done
}
trap 'echo "local.sh: interrupted; stopping all processes" >&2; stop_all; exit 130' INT TERM

for ((i = 0; i < n; i++)); do
  REC_LLM_COORDINATOR="127.0.0.1:$port" REC_LLM_NUM_PROCESSES=$n REC_LLM_PROCESS_ID=$i \
  XLA_FLAGS="--xla_force_host_platform_device_count=$((total / n)) ${XLA_FLAGS:-}" \
    "$py" -m experiments.train "$@" > >(sed -u "s/^/[p$i] /") 2>&1 &
  pids+=("$!")
done

left=$n
while (( left > 0 )); do
  wait -n -p done_pid "${pids[@]}"
  rc=$?
  for ((i = 0; i < n; i++)); do [ "${pids[$i]}" = "$done_pid" ] && break; done
  if (( rc != 0 )); then
    why="exited with code $rc"
    (( rc > 128 )) && why="was killed by signal $((rc - 128)) ($(kill -l $((rc - 128)) 2>/dev/null))"
    echo "local.sh: process $i (pid $done_pid) $why; stopping the other processes" >&2
    stop_all
    exit "$rc"
  fi
  left=$((left - 1))
done
echo "local.sh: all $n processes finished" >&2
