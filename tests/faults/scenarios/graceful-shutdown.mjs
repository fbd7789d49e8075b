// 6. Graceful shutdown: under load, gateway2 gets SIGTERM, then (once it is back) the
// persister does. Proves:
//   - the gateway refuses new connections once stopping, tells its sockets (they see a
//     disconnect) and the other gateway's members get `has left` at once (< 3 s), and it exits
//     within gateway.shutdown_timeout_ms,
//   - the persister exits within persister.shutdown_timeout_ms,
//   - neither loses nor duplicates a message (checker); sends in flight at the SIGTERM are
//     either acknowledged or indeterminate, never acknowledged and lost.

import { connect, sleep } from "../../e2e/helpers.mjs";
import { serverSetting } from "../lib/config.mjs";
import { runSender, until } from "../lib/load.mjs";

const ROOMS = 2;
const LEFT_AT_ONCE_MS = 3000;
/** Time between the exit and our noticing it (polling /proc every 20 ms), and signal delivery. */
const EXIT_SLACK_MS = 500;

export default {
  name: "graceful-shutdown",
  short: "gs",
  title: "SIGTERM to a gateway and to the persister under load",
  async run({ sizes, tag, checks, log, sys, room, client, ledger }) {
    const gwDeadline = serverSetting("CHATIFY_GATEWAY__SHUTDOWN_TIMEOUT_MS", 10_000);
    const pDeadline = serverSetting("CHATIFY_PERSISTER__SHUTDOWN_TIMEOUT_MS", 10_000);
    const rooms = [room(0), room(1)];
    const lb = sys.urls.lb();
    // on gateway2 (stopped): two senders per room, who come back through the load balancer
    const leaving = [];
    for (let i = 0; i < ROOMS * 2; i++) leaving.push(client({ name: `l${i}`, url: sys.urls.gateway2(), reconnectUrl: lb, rooms: [rooms[i % ROOMS]], autoReconnect: true }));
    // on gateway1: one sender-observer per room
    const staying = rooms.map((r, i) => client({ name: `o${i}`, url: sys.urls.gateway1(), rooms: [r] }));
    await Promise.all(staying.map((c) => c.open()));
    await Promise.all(leaving.map((c) => c.open()));
    ledger.trace = true;

    let stop = false;
    let inFlightAtTerm = [];
    const all = [...leaving, ...staying];
    const rate = sizes.FAULTS_SHUTDOWN_RATE / all.length;
    // gateway2's clients send in bursts of 20 (one falls on the SIGTERM), so that sends are in
    // flight when it comes
    const load = Promise.all(
      all.map((c) => runSender(c, c.rooms[0], { count: Infinity, tag, window: 20, burst: leaving.includes(c) ? 20 : 1, ratePerSec: rate, stop: () => stop })).map((p) => p.catch((e) => e)),
    );
    await sleep(2000);

    // --- the gateway
    const termAt = Date.now();
    const gwExit = sys.sigterm("gateway2", gwDeadline + 5000);
    await sleep(50);
    // a new client 50 ms into the shutdown (refused by the closed listener, or by the process
    // being gone already)
    let refused;
    try {
      const s = await connect(sys.urls.gateway2(), { transports: ["websocket"] }, undefined, 1500);
      s.disconnect();
      refused = false;
    } catch {
      refused = true;
    }
    const g = await gwExit;
    log(`gateway2 (PID ${g.pid}) ${g.exited ? `exited ${g.ms} ms after SIGTERM` : `still running ${g.ms} ms after SIGTERM`}`);
    checks.check("the stopping gateway refused a new connection", refused === true, "");
    checks.check(`gateway2 exited within its shutdown deadline (${gwDeadline} ms)`, g.exited && g.ms <= gwDeadline + EXIT_SLACK_MS, g.exited ? `${g.ms} ms` : "did not exit");
    if (!g.exited) await sys.down("gateway2");
    for (const c of leaving) {
      const d = c.disconnects.find((x) => x.at >= termAt);
      checks.check(`${c.name} was told (disconnected) by the stopping gateway`, !!d, d ? `${d.reason} after ${d.at - termAt} ms` : "no disconnect");
    }
    await until(() => leaving.every((c) => c.recoveries.length > 0 && c.connected), 20_000, "").catch(() => {});
    for (const o of staying) {
      const r = o.rooms[0];
      for (const c of leaving.filter((x) => x.rooms[0] === r)) {
        const left = o.notices.find((n) => n.at >= termAt && n.event === "receive_message" && n.payload.message === `${c.username} has left the chat room`);
        checks.check(`${o.name} got '${c.name} has left' at once (< ${LEFT_AT_ONCE_MS} ms)`, left && left.at - termAt < LEFT_AT_ONCE_MS, left ? `after ${left.at - termAt} ms` : "never");
      }
      // Member ids as this observer listed them before the stop (a reconnection gets new ones).
      const before = o.notices.filter((n) => n.at < termAt && n.event === "chatroom_users").at(-1)?.payload ?? [];
      const leavingNames = new Set(leaving.map((c) => c.username));
      const stale = new Set(before.filter((u) => leavingNames.has(u.username)).map((u) => u.id));
      checks.check(`${o.name} listed the stopping gateway's members before the stop`, stale.size > 0, JSON.stringify(before));
      const lists = o.notices.filter((n) => n.at >= termAt && n.event === "chatroom_users");
      checks.check(`${o.name}'s chatroom_users dropped the stopped gateway's sockets`, lists.some((n) => !n.payload.some((u) => stale.has(u.id))), "");
    }
    const restart = await sys.up("gateway2");
    log(`gateway2 restarted by up.sh in ${restart} ms`);
    await sleep(1500);

    // --- the persister
    const before = await sys.consumerState();
    const p = await sys.sigterm("persister", pDeadline + 5000);
    log(`persister (PID ${p.pid}) ${p.exited ? `exited ${p.ms} ms after SIGTERM` : `still running ${p.ms} ms after SIGTERM`}`);
    checks.check(`the persister exited within its shutdown deadline (${pDeadline} ms)`, p.exited && p.ms <= pDeadline + EXIT_SLACK_MS, p.exited ? `${p.ms} ms` : "did not exit");
    if (!p.exited) await sys.down("persister");
    const afterStop = await sys.consumerState();
    log(`consumer before the SIGTERM ${JSON.stringify(before)}, after the exit ${JSON.stringify(afterStop)}`);
    // Messages the stopped persister had received but neither acked nor handed back wait for the
    // consumer's ack wait (30 s) before another persister gets them. Not a loss (history
    // includes what JetStream holds), but not "finished its batch" either.
    if (afterStop.ackPending > 0) {
      checks.note("the stopped persister left messages delivered to it unacked", `${afterStop.ackPending} messages ack-pending after its exit (redelivered only after the ack wait)`);
    }
    await sleep(1000);
    const pRestart = await sys.up("persister");
    log(`persister restarted by up.sh in ${pRestart} ms`);
    await sleep(2000);
    stop = true;
    const results = await load;
    const failedSenders = results.filter((r) => r instanceof Error);
    checks.check("every sender ran to the end", failedSenders.length === 0, failedSenders.map((e) => e.message).join("; "));
    const notOk = ledger.list().filter((a) => a.status !== "ok");
    log(`${notOk.length} sends without an ok answer: ${JSON.stringify(notOk.slice(0, 8).map((a) => [a.key, a.status, a.code]))}`);
    inFlightAtTerm = notOk.filter((a) => leaving.some((c) => a.sender === `${c.name}#0`)).map((a) => a.key);
    const drained = await sys.waitConsumerDrained(sizes.FAULTS_SETTLE_MS);
    const redeliveries = await sys.metric("persister", "chatify_persister_redeliveries_total");
    log(`the restarted persister caught up ${drained} ms after the load; it saw ${redeliveries} redeliveries`);
    // Sends in flight on gateway2 at the SIGTERM: the gateway closes the sockets first, so their
    // acks cannot arrive (the client must retry with its clientId); the publishes themselves are
    // finished, so these messages should be stored.
    if (inFlightAtTerm.length) {
      const stored = new Set((await sys.storedRowsOf(rooms)).map((r) => r.message.split(" ")[0]));
      const kept = inFlightAtTerm.filter((k) => stored.has(k)).length;
      const sentAt = ledger.emissions.filter((e) => inFlightAtTerm.includes(e.key)).map((e) => e.at - termAt);
      checks.note(
        "sends in flight at the gateway's SIGTERM got no answer",
        `${inFlightAtTerm.length} sends, emitted ${Math.min(...sentAt)}..${Math.max(...sentAt)} ms relative to the SIGTERM; ${kept} of them stored anyway`,
      );
    }
  },
};
