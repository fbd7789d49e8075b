// 5. Gateway crash: gateway1 is SIGKILLed while its clients chat with clients of gateway2.
// Proves:
//   - the other gateway drops the crashed gateway's members from every room within 10 s: each
//     observer gets `<user> has left the chat room` and a chatroom_users without them,
//   - the crashed gateway's clients reconnect through the load balancer, rejoin with
//     `since: <last id they saw>` and so recover every message acknowledged in their room,
//   - nothing acknowledged is lost (in-flight sends of the killed gateway are indeterminate).

import { sleep } from "../../e2e/helpers.mjs";
import { runSender, unseen, until } from "../lib/load.mjs";

const ROOMS = 2;
const DROP_WITHIN_MS = 10_000;

const hasLeft = (room, username) => (n) => n.event === "receive_message" && n.payload.room === room && n.payload.message === `${username} has left the chat room`;

export default {
  name: "gateway-crash",
  short: "gc",
  title: "a gateway is SIGKILLed; its clients come back through the load balancer",
  async run({ sizes, tag, checks, log, sys, room, client, ledger }) {
    const rooms = [room(0), room(1)];
    const lb = sys.urls.lb();
    // on gateway1 (killed): per room one client that sends and one that only listens
    const victims = [];
    for (let i = 0; i < ROOMS; i++) {
      victims.push(client({ name: `vs${i}`, url: sys.urls.gateway1(), reconnectUrl: lb, rooms: [rooms[i]], autoReconnect: true }));
      // the listener comes back only after a while, like a client with a reconnection delay:
      // what was sent meanwhile reaches it only through join_room's since
      victims.push(client({ name: `vl${i}`, url: sys.urls.gateway1(), reconnectUrl: lb, rooms: [rooms[i]], autoReconnect: true, reconnectDelayMs: 3000 }));
    }
    // on gateway2 (survives): per room one sender and one observer
    const senders = rooms.map((r, i) => client({ name: `s${i}`, url: sys.urls.gateway2(), rooms: [r] }));
    const observers = rooms.map((r, i) => client({ name: `o${i}`, url: sys.urls.gateway2(), rooms: [r] }));
    await Promise.all([...observers, ...senders].map((c) => c.open()));
    await Promise.all(victims.map((c) => c.open()));
    // everyone sees everyone before the crash
    await until(
      () => observers.every((o) => {
        const lists = o.notices.filter((n) => n.event === "chatroom_users");
        return lists.length && lists.at(-1).payload.length === 4;
      }),
      5000,
      "observers see all four members of their room",
    );
    // Member ids as the observers list them (random per connection: a reconnection gets a new one).
    const oldIds = new Map(
      victims.map((v) => {
        const o = observers.find((x) => x.rooms[0] === v.rooms[0]);
        const list = o.notices.filter((n) => n.event === "chatroom_users").at(-1)?.payload ?? [];
        return [v.name, list.find((u) => u.username === v.username)?.id];
      }),
    );
    let killedAt;
    const byId = () => new Map(ledger.list().flatMap((a) => a.ids.map((id) => [id, a])));
    /** An acknowledged id with the message's sender and creation time relative to the kill. */
    const describe = (id) => {
      const a = byId().get(id);
      return a ? `${id} (${a.key}, created ${a.createdTime - killedAt} ms after the kill)` : id;
    };

    let stop = false;
    const rate = sizes.FAULTS_GATEWAY_RATE;
    const load = Promise.all(
      [
        ...senders.map((c) => runSender(c, c.rooms[0], { count: Infinity, tag, window: 10, ratePerSec: rate / 2, stop: () => stop })),
        ...victims.filter((v) => v.name.startsWith("vs")).map((c) => runSender(c, c.rooms[0], { count: Infinity, tag, window: 10, ratePerSec: rate / 2, stop: () => stop })),
      ].map((p) => p.catch((e) => e)),
    );
    await sleep(2000);
    killedAt = Date.now();
    const pid = await sys.sigkill("gateway1");
    log(`SIGKILLed gateway1 (PID ${pid})`);
    await sleep(sizes.FAULTS_GATEWAY_AFTER_MS);
    stop = true;
    const results = await load;
    const failedSenders = results.filter((r) => r instanceof Error);
    checks.check("every sender ran to the end", failedSenders.length === 0, failedSenders.map((e) => e.message).join("; "));

    // the observers on gateway2: has-left notices and a member list without the old sockets
    for (const o of observers) {
      const r = o.rooms[0];
      const mine = victims.filter((v) => v.rooms[0] === r);
      for (const v of mine) {
        const left = o.notices.find((n) => n.at >= killedAt && hasLeft(r, v.username)(n));
        const ms = left ? left.at - killedAt : undefined;
        checks.check(`${o.name} got '${v.name} has left' within ${DROP_WITHIN_MS / 1000} s`, left && ms <= DROP_WITHIN_MS, left ? `after ${ms} ms` : "never");
      }
      const stale = new Set(mine.map((v) => oldIds.get(v.name)));
      checks.check(`${o.name} listed each of its room's victims before the crash`, [...stale].every(Boolean), JSON.stringify([...stale]));
      const firstClean = o.notices.find((n) => n.at >= killedAt && n.event === "chatroom_users" && !n.payload.some((u) => stale.has(u.id)));
      const ms = firstClean ? firstClean.at - killedAt : undefined;
      checks.check(`${o.name}'s chatroom_users dropped the crashed gateway's sockets within ${DROP_WITHIN_MS / 1000} s`, firstClean && ms <= DROP_WITHIN_MS, firstClean ? `after ${ms} ms` : "never");
      const want = [...mine, ...senders.concat(observers).filter((c) => c.rooms[0] === r)].map((c) => c.username).sort();
      const lastList = () => o.notices.filter((n) => n.event === "chatroom_users").at(-1)?.payload ?? [];
      // (a rejoin's chatroom_users follows it by up to 50 ms: the gateway coalesces it per room)
      await until(() => JSON.stringify(lastList().map((u) => u.username).sort()) === JSON.stringify(want), 2000, "").catch(() => {});
      const last = lastList();
      checks.check(`${o.name}'s last chatroom_users is exactly the room's current members`, JSON.stringify(last.map((u) => u.username).sort()) === JSON.stringify(want) && new Set(last.map((u) => u.id)).size === last.length, `got ${JSON.stringify(last)}; want ${JSON.stringify(want)}`);
    }

    // the victims: reconnected through the load balancer and recovered everything with since
    for (const v of victims) {
      const r = v.rooms[0];
      const rec = v.recoveries[0];
      checks.check(`${v.name} reconnected through the load balancer`, !!rec && v.connected, rec ? `after ${rec.ms} ms, rejoined with since=${rec.since[r]}` : `no reconnection${v.reconnectError ? `: ${v.reconnectError.message}` : ""}`);
      let missing = [];
      await until(() => (missing = unseen(v, ledger, r)).length === 0, 5000, "").catch(() => {});
      missing = missing.map(describe);
      checks.check(
        `${v.name} has every acknowledged message of its room (live or through since)`,
        missing.length === 0 && (v.name.startsWith("vs") || v.recovered.get(r) > 0),
        `${missing.length ? `${missing.length} missing, e.g. ${missing.slice(0, 3).join(" ")}; ` : ""}${v.recovered.get(r)} recovered through since`,
      );
    }
    // Not a promise, but evidence when a recovery fails: what the observers (never disconnected)
    // did not get live.
    for (const o of observers) {
      const missing = unseen(o, ledger, o.rooms[0]);
      if (missing.length) checks.note(`${o.name} (never disconnected) did not get ${missing.length} acknowledged message(s) live`, missing.slice(0, 5).map(describe).join(" "));
    }
    const inFlight = ledger.list().filter((a) => a.status !== "ok");
    log(`${inFlight.length} sends without an ok answer (in flight on the killed gateway, or sent while reconnecting): ${JSON.stringify(inFlight.slice(0, 5).map((a) => [a.key, a.status, a.code]))}`);

    const restartMs = await sys.up("gateway1");
    log(`gateway1 restarted by up.sh in ${restartMs} ms`);
  },
};
