#!/usr/bin/env bash
# Where the servers' memory and CPU go: the profiles behind bench/PROFILE.md.
#
#   bench/profile.sh heap [CONNS]   heap profile (valgrind's DHAT) of one gateway holding CONNS
#                                   idle WebSocket connections (default 2000, each in one of
#                                   CONNS/10 rooms); prints the allocation sites alive at the peak,
#                                   in bytes per connection
#   bench/profile.sh cpu [RATE]     CPU profile (perf) of one gateway during the big-room scenario
#                                   (1,000 members, RATE messages/s, default 20); prints the split
#                                   between the kernel and user space and the top symbols
#   bench/profile.sh rooms2 [RATE]  CPU profile of both gateways and NATS during the two-server
#                                   scenario (100 rooms of 10 members spread over the two gateways,
#                                   RATE messages/s, default 1000, i.e. 10,000 deliveries/s)
#   bench/profile.sh drain [RATE]   CPU profile of HarperDB, NATS and the persister while the
#                                   persister drains a backlog (RATE messages/s sent for 8 s while
#                                   it is stopped, default 10000), with vmstat's disk figures
#
# cpu, rooms2 and drain write a flame graph per profile when inferno is installed
# (cargo install inferno). It starts a private NATS, HarperDB and persister (deploy/local/up.sh)
# on free ports, and the gateways; for cpu and rooms2 it pins the servers to core 0 and
# the load generator to core 1, as bench/run.sh does (the drain runs unpinned, as there); it
# stops everything on exit. NATS is profiled by Go's own profiler (Debian's nats-server is
# stripped), read by profile/pprof-collapse.mjs. Outputs go to target/profile/<UTC time>-<kind>/.
# Needs valgrind or perf (Debian packages valgrind, linux-perf; installed when missing) and the
# release binaries (cargo build --release -p chatify-gateway -p chatify-persister -p chatify-loadgen).
set -euo pipefail
root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

kind=${1:-}
case $kind in
  heap) conns=${2:-2000}; tool=valgrind package=valgrind ;;
  cpu) rate=${2:-20}; tool=perf package=linux-perf ;;
  rooms2) rate=${2:-1000}; tool=perf package=linux-perf ;;
  drain) rate=${2:-10000}; tool=perf package=linux-perf ;;
  -h | --help | '') sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
  *) echo "unknown profile $kind (heap, cpu, rooms2 or drain)" >&2; exit 2 ;;
esac
if ! command -v "$tool" >/dev/null 2>&1; then
  sudo=; ((EUID == 0)) || sudo=sudo
  $sudo apt-get install -y --no-install-recommends "$package" >/dev/null
fi
for bin in chatify-gateway chatify-persister chatify-loadgen; do
  [[ -x target/release/$bin ]] || { echo "build first: cargo build --release -p $bin" >&2; exit 2; }
done

out=target/profile/$(date -u +%Y%m%dT%H%M%SZ)-$kind
mkdir -p "$out"
out=$(cd "$out" && pwd)
touch "$out/.started" # what is newer than this was made by this run
run_dir=$(mktemp -d "${TMPDIR:-/tmp}/chatify-profile.XXXXXX")
gateway_pid=
cleanup() {
  local status=$?
  set +e
  [[ -n $gateway_pid ]] && kill "$gateway_pid" 2>/dev/null && wait "$gateway_pid" 2>/dev/null
  CHATIFY_RUN_DIR=$run_dir deploy/local/down.sh >/dev/null 2>&1
  rm -rf "$run_dir"
  # V8's maps of the drain's node processes (HarperDB starts more than one), once they are gone.
  [[ $kind == drain ]] && find /tmp -maxdepth 1 -name 'perf-*.map' -newer "$out/.started" -delete
  exit "$status"
}
trap cleanup EXIT

# shellcheck source=../scripts/free-ports.sh
. scripts/free-ports.sh
# For rooms2 and drain, NATS opens Go's profiling endpoint (its Debian build is stripped, so perf
# cannot name its functions; Go's profile does).
nats_profile_port=
if [[ $kind == rooms2 || $kind == drain ]]; then
  nats_profile_port=$(node scripts/free-ports.mjs 1)
  while env | grep -q "^CHATIFY_.*_PORT=$nats_profile_port\$"; do nats_profile_port=$(node scripts/free-ports.mjs 1); done
fi
# For the drain, HarperDB writes V8's map of its compiled JavaScript (/tmp/perf-<pid>.map), so
# that perf can name those frames.
hdb_node_options=
[[ $kind == drain ]] && hdb_node_options=--perf-basic-prof
# up_on CPUS COMPONENT...: deploy/local/up.sh for this run, started on those cores (tokio sizes
# a gateway's worker pool by the cores it may use when it starts), or anywhere for "all".
up_on() {
  local cpus=$1 launch=()
  shift
  [[ $cpus == all ]] || launch=(taskset -c "$cpus")
  CHATIFY_RUN_DIR=$run_dir CHATIFY_SKIP_BUILD=1 CHATIFY_LIMITS__CONNECTIONS_PER_ADDRESS=0 \
    CHATIFY_HDB_NODE_OPTIONS=$hdb_node_options CHATIFY_NATS_PROFILE_PORT=$nats_profile_port \
    "${launch[@]}" deploy/local/up.sh "$@" >>"$out/up.log" 2>&1 || { tail -20 "$out/up.log" >&2; exit 1; }
}
cpid() { head -n1 "$run_dir/pids/$1.pid" | tr -dc '0-9'; }
up_on all nats harperdb persister
# shellcheck disable=SC1091
. "$run_dir/env"
url=$CHATIFY_GATEWAY1_URL
ulimit -n 20000 2>/dev/null || true
gateway_env=(CHATIFY_NATS__URL="$CHATIFY_NATS_URL" CHATIFY_NATS__USER="$CHATIFY_NATS_GATEWAY_USER"
  CHATIFY_NATS__PASSWORD="$CHATIFY_NATS_GATEWAY_PASSWORD" CHATIFY_GATEWAY__PORT="$CHATIFY_GATEWAY1_PORT"
  CHATIFY_LIMITS__CONNECTIONS_PER_ADDRESS=0 CHATIFY_LOG__LEVEL=warn)
wait_ready() {
  for _ in $(seq 120); do
    curl -sf -m 2 "$url/readyz" >/dev/null 2>&1 && return 0
    kill -0 "$gateway_pid" 2>/dev/null || { echo "the gateway exited ($out/gateway.log)" >&2; return 1; }
    sleep 1
  done
  echo "the gateway did not get ready ($out/gateway.log)" >&2
  return 1
}

# record NAME CALL_GRAPH SECONDS PID...: perf samples of those processes, from core 1.
record() {
  local name=$1 call_graph=$2 seconds=$3 pids
  shift 3
  pids=$(IFS=,; echo "$*")
  taskset -c 1 perf record -F 999 --call-graph "$call_graph" -p "$pids" -o "$out/$name.data" \
    -- sleep "$seconds" >"$out/$name.perf.log" 2>&1
}
# report DATA SORT LINES: the first lines of perf's report (head closing the pipe is no failure).
report() {
  perf report -i "$1" --no-children --stdio -g none --sort "$2" 2>/dev/null | grep -v -e '^#' -e '^$' |
    head -n "$3" || true
}
# summarize NAME TITLE: the samples split by process, thread and shared object, the top
# symbols, and a flame graph when inferno is installed.
summarize() {
  local name=$1 title=$2 data=$out/$1.data sort
  {
    echo "## $title"
    for sort in pid comm dso; do
      echo "### samples by ${sort/comm/thread name}"
      report "$data" "$sort" 12
    done
    echo "### top symbols"
    report "$data" dso,sym 40
  } | tee "$out/$name.txt"
  if command -v inferno-collapse-perf >/dev/null && command -v inferno-flamegraph >/dev/null; then
    perf script -i "$data" 2>/dev/null | inferno-collapse-perf |
      inferno-flamegraph --title "$title" >"$out/$name.svg"
    echo "flame graph: $out/$name.svg"
  fi
}

# go_profile NAME SECONDS: NATS's CPU profile over that time, from Go's profiling endpoint.
go_profile() {
  local name=$1 seconds=$2
  curl -sf -m $((seconds + 30)) -o "$out/$name.pb.gz" \
    "http://127.0.0.1:$nats_profile_port/debug/pprof/profile?seconds=$seconds" ||
    { echo "no profile from NATS's profiling endpoint" >&2; return 1; }
}
# go_summarize NAME TITLE: its top functions and, with inferno, a flame graph.
go_summarize() {
  local name=$1 title=$2
  echo "## $title (Go's profiler)" | tee "$out/$name.txt"
  node bench/profile/pprof-collapse.mjs "$out/$name.pb.gz" 2>>"$out/$name.txt" >"$out/$name.folded"
  tail -n +2 "$out/$name.txt"
  if command -v inferno-flamegraph >/dev/null; then
    inferno-flamegraph --title "$title" <"$out/$name.folded" >"$out/$name.svg"
    echo "flame graph: $out/$name.svg"
  fi
}

case $kind in
  heap)
    env "${gateway_env[@]}" valgrind --tool=dhat --dhat-out-file="$out/dhat.json" \
      target/release/chatify-gateway >"$out/gateway.log" 2>&1 &
    gateway_pid=$!
    wait_ready
    target/release/chatify-loadgen idle --url "$url" --conns "$conns" --rooms $((conns / 10 > 0 ? conns / 10 : 1)) \
      --hold 5 --quiet >"$out/loadgen.json" 2>"$out/loadgen.log"
    kill -INT "$gateway_pid"
    wait "$gateway_pid" || true
    gateway_pid=
    grep -E 't-gmax' "$out/gateway.log" >&2 || true
    node bench/profile/heap-summary.mjs "$out/dhat.json" "$conns" | tee "$out/heap.txt"
    ;;
  cpu)
    env "${gateway_env[@]}" taskset -c 0 target/release/chatify-gateway >"$out/gateway.log" 2>&1 &
    gateway_pid=$!
    wait_ready
    # The profile covers the middle of the run: after the joins and warm-up, before the drain.
    (sleep 12 && record gateway dwarf 10 "$gateway_pid") &
    recorder=$!
    taskset -c 1 target/release/chatify-loadgen room --url "$url" --pid "$gateway_pid" --members 1000 \
      --rate "$rate" --duration 24 --warmup 2 --quiet >"$out/loadgen.json" 2>"$out/loadgen.log"
    wait "$recorder"
    # shellcheck disable=SC2016 # JavaScript, not shell
    figure=$(node -e '
      const s = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
      console.log(`${s.delivered} deliveries, gateway CPU per delivery ${s.server.cpu_us_per_delivery.toFixed(1)} µs`);
    ' "$out/loadgen.json")
    echo "$figure" | tee "$out/cpu.txt"
    summarize gateway "gateway, one room of 1,000 members, $rate messages/s ($figure)"
    ;;
  rooms2)
    # As bench/run.sh: the gateways started on core 0 (one tokio worker each), NATS, HarperDB and
    # the persister moved there, the load generator on core 1.
    up_on 0 gateway1 gateway2
    for c in nats harperdb persister; do taskset -a -p -c 0 "$(cpid "$c")" >/dev/null; done
    g1=$(cpid gateway1) g2=$(cpid gateway2) nats=$(cpid nats)
    # perf with DWARF call graphs for the Rust gateways (built without frame pointers), Go's
    # profiler for nats-server.
    (sleep 8 && record gateways dwarf 15 "$g1" "$g2") &
    recorder1=$!
    (sleep 8 && go_profile nats 15) &
    recorder2=$!
    taskset -c 1 target/release/chatify-loadgen rooms --url "$CHATIFY_GATEWAY1_URL" --url "$CHATIFY_GATEWAY2_URL" \
      --pid "$g1" --pid "$g2" --pid "$nats" --rooms 100 --members 10 --rate "$rate" --duration 25 --warmup 2 \
      --quiet >"$out/loadgen.json" 2>"$out/loadgen.log"
    wait "$recorder1" "$recorder2"
    # shellcheck disable=SC2016 # JavaScript, not shell
    node -e '
      const s = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
      const cpu = s.server.processes.map((p) => `${p.pid} ${(p.cpu_us / 1e6).toFixed(2)} s`).join(", ");
      console.log(`${s.delivered} deliveries, CPU per delivery ${s.server.cpu_us_per_delivery.toFixed(1)} µs (gateways and NATS: ${cpu})`);
    ' "$out/loadgen.json" | tee "$out/cpu.txt"
    summarize gateways "two gateways, 100 rooms of 10 members, $rate messages/s"
    go_summarize nats "nats-server, two gateways, 100 rooms of 10 members, $rate messages/s"
    ;;
  drain)
    up_on all gateway1 gateway2
    hdb=$(cpid harperdb)
    # The persister is stopped while the load generator sends and started again by its resume
    # hook, which then leaves a mark; the recorders start at that mark, as the drain does.
    # HarperDB's admin: the load generator seeds and reads tables of its own too.
    with_db=(CHATIFY_HARPERDB_URL="$CHATIFY_HARPERDB_URL" CHATIFY_HARPERDB__USERNAME="$CHATIFY_HDB_ADMIN_USERNAME"
      CHATIFY_HARPERDB__PASSWORD="$CHATIFY_HDB_ADMIN_PASSWORD")
    env "${with_db[@]}" target/release/chatify-loadgen persister --url "$CHATIFY_GATEWAY1_URL" \
      --url "$CHATIFY_GATEWAY2_URL" --persister-url "$CHATIFY_PERSISTER_URL" --senders 1000 --rate "$rate" \
      --duration 8 --warmup 0 --quiet \
      --pause-cmd "CHATIFY_RUN_DIR=$run_dir deploy/local/down.sh persister >>'$out/up.log' 2>&1" \
      --resume-cmd "CHATIFY_RUN_DIR=$run_dir CHATIFY_SKIP_BUILD=1 deploy/local/up.sh persister >>'$out/up.log' 2>&1 && touch '$out/resumed'" \
      >"$out/loadgen.json" 2>"$out/loadgen.log" &
    loadgen=$!
    until [[ -e $out/resumed ]] || ! kill -0 "$loadgen" 2>/dev/null; do sleep 0.05; done
    [[ -e $out/resumed ]] ||
      { wait "$loadgen"; echo "the load generator ended before the drain ($out/loadgen.log)" >&2; exit 1; }
    # Frame pointers: V8's compiled code keeps them, and the persister is a small share here.
    record drain fp 4 "$hdb" "$(cpid persister)" &
    recorder1=$!
    go_profile drain-nats 4 &
    recorder2=$!
    vmstat -w 1 5 >"$out/vmstat.txt" 2>&1 &
    recorder3=$!
    wait "$loadgen"
    wait "$recorder1" "$recorder2" "$recorder3"
    # shellcheck disable=SC2016 # JavaScript, not shell
    figure=$(node -e '
      const s = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
      console.log(`${s.stored} messages stored, ${Math.round(s.stored_per_s)} per second`);
    ' "$out/loadgen.json")
    echo "$figure" | tee "$out/cpu.txt"
    cat "$out/vmstat.txt"
    summarize drain "HarperDB and the persister draining a backlog ($figure)"
    go_summarize drain-nats "nats-server while the persister drains a backlog ($figure)"
    mv -f "/tmp/perf-$hdb.map" "$out/" 2>/dev/null || true # V8's map, for perf script later (copy it back to /tmp)
    ;;
esac
echo "outputs: $out" >&2
