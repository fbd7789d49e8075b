// What the NATS cluster scenarios (nats-node-loss, nats-rolling-restart) share: a load of
// sockets that send one message at a time and retry an unanswered or refused one with the same
// clientId until it is acknowledged, a /readyz prober of the gateways and persisters, and the
// checks of the answers the senders got.

import { sleep } from "../../e2e/helpers.mjs";
import { serverSetting } from "./config.mjs";
import { runSender, until } from "./load.mjs";

const ROOMS = 4;

/**
 * Opens `n` senders (half on each gateway, reconnecting through the load balancer) in 4 rooms
 * and starts their load: 100 messages a second each, one at a time, retried with the same
 * clientId. Returns { senders, stop(), done } where `done` resolves the senders' results
 * (an Error for a sender that gave up).
 */
export async function retryingLoad({ tag, sys, room, client, ledger }, n) {
  const requestTimeout = serverSetting("CHATIFY_NATS__REQUEST_TIMEOUT_MS", 5000);
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
  let stopped = false;
  const done = Promise.all(
    senders
      .map((c) => runSender(c, c.rooms[0], { count: Infinity, tag, window: 1, retry: true, ratePerSec: 100, stop: () => stopped }))
      .map((p) => p.catch((e) => e)),
  );
  return {
    senders,
    requestTimeout,
    stop() {
      stopped = true;
      return done;
    },
  };
}

/** Probes /readyz of `names` every 100 ms until stop(); the probes are { at, [name]: status }. */
export function readinessProber(sys, names) {
  const probes = [];
  let probing = true;
  const loop = (async () => {
    while (probing) {
      const at = Date.now();
      const statuses = await Promise.all(names.map((n) => sys.readyStatus(n)));
      probes.push({ at, ...Object.fromEntries(names.map((n, i) => [n, statuses[i]])) });
      await sleep(100);
    }
  })();
  return {
    probes,
    async stop() {
      probing = false;
      await loop;
    },
    /** The first time after `from` from which every probe of every name said 200 (to the end). */
    readyAgainAt(from) {
      let at;
      for (const p of probes) {
        if (p.at < from) continue;
        const ok = names.every((n) => p[n] === 200);
        if (!ok) at = undefined;
        else at ??= p.at;
      }
      return at;
    },
  };
}

/**
 * The checks every cluster scenario makes of its senders' answers: every sender ran to the end,
 * every send was answered (ok or unavailable, within request timeout + 1 s: never a hang or
 * another error), every message was finally acknowledged, and the gateways and persisters kept
 * their PIDs (they failed over, nobody restarted them).
 */
export function checkAnswers({ checks, ledger, sys }, { results, requestTimeout, pids }) {
  const failedSenders = results.filter((r) => r instanceof Error);
  checks.check("every sender ran to the end", failedSenders.length === 0, failedSenders.map((e) => e.message).join("; "));
  const em = ledger.emissions;
  const bound = requestTimeout + 1000;
  const slow = em.filter((e) => e.outcome !== "timeout" && e.ms > bound);
  const hangs = em.filter((e) => e.outcome === "timeout" || e.outcome === "disconnected");
  const other = em.filter((e) => !["ok", "unavailable", "timeout", "disconnected"].includes(e.outcome));
  checks.check(`every send was answered within request timeout + 1 s (${bound} ms)`, slow.length === 0, slow.length ? `${slow.length} slower, e.g. ${JSON.stringify(slow.slice(0, 3))}` : `slowest answer ${Math.max(0, ...em.map((e) => e.ms))} ms`);
  checks.check("no send went unanswered (no hang, no silent drop)", hangs.length === 0, hangs.length ? `${hangs.length}: ${JSON.stringify(hangs.slice(0, 3))}` : "");
  checks.check("no answer other than ok or unavailable", other.length === 0, other.length ? JSON.stringify(other.slice(0, 3)) : "");
  const unacked = ledger.list().filter((a) => a.status !== "ok");
  checks.check("every message was finally acknowledged", unacked.length === 0, unacked.length ? `${unacked.length} not: ${JSON.stringify(unacked.slice(0, 3).map((a) => [a.key, a.status]))}` : "");
  const changed = Object.entries(pids).filter(([c, pid]) => sys.pidOf(c) !== pid);
  checks.check("gateways and persisters failed over by themselves (same PIDs, never restarted)", changed.length === 0, changed.map(([c]) => `${c} changed`).join(", "));
}

/**
 * Sends during a window (a leader election, a node's restart): how many emissions started in
 * [from, to), how many were answered `unavailable`, how many took longer than `slowMs`, and the
 * messages of those that were acknowledged after a retry with the same clientId.
 */
export function windowAnswers(ledger, from, to, slowMs = 1000) {
  const during = ledger.emissions.filter((e) => e.at >= from && e.at < to);
  const unavailable = during.filter((e) => e.outcome === "unavailable");
  const slow = during.filter((e) => e.ms > slowMs);
  const keys = new Set([...unavailable, ...slow].map((e) => e.key));
  const retried = ledger.list().filter((a) => keys.has(a.key) && a.status === "ok" && a.emissions > 1);
  const notAcked = ledger.list().filter((a) => keys.has(a.key) && a.status !== "ok");
  return { during: during.length, unavailable: unavailable.length, slow: slow.length, affected: keys.size, retriedOk: retried.length, notAcked: notAcked.length, slowest: Math.max(0, ...during.map((e) => e.ms)) };
}

/**
 * Live delivery: every message acknowledged after `since` reached every other sender in its
 * room (within 5 s). Returns { checked, missing }.
 */
export async function liveDeliveryAfter(ledger, senders, since) {
  const after = ledger.list().filter((a) => a.status === "ok" && a.createdTime > since);
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
  return { checked: after.length, missing };
}
