#!/usr/bin/env bash
# Starts the reference peer (bench/reference/server.mjs) in the background.
#
#   bench/reference/start.sh 1      one process on $PORT, in-memory adapter
#   bench/reference/start.sh N      N processes on $PORT .. $PORT+N-1, joined by the Redis adapter
#                                   through a private redis-server on a free port (no persistence)
#
# Environment: PORT [4101], HOST [127.0.0.1], REF_RUN_DIR [a new temp dir], REDIS_PORT [a free one],
# and anything server.mjs reads (CORS_ORIGINS, TRANSPORTS, HISTORY_MAX, NODE_OPTIONS).
# The run dir gets one pid file per process (*.pid), their logs (*.log) and `env`, a sourceable
# file with REF_URLS, REF_PIDS and REDIS_URL. bench/reference/stop.sh RUN_DIR stops exactly those.
set -euo pipefail

HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
N=${1:-1}
[[ $N =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [PROCESSES]" >&2; exit 2; }
PORT=${PORT:-4101}
HOST=${HOST:-127.0.0.1}
RUN_DIR=${REF_RUN_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/chatify-ref.XXXXXX")}
mkdir -p "$RUN_DIR"
RUN_DIR=$(cd -- "$RUN_DIR" && pwd)

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

port_busy() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

free_port() {
  node -e 'const s=require("net").createServer().listen(0,process.argv[1],()=>{console.log(s.address().port);s.close()})' "$HOST"
}

wait_for() { # wait_for WHAT SECONDS COMMAND...
  local what=$1 deadline=$((SECONDS + $2))
  shift 2
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      echo "$what did not become ready; see $RUN_DIR" >&2
      exit 1
    fi
    sleep 0.1
  done
}

for f in "$RUN_DIR"/*.pid; do
  [[ -e $f ]] || continue
  if st=$(ps -o stat= -p "$(cat "$f")" 2>/dev/null) && [[ $st != Z* ]]; then
    echo "$RUN_DIR already has running processes ($f); stop them with $HERE/stop.sh $RUN_DIR" >&2
    exit 1
  fi
done

# From here on, a failure stops whatever this run started.
trap 'status=$?; if ((status != 0)); then "$HERE/stop.sh" "$RUN_DIR" >/dev/null 2>&1 || true; fi' EXIT

if [[ ! -d $HERE/node_modules/socket.io ]]; then
  (cd "$HERE" && npm ci --no-audit --no-fund)
fi

for ((i = 0; i < N; i++)); do
  if port_busy $((PORT + i)); then
    echo "port $((PORT + i)) on $HOST is in use" >&2
    exit 1
  fi
done

REDIS_URL=
if ((N > 1)); then
  if ! command -v redis-server >/dev/null; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null
  fi
  REDIS_PORT=${REDIS_PORT:-$(free_port)}
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$RUN_DIR" --logfile "$RUN_DIR/redis.log" --daemonize no </dev/null >/dev/null 2>&1 &
  echo $! >"$RUN_DIR/redis.pid"
  wait_for redis-server 10 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping
  REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
fi

URLS=()
PIDS=()
for ((i = 0; i < N; i++)); do
  p=$((PORT + i))
  PORT=$p HOST=$HOST REDIS_URL=$REDIS_URL nohup node "$HERE/server.mjs" </dev/null >"$RUN_DIR/ref-$p.log" 2>&1 &
  echo $! >"$RUN_DIR/ref-$p.pid"
  URLS+=("http://$HOST:$p")
  PIDS+=("$!")
done
for url in "${URLS[@]}"; do
  wait_for "$url" 15 curl -fsS "$url/healthz"
done

{
  echo "REF_RUN_DIR=$RUN_DIR"
  echo "REF_URLS=\"${URLS[*]}\""
  echo "REF_PIDS=\"${PIDS[*]}\""
  echo "REDIS_URL=$REDIS_URL"
  [[ -z $REDIS_URL ]] || echo "REDIS_PID=$(cat "$RUN_DIR/redis.pid")"
} >"$RUN_DIR/env"

echo "reference peer: ${URLS[*]}${REDIS_URL:+ (redis adapter, $REDIS_URL)}"
echo "run dir: $RUN_DIR (stop with $HERE/stop.sh $RUN_DIR)"
