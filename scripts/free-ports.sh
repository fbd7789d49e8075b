# shellcheck shell=bash
# Sourced by the scripts that start a private system (test.sh, faults.sh): exports every port
# variable deploy/local/up.sh reads with a free loopback port, so the system never collides with
# a developer's running set. With CHATIFY_NATS_NODES=3 also the other NATS nodes' and the routes'
# ports, with CHATIFY_PERSISTERS=N the other persisters' (set those two before sourcing this).
_vars=(
  CHATIFY_LB_PORT CHATIFY_GATEWAY1_PORT CHATIFY_GATEWAY2_PORT CHATIFY_PERSISTER_PORT CHATIFY_NATS_PORT
  CHATIFY_NATS_MONITOR_PORT CHATIFY_HDB_PORT CHATIFY_HDB_HTTP_PORT CHATIFY_HDB_MQTT_PORT
  CHATIFY_HDB_MQTTS_PORT CHATIFY_HDB_REPLICATION_PORT CHATIFY_WEB_PORT
)
if [[ ${CHATIFY_NATS_NODES:-1} -gt 1 ]]; then
  _vars+=(CHATIFY_NATS_CLUSTER_PORT CHATIFY_NATS2_PORT CHATIFY_NATS2_MONITOR_PORT CHATIFY_NATS2_CLUSTER_PORT
    CHATIFY_NATS3_PORT CHATIFY_NATS3_MONITOR_PORT CHATIFY_NATS3_CLUSTER_PORT)
fi
for ((_i = 2; _i <= ${CHATIFY_PERSISTERS:-1}; _i++)); do _vars+=("CHATIFY_PERSISTER${_i}_PORT"); done
mapfile -t _ports < <(node "$(dirname -- "${BASH_SOURCE[0]}")/free-ports.mjs" "${#_vars[@]}")
for _i in "${!_vars[@]}"; do export "${_vars[_i]}=${_ports[_i]}"; done
unset _ports _vars _i
