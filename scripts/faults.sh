#!/usr/bin/env bash
# Fault-injection harness: proves that nothing acknowledged is lost or stored twice when parts of
# Chatify crash, restart or stall (see tests/faults/README.md).
#
#   scripts/faults.sh [--full] [SCENARIO...]
#
#   1. starts a complete private system (NATS, HarperDB, persister, two gateways, HAProxy) on free
#      loopback ports in a temporary run directory, with deploy/local/up.sh and the binaries in
#      target/release (or $CHATIFY_BIN_DIR) as they are (CHATIFY_SKIP_BUILD=1: build them first),
#   2. runs the scenarios (all by default) that need that set: persister-crash nats-restart
#      harperdb-outage gateway-crash graceful-shutdown slow-client ordering,
#   3. prints per scenario
#        NAME: attempted=… acknowledged=… stored=… lost=0 duplicated=0 unexpected=0 reordered=0 (… s)
#      and its own checks, writes target/faults/summary.json,
#   4. stops everything (also on failure or ctrl-c); logs of a failed run go to target/faults/logs/,
#   5. then the same with a cluster set (CHATIFY_NATS_NODES=3 CHATIFY_PERSISTERS=2: three NATS
#      nodes, streams replicated three ways, two persisters) for the scenarios that need one:
#      nats-node-loss nats-rolling-restart persister-pair (summary-cluster.json, logs-cluster/).
# A set is started only when a scenario given needs it. Exits non-zero when any count is not zero
# or any check fails.
#
# Default sizes are reduced (a few minutes on two cores); --full uses the full sizes (100,000
# messages, SIGKILL every 5-20 s, HarperDB down 2 minutes...). Every size can be overridden with
# its FAULTS_* variable (listed in tests/faults/README.md), e.g. FAULTS_PERSISTER_MESSAGES=20000.
# Set FAULTS_KEEP_LOGS=1 to keep the logs of a passing run too; FAULTS_TIMEOUT_S bounds the
# scenarios of the whole run (1200 s reduced, 5400 s full). CHATIFY_NATS_SYNC=always runs NATS
# in the strict fsync mode (docs/guarantees.md).
set -euo pipefail
root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

args=()
for arg in "$@"; do
  case $arg in
    -h | --help)
      sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
      exit 0
      ;;
    *) args+=("$arg") ;;
  esac
done

step() { printf '\n==> %s\n' "$*"; }

deploy/local/install.sh
if [[ ! -d tests/e2e/node_modules/socket.io-client || ! -d tests/e2e/node_modules/ws ]]; then
  step "installing the e2e suite's client libraries (tests/e2e: npm ci)"
  (cd tests/e2e && npm ci --no-audit --no-fund --loglevel=error)
fi
missing=()
for bin in chatify-gateway chatify-persister; do
  [[ -x ${CHATIFY_BIN_DIR:-target/release}/$bin ]] || missing+=("${CHATIFY_BIN_DIR:-target/release}/$bin")
done
if ((${#missing[@]})); then
  echo "error: ${missing[*]} missing: cargo build --release -p chatify-gateway -p chatify-persister" >&2
  exit 1
fi

# Addresses of another system (an env file sourced by the caller) would win over this run's own
# in the harness: they are outputs of deploy/local/up.sh, never inputs, so drop them.
unset CHATIFY_LB_URL CHATIFY_GATEWAY1_URL CHATIFY_GATEWAY2_URL CHATIFY_PERSISTER_URL CHATIFY_NATS_URL \
  CHATIFY_NATS_MONITOR_URL CHATIFY_HARPERDB_URL CHATIFY_NATS_URLS CHATIFY_NATS2_URL CHATIFY_NATS3_URL \
  CHATIFY_NATS2_MONITOR_URL CHATIFY_NATS3_MONITOR_URL CHATIFY_PERSISTER2_URL
# The set's shape is each group's (below), never the caller's.
unset CHATIFY_NATS_NODES CHATIFY_PERSISTERS

# Server settings for the harness (the caller's values win). They stay exported: restarts of a
# component by the scenarios (deploy/local/up.sh NAME) get the same ones.
#   load far above the per-socket rate limit; `unavailable` after 2 s rather than 5 s;
#   shutdown deadlines shorter than the defaults, to show they are honoured;
export CHATIFY_LIMITS__MESSAGES_PER_SECOND=${CHATIFY_LIMITS__MESSAGES_PER_SECOND:-100000}
export CHATIFY_LIMITS__MESSAGE_BURST=${CHATIFY_LIMITS__MESSAGE_BURST:-100000}
#   (a socket's queue of unfinished events must hold a whole burst, or the settings are refused)
export CHATIFY_LIMITS__EVENTS_QUEUED_PER_SOCKET=${CHATIFY_LIMITS__EVENTS_QUEUED_PER_SOCKET:-$((CHATIFY_LIMITS__MESSAGE_BURST + 1))}
export CHATIFY_NATS__REQUEST_TIMEOUT_MS=${CHATIFY_NATS__REQUEST_TIMEOUT_MS:-2000}
export CHATIFY_GATEWAY__SHUTDOWN_TIMEOUT_MS=${CHATIFY_GATEWAY__SHUTDOWN_TIMEOUT_MS:-5000}
export CHATIFY_PERSISTER__SHUTDOWN_TIMEOUT_MS=${CHATIFY_PERSISTER__SHUTDOWN_TIMEOUT_MS:-5000}
#   a shorter Engine.IO heartbeat (10 s + 5 s instead of 25 s + 20 s), so that the slow-client
#   scenario can wait for a dead client's disconnection without taking a minute.
export CHATIFY_GATEWAY__PING_INTERVAL_MS=${CHATIFY_GATEWAY__PING_INTERVAL_MS:-10000}
export CHATIFY_GATEWAY__PING_TIMEOUT_MS=${CHATIFY_GATEWAY__PING_TIMEOUT_MS:-5000}
export CHATIFY_LOG__LEVEL=${CHATIFY_LOG__LEVEL:-info}

# A watchdog for the whole run, so that a harness bug cannot hang CI: 20 minutes reduced, 90 full.
limit=${FAULTS_TIMEOUT_S:-1200}
for arg in "${args[@]}"; do [[ $arg == --full ]] && limit=${FAULTS_TIMEOUT_S:-5400}; done
started=$SECONDS

# The scenarios by the shape of set they need, one line each: "single NAME..." (the default set)
# and "cluster NAME..." (CHATIFY_NATS_NODES=3 CHATIFY_PERSISTERS=2).
scenario_args=()
for arg in "${args[@]}"; do [[ $arg == --* ]] || scenario_args+=("$arg"); done
mapfile -t groups < <(node tests/faults/run.mjs --groups "${scenario_args[@]}")
((${#groups[@]})) || {
  echo "error: no scenario to run" >&2
  exit 2
}

# One group: a private set of its shape on free ports in a temporary run dir, its scenarios,
# then everything stopped (also on failure or ctrl-c). In a subshell: each group's ports and run
# dir stay its own.
# Stops a group's set, keeps its logs when it failed (or with FAULTS_KEEP_LOGS=1), removes its
# run dir: run_group's EXIT trap.
# shellcheck disable=SC2317 # (only the trap calls it)
cleanup() {
  deploy/local/down.sh >/dev/null 2>&1 || deploy/local/down.sh || true
  if [[ -d $run_dir/logs && ($status -ne 0 || ${FAULTS_KEEP_LOGS:-} == 1) ]]; then
    rm -rf "target/faults/logs$suffix"
    if mkdir -p "target/faults/logs$suffix" && cp -r "$run_dir/logs/." "target/faults/logs$suffix/"; then
      echo "logs of this run: target/faults/logs$suffix/" >&2
    fi
  fi
  rm -rf "$run_dir"
}

run_group() (
  group=$1 suffix="" rc=0
  shift
  if [[ $group == cluster ]]; then
    export CHATIFY_NATS_NODES=3 CHATIFY_PERSISTERS=2
    suffix=-cluster
  fi
  step "starting a private system on free ports ($group: ${CHATIFY_NATS_NODES:-1} NATS node(s), ${CHATIFY_PERSISTERS:-1} persister(s))"
  run_dir=$(mktemp -d "${TMPDIR:-/tmp}/chatify-faults.XXXXXX")
  export CHATIFY_RUN_DIR=$run_dir CHATIFY_SKIP_BUILD=1
  # shellcheck source=scripts/free-ports.sh
  . scripts/free-ports.sh
  status=1
  trap cleanup EXIT
  trap 'exit 130' INT TERM
  deploy/local/up.sh

  step "fault scenarios ($group)"
  remaining=$((limit - (SECONDS - started)))
  ((remaining > 0)) || remaining=1
  timeout -k 10 "$remaining" node tests/faults/run.mjs --summary "target/faults/summary$suffix.json" "$@" || rc=$?
  ((rc == 124)) && echo "error: the fault scenarios did not finish within ${limit} s (FAULTS_TIMEOUT_S)" >&2
  status=$rc
  exit "$rc"
)

options=()
for arg in "${args[@]}"; do [[ $arg == --* ]] && options+=("$arg"); done
rc=0
for line in "${groups[@]}"; do
  read -r -a group <<<"$line"
  run_group "${group[0]}" "${options[@]}" "${group[@]:1}" || rc=$?
done
exit "$rc"
