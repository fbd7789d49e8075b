#!/bin/sh
# Starts nats-server with deploy/nats/nats.conf, the fsync setting CHATIFY_NATS_SYNC and Chatify's
# two users with their permissions. Shared by deploy/local/up.sh and deploy/docker-compose.yml
# (POSIX sh: the nats alpine image has no bash).
#
#   start.sh BASE_CONF EFFECTIVE_CONF [nats-server arguments...]
#
# CHATIFY_NATS_SYNC (empty or "default", "always", or an interval such as 10s, 500ms, 1m):
#   empty/default  JetStream's own fsync interval (2 minutes): a killed process loses nothing, a
#                  machine or OS crash can lose what was acknowledged in the last interval;
#   always         fsync before every acknowledgement: nothing acknowledged is lost in a crash
#                  either, at the cost of write throughput;
#   an interval    fsync that often.
# Anything but the default needs nats-server 2.10 or later (`sync_interval`); an older one is
# refused here with that reason rather than left to fail on an unknown key.
#
# CHATIFY_NATS_GATEWAY_PASSWORD and CHATIFY_NATS_PERSISTER_PASSWORD (both required): the passwords
# of the users chatify-gateway and chatify-persister, whose permissions are those of
# permissions.conf beside BASE_CONF (docs/security.md). No other user exists, so a connection
# without credentials is refused. A password may be a bcrypt hash (`nats server passwd`); it may
# not contain a double quote, a backslash or a line break.
#
# A JetStream cluster node, when CHATIFY_NATS_CLUSTER_LISTEN is set (deploy/local/up.sh with
# CHATIFY_NATS_NODES=3, compose's three nats services):
#   CHATIFY_NATS_SERVER_NAME       this node's name, unique in the cluster (JetStream needs one)
#   CHATIFY_NATS_CLUSTER_NAME      the cluster's name [chatify]
#   CHATIFY_NATS_CLUSTER_LISTEN    HOST:PORT the route listener binds to
#   CHATIFY_NATS_ROUTES            every node's route address, HOST:PORT, comma separated (a node
#                                  may list its own: NATS ignores a route to itself)
#   CHATIFY_NATS_CLUSTER_PASSWORD  the password of the route user chatify-route (required): a
#                                  route sees every message of every account, so no server joins
#                                  without it. It goes into the route URLs too: plain (no bcrypt
#                                  hash), and no '@', ':' or '/' besides the characters above.
#
# NATS_SERVER names the binary (default: nats-server on PATH). EFFECTIVE_CONF (written readable by
# its owner only: it holds the passwords) is BASE_CONF with the sync setting added to its jetstream
# block, then permissions.conf, then the users, then the cluster; nats-server is exec'd with
# -c EFFECTIVE_CONF and the rest.
set -eu

die() {
  echo "deploy/nats/start.sh: $*" >&2
  exit 2
}

[ $# -ge 2 ] || die "usage: start.sh BASE_CONF EFFECTIVE_CONF [nats-server arguments...]"
base=$1
effective=$2
shift 2
server=${NATS_SERVER:-nats-server}
sync=${CHATIFY_NATS_SYNC:-default}

[ -r "$base" ] || die "cannot read $base"
permissions=$(dirname -- "$base")/permissions.conf
[ -r "$permissions" ] || die "cannot read $permissions"

# A password goes between double quotes in the configuration, where NATS reads no variable.
password() {
  eval "value=\${$1:-}"
  # shellcheck disable=SC2154 # set by the eval
  [ -n "$value" ] || die "$1 is not set: the NATS users' passwords are required (deploy/local/up.sh generates them)"
  case $value in
    *'"'* | *'\'* | *"
"*) die "$1 may not contain a double quote, a backslash or a line break" ;;
  esac
  printf '%s' "$value"
}
gateway_password=$(password CHATIFY_NATS_GATEWAY_PASSWORD)
persister_password=$(password CHATIFY_NATS_PERSISTER_PASSWORD)
cluster_listen=${CHATIFY_NATS_CLUSTER_LISTEN:-}
if [ -n "$cluster_listen" ]; then
  server_name=${CHATIFY_NATS_SERVER_NAME:-}
  cluster_name=${CHATIFY_NATS_CLUSTER_NAME:-chatify}
  routes=${CHATIFY_NATS_ROUTES:-}
  cluster_password=$(password CHATIFY_NATS_CLUSTER_PASSWORD)
  case $cluster_password in
    *@* | *:* | */*) die "CHATIFY_NATS_CLUSTER_PASSWORD may not contain '@', ':' or '/' (it is part of the route URLs)" ;;
  esac
  for value in "$server_name" "$cluster_name"; do
    printf '%s' "$value" | grep -Eq '^[A-Za-z0-9_-]+$' ||
      die "CHATIFY_NATS_SERVER_NAME and CHATIFY_NATS_CLUSTER_NAME must be set, of letters, digits, '-' and '_' only (not '$value')"
  done
  [ -n "$routes" ] || die "CHATIFY_NATS_ROUTES is not set: a cluster node needs the route address of every node"
  for address in $cluster_listen $(printf '%s' "$routes" | tr ',' ' '); do
    printf '%s' "$address" | grep -Eq '^[A-Za-z0-9.-]+:[0-9]+$' ||
      die "CHATIFY_NATS_CLUSTER_LISTEN and CHATIFY_NATS_ROUTES take HOST:PORT addresses, not '$address'"
  done
elif [ -n "${CHATIFY_NATS_ROUTES:-}" ]; then
  die "CHATIFY_NATS_ROUTES is set without CHATIFY_NATS_CLUSTER_LISTEN"
fi
case $sync in
  default) ;;
  always) ;;
  *)
    # A positive number and a unit nats-server's duration parser takes.
    printf '%s' "$sync" | grep -Eq '^[1-9][0-9]*(ms|s|m|h)$' ||
      die "CHATIFY_NATS_SYNC must be default, always or an interval like 10s, not '$sync'"
    ;;
esac

umask 077
rm -f "$effective"
if [ "$sync" = default ]; then
  cp "$base" "$effective"
else
  # "nats-server: v2.9.10" -> 2 9
  version=$("$server" --version 2>/dev/null | sed -n 's/.*v\([0-9][0-9]*\)\.\([0-9][0-9]*\).*/\1 \2/p' | head -n 1)
  [ -n "$version" ] || die "could not run '$server --version'"
  major=${version% *}
  minor=${version#* }
  if [ "$major" -lt 2 ] || { [ "$major" -eq 2 ] && [ "$minor" -lt 10 ]; }; then
    die "CHATIFY_NATS_SYNC=$sync needs nats-server 2.10 or later (sync_interval), and $server is $major.$minor; deploy/local/install.sh installs one when the variable is set"
  fi
  grep -q '^jetstream {' "$base" || die "$base has no 'jetstream {' block to add sync_interval to"
  awk -v sync="$sync" '{ print } /^jetstream \{$/ { print "  sync_interval: " sync }' "$base" >"$effective"
fi
{
  echo
  echo "# ---- $permissions"
  cat "$permissions"
  echo
  echo "# ---- the users (deploy/nats/start.sh)"
  echo "authorization {"
  echo "  users = ["
  printf '    {user: "chatify-gateway", password: "%s", permissions: $CHATIFY_GATEWAY_PERMISSIONS}\n' "$gateway_password"
  printf '    {user: "chatify-persister", password: "%s", permissions: $CHATIFY_PERSISTER_PERMISSIONS}\n' "$persister_password"
  echo "  ]"
  echo "}"
  if [ -n "$cluster_listen" ]; then
    echo
    echo "# ---- the JetStream cluster (deploy/nats/start.sh): routes log in as chatify-route"
    printf 'server_name: "%s"\n' "$server_name"
    echo "cluster {"
    printf '  name: "%s"\n' "$cluster_name"
    printf '  listen: "%s"\n' "$cluster_listen"
    printf '  authorization {user: "chatify-route", password: "%s"}\n' "$cluster_password"
    echo "  routes: ["
    for address in $(printf '%s' "$routes" | tr ',' ' '); do
      printf '    "nats-route://chatify-route:%s@%s"\n' "$cluster_password" "$address"
    done
    echo "  ]"
    echo "}"
  fi
} >>"$effective"
exec "$server" -c "$effective" "$@"
