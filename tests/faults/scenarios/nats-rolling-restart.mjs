// 9. NATS rolling restart (a 3-node JetStream cluster, streams R3, two persisters): under load,
// each node in turn gets SIGTERM, stays stopped a moment, is started again with up.sh and must be
// a current replica of the messages stream again before the next one goes, as an operator
// upgrading the cluster would do. Senders retry with the same clientId as in nats-node-loss.
// Proves:
//   - each node stops on SIGTERM and catches up after its restart; the stream always has a
//     leader again, wherever it moved,
//   - the gateways and persisters ride through all three restarts by themselves (same PIDs) and
//     are ready at the end,
//   - sends are answered ok or `unavailable` within the request timeout, never hang, every
//     message is finally acknowledged and stored once, nothing acknowledged is lost.

import { sleep } from "../../e2e/helpers.mjs";
import { checkAnswers, liveDeliveryAfter, readinessProber, retryingLoad, windowAnswers } from "../lib/cluster.mjs";

const STOP_TIMEOUT_MS = 15_000;

export default {
  name: "nats-rolling-restart",
  short: "rr",
  system: "cluster",
  title: "all three NATS nodes are restarted one after another under load",
  async run(ctx) {
    const { sizes, checks, log, sys, ledger } = ctx;
    const services = ["gateway1", "gateway2", ...sys.persisters()];
    const load = await retryingLoad(ctx, sizes.FAULTS_CLUSTER_SENDERS);
    const pids = Object.fromEntries(services.map((c) => [c, sys.pidOf(c)]));
    const prober = readinessProber(sys, services);
    await sleep(2000);

    const restarts = [];
    for (const node of sys.natsNodes()) {
      const before = await sys.streamLeader();
      const stoppedAt = Date.now();
      const { pid, exited, ms } = await sys.sigterm(node, STOP_TIMEOUT_MS);
      if (!exited) await sys.down(node);
      log(`SIGTERM to ${node} (PID ${pid}${before.leader === node ? ", the stream's leader" : ""}): ${exited ? `exited in ${ms} ms` : `still running after ${STOP_TIMEOUT_MS} ms, stopped by down.sh`}`);
      await sleep(sizes.FAULTS_ROLLING_PAUSE_MS);
      const upMs = await sys.up(node);
      const backAt = Date.now();
      let currentMs;
      let error;
      try {
        currentMs = await sys.waitReplicaCurrent(node, { timeoutMs: 30_000 });
      } catch (e) {
        error = e.message;
      }
      const after = await sys.streamLeader();
      restarts.push({ node, wasLeader: before.leader === node, exited, stopMs: ms, upMs, currentMs, error, leaderAfter: after.leader, stoppedAt, backAt });
      log(`${node} restarted by up.sh in ${upMs} ms, ${error ? `not current: ${error}` : `a current replica ${currentMs} ms later`}; the stream's leader is ${after.leader ?? "being elected"}`);
    }
    const lastBackAt = Date.now();
    await sleep(sizes.FAULTS_CLUSTER_AFTER_MS);
    const results = await load.stop();
    await prober.stop();

    for (const r of restarts) {
      checks.check(`${r.node} stopped on SIGTERM`, r.exited, r.exited ? `in ${r.stopMs} ms${r.wasLeader ? " (it led the stream)" : ""}` : `not within ${STOP_TIMEOUT_MS} ms`);
      checks.check(`${r.node} was a current replica again before the next node stopped`, r.currentMs !== undefined, r.error ?? `${r.currentMs} ms after up.sh returned (up.sh took ${r.upMs} ms)`);
      const w = windowAnswers(ledger, r.stoppedAt, r.backAt);
      checks.note(`sends while ${r.node} was away`, `${w.during} sends, ${w.unavailable} unavailable, ${w.slow} slower than 1 s (slowest ${w.slowest} ms), ${w.retriedOk} acknowledged after a retry`);
    }
    const final = await sys.waitStreamLeader({ timeoutMs: 10_000 }).catch((e) => ({ error: e.message }));
    checks.check("the messages stream has a leader after the three restarts", !!final.leader, final.error ?? final.leader);
    const endProbes = prober.probes.filter((p) => p.at > lastBackAt + 1000);
    const notReady = endProbes.filter((p) => services.some((s) => p[s] !== 200));
    checks.check("gateways and persisters /readyz 200 after the last restart", endProbes.length > 0 && notReady.length === 0, `${endProbes.length - notReady.length} of ${endProbes.length} probes all 200`);
    checkAnswers(ctx, { results, requestTimeout: load.requestTimeout, pids });
    const live = await liveDeliveryAfter(ledger, load.senders, lastBackAt + 1000);
    checks.check("live delivery went on after the last restart", live.checked > 0 && live.missing.length === 0, `${live.checked} messages checked, ${live.missing.length} deliveries missing ${live.missing.slice(0, 5).join(" ")}`);
    const drained = await sys.waitConsumerDrained(sizes.FAULTS_SETTLE_MS).then((ms) => ({ ms }), (e) => ({ error: e.message }));
    checks.check("the persisters' consumer drained", !drained.error, drained.error ?? `${drained.ms} ms after the load`);
  },
};
