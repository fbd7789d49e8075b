#!/usr/bin/env bash
# Runs every test of the project, the way CI does:
#   1. installs what is missing (deploy/local/install.sh --browser: nats-server, HAProxy,
#      HarperDB 4.7.29, the chat page's socket.io-client, Chromium for the browser test, and the
#      newer nats-server that CHATIFY_NATS_SYNC=always needs),
#   2. checks formatting and lints, and that the compose file, the Kubernetes manifests and the
#      native scripts agree (tests/deploy),
#   3. starts a complete private system (NATS, HarperDB, persister, two gateways, HAProxy, the chat
#      page) on free loopback ports in a temporary run directory, with the same deploy/local/up.sh
#      users run,
#   4. runs the Rust unit and integration tests (the integration tests start their own
#      nats-server processes and use this run's HarperDB with databases of their own), and the
#      tests of the vendored engineioxide (vendor/README.md),
#   5. runs the end-to-end suite (tests/e2e, the real socket.io-client) and the browser test
#      (tests/browser: two headless Chromium pages on the chat page) against it, and the
#      reduced fault scenarios (scripts/faults.sh, all of them) on a second private system, and
#      the NATS restart and cluster scenarios once more with CHATIFY_NATS_SYNC=always,
#   6. runs the profile tools' tests (bench/profile), the reference peer's, and the benchmark
#      tool's smoke mode (bench/run.sh --smoke, tiny sizes, no figures),
#   7. stops everything it started (deploy/local/down.sh) and removes the run directory.
# Logs of a failed run are kept in target/test-logs/.
set -euo pipefail
root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
# A run builds once from a fresh clone: incremental caches would only double target/'s size.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

step() { printf '\n==> %s\n' "$*"; }

step "installing what is missing"
# CHATIFY_NATS_SYNC=always: also the newer nats-server the strict fsync mode needs, for its tests.
CHATIFY_NATS_SYNC=always deploy/local/install.sh --browser

step "formatting and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

step "deployment files (compose, Kubernetes, HAProxy) agree with the native scripts"
(cd tests/deploy && npm ci --no-audit --no-fund --loglevel=error)
node --test --test-reporter=spec tests/deploy/

step "starting a private system on free ports"
run_dir=$(mktemp -d "${TMPDIR:-/tmp}/chatify-test.XXXXXX")
export CHATIFY_RUN_DIR=$run_dir
# shellcheck source=scripts/free-ports.sh
. scripts/free-ports.sh
status=1
cleanup() {
  deploy/local/down.sh >/dev/null 2>&1 || deploy/local/down.sh || true
  if [[ $status -ne 0 && -d $run_dir/logs ]]; then
    { mkdir -p target/test-logs && cp -r "$run_dir/logs/." target/test-logs/; } || true
    echo "logs of this run: target/test-logs/" >&2
  fi
  rm -rf "$run_dir"
}
trap cleanup EXIT
# Every client of the suite comes from 127.0.0.1: one address for all of them. The per-address
# bounds are tested on gateways of their own (tests/e2e/adversarial.test.mjs).
export CHATIFY_LIMITS__HTTP_HISTORY_PER_SECOND=1000 CHATIFY_LIMITS__HTTP_HISTORY_BURST=1000
deploy/local/up.sh

step "Rust unit and integration tests"
# In a subshell: this system's addresses must not leak into the later steps (the fault harness
# starts a system of its own). The e2e suite reads them from $CHATIFY_RUN_DIR/env itself.
(
  # shellcheck disable=SC1091
  . "$run_dir/env"
  export CHATIFY_TEST_HARPERDB_URL=$CHATIFY_HARPERDB_URL
  # HarperDB's super user: the tests create databases of their own (and the persister's role and
  # user, for the setup test); the system's persister runs as a user that may not.
  export CHATIFY_TEST_HARPERDB_USERNAME=$CHATIFY_HDB_ADMIN_USERNAME
  export CHATIFY_TEST_HARPERDB_PASSWORD=$CHATIFY_HDB_ADMIN_PASSWORD
  cargo test --workspace --locked
)

step "vendored engineioxide's own tests (with the patches vendor/README.md lists)"
cargo test --manifest-path vendor/engineioxide/Cargo.toml --locked --target-dir target/vendor \
  --features v3,tracing,__test_harness

step "end-to-end tests (socket.io-client against two gateways behind HAProxy)"
(cd tests/e2e && npm ci --no-audit --no-fund --loglevel=error)
tests/e2e/python/setup.sh
CHATIFY_SKIP_BUILD=1 node --test --test-concurrency=1 --test-reporter=spec tests/e2e/

step "browser test (two headless Chromium pages on the chat page, through HAProxy)"
(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
node --test --test-reporter=spec tests/browser/

step "fault scenarios, reduced (a second private system; see tests/faults/README.md)"
node --test --test-reporter=spec tests/faults/
scripts/faults.sh
step "fault scenarios in the strict fsync mode (CHATIFY_NATS_SYNC=always: nats-server 2.15, fsync per ack)"
CHATIFY_NATS_SYNC=always scripts/faults.sh nats-restart nats-node-loss nats-rolling-restart persister-pair

step "profile tools (bench/profile: Go profiles to flame-graph stacks)"
node --test --test-reporter=spec bench/profile/

step "benchmark reference peer (Node socket.io, alone and two processes with Redis)"
(cd bench/reference && npm ci --no-audit --no-fund --loglevel=error)
node --test --test-reporter=spec bench/reference/

step "benchmark smoke (bench/run.sh --smoke: the load generator against Chatify and the reference)"
bench/run.sh --smoke

status=0
