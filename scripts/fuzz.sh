#!/usr/bin/env bash
# Fuzzes the decoding of client event payloads (fuzz/fuzz_targets/client_events.rs) with
# libFuzzer through cargo-fuzz, for SECONDS (default 60). Installs cargo-fuzz if missing.
# cargo-fuzz needs nightly-only compiler flags; RUSTC_BOOTSTRAP lets the stable toolchain
# accept them. Crashes are saved under fuzz/artifacts/.
#   scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.."
seconds=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
cd fuzz
exec cargo fuzz run client_events -- -max_total_time="$seconds" -max_len=4096
