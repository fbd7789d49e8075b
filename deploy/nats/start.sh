#!/bin/sh
# Starts nats-server with deploy/nats/nats.conf and the fsync setting CHATIFY_NATS_SYNC. Shared by
# deploy/local/up.sh and deploy/docker-compose.yml (POSIX sh: the nats alpine image has no bash).
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
# NATS_SERVER names the binary (default: nats-server on PATH). EFFECTIVE_CONF is BASE_CONF with the
# setting added to its jetstream block; nats-server is exec'd with -c EFFECTIVE_CONF and the rest.
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
case $sync in
  default) ;;
  always) ;;
  *)
    # A positive number and a unit nats-server's duration parser takes.
    printf '%s' "$sync" | grep -Eq '^[1-9][0-9]*(ms|s|m|h)$' ||
      die "CHATIFY_NATS_SYNC must be default, always or an interval like 10s, not '$sync'"
    ;;
esac

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
exec "$server" -c "$effective" "$@"
