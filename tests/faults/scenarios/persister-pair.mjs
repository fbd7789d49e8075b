// 10. Persister pair (two persisters sharing the durable consumer and the history service, on
// the 3-node NATS cluster): under a steady load of acked sends, persister2 is SIGKILLed every
// few seconds and restarted with up.sh, again and again, while persister goes on. Proves:
//   - the survivor keeps writing (its stored counter grows while its partner is down) and stays
//     ready; history is answered by both again once the consumer has drained (noted: how many
//     queries failed meanwhile — a killed persister's unacked messages hold the ack floor back
//     for the ack wait, and every answer then reads the room's messages above it one by one from
//     the stream, which under this load takes longer than the request timeout),
//   - what the killed one had fetched and not acked is redelivered after the ack wait and
//     written once: nothing acknowledged is lost or stored twice, the consumer drains,
//   - the restarted persister is ready again each time.

import { sleep } from "../../e2e/helpers.mjs";
import { runSender } from "../lib/load.mjs";

const SENDERS = 8;
const ROOMS = 4;
const VICTIM = "persister2";
const SURVIVOR = "persister";

export default {
  name: "persister-pair",
  short: "pp",
  system: "cluster",
  title: "one of two persisters is SIGKILLed and restarted again and again under load",
  async run({ sizes, tag, checks, log, sys, room, client }) {
    const messages = sizes.FAULTS_PAIR_MESSAGES;
    const rate = sizes.FAULTS_PAIR_RATE;
    const senders = [];
    for (let i = 0; i < SENDERS; i++) {
      senders.push(client({ name: `s${i}`, url: i % 2 ? sys.urls.gateway1() : sys.urls.gateway2(), reconnectUrl: sys.urls.lb(), rooms: [room(i % ROOMS)] }));
    }
    await Promise.all(senders.map((c) => c.open()));
    const historian = client({ name: "history", url: sys.urls.gateway2(), rooms: [] });
    await historian.open();
    const survivorPid = sys.pidOf(SURVIVOR);
    const storedBefore = await sys.metric(SURVIVOR, "chatify_persister_messages_stored_total");

    let loadDone = false;
    const perSender = Math.ceil(messages / SENDERS);
    const started = Date.now();
    const load = Promise.all(
      senders.map((c) => runSender(c, c.rooms[0], { count: perSender, tag, window: 20, ratePerSec: rate / SENDERS })).map((p) => p.catch((e) => e)),
    ).finally(() => {
      loadDone = true;
    });

    // the survivor's readiness and a history query, every 250 ms, while the load runs
    const probes = [];
    const prober = (async () => {
      while (!loadDone) {
        const at = Date.now();
        let history;
        try {
          const res = await historian.socket.timeout(5000).emitWithAck("get_history", { room: room(0), limit: 10 });
          history = res?.ok ? "ok" : res?.error?.code ?? "bad answer";
        } catch {
          history = "no answer";
        }
        probes.push({ at, survivor: await sys.readyStatus(SURVIVOR), history, ms: Date.now() - at });
        await sleep(250);
      }
    })();

    const kills = [];
    const chaos = (async () => {
      const span = sizes.FAULTS_PAIR_KILL_MAX_MS - sizes.FAULTS_PAIR_KILL_MIN_MS;
      while (!loadDone) {
        const pause = sizes.FAULTS_PAIR_KILL_MIN_MS + Math.random() * span;
        const until = Date.now() + pause;
        while (!loadDone && Date.now() < until) await sleep(50);
        if (loadDone) break;
        const storedAtKill = await sys.metric(SURVIVOR, "chatify_persister_messages_stored_total");
        const pid = await sys.sigkill(VICTIM);
        const killedAt = Date.now();
        // down a moment, so that the survivor is seen writing alone
        await sleep(500);
        const storedWhileDown = await sys.metric(SURVIVOR, "chatify_persister_messages_stored_total");
        const restartMs = await sys.up(VICTIM);
        kills.push({ pid, pauseMs: Math.round(pause), restartMs, killedAt, backAt: Date.now(), survivorWrote: storedWhileDown - storedAtKill });
        log(`SIGKILLed ${VICTIM} PID ${pid} after ${Math.round(pause)} ms; up.sh restarted it in ${restartMs} ms (${Date.now() - killedAt} ms without it; ${SURVIVOR} stored ${storedWhileDown - storedAtKill} meanwhile before the restart)`);
      }
    })();

    const results = await load;
    await chaos;
    await prober;
    const failedSenders = results.filter((r) => r instanceof Error);
    checks.check("every sender ran to the end", failedSenders.length === 0, failedSenders.map((e) => e.message).join("; "));
    log(`load of ${messages} messages took ${Date.now() - started} ms`);
    checks.check(`${VICTIM} was SIGKILLed at least ${sizes.FAULTS_PAIR_MIN_KILLS} times during the load`, kills.length >= sizes.FAULTS_PAIR_MIN_KILLS, `${kills.length} kills`);
    const wrote = kills.filter((k) => k.survivorWrote > 0).length;
    checks.check(`${SURVIVOR} went on writing while ${VICTIM} was down`, kills.length > 0 && wrote === kills.length, `it stored messages during ${wrote} of ${kills.length} outages of ${VICTIM}`);
    checks.check(`${SURVIVOR} never stopped (same PID)`, sys.pidOf(SURVIVOR) === survivorPid, "");
    const notReady = probes.filter((p) => p.survivor !== 200);
    checks.check(`${SURVIVOR} /readyz stayed 200`, probes.length > 0 && notReady.length === 0, `${probes.length - notReady.length} of ${probes.length} probes`);
    const failedHistory = probes.filter((p) => p.history !== "ok");
    checks.note(
      "history queries during the load",
      `${probes.length - failedHistory.length} of ${probes.length} answered${failedHistory.length ? `; the others ${JSON.stringify([...new Set(failedHistory.map((p) => p.history))])} (the ack floor held back by the killed persister's unacked messages)` : ""}`,
    );
    const drained = await sys.waitConsumerDrained(sizes.FAULTS_SETTLE_MS).then((ms) => ({ ms }), (e) => ({ error: e.message }));
    checks.check("the persisters' consumer drained (the killed one's unacked messages redelivered and written)", !drained.error, drained.error ?? `${drained.ms} ms after the load`);
    // Once drained, history is answered again, whichever persister the query reaches.
    const after = [];
    for (let i = 0; i < 8; i++) {
      const res = await historian.socket.timeout(5000).emitWithAck("get_history", { room: room(i % ROOMS), limit: 10 }).catch(() => undefined);
      after.push(res?.ok ? "ok" : res?.error?.code ?? "no answer");
    }
    checks.check("history is answered again after the drain", after.every((a) => a === "ok"), after.join(" "));
    for (const p of [SURVIVOR, VICTIM]) {
      checks.check(`${p} /readyz 200 at the end`, (await sys.readyStatus(p)) === 200, "");
    }
    const storedAfter = await sys.metric(SURVIVOR, "chatify_persister_messages_stored_total");
    const victimStored = await sys.metric(VICTIM, "chatify_persister_messages_stored_total");
    const redeliveries = (await sys.metric(SURVIVOR, "chatify_persister_redeliveries_total")) + (await sys.metric(VICTIM, "chatify_persister_redeliveries_total"));
    checks.note("who wrote", `${SURVIVOR} ${storedAfter - storedBefore} rows during the scenario, the last ${VICTIM} process ${victimStored}, ${redeliveries} redeliveries counted by the running processes`);
  },
};
