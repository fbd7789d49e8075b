#!/usr/bin/env bash
# Where the gateway's memory and CPU go: the profiles behind bench/PROFILE.md.
#
#   bench/profile.sh heap [CONNS]   heap profile (valgrind's DHAT) of one gateway holding CONNS
#                                   idle WebSocket connections (default 2000, each in one of
#                                   CONNS/10 rooms); prints the allocation sites alive at the peak,
#                                   in bytes per connection
#   bench/profile.sh cpu [RATE]     CPU profile (perf) of one gateway during the big-room scenario
#                                   (1,000 members, RATE messages/s, default 20); prints the split
#                                   between the kernel and user space and the top symbols, and
#                                   writes a flame graph when inferno is installed
#                                   (cargo install inferno)
#
# It starts a private NATS, HarperDB and persister (deploy/local/up.sh) on free ports, runs the
# release gateway itself (under valgrind for heap), pins it to core 0 and the load generator to
# core 1 (cpu), and stops everything on exit. Outputs go to target/profile/<UTC time>-<kind>/.
# Needs valgrind or perf (Debian packages valgrind, linux-perf; installed when missing) and the
# release binaries (cargo build --release -p chatify-gateway -p chatify-persister -p chatify-loadgen).
set -euo pipefail
root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

kind=${1:-}
case $kind in
  heap) conns=${2:-2000}; tool=valgrind package=valgrind ;;
  cpu) rate=${2:-20}; tool=perf package=linux-perf ;;
  -h | --help | '') sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
  *) echo "unknown profile $kind (heap or cpu)" >&2; exit 2 ;;
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
run_dir=$(mktemp -d "${TMPDIR:-/tmp}/chatify-profile.XXXXXX")
gateway_pid=
cleanup() {
  local status=$?
  set +e
  [[ -n $gateway_pid ]] && kill "$gateway_pid" 2>/dev/null && wait "$gateway_pid" 2>/dev/null
  CHATIFY_RUN_DIR=$run_dir deploy/local/down.sh >/dev/null 2>&1
  rm -rf "$run_dir"
  exit "$status"
}
trap cleanup EXIT

# shellcheck source=../scripts/free-ports.sh
. scripts/free-ports.sh
CHATIFY_RUN_DIR=$run_dir CHATIFY_SKIP_BUILD=1 deploy/local/up.sh nats harperdb persister >"$out/up.log" 2>&1 ||
  { tail -20 "$out/up.log" >&2; exit 1; }
# shellcheck disable=SC1091
. "$run_dir/env"
url=$CHATIFY_GATEWAY1_URL
ulimit -n 20000 2>/dev/null || true
gateway_env=(CHATIFY_NATS__URL="$CHATIFY_NATS_URL" CHATIFY_GATEWAY__PORT="$CHATIFY_GATEWAY1_PORT"
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
    (sleep 12 && perf record -F 1999 -g -p "$gateway_pid" -o "$out/perf.data" -- sleep 10) \
      >"$out/perf.log" 2>&1 &
    recorder=$!
    taskset -c 1 target/release/chatify-loadgen room --url "$url" --pid "$gateway_pid" --members 1000 \
      --rate "$rate" --duration 24 --warmup 2 --quiet >"$out/loadgen.json" 2>"$out/loadgen.log"
    wait "$recorder"
    {
      node -e '
        const s = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
        console.log(`deliveries ${s.delivered}, gateway CPU per delivery ${s.server.cpu_us_per_delivery.toFixed(1)} µs`);
      ' "$out/loadgen.json"
      echo "## where the samples are (shared object)"
      perf report -i "$out/perf.data" --no-children --sort dso --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -8
      echo "## top symbols"
      perf report -i "$out/perf.data" --no-children --sort dso,sym --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -40
    } | tee "$out/cpu.txt"
    if command -v inferno-collapse-perf >/dev/null && command -v inferno-flamegraph >/dev/null; then
      perf script -i "$out/perf.data" 2>/dev/null | inferno-collapse-perf | inferno-flamegraph >"$out/flamegraph.svg"
      echo "flame graph: $out/flamegraph.svg"
    fi
    ;;
esac
echo "outputs: $out" >&2
