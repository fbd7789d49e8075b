#!/usr/bin/env bash
# Fault-injection harness: proves that nothing acknowledged is lost or stored twice when parts of
# Chatify crash, restart or stall (see tests/faults/README.md).
#
#   scripts/faults.sh [--full] [SCENARIO...]
#
#   1. starts a complete private system (NATS, HarperDB, persister, two gateways, HAProxy) on free
#      loopback ports in a temporary run directory, with deploy/local/up.sh and the binaries in
#      target/release as they are (CHATIFY_SKIP_BUILD=1: build them first),
#   2. runs the scenarios (all by default): persister-crash nats-restart harperdb-outage
#      gateway-crash graceful-shutdown slow-client ordering,
#   3. prints per scenario
#        NAME: attempted=… acknowledged=… stored=… lost=0 duplicated=0 unexpected=0 reordered=0 (… s)
#      and its own checks, writes target/faults/summary.json,
#   4. stops everything (also on failure or ctrl-c); logs of a failed run go to target/faults/logs/.
# Exits non-zero when any count is not zero or any check fails.
#
# Default sizes are reduced (a few minutes on two cores); --full uses the full sizes (100,000
# messages, SIGKILL every 5-20 s, HarperDB down 2 minutes...). Every size can be overridden with
# its FAULTS_* variable (listed in tests/faults/README.md), e.g. FAULTS_PERSISTER_MESSAGES=20000.
# Set FAULTS_KEEP_LOGS=1 to keep the logs of a passing run too; FAULTS_TIMEOUT_S bounds the whole
# run (1200 s reduced, 5400 s full).
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
  CHATIFY_NATS_MONITOR_URL CHATIFY_HARPERDB_URL

step "starting a private system on free ports"
run_dir=$(mktemp -d "${TMPDIR:-/tmp}/chatify-faults.XXXXXX")
export CHATIFY_RUN_DIR=$run_dir CHATIFY_SKIP_BUILD=1
# shellcheck source=scripts/free-ports.sh
. scripts/free-ports.sh
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

status=1
cleanup() {
  deploy/local/down.sh >/dev/null 2>&1 || deploy/local/down.sh || true
  if [[ -d $run_dir/logs && ($status -ne 0 || ${FAULTS_KEEP_LOGS:-} == 1) ]]; then
    rm -rf target/faults/logs
    if mkdir -p target/faults/logs && cp -r "$run_dir/logs/." target/faults/logs/; then
      echo "logs of this run: target/faults/logs/" >&2
    fi
  fi
  rm -rf "$run_dir"
}
trap cleanup EXIT
deploy/local/up.sh

step "fault scenarios"
# A watchdog, so that a harness bug cannot hang CI: 20 minutes reduced, 90 full.
limit=${FAULTS_TIMEOUT_S:-1200}
for arg in "${args[@]}"; do [[ $arg == --full ]] && limit=${FAULTS_TIMEOUT_S:-5400}; done
rc=0
timeout -k 10 "$limit" node tests/faults/run.mjs "${args[@]}" || rc=$?
((rc == 124)) && echo "error: the fault scenarios did not finish within ${limit} s (FAULTS_TIMEOUT_S)" >&2
status=$rc
if ((rc != 0)); then exit "$rc"; fi
