#!/usr/bin/env bash
# A Ray cluster of several nodes on this one machine: the launcher flow without a cloud.
#
#   bash launch/local_cluster.sh up [WORKERS] [CPUS]   # a head + WORKERS worker nodes of CPUS CPUs each (2, 2)
#   .venv/bin/dni submit configs/debug.yaml            # a run, as a Ray job (dashboard on 127.0.0.1:8265)
#   .venv/bin/dni train configs/debug.yaml backend=ray --address 127.0.0.1:6390   # or a driver here
#   bash launch/local_cluster.sh status
#   bash launch/local_cluster.sh down                  # stops this cluster's processes only
#
# Every node is a real raylet joined to the head, as on separate machines; stages are placed
# on the worker nodes (the head offers no CPUs, like launch/cluster.yaml). Everything binds
# 127.0.0.1. Token authentication is on (RAY_AUTH_MODE=token; the token is ~/.ray/auth_token,
# generated when missing). The processes are told apart from other Ray instances on this
# machine by their temporary folder, DNI_CLUSTER_DIR (default /tmp/dni-cluster).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PATH="$ROOT/.venv/bin:$PATH"   # the jobs' `python` is the project's environment
export RAY_AUTH_MODE=token
DIR=${DNI_CLUSTER_DIR:-/tmp/dni-cluster}
PORT=${DNI_CLUSTER_PORT:-6390}
DASHBOARD_PORT=${DNI_DASHBOARD_PORT:-8265}
# Each node's dashboard agent needs a port of its own (Ray's default, 52365, is taken by the first
# Ray instance on a machine, and jobs run only where an agent answers).
AGENT_PORT=${DNI_AGENT_PORT:-52400}

up() {
  local workers=${1:-2} cpus=${2:-2}
  if pgrep -f -- "$DIR/session" >/dev/null; then
    echo "local_cluster: already up (bash launch/local_cluster.sh down first)" >&2
    exit 1
  fi
  ray get-auth-token --generate >/dev/null  # the shared secret of every node and client
  ray start --head --node-ip-address=127.0.0.1 --port="$PORT" --num-cpus=0 --num-gpus=0 \
    --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
    --dashboard-agent-listen-port="$AGENT_PORT" --temp-dir="$DIR" --disable-usage-stats >/dev/null
  for i in $(seq 1 "$workers"); do
    ray start --address="127.0.0.1:$PORT" --node-ip-address=127.0.0.1 --num-cpus="$cpus" --num-gpus=0 \
      --resources="{\"dni_node_$i\": 1}" --dashboard-agent-listen-port=$((AGENT_PORT + i)) \
      --disable-usage-stats >/dev/null
  done
  # The job server takes jobs only once the head's agent is up: probe it with a no-op job.
  for _ in $(seq 1 90); do
    if ray job submit --address="http://127.0.0.1:$DASHBOARD_PORT" --no-wait -- true >/dev/null 2>&1; then
      echo "local_cluster: head 127.0.0.1:$PORT, dashboard http://127.0.0.1:$DASHBOARD_PORT, $workers worker nodes of $cpus CPUs"
      return 0
    fi
    sleep 1
  done
  echo "local_cluster: the job server did not accept jobs within 90 s (see $DIR/session_latest/logs)" >&2
  exit 1
}

down() {
  # Only this cluster's processes: their command lines name its temporary folder, and their
  # children (the agents, whose process titles do not), collected before their parents go.
  local pids children
  pids=$(pgrep -f -- "$DIR/session" || true)
  children=$(for p in $pids; do pgrep -P "$p" || true; done)
  [ -n "$pids$children" ] && kill -TERM $pids $children 2>/dev/null || true
  for _ in $(seq 1 50); do
    alive=""
    for p in $pids $children; do kill -0 "$p" 2>/dev/null && alive="$alive $p"; done
    [ -z "$alive" ] && break
    sleep 0.2
  done
  [ -n "${alive:-}" ] && kill -KILL $alive 2>/dev/null || true
  echo "local_cluster: down"
}

status() {
  ray status --address="127.0.0.1:$PORT"
}

case "${1:-}" in
  up) shift; up "$@" ;;
  down) down ;;
  status) status ;;
  *) echo "usage: bash launch/local_cluster.sh up [WORKERS] [CPUS] | status | down" >&2; exit 2 ;;
esac
