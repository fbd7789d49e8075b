# shellcheck shell=bash
# Sourced by the scripts that start a private system (test.sh, faults.sh): exports every port
# variable deploy/local/up.sh reads with a free loopback port, so the system never collides with
# a developer's running set.
mapfile -t _ports < <(node "$(dirname -- "${BASH_SOURCE[0]}")/free-ports.mjs" 12)
export CHATIFY_LB_PORT=${_ports[0]} CHATIFY_GATEWAY1_PORT=${_ports[1]} CHATIFY_GATEWAY2_PORT=${_ports[2]}
export CHATIFY_PERSISTER_PORT=${_ports[3]} CHATIFY_NATS_PORT=${_ports[4]} CHATIFY_NATS_MONITOR_PORT=${_ports[5]}
export CHATIFY_HDB_PORT=${_ports[6]} CHATIFY_HDB_HTTP_PORT=${_ports[7]} CHATIFY_HDB_MQTT_PORT=${_ports[8]}
export CHATIFY_HDB_MQTTS_PORT=${_ports[9]} CHATIFY_HDB_REPLICATION_PORT=${_ports[10]} CHATIFY_WEB_PORT=${_ports[11]}
unset _ports
