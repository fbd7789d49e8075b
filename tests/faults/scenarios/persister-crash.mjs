// 1. Persister crash: under a steady load of acked sends, the persister is SIGKILLed every few
// seconds and restarted with deploy/local/up.sh. Whatever batch it was writing, whatever it had
// fetched from JetStream and not acked, must end up in HarperDB exactly once: the durable
// consumer redelivers what was never acked, and the insert of a redelivered message does not
// create a second record.
// Messages that change are mixed in (FAULTS_CHANGE_RATE a second per socket): every socket edits
// and deletes some of its own acknowledged messages and toggles reactions to its room's messages;
// each acknowledged change must be in HarperDB's final state once, in its order (checkChanges).

import { sleep } from "../../e2e/helpers.mjs";
import { runSender } from "../lib/load.mjs";

const SENDERS = 8;
const ROOMS = 4;

export default {
  name: "persister-crash",
  short: "pc",
  title: "the persister is SIGKILLed and restarted again and again under load (with edits, deletions and reactions)",
  changes: true,
  async run({ sizes, tag, checks, log, sys, room, client, changes, runChangers }) {
    const messages = sizes.FAULTS_PERSISTER_MESSAGES;
    const rate = sizes.FAULTS_PERSISTER_RATE;
    const senders = [];
    for (let i = 0; i < SENDERS; i++) {
      senders.push(client({ name: `s${i}`, url: i % 2 ? sys.urls.gateway1() : sys.urls.gateway2(), reconnectUrl: sys.urls.lb(), rooms: [room(i % ROOMS)] }));
    }
    await Promise.all(senders.map((c) => c.open()));
    const storedBefore = await sys.metric("persister", "chatify_persister_messages_stored_total");

    let loadDone = false;
    const perSender = Math.ceil(messages / SENDERS);
    const load = Promise.all(
      senders.map((c) => runSender(c, c.rooms[0], { count: perSender, tag, window: 20, ratePerSec: rate / SENDERS })).map((p) => p.catch((e) => e)),
    ).finally(() => {
      loadDone = true;
    });
    const changing = runChangers(senders, () => loadDone);

    const kills = [];
    const chaos = (async () => {
      const span = sizes.FAULTS_PERSISTER_KILL_MAX_MS - sizes.FAULTS_PERSISTER_KILL_MIN_MS;
      while (!loadDone) {
        const pause = sizes.FAULTS_PERSISTER_KILL_MIN_MS + Math.random() * span;
        const until = Date.now() + pause;
        while (!loadDone && Date.now() < until) await sleep(50);
        if (loadDone) break;
        const pid = await sys.sigkill("persister");
        const killedAt = Date.now();
        const restartMs = await sys.up("persister");
        kills.push({ pid, pauseMs: Math.round(pause), restartMs });
        log(`SIGKILLed persister PID ${pid} after ${Math.round(pause)} ms; up.sh restarted it in ${restartMs} ms (${Date.now() - killedAt} ms without persister)`);
      }
    })();

    const started = Date.now();
    const results = await load;
    await chaos;
    const { errors: changerErrors } = await changing;
    const failedSenders = results.filter((r) => r instanceof Error);
    checks.check("every sender ran to the end", failedSenders.length === 0, failedSenders.map((e) => e.message).join("; "));
    if (changes.ops.length) log(`changes during the load: ${JSON.stringify(changes.summary())}`);
    checks.check("every changer ran to the end", changerErrors.length === 0, changerErrors.map((e) => e.message).join("; "));
    log(`load of ${messages} messages took ${Date.now() - started} ms`);
    checks.check(
      `the persister was SIGKILLed at least ${sizes.FAULTS_PERSISTER_MIN_KILLS} times during the load`,
      kills.length >= sizes.FAULTS_PERSISTER_MIN_KILLS,
      `${kills.length} kills`,
    );
    // a restarted persister must catch up by itself (the runner waits for it and then reads the rows)
    await sys.waitConsumerDrained(sizes.FAULTS_SETTLE_MS);
    const redeliveries = await sys.metric("persister", "chatify_persister_redeliveries_total");
    const storedAfter = await sys.metric("persister", "chatify_persister_messages_stored_total");
    log(`last persister: ${storedAfter} stored, ${redeliveries} redeliveries (counters of the last process only; before the load ${storedBefore})`);
  },
};
