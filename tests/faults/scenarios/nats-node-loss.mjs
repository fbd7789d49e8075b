// 8. NATS node loss (a 3-node JetStream cluster, streams R3, two persisters): the node that
// leads the messages stream is SIGKILLed under load, stays down a while, and is started again
// with up.sh (same store). Every client sends one message at a time and retries one that was
// refused or unanswered with the same clientId until it is acknowledged. Proves:
//   - the two other nodes elect a new leader of the stream, and the gateways and persisters
//     connected to the dead node move to another by themselves (same PIDs): all of them are
//     ready again while the node is still down,
//   - sends during the election are answered `unavailable` (or late, within the request
//     timeout), never hang, and their retries with the same clientId are acknowledged and
//     stored once (checker: duplicated = 0); nothing acknowledged is lost,
//   - the node comes back, catches up (a current replica in the leader's view), live delivery
//     goes on, and the consumer drains.

import { sleep } from "../../e2e/helpers.mjs";
import { checkAnswers, liveDeliveryAfter, readinessProber, retryingLoad, windowAnswers } from "../lib/cluster.mjs";

export default {
  name: "nats-node-loss",
  short: "nl",
  system: "cluster",
  title: "the node leading the messages stream is SIGKILLed under load, then brought back",
  async run(ctx) {
    const { sizes, checks, log, sys, ledger } = ctx;
    const services = ["gateway1", "gateway2", ...sys.persisters()];
    const load = await retryingLoad(ctx, sizes.FAULTS_CLUSTER_SENDERS);
    const pids = Object.fromEntries(services.map((c) => [c, sys.pidOf(c)]));
    const prober = readinessProber(sys, services);

    await sleep(2000);
    const { leader } = await sys.waitStreamLeader({ timeoutMs: 10_000 });
    const onIt = await sys.clientsOf(leader);
    log(`the messages stream's leader is ${leader}; its clients: ${onIt.join(", ") || "none"}`);
    checks.note(`clients connected to ${leader} when it was killed`, onIt.join(", ") || "none");
    const killedAt = Date.now();
    const pid = await sys.sigkill(leader);
    log(`SIGKILLed ${leader} (PID ${pid})`);

    let elected;
    try {
      elected = await sys.waitStreamLeader({ not: leader, timeoutMs: 30_000 });
      log(`${elected.leader} leads the messages stream ${Date.now() - killedAt} ms after the kill`);
    } catch (e) {
      checks.check("another node was elected leader of the messages stream", false, e.message);
    }
    const electedAt = Date.now();
    const downFor = killedAt + sizes.FAULTS_NODE_DOWN_MS - Date.now();
    if (downFor > 0) await sleep(downFor);
    const failedOverAt = prober.readyAgainAt(killedAt);
    const restartMs = await sys.up(leader);
    const backAt = Date.now();
    log(`${leader} restarted by up.sh in ${restartMs} ms (down ${backAt - killedAt} ms)`);
    let currentMs;
    try {
      currentMs = await sys.waitReplicaCurrent(leader, { timeoutMs: 30_000 });
      log(`${leader} is a current replica of the messages stream ${currentMs} ms after up.sh returned`);
    } catch (e) {
      checks.check(`${leader} caught up after its restart`, false, e.message);
    }
    await sleep(sizes.FAULTS_CLUSTER_AFTER_MS);
    const results = await load.stop();
    await prober.stop();

    if (elected) {
      checks.check("another node was elected leader of the messages stream", elected.leader !== leader, `${elected.leader}, ${electedAt - killedAt} ms after the kill`);
    }
    checks.check(
      "gateways and persisters were all ready again while the node was still down (they failed over to the other nodes)",
      failedOverAt !== undefined && failedOverAt < backAt,
      failedOverAt ? `${failedOverAt - killedAt} ms after the kill` : "not before the node was back",
    );
    const endProbes = prober.probes.filter((p) => p.at > backAt + 1000);
    const notReady = endProbes.filter((p) => services.some((s) => p[s] !== 200));
    checks.check("gateways and persisters /readyz 200 after the node was back", endProbes.length > 0 && notReady.length === 0, `${endProbes.length - notReady.length} of ${endProbes.length} probes all 200`);
    if (currentMs !== undefined) checks.check(`${leader} caught up after its restart`, true, `a current replica ${currentMs} ms after up.sh`);

    checkAnswers(ctx, { results, requestTimeout: load.requestTimeout, pids });
    const election = windowAnswers(ledger, killedAt, electedAt);
    log(`sends from the kill to the election: ${JSON.stringify(election)}`);
    checks.check(
      "sends during the election were refused (`unavailable`) or answered late, and retried with the same clientId until acknowledged",
      election.affected > 0 && election.notAcked === 0,
      `${election.during} sends, ${election.unavailable} unavailable, ${election.slow} slower than 1 s (slowest ${election.slowest} ms), ${election.retriedOk} messages acknowledged after a retry`,
    );
    const live = await liveDeliveryAfter(ledger, load.senders, backAt + 1000);
    checks.check("live delivery went on after the node was back", live.checked > 0 && live.missing.length === 0, `${live.checked} messages checked, ${live.missing.length} deliveries missing ${live.missing.slice(0, 5).join(" ")}`);
    const drained = await sys.waitConsumerDrained(sizes.FAULTS_SETTLE_MS).then((ms) => ({ ms }), (e) => ({ error: e.message }));
    checks.check("the persisters' consumer drained", !drained.error, drained.error ?? `${drained.ms} ms after the load`);
  },
};
