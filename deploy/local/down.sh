#!/usr/bin/env bash
# Stops what deploy/local/up.sh started in ${CHATIFY_RUN_DIR:-deploy/local/run}, by the PIDs in
# its pid files: all components (web lb gateway2 gateway1 persister harperdb nats, and the NATS
# nodes and persisters of a cluster set: the run dir's recorded CHATIFY_NATS_NODES and
# CHATIFY_PERSISTERS), or only the ones named. SIGTERM, then SIGKILL after CHATIFY_STOP_TIMEOUT
# seconds (15). A PID that no longer belongs to the process up.sh started is left alone. Data and
# logs stay in the run dir.
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

for arg in "$@"; do
  case $arg in
    -h | --help)
      sed -n '2,7s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
      exit 0
      ;;
  esac
done

resolve_run_dir existing
# The set up.sh recorded, whatever this environment says.
resolve_topology recorded
check_components "$@"
mapfile -t selected < <(select_components "$@")
if (($# == 0)); then
  # A NATS node or persister of another shape of set whose pid file is still there (the recorded
  # shape changed while it ran): stopped too, in start order.
  selected=()
  for c in nats nats2 nats3 harperdb persister persister{2..9} gateway1 gateway2 lb web; do
    if is_component "$c" || [[ -f $PID_DIR/$c.pid ]]; then selected+=("$c"); fi
  done
fi
if [[ ! -d $PID_DIR ]]; then
  info "nothing to stop in $CHATIFY_RUN_DIR"
  exit 0
fi

lock_run_dir
info "stopping in $CHATIFY_RUN_DIR"
for ((i = ${#selected[@]} - 1; i >= 0; i--)); do
  stop_component "${selected[i]}"
done
