// 2. NATS restart: NATS is SIGKILLed under load and restarted (same JetStream store) a few
// seconds later. Every client sends one message at a time and retries a message that was not
// acknowledged with the same clientId until it is. Proves:
//   - a send during the outage is answered `unavailable` within nats.request_timeout_ms + 1 s:
//     never a hang (no answer) and never another error,
//   - /readyz of both gateways says 503 while NATS is away and 200 after it is back,
//   - gateways and persister reconnect by themselves (same PIDs), live delivery resumes,
//   - the retries are stored once (checker: duplicated = 0), nothing acknowledged is lost.

import { sleep } from "../../e2e/helpers.mjs";
import { serverSetting } from "../lib/config.mjs";
import { runSender, until } from "../lib/load.mjs";

const ROOMS = 4;

export default {
  name: "nats-restart",
  short: "nr",
  title: "NATS is killed and restarted under load; clients retry with the same clientId",
  async run({ sizes, tag, checks, log, sys, room, client, ledger }) {
    const requestTimeout = serverSetting("CHATIFY_NATS__REQUEST_TIMEOUT_MS", 5000);
    const n = sizes.FAULTS_NATS_SENDERS;
    ledger.trace = true;
    const senders = [];
    for (let i = 0; i < n; i++) {
      senders.push(
        client({
          name: `s${i}`,
          url: i % 2 ? sys.urls.gateway1() : sys.urls.gateway2(),
          reconnectUrl: sys.urls.lb(),
          rooms: [room(i % ROOMS)],
          // long enough to tell a slow answer (> request timeout + 1 s) from none at all
          ackTimeoutMs: requestTimeout + 8000,
        }),
      );
    }
    await Promise.all(senders.map((c) => c.open()));
    const pids = Object.fromEntries(["gateway1", "gateway2", "persister"].map((c) => [c, sys.pidOf(c)]));

    // /readyz of both gateways (and the persister), every 100 ms, for the whole scenario
    const probes = [];
    let probing = true;
    const prober = (async () => {
      while (probing) {
        const at = Date.now();
        const [g1, g2, p] = await Promise.all([sys.readyStatus("gateway1"), sys.readyStatus("gateway2"), sys.readyStatus("persister")]);
        probes.push({ at, gateway1: g1, gateway2: g2, persister: p });
        await sleep(100);
      }
    })();

    let stop = false;
    const load = Promise.all(
      senders.map((c) => runSender(c, c.rooms[0], { count: Infinity, tag, window: 1, retry: true, ratePerSec: 100, stop: () => stop })).map((p) => p.catch((e) => e)),
    );

    await sleep(2000);
    const killedAt = Date.now();
    const natsPid = await sys.sigkill("nats");
    log(`SIGKILLed NATS (PID ${natsPid})`);
    await sleep(sizes.FAULTS_NATS_DOWN_MS);
    const restartAt = Date.now();
    const restartMs = await sys.up("nats");
    const natsBackAt = Date.now();
    log(`NATS restarted by up.sh in ${restartMs} ms (down ${natsBackAt - killedAt} ms)`);
    let gatewaysBackAt;
    try {
      await until(async () => (await sys.readyStatus("gateway1")) === 200 && (await sys.readyStatus("gateway2")) === 200, 30_000, "both gateways /readyz 200 after NATS came back");
      gatewaysBackAt = Date.now();
    } catch (e) {
      checks.check("gateways ready again after NATS came back", false, e.message);
    }
    if (gatewaysBackAt) log(`gateways ready ${gatewaysBackAt - natsBackAt} ms after NATS was`);
    await sleep(sizes.FAULTS_NATS_AFTER_MS);
    stop = true;
    const results = await load;
    probing = false;
    await prober;
    const failedSenders = results.filter((r) => r instanceof Error);
    checks.check("every sender ran to the end", failedSenders.length === 0, failedSenders.map((e) => e.message).join("; "));

    // readiness
    for (const gw of ["gateway1", "gateway2"]) {
      const during = probes.filter((p) => p.at > killedAt + 1000 && p.at < restartAt);
      const down = during.filter((p) => p[gw] === 503);
      checks.check(`${gw} /readyz answered 503 while NATS was away`, during.length > 0 && down.length === during.length, `${down.length} of ${during.length} probes were 503 (others: ${[...new Set(during.map((p) => p[gw]))].join(",")})`);
      const last = probes.filter((p) => p.at > (gatewaysBackAt ?? natsBackAt) + 1000);
      checks.check(`${gw} /readyz answered 200 after NATS was back`, last.length > 0 && last.every((p) => p[gw] === 200), `${last.filter((p) => p[gw] === 200).length} of ${last.length} probes were 200`);
      const firstDown = probes.find((p) => p.at >= killedAt && p[gw] === 503);
      if (firstDown) log(`${gw} /readyz first 503 ${firstDown.at - killedAt} ms after the kill`);
    }
    checks.check(
      "the persister /readyz is 200 again after NATS was back",
      (await sys.waitReady("persister", 30_000).then(() => true).catch(() => false)),
      "",
    );
    const samePids = Object.entries(pids).filter(([c, pid]) => sys.pidOf(c) !== pid);
    checks.check("gateways and persister reconnected by themselves (same PIDs, never restarted)", samePids.length === 0, samePids.map(([c]) => `${c} changed`).join(", "));

    // answers during the outage
    const em = ledger.emissions;
    const outage = em.filter((e) => e.at >= killedAt && e.at < natsBackAt);
    const unavailable = em.filter((e) => e.outcome === "unavailable");
    const bound = requestTimeout + 1000;
    const slow = em.filter((e) => e.outcome !== "timeout" && e.ms > bound);
    const hangs = em.filter((e) => e.outcome === "timeout" || e.outcome === "disconnected");
    const other = em.filter((e) => !["ok", "unavailable", "timeout", "disconnected"].includes(e.outcome));
    const maxUnavailableMs = Math.max(0, ...unavailable.map((e) => e.ms));
    checks.check("sends during the outage were answered `unavailable`", unavailable.length > 0, `${unavailable.length} unavailable answers, ${outage.length} sends started during the outage`);
    checks.check(`every send was answered within request timeout + 1 s (${bound} ms)`, slow.length === 0, slow.length ? `${slow.length} slower, e.g. ${JSON.stringify(slow.slice(0, 3))}` : `slowest unavailable answer ${maxUnavailableMs} ms`);
    checks.check("no send went unanswered (no hang, no silent drop)", hangs.length === 0, hangs.length ? `${hangs.length}: ${JSON.stringify(hangs.slice(0, 3))}` : "");
    checks.check("no answer other than ok or unavailable", other.length === 0, other.length ? JSON.stringify(other.slice(0, 3)) : "");
    const retriedOk = ledger.list().filter((a) => a.status === "ok" && a.emissions > 1);
    checks.check("messages refused during the outage were retried with the same clientId and acknowledged after recovery", retriedOk.length > 0, `${retriedOk.length} messages acknowledged after a retry`);
    const unacked = ledger.list().filter((a) => a.status !== "ok");
    checks.check("every message was finally acknowledged", unacked.length === 0, unacked.length ? `${unacked.length} not: ${JSON.stringify(unacked.slice(0, 3).map((a) => [a.key, a.status]))}` : "");

    // live delivery resumed: what was acked well after the gateways were back reached the other sender of the room
    if (gatewaysBackAt) {
      const after = ledger.list().filter((a) => a.status === "ok" && a.createdTime > gatewaysBackAt + 1000);
      const missing = [];
      await until(
        () => {
          missing.length = 0;
          for (const a of after) {
            for (const c of senders) {
              if (c.rooms[0] !== a.room || c.name === a.key.split(".")[1]) continue;
              if (!c.seen.get(a.room).has(a.ids[0])) missing.push(`${c.name}<-${a.key}`);
            }
          }
          return missing.length === 0;
        },
        5000,
        "",
      ).catch(() => {});
      checks.check("live delivery resumed after the restart (messages acked after recovery reached the room's other members)", after.length > 0 && missing.length === 0, `${after.length} messages checked, ${missing.length} deliveries missing ${missing.slice(0, 5).join(" ")}`);
    }
  },
};
