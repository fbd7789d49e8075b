#!/usr/bin/env bash
# Runs Chatify locally: installs what is missing, builds the binaries, starts every component in
# the background, waits until each one is ready and prints the URLs.
#
#   deploy/local/up.sh                      everything: nats harperdb persister gateway1 gateway2 lb web
#   deploy/local/up.sh nats harperdb        only those (in that order)
#   deploy/local/down.sh                    stops what up.sh started
#   CHATIFY_NATS_NODES=3 CHATIFY_PERSISTERS=2 deploy/local/up.sh
#                                           a 3-node JetStream cluster (nats nats2 nats3, streams
#                                           replicated 3 ways) and two persisters (persister persister2)
#
# A component whose pid file names a live process is left alone, so running it twice is harmless.
# Everything lives in ${CHATIFY_RUN_DIR:-deploy/local/run}: pids/, logs/, data/, secrets/, and
# env, a sourceable file with every port and URL (up.sh reuses its ports next time).
#
# Environment (defaults in brackets):
#   CHATIFY_RUN_DIR [deploy/local/run]   CHATIFY_BIN_DIR [target/release]   CHATIFY_SKIP_BUILD=1
#   CHATIFY_LB_PORT [4000]  CHATIFY_GATEWAY1_PORT [4001]  CHATIFY_GATEWAY2_PORT [4002]
#   CHATIFY_PERSISTER_PORT [4100]  CHATIFY_NATS_PORT [4222]  CHATIFY_NATS_MONITOR_PORT [8222]
#   CHATIFY_HDB_PORT [9925]  CHATIFY_HDB_HTTP_PORT [9926]  CHATIFY_HDB_MQTT_PORT, CHATIFY_HDB_MQTTS_PORT,
#   CHATIFY_HDB_REPLICATION_PORT [1883, 8883, 9933; or CHATIFY_HDB_PORT+10, +11, +12 when it is moved]
#   CHATIFY_WEB_PORT [3000]  (the chat page, http://localhost:$CHATIFY_WEB_PORT)
#   CHATIFY_HDB_ADMIN_USERNAME [chatify]  CHATIFY_HDB_ADMIN_PASSWORD [random, kept in secrets/]
#     HarperDB's super user: it installs HarperDB and runs `chatify-persister setup`, nothing else
#   CHATIFY_HARPERDB__USERNAME [chatify_persister]  CHATIFY_HARPERDB__PASSWORD [random, in secrets/]
#     the persister's HarperDB user, which setup creates: it may only read, insert and update its messages table and read and insert into its change log
#   CHATIFY_NATS_GATEWAY_PASSWORD, CHATIFY_NATS_PERSISTER_PASSWORD [random, kept in secrets/]
#     the NATS users chatify-gateway and chatify-persister (deploy/nats/permissions.conf)
#   CHATIFY_CORS__ALLOWED_ORIGINS [http://localhost:3000 and the chat page's origins]
#   CHATIFY_NATS_SYNC [default]  JetStream's fsync: default (every 2 minutes), always, or an interval
#   CHATIFY_NATS_NODES [1]  1, or 3: a JetStream cluster (docs/operations.md, "A NATS cluster")
#     whose routes log in as chatify-route (CHATIFY_NATS_CLUSTER_PASSWORD [random, in secrets/]):
#     CHATIFY_NATS2_PORT, CHATIFY_NATS3_PORT [4223, 4224]  CHATIFY_NATS2_MONITOR_PORT,
#     CHATIFY_NATS3_MONITOR_PORT [8223, 8224]  CHATIFY_NATS_CLUSTER_PORT, CHATIFY_NATS2_CLUSTER_PORT,
#     CHATIFY_NATS3_CLUSTER_PORT [6222, 6223, 6224]  (routes, on 127.0.0.1)
#   CHATIFY_PERSISTERS [1]  how many persisters (1-9): persister2 ... on CHATIFY_PERSISTER2_PORT ...
#     [CHATIFY_PERSISTER_PORT + 1 ...]
#   The run dir remembers CHATIFY_NATS_SYNC, CHATIFY_NATS_NODES and CHATIFY_PERSISTERS.
# Every other CHATIFY_* variable reaches the gateways and the persister unchanged.
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

for arg in "$@"; do
  case $arg in
    -h | --help)
      sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
      exit 0
      ;;
  esac
done

resolve_run_dir existing
resolve_topology
check_components "$@"
mapfile -t WANTED < <(select_components "$@")
wants() {
  local c
  for c in "${WANTED[@]}"; do [[ $c == "$1" ]] && return 0; done
  return 1
}

"$CHATIFY_LOCAL_DIR/install.sh"

resolve_run_dir create
lock_run_dir
resolve_config
check_topology_change
mkdir -p "$PID_DIR" "$LOG_DIR" "$DATA_DIR"
# Recorded before anything starts, so that a later `up.sh NAME` finds the same ports even if
# this run fails half way.
write_env_file

# --- what each component listens on, how it starts, and how it shows it is ready -----------

component_ports() {
  local p
  case $1 in
    nats | nats2 | nats3)
      p=$(component_var_prefix "$1")
      local port=${p}_PORT monitor=${p}_MONITOR_PORT cluster=${p}_CLUSTER_PORT
      if nats_clustered; then
        echo "${!port} ${!monitor} ${!cluster}"
      else
        echo "${!port} ${!monitor}"
      fi
      ;;
    harperdb) echo "$CHATIFY_HDB_PORT $CHATIFY_HDB_HTTP_PORT $CHATIFY_HDB_MQTT_PORT $CHATIFY_HDB_MQTTS_PORT $CHATIFY_HDB_REPLICATION_PORT" ;;
    persister | persister[2-9])
      p=$(component_var_prefix "$1")_PORT
      echo "${!p}"
      ;;
    gateway1) echo "$CHATIFY_GATEWAY1_PORT" ;;
    gateway2) echo "$CHATIFY_GATEWAY2_PORT" ;;
    lb) echo "$CHATIFY_LB_PORT" ;;
    web) echo "$CHATIFY_WEB_PORT" ;;
  esac
}

# `env` arguments for a binary (gateway or persister): first `-u` for each of this script's own
# variables (those the run dir's env file holds, the port variables of every shape of set, the
# route password, and the build and profiling switches), which the binaries would report as
# unknown settings, and for the HarperDB admin's settings, which no running binary gets; then the
# settings: every NATS node's URL, the stream replicas (one per node, unless the caller set
# CHATIFY_STREAM__REPLICAS), and each binary's own credentials (the gateways get no HarperDB
# credentials: they never talk to HarperDB). The caller's other CHATIFY_* variables are inherited
# as they are (a misspelled setting among them is reported).
# NO_COLOR: their output goes to a log file, not a terminal.
binary_env() {
  local role=$1 name
  for name in $(sed -n 's/^export \(CHATIFY_[A-Z0-9_]*\)=.*/\1/p' "$CHATIFY_RUN_DIR/env") $(all_port_vars) \
    CHATIFY_NATS_CLUSTER_PASSWORD CHATIFY_BIN_DIR CHATIFY_SKIP_BUILD CHATIFY_HDB_NODE_OPTIONS CHATIFY_NATS_PROFILE_PORT; do
    [[ $name == *__* ]] || printf '%s\0' -u "$name"
  done
  printf '%s\0' -u CHATIFY_HARPERDB__ADMIN_USERNAME -u CHATIFY_HARPERDB__ADMIN_PASSWORD
  [[ $role == gateway ]] && printf '%s\0' -u CHATIFY_HARPERDB__USERNAME -u CHATIFY_HARPERDB__PASSWORD
  printf '%s\0' "CHATIFY_NATS__URL=$(nats_client_urls)" \
    "CHATIFY_STREAM__REPLICAS=${CHATIFY_STREAM__REPLICAS:-$CHATIFY_NATS_NODES}" "NO_COLOR=${NO_COLOR:-1}"
  "${role}_settings"
}

gateway_settings() {
  printf '%s\0' "CHATIFY_NATS__USER=chatify-gateway" "CHATIFY_NATS__PASSWORD=$CHATIFY_NATS_GATEWAY_PASSWORD"
}

persister_settings() {
  printf '%s\0' \
    "CHATIFY_NATS__USER=chatify-persister" "CHATIFY_NATS__PASSWORD=$CHATIFY_NATS_PERSISTER_PASSWORD" \
    "CHATIFY_HARPERDB__URL=http://127.0.0.1:$CHATIFY_HDB_PORT" \
    "CHATIFY_HARPERDB__USERNAME=$CHATIFY_HARPERDB__USERNAME" \
    "CHATIFY_HARPERDB__PASSWORD=$CHATIFY_HARPERDB__PASSWORD"
}

# Through deploy/nats/start.sh (as in compose), which adds CHATIFY_NATS_SYNC to nats.conf, and
# the users of permissions.conf with their passwords (the effective config, readable by its
# owner only, is $DATA_DIR/NODE.conf), and on a cluster the node's name and routes: each node
# routes to every node's route port on 127.0.0.1, as the user chatify-route. Each node keeps its
# JetStream store in $DATA_DIR/NODE.
# CHATIFY_NATS_PROFILE_PORT, when set, opens Go's profiling endpoint there (bench/profile.sh; the
# first node only).
start_nats() {
  local node=$1 p port monitor cluster
  p=$(component_var_prefix "$node")
  port=${p}_PORT monitor=${p}_MONITOR_PORT cluster=${p}_CLUSTER_PORT
  local -a cluster_env=() profile=()
  if [[ $node == nats && -n ${CHATIFY_NATS_PROFILE_PORT:-} ]]; then
    profile=(--profile "$CHATIFY_NATS_PROFILE_PORT")
  fi
  if nats_clustered; then
    cluster_env=(CHATIFY_NATS_SERVER_NAME="$node" CHATIFY_NATS_CLUSTER_NAME="$CHATIFY_NATS_CLUSTER_NAME"
      CHATIFY_NATS_CLUSTER_LISTEN="127.0.0.1:${!cluster}" CHATIFY_NATS_ROUTES="$(nats_route_addresses)"
      CHATIFY_NATS_CLUSTER_PASSWORD="$CHATIFY_NATS_CLUSTER_PASSWORD")
  fi
  mkdir -p "$DATA_DIR/$node"
  start_background "$node" "$CHATIFY_RUN_DIR" \
    env CHATIFY_NATS_SYNC="$CHATIFY_NATS_SYNC" NATS_SERVER="$(nats_server_bin)" \
    CHATIFY_NATS_GATEWAY_PASSWORD="$CHATIFY_NATS_GATEWAY_PASSWORD" \
    CHATIFY_NATS_PERSISTER_PASSWORD="$CHATIFY_NATS_PERSISTER_PASSWORD" "${cluster_env[@]}" \
    "$CHATIFY_NATS_START" "$CHATIFY_NATS_CONF" "$DATA_DIR/$node.conf" -js -a 127.0.0.1 \
    -p "${!port}" -m "${!monitor}" -sd "$DATA_DIR/$node" "${profile[@]}"
}

# HarperDB gets a clean environment: it reads many plain variables (HTTP_PORT, LOGGING_LEVEL...)
# as settings, and it keeps its boot file in $HOME/.harperdb, which must stay private to this run.
# CHATIFY_HDB_NODE_OPTIONS, when set, becomes its NODE_OPTIONS (bench/profile.sh passes
# --perf-basic-prof).
hdb_env() {
  printf '%s\0' "PATH=$PATH" "HOME=$HDB_HOME" "LANG=C.UTF-8" "ROOTPATH=$HDB_ROOT" \
    "$CHATIFY_MARKER_VAR=$CHATIFY_RUN_DIR" ${CHATIFY_HDB_NODE_OPTIONS:+"NODE_OPTIONS=$CHATIFY_HDB_NODE_OPTIONS"}
}

install_harperdb_instance() {
  [[ -f $HDB_ROOT/harperdb-config.yaml ]] && return 0
  info "harperdb: installing an instance in $HDB_ROOT (first start of this run dir)"
  mkdir -p "$HDB_HOME"
  local -a env
  mapfile -d '' -t env < <(hdb_env)
  # Answers every question of the installer; "prod" defaults (no unauthenticated local access).
  if ! env -i "${env[@]}" TC_AGREEMENT=yes \
    HDB_ADMIN_USERNAME="$CHATIFY_HDB_ADMIN_USERNAME" HDB_ADMIN_PASSWORD="$CHATIFY_HDB_ADMIN_PASSWORD" \
    OPERATIONSAPI_NETWORK_PORT="$CHATIFY_HDB_PORT" HTTP_PORT="$CHATIFY_HDB_HTTP_PORT" THREADS_COUNT=2 \
    "$CHATIFY_HDB_BIN" install </dev/null >>"$(log_file harperdb)" 2>&1; then
    fail_component harperdb "install failed"
  fi
  [[ -f $HDB_ROOT/harperdb-config.yaml ]] || fail_component harperdb "install did not create $HDB_ROOT/harperdb-config.yaml"
}

start_harperdb() {
  # Applied on every start (HarperDB writes it into its config), so the ports always follow the
  # variables. "host:port" binds to loopback only; a bare port would listen on all interfaces.
  local lo=127.0.0.1 set_config
  set_config=$(printf '{"operationsApi":{"network":{"port":"%s:%s"}},"http":{"port":"%s:%s"},"mqtt":{"network":{"port":"%s:%s","securePort":"%s:%s"}},"replication":{"securePort":"%s:%s"},"logging":{"stdStreams":true}}' \
    "$lo" "$CHATIFY_HDB_PORT" "$lo" "$CHATIFY_HDB_HTTP_PORT" "$lo" "$CHATIFY_HDB_MQTT_PORT" \
    "$lo" "$CHATIFY_HDB_MQTTS_PORT" "$lo" "$CHATIFY_HDB_REPLICATION_PORT")
  local -a env
  mapfile -d '' -t env < <(hdb_env)
  # `harperdb` without a command runs in the foreground: its PID is the server's, and SIGTERM
  # stops it. (`harperdb stop` is never used: it kills every nats-server on the machine.)
  start_background harperdb "$CHATIFY_RUN_DIR" \
    env -i "${env[@]}" HARPER_SET_CONFIG="$set_config" "$CHATIFY_HDB_BIN"
}

# `chatify-persister setup` with HarperDB's super user: the database, the table, the persister's
# role (read, insert and update the messages table, read and insert into its change log) and user. Idempotent, so it runs before every start of
# the persister; the admin's credentials reach this run only.
setup_harperdb() {
  local name=$1
  local -a env
  mapfile -d '' -t env < <(binary_env persister)
  printf '\n===== %s: chatify-persister setup =====\n' "$(date '+%F %T')" >>"$(log_file "$name")"
  if ! env "${env[@]}" CHATIFY_HARPERDB__ADMIN_USERNAME="$CHATIFY_HDB_ADMIN_USERNAME" \
    CHATIFY_HARPERDB__ADMIN_PASSWORD="$CHATIFY_HDB_ADMIN_PASSWORD" \
    "$CHATIFY_BIN_DIR/chatify-persister" setup </dev/null >>"$(log_file "$name")" 2>&1; then
    fail_component "$name" "could not set HarperDB up (chatify-persister setup)"
  fi
}

# persister, or persister2 ... (CHATIFY_PERSISTERS), each on its own HTTP port; they share the
# durable consumer and the history service.
start_persister() {
  local name=$1 port
  local -a env
  port=$(component_var_prefix "$name")_PORT
  setup_harperdb "$name"
  mapfile -d '' -t env < <(binary_env persister)
  start_background "$name" "$CHATIFY_RUN_DIR" \
    env "${env[@]}" CHATIFY_PERSISTER__HOST=127.0.0.1 CHATIFY_PERSISTER__PORT="${!port}" \
    "$CHATIFY_BIN_DIR/chatify-persister"
}

# The browser origins the gateways accept: the caller's CHATIFY_CORS__ALLOWED_ORIGINS, or else the
# original client's http://localhost:3000 and the chat page's own origins (web on its port).
allowed_origins() {
  if [[ -n ${CHATIFY_CORS__ALLOWED_ORIGINS:-} ]]; then
    echo "$CHATIFY_CORS__ALLOWED_ORIGINS"
    return
  fi
  local origins=http://localhost:3000
  [[ $CHATIFY_WEB_PORT == 3000 ]] || origins+=",http://localhost:$CHATIFY_WEB_PORT"
  echo "$origins,http://127.0.0.1:$CHATIFY_WEB_PORT"
}

start_gateway() {
  local name=$1 port=$2
  local -a env
  mapfile -d '' -t env < <(binary_env gateway)
  start_background "$name" "$CHATIFY_RUN_DIR" \
    env "${env[@]}" CHATIFY_GATEWAY__HOST=127.0.0.1 CHATIFY_GATEWAY__PORT="$port" CHATIFY_GATEWAY__NAME="$name" \
    CHATIFY_GATEWAY__ADVERTISE_ADDRESS="127.0.0.1:$port" CHATIFY_CORS__ALLOWED_ORIGINS="$(allowed_origins)" "$CHATIFY_BIN_DIR/chatify-gateway"
}

lb_env() {
  printf '%s\0' "CHATIFY_LB_BIND=127.0.0.1:$CHATIFY_LB_PORT" \
    "CHATIFY_GATEWAY1_ADDR=127.0.0.1:$CHATIFY_GATEWAY1_PORT" \
    "CHATIFY_GATEWAY2_ADDR=127.0.0.1:$CHATIFY_GATEWAY2_PORT"
}

start_lb() {
  local -a env
  mapfile -d '' -t env < <(lb_env)
  # -W: master-worker, in the foreground (no daemon mode), with the master's PID in the pid file.
  start_background lb "$CHATIFY_RUN_DIR" \
    env "${env[@]}" haproxy -W -f "$CHATIFY_HAPROXY_CFG" -p "$(pid_file lb)"
}

# The chat page; it sends browsers to the load balancer on the page's own host name.
start_web() {
  start_background web "$CHATIFY_RUN_DIR" \
    env CHATIFY_WEB_HOST=127.0.0.1 CHATIFY_WEB_PORT="$CHATIFY_WEB_PORT" CHATIFY_LB_PORT="$CHATIFY_LB_PORT" \
    node "$CHATIFY_WEB_DIR/serve.mjs"
}

start_component() {
  case $1 in
    nats | nats2 | nats3) start_nats "$1" ;;
    harperdb) start_harperdb ;;
    persister | persister[2-9]) start_persister "$1" ;;
    gateway1) start_gateway gateway1 "$CHATIFY_GATEWAY1_PORT" ;;
    gateway2) start_gateway gateway2 "$CHATIFY_GATEWAY2_PORT" ;;
    lb) start_lb ;;
    web) start_web ;;
  esac
}

# One readiness probe; fails while the component is not ready yet. A single NATS server is ready
# once JetStream runs; a cluster node once its full /healthz is ok: it is in contact with the
# JetStream meta leader (so 2 of the 3 nodes run) and current with it and with the replicas of the
# streams and consumers it holds (a node that was away has caught up).
probe() {
  local p
  case $1 in
    nats | nats2 | nats3)
      p=$(component_var_prefix "$1")_MONITOR_PORT
      if nats_clustered; then
        http_ok "http://127.0.0.1:${!p}/healthz"
      else
        http_ok "http://127.0.0.1:${!p}/healthz?js-enabled-only=true"
      fi
      ;;
    harperdb)
      HDB_LAST_STATUS=$(hdb_operation_status '{"operation":"describe_all"}')
      [[ $HDB_LAST_STATUS == 200 ]]
      ;;
    persister | persister[2-9])
      p=$(component_var_prefix "$1")_PORT
      http_ok "http://127.0.0.1:${!p}/readyz"
      ;;
    gateway1) http_ok "http://127.0.0.1:$CHATIFY_GATEWAY1_PORT/readyz" ;;
    gateway2) http_ok "http://127.0.0.1:$CHATIFY_GATEWAY2_PORT/readyz" ;;
    lb) http_ok "http://127.0.0.1:$CHATIFY_LB_PORT/healthz" ;;
    web) http_ok "http://127.0.0.1:$CHATIFY_WEB_PORT/healthz" ;;
  esac
}

ready_timeout() {
  case $1 in
    nats | nats2 | nats3) if nats_clustered; then echo 60; else echo 20; fi ;;
    harperdb) echo 120 ;;
    lb | web) echo 30 ;;
    *) echo 60 ;;
  esac
}

wait_ready() {
  local name=$1 timeout start=$SECONDS unauthorized_since=
  timeout=$(ready_timeout "$name")
  HDB_LAST_STATUS=
  while ! probe "$name"; do
    # Checked twice: while the recorded process execs into the program (bash, then env, then
    # the binary), /proc may briefly show neither its command line nor its environment.
    component_pid "$name" >/dev/null || { sleep 0.2 && component_pid "$name" >/dev/null; } ||
      fail_component "$name" "exited while starting"
    if [[ $name == harperdb && $HDB_LAST_STATUS == 401 ]]; then
      unauthorized_since=${unauthorized_since:-$SECONDS}
      if ((SECONDS - unauthorized_since >= 10)); then
        fail_component harperdb "answers but rejects user '$CHATIFY_HDB_ADMIN_USERNAME' (401): its data in $HDB_ROOT
    was installed with other credentials. Use those (unset CHATIFY_HDB_ADMIN_PASSWORD to use the
    one in $HDB_PASSWORD_FILE), or stop it and delete $HDB_ROOT to start afresh"
      fi
    fi
    if ((SECONDS - start >= timeout)); then
      if is_nats_node "$name" && nats_clustered; then
        local monitor health
        monitor=$(component_var_prefix "$name")_MONITOR_PORT
        health=$(curl -s --max-time 2 "http://127.0.0.1:${!monitor}/healthz" 2>/dev/null || true)
        fail_component "$name" "was not ready after ${timeout}s: a cluster node is ready once it reaches the JetStream meta leader and has caught up, which needs 2 of the 3 nodes running (/healthz: ${health:-no answer})"
      fi
      fail_component "$name" "was not ready after ${timeout}s"
    fi
    sleep 0.3
  done
}

# --- checks before anything starts ------------------------------------------------------------

needs_binaries=false
for c in "${WANTED[@]}"; do
  case $c in persister | persister[2-9] | gateway1 | gateway2) needs_binaries=true ;; esac
done

if $needs_binaries; then
  if [[ ${CHATIFY_SKIP_BUILD:-} == 1 ]]; then
    note "CHATIFY_SKIP_BUILD=1: using the binaries in $CHATIFY_BIN_DIR as they are"
  elif [[ $CHATIFY_BIN_DIR != "$CHATIFY_DEFAULT_BIN_DIR" ]]; then
    note "CHATIFY_BIN_DIR is set: using the binaries in $CHATIFY_BIN_DIR without building"
  else
    command -v cargo >/dev/null 2>&1 || die "cargo is needed to build the gateway and the persister (or set CHATIFY_SKIP_BUILD=1)"
    info "building: cargo build --release -p chatify-gateway -p chatify-persister"
    (cd "$CHATIFY_REPO" && cargo build --release -p chatify-gateway -p chatify-persister) ||
      die "cargo build failed"
  fi
  for c in "${WANTED[@]}"; do
    case $c in
      persister | persister[2-9]) bin=chatify-persister ;;
      gateway1 | gateway2) bin=chatify-gateway ;;
      *) continue ;;
    esac
    [[ -x $CHATIFY_BIN_DIR/$bin ]] ||
      die "$c needs $CHATIFY_BIN_DIR/$bin, which does not exist: build it with
    cargo build --release -p chatify-gateway -p chatify-persister  (or point CHATIFY_BIN_DIR at it)"
  done
fi

if wants lb; then
  mapfile -d '' -t lbenv < <(lb_env)
  if ! out=$(env "${lbenv[@]}" haproxy -c -q -f "$CHATIFY_HAPROXY_CFG" 2>&1); then
    die "invalid HAProxy configuration $CHATIFY_HAPROXY_CFG:
$out"
  fi
fi

# A port taken by something else would make a probe succeed against the wrong process.
declare -A RUNNING=()
for c in "${WANTED[@]}"; do
  if pid=$(component_pid "$c"); then
    RUNNING[$c]=$pid
    continue
  fi
  for port in $(component_ports "$c"); do
    if port_in_use "$port"; then
      die "$c cannot start: port $port on 127.0.0.1 is already in use by another process.
    Stop it, or choose other ports (see deploy/local/up.sh --help; this run dir records its ports in $RUN_ENV_FILE)"
    fi
  done
done

# --- start --------------------------------------------------------------------------------------

# NATS nodes of a cluster are started together and waited for after the last one: none is ready
# before two of them run.
NATS_STARTED=()
wait_nats_nodes() {
  local n
  for n in "${NATS_STARTED[@]}"; do
    wait_ready "$n"
    note "$n: ready"
  done
  NATS_STARTED=()
}

nats_running() {
  local n
  for n in "${CHATIFY_NATS_NODE_NAMES[@]:0:CHATIFY_NATS_NODES}"; do
    component_pid "$n" >/dev/null && return 0
    wants "$n" && return 0
  done
  return 1
}

for c in "${WANTED[@]}"; do
  if ! is_nats_node "$c"; then wait_nats_nodes; fi
  case $c in
    persister | persister[2-9] | gateway1 | gateway2)
      nats_running || warn "$c needs nats, which this run dir does not run (start it with: deploy/local/up.sh nats)"
      if is_persister "$c"; then
        component_pid harperdb >/dev/null || wants harperdb ||
          warn "$c needs harperdb, which this run dir does not run (start it with: deploy/local/up.sh harperdb)"
      fi
      ;;
    web)
      component_pid lb >/dev/null || wants lb ||
        warn "web sends browsers to the load balancer, which this run dir does not run (start it with: deploy/local/up.sh lb)"
      ;;
  esac
  if [[ -n ${RUNNING[$c]:-} ]]; then
    info "$c: already running (PID ${RUNNING[$c]}), left alone"
  else
    [[ $c == harperdb ]] && install_harperdb_instance
    info "$c: starting (log: $(log_file "$c"))"
    start_component "$c"
  fi
  if is_nats_node "$c" && nats_clustered; then
    NATS_STARTED+=("$c")
    continue
  fi
  wait_ready "$c"
  note "$c: ready"
done
wait_nats_nodes

# --- report -------------------------------------------------------------------------------------

status() {
  if component_pid "$1" >/dev/null; then echo "$2"; else echo "$2   (not running)"; fi
}
echo
echo "Chatify (run dir $CHATIFY_RUN_DIR):"
echo "  chat page      $(status web "http://localhost:$CHATIFY_WEB_PORT")"
echo "  load balancer  $(status lb "http://127.0.0.1:$CHATIFY_LB_PORT")"
echo "  gateway1       $(status gateway1 "http://127.0.0.1:$CHATIFY_GATEWAY1_PORT")"
echo "  gateway2       $(status gateway2 "http://127.0.0.1:$CHATIFY_GATEWAY2_PORT")"
for c in "${CHATIFY_ALL_COMPONENTS[@]}"; do
  is_persister "$c" || continue
  p=$(component_var_prefix "$c")_PORT
  printf '  %-14s %s\n' "$c" "$(status "$c" "http://127.0.0.1:${!p}  (/healthz /readyz /metrics)")"
done
for c in "${CHATIFY_ALL_COMPONENTS[@]}"; do
  is_nats_node "$c" || continue
  p=$(component_var_prefix "$c")
  port=${p}_PORT monitor=${p}_MONITOR_PORT
  label=NATS
  nats_clustered && label="NATS $c"
  printf '  %-14s %s\n' "$label" "$(status "$c" "nats://127.0.0.1:${!port}  (monitoring http://127.0.0.1:${!monitor})")"
done
if nats_clustered; then
  echo "  NATS cluster   $CHATIFY_NATS_CLUSTER_NAME, routes on 127.0.0.1:$(nats_route_addresses | sed 's/127\.0\.0\.1://g') (user chatify-route), streams replicated ${CHATIFY_STREAM__REPLICAS:-$CHATIFY_NATS_NODES} ways"
fi
echo "  HarperDB       $(status harperdb "http://127.0.0.1:$CHATIFY_HDB_PORT  (operations API; admin '$CHATIFY_HDB_ADMIN_USERNAME', persister '$CHATIFY_HARPERDB__USERNAME')")"
if $HDB_PASSWORD_FROM_ENV; then
  echo "  admin password from CHATIFY_HDB_ADMIN_PASSWORD (also recorded in $RUN_ENV_FILE)"
else
  echo "  admin password in $HDB_PASSWORD_FILE (and $RUN_ENV_FILE)"
fi
echo "  credentials    NATS users chatify-gateway and chatify-persister$(nats_clustered && echo ", route user chatify-route"), the persister's HarperDB user: $SECRETS_DIR/"
echo "  environment    . $RUN_ENV_FILE"
echo "  logs           $LOG_DIR/"
if [[ $CHATIFY_RUN_DIR == "$CHATIFY_LOCAL_DIR/run" ]]; then
  echo "  stop           $CHATIFY_LOCAL_DIR/down.sh"
else
  echo "  stop           CHATIFY_RUN_DIR=$(printf '%q' "$CHATIFY_RUN_DIR") $CHATIFY_LOCAL_DIR/down.sh"
fi
