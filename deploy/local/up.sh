#!/usr/bin/env bash
# Runs Chatify locally: installs what is missing, builds the binaries, starts every component in
# the background, waits until each one is ready and prints the URLs.
#
#   deploy/local/up.sh                      everything: nats harperdb persister gateway1 gateway2 lb web
#   deploy/local/up.sh nats harperdb        only those (in that order)
#   deploy/local/down.sh                    stops what up.sh started
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
#     the persister's HarperDB user, which setup creates: it may only read and insert into its table
#   CHATIFY_NATS_GATEWAY_PASSWORD, CHATIFY_NATS_PERSISTER_PASSWORD [random, kept in secrets/]
#     the NATS users chatify-gateway and chatify-persister (deploy/nats/permissions.conf)
#   CHATIFY_CORS__ALLOWED_ORIGINS [http://localhost:3000 and the chat page's origins]
#   CHATIFY_NATS_SYNC [default]  JetStream's fsync: default (every 2 minutes), always, or an interval
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
mkdir -p "$PID_DIR" "$LOG_DIR" "$DATA_DIR"
# Recorded before anything starts, so that a later `up.sh NAME` finds the same ports even if
# this run fails half way.
write_env_file

# --- what each component listens on, how it starts, and how it shows it is ready -----------

component_ports() {
  case $1 in
    nats) echo "$CHATIFY_NATS_PORT $CHATIFY_NATS_MONITOR_PORT" ;;
    harperdb) echo "$CHATIFY_HDB_PORT $CHATIFY_HDB_HTTP_PORT $CHATIFY_HDB_MQTT_PORT $CHATIFY_HDB_MQTTS_PORT $CHATIFY_HDB_REPLICATION_PORT" ;;
    persister) echo "$CHATIFY_PERSISTER_PORT" ;;
    gateway1) echo "$CHATIFY_GATEWAY1_PORT" ;;
    gateway2) echo "$CHATIFY_GATEWAY2_PORT" ;;
    lb) echo "$CHATIFY_LB_PORT" ;;
    web) echo "$CHATIFY_WEB_PORT" ;;
  esac
}

# `env` arguments for a binary (gateway or persister): first `-u` for each of this script's own
# variables (those the run dir's env file holds, and the build and profiling switches), which the
# binaries would report as unknown settings, and for the HarperDB admin's settings, which no
# running binary gets; then the settings: the NATS URL, and each binary's own credentials (the
# gateways get no HarperDB credentials: they never talk to HarperDB). The caller's other CHATIFY_*
# variables are inherited as they are (a misspelled setting among them is reported).
# NO_COLOR: their output goes to a log file, not a terminal.
binary_env() {
  local role=$1 name
  for name in $(sed -n 's/^export \(CHATIFY_[A-Z0-9_]*\)=.*/\1/p' "$CHATIFY_RUN_DIR/env") \
    CHATIFY_BIN_DIR CHATIFY_SKIP_BUILD CHATIFY_HDB_NODE_OPTIONS CHATIFY_NATS_PROFILE_PORT; do
    [[ $name == *__* ]] || printf '%s\0' -u "$name"
  done
  printf '%s\0' -u CHATIFY_HARPERDB__ADMIN_USERNAME -u CHATIFY_HARPERDB__ADMIN_PASSWORD
  [[ $role == gateway ]] && printf '%s\0' -u CHATIFY_HARPERDB__USERNAME -u CHATIFY_HARPERDB__PASSWORD
  printf '%s\0' "CHATIFY_NATS__URL=nats://127.0.0.1:$CHATIFY_NATS_PORT" "NO_COLOR=${NO_COLOR:-1}"
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
# owner only, is $DATA_DIR/nats.conf).
# CHATIFY_NATS_PROFILE_PORT, when set, opens Go's profiling endpoint there (bench/profile.sh).
start_nats() {
  mkdir -p "$DATA_DIR/nats"
  start_background nats "$CHATIFY_RUN_DIR" \
    env CHATIFY_NATS_SYNC="$CHATIFY_NATS_SYNC" NATS_SERVER="$(nats_server_bin)" \
    CHATIFY_NATS_GATEWAY_PASSWORD="$CHATIFY_NATS_GATEWAY_PASSWORD" \
    CHATIFY_NATS_PERSISTER_PASSWORD="$CHATIFY_NATS_PERSISTER_PASSWORD" \
    "$CHATIFY_NATS_START" "$CHATIFY_NATS_CONF" "$DATA_DIR/nats.conf" -js -a 127.0.0.1 \
    -p "$CHATIFY_NATS_PORT" -m "$CHATIFY_NATS_MONITOR_PORT" -sd "$DATA_DIR/nats" \
    ${CHATIFY_NATS_PROFILE_PORT:+--profile "$CHATIFY_NATS_PROFILE_PORT"}
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
# role (read and insert into the table) and user. Idempotent, so it runs before every start of
# the persister; the admin's credentials reach this run only.
setup_harperdb() {
  local -a env
  mapfile -d '' -t env < <(binary_env persister)
  printf '\n===== %s: chatify-persister setup =====\n' "$(date '+%F %T')" >>"$(log_file persister)"
  if ! env "${env[@]}" CHATIFY_HARPERDB__ADMIN_USERNAME="$CHATIFY_HDB_ADMIN_USERNAME" \
    CHATIFY_HARPERDB__ADMIN_PASSWORD="$CHATIFY_HDB_ADMIN_PASSWORD" \
    "$CHATIFY_BIN_DIR/chatify-persister" setup </dev/null >>"$(log_file persister)" 2>&1; then
    fail_component persister "could not set HarperDB up (chatify-persister setup)"
  fi
}

start_persister() {
  local -a env
  setup_harperdb
  mapfile -d '' -t env < <(binary_env persister)
  start_background persister "$CHATIFY_RUN_DIR" \
    env "${env[@]}" CHATIFY_PERSISTER__HOST=127.0.0.1 CHATIFY_PERSISTER__PORT="$CHATIFY_PERSISTER_PORT" \
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
    CHATIFY_CORS__ALLOWED_ORIGINS="$(allowed_origins)" "$CHATIFY_BIN_DIR/chatify-gateway"
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
    nats) start_nats ;;
    harperdb) start_harperdb ;;
    persister) start_persister ;;
    gateway1) start_gateway gateway1 "$CHATIFY_GATEWAY1_PORT" ;;
    gateway2) start_gateway gateway2 "$CHATIFY_GATEWAY2_PORT" ;;
    lb) start_lb ;;
    web) start_web ;;
  esac
}

# One readiness probe; fails while the component is not ready yet.
probe() {
  case $1 in
    nats) http_ok "http://127.0.0.1:$CHATIFY_NATS_MONITOR_PORT/healthz?js-enabled-only=true" ;;
    harperdb)
      HDB_LAST_STATUS=$(hdb_operation_status '{"operation":"describe_all"}')
      [[ $HDB_LAST_STATUS == 200 ]]
      ;;
    persister) http_ok "http://127.0.0.1:$CHATIFY_PERSISTER_PORT/readyz" ;;
    gateway1) http_ok "http://127.0.0.1:$CHATIFY_GATEWAY1_PORT/readyz" ;;
    gateway2) http_ok "http://127.0.0.1:$CHATIFY_GATEWAY2_PORT/readyz" ;;
    lb) http_ok "http://127.0.0.1:$CHATIFY_LB_PORT/healthz" ;;
    web) http_ok "http://127.0.0.1:$CHATIFY_WEB_PORT/healthz" ;;
  esac
}

ready_timeout() {
  case $1 in
    nats) echo 20 ;;
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
      fail_component "$name" "was not ready after ${timeout}s"
    fi
    sleep 0.3
  done
}

# --- checks before anything starts ------------------------------------------------------------

needs_binaries=false
for c in "${WANTED[@]}"; do
  case $c in persister | gateway1 | gateway2) needs_binaries=true ;; esac
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
      persister) bin=chatify-persister ;;
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

for c in "${WANTED[@]}"; do
  case $c in
    persister | gateway1 | gateway2)
      for dep in nats harperdb; do
        [[ $c != persister && $dep == harperdb ]] && continue
        component_pid "$dep" >/dev/null || wants "$dep" ||
          warn "$c needs $dep, which this run dir does not run (start it with: deploy/local/up.sh $dep)"
      done
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
  wait_ready "$c"
  note "$c: ready"
done

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
echo "  persister      $(status persister "http://127.0.0.1:$CHATIFY_PERSISTER_PORT  (/healthz /readyz /metrics)")"
echo "  NATS           $(status nats "nats://127.0.0.1:$CHATIFY_NATS_PORT  (monitoring http://127.0.0.1:$CHATIFY_NATS_MONITOR_PORT)")"
echo "  HarperDB       $(status harperdb "http://127.0.0.1:$CHATIFY_HDB_PORT  (operations API; admin '$CHATIFY_HDB_ADMIN_USERNAME', persister '$CHATIFY_HARPERDB__USERNAME')")"
if $HDB_PASSWORD_FROM_ENV; then
  echo "  admin password from CHATIFY_HDB_ADMIN_PASSWORD (also recorded in $RUN_ENV_FILE)"
else
  echo "  admin password in $HDB_PASSWORD_FILE (and $RUN_ENV_FILE)"
fi
echo "  credentials    NATS users chatify-gateway and chatify-persister, the persister's HarperDB user: $SECRETS_DIR/"
echo "  environment    . $RUN_ENV_FILE"
echo "  logs           $LOG_DIR/"
if [[ $CHATIFY_RUN_DIR == "$CHATIFY_LOCAL_DIR/run" ]]; then
  echo "  stop           $CHATIFY_LOCAL_DIR/down.sh"
else
  echo "  stop           CHATIFY_RUN_DIR=$(printf '%q' "$CHATIFY_RUN_DIR") $CHATIFY_LOCAL_DIR/down.sh"
fi
