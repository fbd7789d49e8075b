#!/usr/bin/env bash
# Stops what deploy/local/up.sh started in ${CHATIFY_RUN_DIR:-deploy/local/run}, by the PIDs in
# its pid files: all components (web lb gateway2 gateway1 persister harperdb nats), or only the ones
# named. SIGTERM, then SIGKILL after CHATIFY_STOP_TIMEOUT seconds (15). A PID that no longer
# belongs to the process up.sh started is left alone. Data and logs stay in the run dir.
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

for arg in "$@"; do
  case $arg in
    -h | --help)
      sed -n '2,5s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
      exit 0
      ;;
  esac
done

check_components "$@"
mapfile -t selected < <(select_components "$@")
resolve_run_dir existing
if [[ ! -d $PID_DIR ]]; then
  info "nothing to stop in $CHATIFY_RUN_DIR"
  exit 0
fi

lock_run_dir
info "stopping in $CHATIFY_RUN_DIR"
for ((i = ${#selected[@]} - 1; i >= 0; i--)); do
  stop_component "${selected[i]}"
done
