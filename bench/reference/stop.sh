#!/usr/bin/env bash
# Stops what bench/reference/start.sh started in one run dir: the node processes first (SIGTERM,
# then SIGKILL after 5 s), then the private redis-server. Only the PIDs recorded there, and only
# while they still run the program they were started as.
#
#   bench/reference/stop.sh [RUN_DIR]      (default: $REF_RUN_DIR)
set -euo pipefail

RUN_DIR=${1:-${REF_RUN_DIR:-}}
[[ -n $RUN_DIR && -d $RUN_DIR ]] || { echo "usage: $0 RUN_DIR (or set REF_RUN_DIR)" >&2; exit 2; }

# Running, and not a zombie waiting to be reaped by init.
alive() {
  local st
  st=$(ps -o stat= -p "$1" 2>/dev/null) && [[ $st != Z* ]]
}

# stop PIDFILE EXPECTED: stops the pid in PIDFILE if its command line contains EXPECTED.
stop() {
  local file=$1 expected=$2 pid cmdline
  [[ -e $file ]] || return 0
  pid=$(cat "$file")
  # The command line is read whole, not piped into `grep -q`, whose early exit could kill tr
  # with SIGPIPE and, under pipefail, fail the test for a process that is there.
  if [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" &&
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) &&
    [[ $cmdline == *"$expected"* ]]; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
      alive "$pid" || break
      sleep 0.1
    done
    if alive "$pid"; then
      echo "pid $pid ($expected) ignored SIGTERM; killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$file"
}

for f in "$RUN_DIR"/ref-*.pid; do
  [[ -e $f ]] || continue
  stop "$f" server.mjs &
done
wait
stop "$RUN_DIR/redis.pid" redis-server
echo "stopped the reference peer of $RUN_DIR"
