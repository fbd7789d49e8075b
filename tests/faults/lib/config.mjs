// Sizes of the fault scenarios: reduced (the default, what scripts/test.sh runs) and full
// (scripts/faults.sh --full, the full sizes). Every one can be overridden by its environment
// variable.

export const SIZES = {
  // persister-crash
  FAULTS_PERSISTER_MESSAGES: { reduced: 10_000, full: 100_000, doc: "messages sent while the persister is being killed" },
  FAULTS_PERSISTER_RATE: { reduced: 600, full: 1000, doc: "messages a second (all senders together)" },
  FAULTS_PERSISTER_KILL_MIN_MS: { reduced: 2000, full: 5000, doc: "shortest pause between a restart and the next SIGKILL" },
  FAULTS_PERSISTER_KILL_MAX_MS: { reduced: 4000, full: 20_000, doc: "longest pause between a restart and the next SIGKILL" },
  FAULTS_PERSISTER_MIN_KILLS: { reduced: 3, full: 5, doc: "SIGKILLs that must have hit the load" },
  // nats-restart
  FAULTS_NATS_DOWN_MS: { reduced: 5000, full: 30_000, doc: "how long NATS stays down" },
  FAULTS_NATS_SENDERS: { reduced: 8, full: 16, doc: "sockets sending (one message at a time, retried with the same clientId)" },
  FAULTS_NATS_AFTER_MS: { reduced: 4000, full: 10_000, doc: "load kept up after the gateways are ready again" },
  // harperdb-outage
  FAULTS_HARPERDB_DOWN_MS: { reduced: 15_000, full: 120_000, doc: "how long HarperDB stays stopped" },
  FAULTS_HARPERDB_RATE: { reduced: 300, full: 300, doc: "messages a second during the outage (all senders)" },
  // gateway-crash
  FAULTS_GATEWAY_RATE: { reduced: 100, full: 200, doc: "messages a second per room while a gateway is killed" },
  FAULTS_GATEWAY_AFTER_MS: { reduced: 12_000, full: 20_000, doc: "load kept up after the SIGKILL" },
  // graceful-shutdown
  FAULTS_SHUTDOWN_RATE: { reduced: 300, full: 1000, doc: "messages a second while gateway and persister get SIGTERM" },
  // slow-client
  FAULTS_SLOW_MESSAGES: { reduced: 6000, full: 50_000, doc: "messages sent to the room of the clients that stopped reading" },
  FAULTS_SLOW_CLIENTS: { reduced: 8, full: 16, doc: "raw WebSocket clients that stop reading" },
  FAULTS_SLOW_MESSAGE_BYTES: { reduced: 4000, full: 4000, doc: "size of each message text" },
  // ordering
  FAULTS_ORDER_MESSAGES: { reduced: 6000, full: 100_000, doc: "messages sent without waiting for acks, across a persister restart" },
  FAULTS_ORDER_RATE: { reduced: 1500, full: 1500, doc: "messages a second (all senders), in bursts of 40 per sender" },
  // nats-node-loss, nats-rolling-restart (a 3-node NATS cluster, 2 persisters)
  FAULTS_CLUSTER_SENDERS: { reduced: 8, full: 16, doc: "sockets sending (one message at a time, 100 a second each, retried with the same clientId)" },
  FAULTS_NODE_DOWN_MS: { reduced: 8000, full: 30_000, doc: "how long the stream leader's node stays down (load goes on)" },
  FAULTS_CLUSTER_AFTER_MS: { reduced: 4000, full: 10_000, doc: "load kept up after the node(s) are back and current" },
  FAULTS_ROLLING_PAUSE_MS: { reduced: 2000, full: 10_000, doc: "how long each node stays stopped in the rolling restart" },
  // persister-pair
  FAULTS_PAIR_MESSAGES: { reduced: 18_000, full: 100_000, doc: "messages sent while one of the two persisters is being killed" },
  FAULTS_PAIR_RATE: { reduced: 600, full: 1000, doc: "messages a second (all senders together)" },
  FAULTS_PAIR_KILL_MIN_MS: { reduced: 1000, full: 4000, doc: "shortest pause between a restart and the next SIGKILL" },
  FAULTS_PAIR_KILL_MAX_MS: { reduced: 2000, full: 10_000, doc: "longest pause between a restart and the next SIGKILL" },
  FAULTS_PAIR_MIN_KILLS: { reduced: 3, full: 5, doc: "SIGKILLs that must have hit the load" },
  // messages that change (persister-crash, ordering)
  FAULTS_CHANGE_RATE: { reduced: 4, full: 4, doc: "edits, deletions and reactions a second per sending socket in persister-crash and ordering (0: none; the limit is 10 a second)" },
  // every scenario
  FAULTS_SETTLE_MS: { reduced: 90_000, full: 300_000, doc: "how long the persister may take to write everything after a scenario (after a SIGKILL, changes wait for the events the killed persister held until the consumer's 30 s ack wait ends; they wait beside the write lanes, so messages keep being written: persister-crash with changes caught up 29 s after its load on 2 cores, once, bounded by that ack wait; it took about 125 s while changes waited in the lanes)" },
};

export function loadSizes(full) {
  const out = {};
  for (const [k, v] of Object.entries(SIZES)) {
    const env = process.env[k];
    if (env !== undefined && env !== "") {
      const n = Number(env);
      if (!Number.isFinite(n) || n < 0) throw new Error(`${k} must be a non-negative number, not '${env}'`);
      out[k] = n;
    } else {
      out[k] = full ? v.full : v.reduced;
    }
  }
  return out;
}

/** Server settings the harness relies on (scripts/faults.sh exports them; defaults as in docs/configuration.md). */
export const serverSetting = (name, dflt) => {
  const v = process.env[name];
  return v === undefined || v === "" ? dflt : Number(v);
};
