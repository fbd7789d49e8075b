#!/usr/bin/env bash
# Runs the benchmark suite against Chatify and the Node socket.io reference peer in one run, and
# writes the medians, ratios and performance targets to bench/RESULTS.md (raw JSON summaries and
# logs under target/bench/<UTC time>/).
#
#   bench/run.sh               every scenario, 3 repeats each (about 40 minutes on 2 cores)
#   bench/run.sh --quick       1 repeat, shorter windows (about 15 minutes)
#   bench/run.sh --smoke       tiny sizes, a few seconds each: checks that the tool works against
#                              both servers; exits non-zero if anything fails or a delivery is
#                              lost. Writes target/bench/<time>/RESULTS.md, not bench/RESULTS.md.
#
# Only complete runs (no --smoke, no --only) replace bench/RESULTS.md; the others write their
# table next to their raw summaries.
#
# Options: --repeats N, --only LIST (comma separated: idle,room,rooms2,interest,bigroom,storm,persister,history,scaleout),
#          --out DIR (instead of target/bench/<time>), --idle-conns N (section 1 with N connections in
#          N/10 rooms: how many one gateway holds; up to its open-file limit less 256, the connection
#          cap; the load generator's own limit is the same, so N up to about 19,700 here).
#
# It starts a private Chatify (deploy/local/up.sh: NATS, HarperDB, persister, two gateways) on
# free ports in a temporary run dir, and the reference (bench/reference/start.sh: one process,
# and two processes with Redis), and stops all of it on exit. With 2+ cores, the servers of the
# WebSocket scenarios (idle, big room, two servers) are pinned to core 0 and the load generator to
# core 1 (taskset): each side gets one core, as the single-threaded Node peer uses; the gateways
# also start on that core, so their tokio pools have one worker. The persister
# and history scenarios run unpinned (HarperDB needs both cores, and it is the same HarperDB for
# the persister and its direct-insert ceiling).
#
# The gateways run with CHATIFY_LIMITS__CONNECTIONS_PER_ADDRESS=0 (the reference has no cap per
# client address; the load generator's 10,000 connections come from 8 loopback addresses) and
# without a per-connection get_history rate (the reference has none; the history scenario asks
# at its rate from a few connections).
set -euo pipefail
root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

mode=full
repeats=3
all_sections=idle,room,rooms2,interest,bigroom,storm,persister,history,scaleout
only=$all_sections
out=
idle_conns=
while (($#)); do
  case $1 in
    --quick) mode=quick repeats=1 ;;
    --smoke) mode=smoke repeats=1 ;;
    --repeats) repeats=$2; shift ;;
    --only) only=$2; shift ;;
    --out) out=$2; shift ;;
    --idle-conns) idle_conns=$2; shift ;;
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ $repeats =~ ^[1-9][0-9]*$ ]] || { echo "--repeats must be a positive number" >&2; exit 2; }
wants() { [[ ,$only, == *,$1,* ]]; }
[[ -z $idle_conns || $idle_conns =~ ^[1-9][0-9]*$ ]] || { echo "--idle-conns must be a positive number" >&2; exit 2; }

stamp=$(date -u +%Y%m%dT%H%M%SZ)
out=${out:-target/bench/$stamp}
mkdir -p "$out"
out=$(cd "$out" && pwd)
LG=$root/target/release/chatify-loadgen
say() { printf '\n==> %s\n' "$*" >&2; }
failures=()

# --- sizes ------------------------------------------------------------------------------------
case $mode in
  smoke)
    IDLE=(--conns 40 --rooms 4 --hold 1)
    ROOM_MEMBERS=20 ROOM_RATES=(4) ROOM_HI=8 ROOM_ARGS=(--duration 2 --warmup 0.5)
    ROOMS2=(--rooms 5 --members 4 --rate 20 --duration 2 --warmup 0.5)
    INTEREST=(--rooms 4 --members 3 --rate 10 --duration 2 --warmup 0.5) BG=(--bg-rooms 20 --bg-rate 20)
    DIRECT=(--records 2000 --rooms 20)
    PMAX=(--senders 20 --rate 200 --duration 2) PLAG_DURATION=2 PLAG_MAX=100
    HIST_SEED=500 HIST_REF_SEED=100 HIST=(--rate 20 --duration 2)
    BIG_SMALL=50 BIG_LARGE=600 BIG=(--rate 2 --duration 2 --warmup 0.5)
    STORM=(--members 40 --history-timeout 10)
    SCALE=(--rooms 3 --members 3 --rate 5 --duration 1 --warmup 0.5)
    ;;
  quick)
    IDLE=(--conns 10000 --rooms 1000 --hold 5)
    ROOM_MEMBERS=1000 ROOM_RATES=(5 10 20 40 60 80 100 120) ROOM_HI=20 ROOM_ARGS=(--duration 8 --warmup 2)
    ROOMS2=(--rooms 100 --members 10 --rate 1000 --duration 10 --warmup 2)
    INTEREST=(--rooms 100 --members 10 --rate 500 --duration 10 --warmup 2) BG=(--bg-rooms 9900 --bg-rate 2000)
    DIRECT=(--records 100000 --rooms 1000)
    PMAX=(--senders 1000 --rate 10000 --duration 8) PLAG_DURATION=10 PLAG_MAX=10000
    HIST_SEED=1000000 HIST_REF_SEED=10000 HIST=(--rate 100 --duration 15 --conns 50)
    BIG_SMALL=1000 BIG_LARGE=10000 BIG=(--rate 5 --duration 10 --warmup 2)
    STORM=(--members 1000 --history-timeout 30)
    SCALE=(--rooms 100 --members 10 --rate 400 --duration 10 --warmup 2)
    ;;
  full)
    IDLE=(--conns 10000 --rooms 1000 --hold 10)
    ROOM_MEMBERS=1000 ROOM_RATES=(5 10 20 40 60 80 100 120) ROOM_HI=20 ROOM_ARGS=(--duration 15 --warmup 3)
    ROOMS2=(--rooms 100 --members 10 --rate 1000 --duration 15 --warmup 3)
    INTEREST=(--rooms 100 --members 10 --rate 500 --duration 15 --warmup 3) BG=(--bg-rooms 9900 --bg-rate 2000)
    DIRECT=(--records 100000 --rooms 1000)
    PMAX=(--senders 1000 --rate 10000 --duration 10) PLAG_DURATION=15 PLAG_MAX=10000
    HIST_SEED=1000000 HIST_REF_SEED=10000 HIST=(--rate 100 --duration 20 --conns 50)
    BIG_SMALL=1000 BIG_LARGE=10000 BIG=(--rate 5 --duration 15 --warmup 3)
    STORM=(--members 1000 --history-timeout 30)
    SCALE=(--rooms 100 --members 10 --rate 400 --duration 10 --warmup 2)
    ;;
esac
if [[ -n $idle_conns ]]; then
  IDLE=(--conns "$idle_conns" --rooms "$(((idle_conns + 9) / 10))" "${IDLE[@]:4}")
fi

# --- CPU pinning ------------------------------------------------------------------------------
ncpu=$(nproc)
PIN=false
if ((ncpu >= 2)) && command -v taskset >/dev/null 2>&1; then PIN=true; fi
server_cpus=0 loadgen_cpus=1 all_cpus=0-$((ncpu - 1))
# pin CPUS PID...: every thread of each process (new threads inherit it).
pin() {
  local cpus=$1 p
  shift
  $PIN || return 0
  for p in "$@"; do taskset -a -p -c "$cpus" "$p" >/dev/null 2>&1 || true; done
}
# The load generator, pinned when the servers are.
lg_pinned() { if $PIN; then taskset -c "$loadgen_cpus" "$LG" "$@"; else "$LG" "$@"; fi; }
lg_free() { "$LG" "$@"; }

# --- systems ----------------------------------------------------------------------------------
chatify_dir=$(mktemp -d "${TMPDIR:-/tmp}/chatify-bench.XXXXXX")
ref1_dir='' ref2_dir=''
cluster_dir= gateway3_pid=
cleanup() {
  local status=$?
  set +e
  [[ -n $ref1_dir ]] && bench/reference/stop.sh "$ref1_dir" >/dev/null 2>&1
  [[ -n $ref2_dir ]] && bench/reference/stop.sh "$ref2_dir" >/dev/null 2>&1
  CHATIFY_RUN_DIR=$chatify_dir deploy/local/down.sh >/dev/null 2>&1 ||
    CHATIFY_RUN_DIR=$chatify_dir deploy/local/down.sh
  if [[ -n $cluster_dir ]]; then
    [[ -n $gateway3_pid ]] && kill "$gateway3_pid" 2>/dev/null
    CHATIFY_RUN_DIR=$cluster_dir deploy/local/down.sh >/dev/null 2>&1
    mkdir -p "$out/logs/cluster"
    cp -r "$cluster_dir/logs/." "$out/logs/cluster/" 2>/dev/null
    rm -rf "$cluster_dir"
  fi
  mkdir -p "$out/logs"
  cp -r "$chatify_dir/logs/." "$out/logs/" 2>/dev/null
  for d in "$ref1_dir" "$ref2_dir"; do [[ -n $d ]] && cp "$d"/*.log "$out/logs/" 2>/dev/null; done
  rm -rf "$chatify_dir" "$ref1_dir" "$ref2_dir"
  exit "$status"
}
trap cleanup EXIT

chatify() { # chatify VAR: a value of the run's env file
  (
    set +u
    # shellcheck disable=SC1091
    . "$chatify_dir/env"
    printf '%s' "${!1}"
  )
}
cpid() { head -n1 "$chatify_dir/pids/$1.pid" | tr -dc '0-9'; }
# chatify_up [COMPONENT...]. When the servers are pinned, the gateways start on the server core:
# tokio sizes its worker pool by the CPUs a process may use when it starts, so a gateway that
# will run on one core starts with one worker, as Node's one thread, instead of two workers
# handing tasks to each other on one core (about 10 % of a gateway's CPU in the two-server
# scenario, PROFILE.md section 3). The pool keeps that size when the persister scenarios unpin.
chatify_up() {
  local c rest=() gateways=()
  for c; do if [[ $c == gateway* ]]; then gateways+=("$c"); else rest+=("$c"); fi; done
  if ((${#rest[@]})); then chatify_up_on "$all_cpus" "${rest[@]}" || return 1; fi
  if ((${#gateways[@]})); then chatify_up_on "$server_cpus" "${gateways[@]}" || return 1; fi
}
chatify_up_on() { # chatify_up_on CPUS COMPONENT...
  local cpus=$1 cmd
  shift
  cmd=(deploy/local/up.sh "$@")
  if $PIN; then cmd=(taskset -c "$cpus" "${cmd[@]}"); fi
  CHATIFY_RUN_DIR=$chatify_dir CHATIFY_SKIP_BUILD=1 CHATIFY_LIMITS__CONNECTIONS_PER_ADDRESS=0 \
    CHATIFY_LIMITS__HISTORY_PER_SECOND=1000000 CHATIFY_LIMITS__HISTORY_BURST=1000000 \
    "${cmd[@]}" >>"$out/chatify-up.log" 2>&1 || {
    tail -20 "$out/chatify-up.log" >&2
    return 1
  }
}
chatify_down() { CHATIFY_RUN_DIR=$chatify_dir deploy/local/down.sh "$@" >>"$out/chatify-up.log" 2>&1; }
# The HarperDB address and its admin's credentials (the load generator creates and seeds tables of
# its own), and the NATS user of the gateways (it publishes messages as they do, with --nats-url),
# for the load generator only (not on a command line).
with_db() {
  CHATIFY_HARPERDB_URL=$(chatify CHATIFY_HARPERDB_URL) \
    CHATIFY_HARPERDB__USERNAME=$(chatify CHATIFY_HDB_ADMIN_USERNAME) \
    CHATIFY_HARPERDB__PASSWORD=$(chatify CHATIFY_HDB_ADMIN_PASSWORD) \
    CHATIFY_NATS__USER=$(chatify CHATIFY_NATS_GATEWAY_USER) \
    CHATIFY_NATS__PASSWORD=$(chatify CHATIFY_NATS_GATEWAY_PASSWORD) "$@"
}

start_ref() { # start_ref N: sets REF_DIR (several tries for N consecutive free ports)
  local n=$1 port
  for _ in 1 2 3 4 5; do
    port=$(node scripts/free-ports.mjs 1)
    REF_DIR=$(mktemp -d "${TMPDIR:-/tmp}/chatify-bench-ref.XXXXXX")
    if REF_RUN_DIR=$REF_DIR PORT=$port bench/reference/start.sh "$n" >>"$out/reference-start.log" 2>&1; then
      return 0
    fi
    rm -rf "$REF_DIR"
    REF_DIR=
  done
  echo "the reference peer did not start ($out/reference-start.log)" >&2
  return 1
}
ref() { # ref DIR VAR
  (
    set +u
    # shellcheck disable=SC1090,SC1091
    . "$1/env"
    printf '%s' "${!2}"
  )
}

# run_one SYSTEM KEY REP RUNNER ARGS...: one summary in $out/SYSTEM-KEY-REP.json.
run_one() {
  local system=$1 key=$2 rep=$3 runner=$4 status=0
  shift 4
  local file=$out/$system-$key-$rep
  echo "  $system $key #$rep: $*" >"$file.cmd"
  printf '  %-9s %-14s #%s ' "$system" "$key" "$rep" >&2
  "$runner" "$@" --label "$system" >"$file.json" 2>"$file.log" || status=$?
  if ((status == 0)); then
    # shellcheck disable=SC2016 # JavaScript, not shell
    node -e '
      const s = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8").trim().split("\n").pop());
      const f = (x, d = 1) => (x === null || x === undefined) ? "-" : Number(x).toFixed(d);
      const parts = [];
      if (s.server && s.server.rss_kib_per_connection !== undefined) parts.push(`RSS/conn ${f(s.server.rss_kib_per_connection)} KiB`);
      if (s.delivered) parts.push(`deliveries/s ${f(s.delivery_rate, 0)} p99 ${f(s.delivery_latency.p99_ms)} ms CPU/delivery ${f(s.server.cpu_us_per_delivery, 2)} µs lost ${s.lost_deliveries}`);
      if (s.stored_per_s !== undefined) parts.push(`stored/s ${f(s.stored_per_s, 0)}`);
      if (s.store_lag && s.store_lag.count) parts.push(`lag p99 ${f(s.store_lag.p99_ms)} ms`);
      if (s.history_ok) parts.push(`history p99 ${f(s.history_latency.p99_ms, 2)} ms`);
      if (s.scenario === "storm") {
        const ph = (name, p) => p ? `${name}: settled in ${f(p.settle_s, 2)} s, CPU ${f(p.cpu_s.total, 2)} s (gateways ${f(p.cpu_s.gateway, 2)}, NATS ${f(p.cpu_s.nats, 2)}, persister ${f(p.cpu_s.persister, 2)}), NATS ${f(p.nats ? p.nats.bytes / 1e6 : null, 2)} MB, missing ${p.missing_events}` : `${name}: -`;
        parts.push(ph("reactions", s.reactions), ph("messages", s.messages),
          `exact ${s.exact.members_exact}/${s.params.members}`, `history: ${s.history.note || "not checked"}`);
      }
      console.log(parts.join(", ") || "ok");' "$file.json" >&2 || echo "ok" >&2
  else
    echo "FAILED (exit $status; see $file.log)" >&2
    tail -3 "$file.log" >&2
    failures+=("$system $key #$rep")
  fi
  return "$status"
}

json_field() { # json_field FILE EXPR (a JS expression on s)
  node -e 'const s = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8").trim().split("\n").pop()); const v = eval(process.argv[2]); console.log(v === undefined || v === null ? "" : v)' "$1" "$2" 2>/dev/null || true
}

# Ports and addresses of another system (scripts/test.sh exports its own, and an env file a
# caller sourced would do the same) would win over the ones this run's system records, so a
# component restarted here would collide with that system: they are not inputs of this run.
unset CHATIFY_LB_PORT CHATIFY_GATEWAY1_PORT CHATIFY_GATEWAY2_PORT CHATIFY_PERSISTER_PORT \
  CHATIFY_NATS_PORT CHATIFY_NATS_MONITOR_PORT CHATIFY_HDB_PORT CHATIFY_HDB_HTTP_PORT \
  CHATIFY_HDB_MQTT_PORT CHATIFY_HDB_MQTTS_PORT CHATIFY_HDB_REPLICATION_PORT CHATIFY_WEB_PORT \
  CHATIFY_LB_URL CHATIFY_GATEWAY1_URL CHATIFY_GATEWAY2_URL CHATIFY_PERSISTER_URL CHATIFY_NATS_URL \
  CHATIFY_NATS_MONITOR_URL CHATIFY_HARPERDB_URL CHATIFY_WEB_URL

# --- build and start ----------------------------------------------------------------------------
say "building (release): chatify-loadgen, chatify-gateway, chatify-persister"
cargo build --release --locked -p chatify-loadgen -p chatify-gateway -p chatify-persister >&2

say "starting Chatify (NATS, HarperDB, persister, two gateways) in $chatify_dir"
(
  export CHATIFY_RUN_DIR=$chatify_dir
  # shellcheck source=scripts/free-ports.sh disable=SC1091
  . scripts/free-ports.sh
  chatify_up nats harperdb persister gateway1 gateway2
)
G1=$(chatify CHATIFY_GATEWAY1_URL) G2=$(chatify CHATIFY_GATEWAY2_URL)
PERSISTER_URL=$(chatify CHATIFY_PERSISTER_URL) NATS_URL=$(chatify CHATIFY_NATS_URL)

say "starting the reference peer: one process, and two with Redis"
start_ref 1
ref1_dir=$REF_DIR
start_ref 2
ref2_dir=$REF_DIR
R1=$(ref "$ref1_dir" REF_URLS)
read -r R2a R2b <<<"$(ref "$ref2_dir" REF_URLS)"
read -r R2pa R2pb <<<"$(ref "$ref2_dir" REF_PIDS)"
R2redis=$(ref "$ref2_dir" REDIS_PID)

server_pids_pinned() { # every server process, pinned to the server core
  pin "$server_cpus" "$(cpid nats)" "$(cpid harperdb)" "$(cpid persister)" "$(cpid gateway1)" "$(cpid gateway2)" \
    "$(ref "$ref1_dir" REF_PIDS)" "$R2pa" "$R2pb" "$R2redis"
}
server_pids_free() {
  pin "$all_cpus" "$(cpid nats)" "$(cpid harperdb)" "$(cpid persister)" "$(cpid gateway1)" "$(cpid gateway2)" \
    "$(ref "$ref1_dir" REF_PIDS)" "$R2pa" "$R2pb" "$R2redis"
}
server_pids_pinned

machine="$(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), $(free -g | awk '/Mem:/{print $2}') GiB, Linux $(uname -r)"
commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"

# --- 1. idle --------------------------------------------------------------------------------------
if wants idle; then
  say "1. idle connections: ${IDLE[*]} (fresh server processes each time)"
  for ((rep = 1; rep <= repeats; rep++)); do
    chatify_down gateway1 && chatify_up gateway1
    pin "$server_cpus" "$(cpid gateway1)"
    sleep 1
    run_one chatify idle "$rep" lg_pinned idle --url "$G1" --pid "$(cpid gateway1)" "${IDLE[@]}" || true
    bench/reference/stop.sh "$ref1_dir" >/dev/null 2>&1 || true
    rm -rf "$ref1_dir"
    start_ref 1
    ref1_dir=$REF_DIR R1=$(ref "$ref1_dir" REF_URLS)
    pin "$server_cpus" "$(ref "$ref1_dir" REF_PIDS)"
    sleep 1
    run_one reference idle "$rep" lg_pinned idle --url "$R1" --pid "$(ref "$ref1_dir" REF_PIDS)" "${IDLE[@]}" || true
  done
fi

# --- 2. big room --------------------------------------------------------------------------------
if wants room; then
  R1pid=$(ref "$ref1_dir" REF_PIDS)
  rate=${ROOM_RATES[0]}
  if ((${#ROOM_RATES[@]} > 1)); then
    say "2. big room, $ROOM_MEMBERS members: the reference's highest sustained rate (p99 <= 50 ms, nothing lost)"
    best=
    for r in "${ROOM_RATES[@]}"; do
      if run_one reference roomladder "$r" lg_pinned room --url "$R1" --pid "$R1pid" --members "$ROOM_MEMBERS" --rate "$r" "${ROOM_ARGS[@]}"; then
        p99=$(json_field "$out/reference-roomladder-$r.json" 's.delivery_latency.p99_ms')
        if [[ -n $p99 ]] && node -e "process.exit($p99 <= 50 ? 0 : 1)"; then best=$r; continue; fi
      fi
      break
    done
    rate=${best:-$((ROOM_RATES[0] / 2))}
    # The ladder's failures are findings, not errors of the run.
    failures=("${failures[@]/reference roomladder*/}")
    echo "  reference's highest sustained rate: $rate messages/s ($((rate * ROOM_MEMBERS)) deliveries/s)" >&2
  fi
  say "2. big room, $ROOM_MEMBERS members, $rate messages/s of 100 bytes"
  for ((rep = 1; rep <= repeats; rep++)); do
    run_one chatify room "$rep" lg_pinned room --url "$G1" --pid "$(cpid gateway1)" --members "$ROOM_MEMBERS" --rate "$rate" "${ROOM_ARGS[@]}" || true
    run_one reference room "$rep" lg_pinned room --url "$R1" --pid "$R1pid" --members "$ROOM_MEMBERS" --rate "$rate" "${ROOM_ARGS[@]}" || true
  done
  say "2. big room, $ROOM_MEMBERS members, $ROOM_HI messages/s: CPU per delivery at a higher fixed rate"
  for ((rep = 1; rep <= repeats; rep++)); do
    run_one chatify room20k "$rep" lg_pinned room --url "$G1" --pid "$(cpid gateway1)" --members "$ROOM_MEMBERS" --rate "$ROOM_HI" "${ROOM_ARGS[@]}" || true
    run_one reference room20k "$rep" lg_pinned room --url "$R1" --pid "$R1pid" --members "$ROOM_MEMBERS" --rate "$ROOM_HI" "${ROOM_ARGS[@]}" || true
  done
fi

# --- 3. rooms across two servers ------------------------------------------------------------------
if wants rooms2; then
  say "3. small rooms across two servers: ${ROOMS2[*]}"
  for ((rep = 1; rep <= repeats; rep++)); do
    run_one chatify rooms2 "$rep" lg_pinned rooms --url "$G1" --url "$G2" \
      --pid "$(cpid gateway1)" --pid "$(cpid gateway2)" --pid "$(cpid nats)" "${ROOMS2[@]}" || true
    run_one reference rooms2 "$rep" lg_pinned rooms --url "$R2a" --url "$R2b" \
      --pid "$R2pa" --pid "$R2pb" --pid "$R2redis" "${ROOMS2[@]}" || true
  done
fi

# --- 6. cost follows interest --------------------------------------------------------------------
if wants interest; then
  say "6. cost follows interest: ${INTEREST[*]} on one server; then again with ${BG[*]} on the other"
  for ((rep = 1; rep <= repeats; rep++)); do
    run_one chatify interest-base "$rep" lg_pinned rooms --url "$G1" --pid "$(cpid gateway1)" "${INTEREST[@]}" || true
    run_one chatify interest-bg "$rep" lg_pinned rooms --url "$G1" --pid "$(cpid gateway1)" "${INTEREST[@]}" \
      --bg-url "$G2" "${BG[@]}" || true
    run_one reference interest-base "$rep" lg_pinned rooms --url "$R2a" --pid "$R2pa" "${INTEREST[@]}" || true
    run_one reference interest-bg "$rep" lg_pinned rooms --url "$R2a" --pid "$R2pa" "${INTEREST[@]}" \
      --bg-url "$R2b" "${BG[@]}" || true
  done
fi

# --- 7. large rooms -----------------------------------------------------------------------------
# One room whose members alternate between the two gateways: the time to fill it (every join
# acknowledged) and the NATS bytes per join (from /varz), for a room of BIG_SMALL and one of
# BIG_LARGE members, then messages into it. Chatify only: what is compared is the two sizes.
if wants bigroom; then
  say "7. large rooms: one room of $BIG_SMALL, then of $BIG_LARGE members over both gateways, then ${BIG[*]}"
  for ((rep = 1; rep <= repeats; rep++)); do
    for size in small large; do
      members=$BIG_SMALL
      [[ $size == large ]] && members=$BIG_LARGE
      run_one chatify "bigroom-$size" "$rep" lg_pinned rooms --url "$G1" --url "$G2" --rooms 1 --members "$members" \
        --pid "$(cpid gateway1)" --pid "$(cpid gateway2)" --pid "$(cpid nats)" \
        --nats-monitor "$(chatify CHATIFY_NATS_MONITOR_URL)" "${BIG[@]}" || true
    done
  done
fi

# --- 8. reaction storm -------------------------------------------------------------------------
# One room whose members alternate between the two gateways; member 0 sends a message, then every
# member reacts to it within one second (member i with emoji i mod 4). Every member's last
# `reaction` event must hold the exact counts; then get_history must show them once the persister
# wrote them (reported, not judged: "not persisted within N s"). Then every member sends one plain
# message within one second: the same N × N deliveries, for comparison. Chatify only: what is
# compared is the two phases (CPU of both gateways, NATS and the persister; NATS bytes).
# The gateways run with a per-connection queue of 2,048 packets (4 MiB) here: the load generator
# reads its N sockets on one core, more slowly than two gateways write a second's N × N events,
# and with the default queue (128) the slow-reader policy drops events to it (bench/README.md).
# They are restarted with the defaults afterwards.
if wants storm; then
  say "8. reaction storm: ${STORM[*]} over both gateways (queue of 2,048 packets), then as many plain messages"
  chatify_down gateway1 gateway2 &&
    CHATIFY_GATEWAY__MAX_BUFFER_SIZE=2048 CHATIFY_GATEWAY__MAX_BUFFER_BYTES=4194304 chatify_up gateway1 gateway2
  for ((rep = 1; rep <= repeats; rep++)); do
    run_one chatify storm "$rep" lg_pinned storm --url "$G1" --url "$G2" \
      --pid "$(cpid gateway1)" --pid "$(cpid gateway2)" --pid "$(cpid nats)" --pid "$(cpid persister)" \
      --pid-names gateway1,gateway2,nats,persister --nats-monitor "$(chatify CHATIFY_NATS_MONITOR_URL)" \
      --history "${STORM[@]}" || true
  done
  chatify_down gateway1 gateway2 && chatify_up gateway1 gateway2
fi

# --- 4. persister -----------------------------------------------------------------------------------
if wants persister; then
  server_pids_free
  say "4. persister: HarperDB direct inserts (batch 500), the persister draining a backlog, and lag at half that rate"
  for ((rep = 1; rep <= repeats; rep++)); do
    # The persister's workload: its batch size, as many rooms as the drain's senders, and as many
    # connections as its writer (persister.write_connections, 2), one insert at a time on each,
    # each replaced after 64 batches as the writer's lanes are (persister/src/lanes.rs).
    run_one chatify direct "$rep" with_db lg_free harperdb-direct --pid "$(cpid harperdb)" "${DIRECT[@]}" \
      --batch 500 --concurrency 2 || true
    # For comparison, one connection (one HarperDB thread), into a table of its own that grows by
    # as much per repeat as the ceiling's (inserts slow as a table grows).
    run_one chatify direct-c1 "$rep" with_db lg_free harperdb-direct --pid "$(cpid harperdb)" "${DIRECT[@]}" \
      --batch 500 --concurrency 1 --direct-table bench_direct_c1 || true
    if [[ $mode == smoke ]]; then
      # No restart in the smoke run: sends acked, then stored (the lag path).
      run_one chatify persister-max "$rep" with_db lg_free persister --url "$G1" --url "$G2" \
        --persister-url "$PERSISTER_URL" "${PMAX[@]}" --warmup 0 || true
    else
      run_one chatify persister-max "$rep" with_db lg_free persister --url "$G1" --url "$G2" \
        --persister-url "$PERSISTER_URL" "${PMAX[@]}" --warmup 0 \
        --pause-cmd "CHATIFY_RUN_DIR=$chatify_dir deploy/local/down.sh persister" \
        --resume-cmd "CHATIFY_RUN_DIR=$chatify_dir CHATIFY_SKIP_BUILD=1 deploy/local/up.sh persister" || true
    fi
  done
  # shellcheck disable=SC2016 # JavaScript, not shell
  max=$(node -e '
    const fs = require("fs"), dir = process.argv[1];
    const v = fs.readdirSync(dir).filter((f) => /^chatify-persister-max-\d+\.json$/.test(f))
      .map((f) => { try { return JSON.parse(fs.readFileSync(`${dir}/${f}`, "utf8").trim().split("\n").pop()).stored_per_s; } catch { return null; } })
      .filter((x) => typeof x === "number" && x > 0).sort((a, b) => a - b);
    console.log(v.length ? Math.round(v[Math.floor(v.length / 2)]) : 0);' "$out")
  lag_rate=$((max / 2))
  ((lag_rate > PLAG_MAX)) && lag_rate=$PLAG_MAX
  ((lag_rate < 10)) && lag_rate=10
  senders=$(((lag_rate + 9) / 10))
  echo "  lag at $lag_rate messages/s ($senders senders)" >&2
  # Twice: published straight into JetStream (the persister alone, as in the drain), and sent
  # by WebSocket clients through the gateways (the whole path sharing the cores).
  for ((rep = 1; rep <= repeats; rep++)); do
    run_one chatify persister-lag-js "$rep" with_db lg_free persister --url "$G1" --nats-url "$NATS_URL" \
      --persister-url "$PERSISTER_URL" --senders "$senders" --rate "$lag_rate" --duration "$PLAG_DURATION" --warmup 0 || true
    run_one chatify persister-lag "$rep" with_db lg_free persister --url "$G1" --url "$G2" \
      --persister-url "$PERSISTER_URL" --senders "$senders" --rate "$lag_rate" --duration "$PLAG_DURATION" --warmup 0 || true
  done
  server_pids_pinned
fi

# --- 5. history ------------------------------------------------------------------------------------
if wants history; then
  server_pids_free
  say "5. history: latest 50 at ${HIST[*]}; Chatify's room holds $HIST_SEED messages, the reference's $HIST_REF_SEED (its HISTORY_MAX)"
  room=bench-history-$stamp
  for ((rep = 1; rep <= repeats; rep++)); do
    seed=0
    ((rep == 1)) && seed=$HIST_SEED
    run_one chatify history "$rep" with_db lg_free history --url "$G1" --pid "$(cpid gateway1)" --pid "$(cpid persister)" \
      --pid "$(cpid harperdb)" --pid "$(cpid nats)" --room "$room" --seed "$seed" --seed-via harperdb --room-holds "$HIST_SEED" "${HIST[@]}" || true
    seed=0
    ((rep == 1)) && seed=$HIST_REF_SEED
    run_one reference history "$rep" lg_free history --url "$R1" --pid "$(ref "$ref1_dir" REF_PIDS)" \
      --room "$room" --seed "$seed" --seed-via sends --room-holds "$HIST_REF_SEED" "${HIST[@]}" || true
  done
  server_pids_pinned
fi

# --- 9. one gateway and three, on a NATS cluster ------------------------------------------------
# A second private system: three NATS nodes (streams replicated three ways), HarperDB, a
# persister, gateway1 and gateway2 (deploy/local/up.sh with CHATIFY_NATS_NODES=3), and a third
# gateway started with gateway2's environment on a port of its own. The same load runs with every
# member on gateway1, then with each room's members spread over the three; the summaries give
# the CPU per delivery of the gateways and of the NATS nodes apart (--pid-names). Unpinned: six
# server processes share the two cores.
if wants scaleout; then
  say "9. one gateway and three on a 3-node NATS cluster: rooms ${SCALE[*]}"
  cluster_dir=$(mktemp -d "${TMPDIR:-/tmp}/chatify-bench-cluster.XXXXXX")
  if (
    export CHATIFY_RUN_DIR=$cluster_dir CHATIFY_NATS_NODES=3
    # shellcheck source=scripts/free-ports.sh disable=SC1091
    . scripts/free-ports.sh
    CHATIFY_SKIP_BUILD=1 CHATIFY_LIMITS__CONNECTIONS_PER_ADDRESS=0 \
      deploy/local/up.sh nats nats2 nats3 harperdb persister gateway1 gateway2
  ) >>"$out/cluster-up.log" 2>&1; then
    # shellcheck disable=SC1091
    cluster() { (set +u; . "$cluster_dir/env"; printf '%s' "${!1}"); }
    kpid() { head -n1 "$cluster_dir/pids/$1.pid" | tr -dc '0-9'; }
    port3=$(node scripts/free-ports.mjs 1)
    mapfile -d '' -t env3 < <(tr '\0' '\n' <"/proc/$(kpid gateway2)/environ" |
      grep -v '^CHATIFY_GATEWAY__\(PORT\|NAME\|ADVERTISE_ADDRESS\)=' | tr '\n' '\0')
    env -i "${env3[@]}" CHATIFY_GATEWAY__PORT="$port3" CHATIFY_GATEWAY__NAME=gateway3 \
      CHATIFY_GATEWAY__ADVERTISE_ADDRESS="127.0.0.1:$port3" target/release/chatify-gateway \
      >"$cluster_dir/logs/gateway3.log" 2>&1 &
    gateway3_pid=$!
    C3=http://127.0.0.1:$port3
    for _ in $(seq 100); do curl -fs "$C3/readyz" >/dev/null 2>&1 && break; sleep 0.2; done
    C1=$(cluster CHATIFY_GATEWAY1_URL) C2=$(cluster CHATIFY_GATEWAY2_URL)
    nats_pids=(--pid "$(kpid nats)" --pid "$(kpid nats2)" --pid "$(kpid nats3)")
    for ((rep = 1; rep <= repeats; rep++)); do
      run_one chatify scaleout-one "$rep" lg_free rooms --url "$C1" --pid "$(kpid gateway1)" "${nats_pids[@]}" \
        --pid-names gateway1,nats1,nats2,nats3 "${SCALE[@]}" || true
      run_one chatify scaleout-three "$rep" lg_free rooms --url "$C1" --url "$C2" --url "$C3" \
        --pid "$(kpid gateway1)" --pid "$(kpid gateway2)" --pid "$gateway3_pid" "${nats_pids[@]}" \
        --pid-names gateway1,gateway2,gateway3,nats1,nats2,nats3 "${SCALE[@]}" || true
    done
  else
    tail -20 "$out/cluster-up.log" >&2
    failures+=("chatify scaleout (the cluster did not start)")
  fi
fi

# --- report -----------------------------------------------------------------------------------------
# Only a complete run replaces bench/RESULTS.md.
results=bench/RESULTS.md
if [[ $mode == smoke || $only != "$all_sections" ]]; then results=$out/RESULTS.md; fi
flag=
[[ $mode != full ]] && flag=" --$mode"
header="Run: $(date -u '+%Y-%m-%d %H:%M UTC'), \`bench/run.sh$flag\` (mode $mode, $repeats repeat(s)), commit $commit.
Machine: $machine. Servers pinned to core $server_cpus and the load generator to core $loadgen_cpus for idle, big room and two servers: $PIN.
Raw summaries: \`${out#"$root"/}/\`."
"$LG" report --dir "$out" --out "$results" --header "$header"

if ((${#failures[@]} > 0)) && [[ -n ${failures[*]// /} ]]; then
  echo >&2
  echo "failed runs: ${failures[*]}" >&2
  [[ $mode == smoke ]] && exit 1
fi
say "done: $results (raw: $out)"
