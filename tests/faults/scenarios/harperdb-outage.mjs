// 3. HarperDB outage: HarperDB is stopped (down.sh) under load and started again later.
// Proves:
//   - chat keeps flowing: sends are acknowledged and delivered live to the room's members on
//     the other gateway during the outage (delivery does not depend on the database),
//   - history requests (get_history and the HTTP route) fail fast with `unavailable` / 503,
//   - the persister backs off (a bounded number of retries, no hot loop) and does not ack what
//     it could not write (the consumer keeps the messages pending),
//   - after HarperDB is back every message is stored (checker).

import { sleep } from "../../e2e/helpers.mjs";
import { runSender, unseen, until } from "../lib/load.mjs";

const ROOMS = 2;
const HISTORY_FAST_MS = 2000;

export default {
  name: "harperdb-outage",
  short: "hd",
  title: "HarperDB is stopped under load, then started again",
  async run({ sizes, tag, checks, log, sys, room, client, ledger }) {
    const rooms = [room(0), room(1)];
    const senders = [];
    const receivers = [];
    for (let i = 0; i < ROOMS * 2; i++) {
      senders.push(client({ name: `s${i}`, url: i % 2 ? sys.urls.gateway1() : sys.urls.gateway2(), rooms: [rooms[i % ROOMS]] }));
    }
    for (let i = 0; i < ROOMS; i++) {
      // a receiver on each gateway per room
      receivers.push(client({ name: `r${i}a`, url: sys.urls.gateway1(), rooms: [rooms[i]] }));
      receivers.push(client({ name: `r${i}b`, url: sys.urls.gateway2(), rooms: [rooms[i]] }));
    }
    await Promise.all([...senders, ...receivers].map((c) => c.open()));
    const prober = client({ name: "history", url: sys.urls.gateway1(), rooms: [] });
    await prober.open();

    let stop = false;
    const rate = sizes.FAULTS_HARPERDB_RATE / senders.length;
    const load = Promise.all(senders.map((c) => runSender(c, c.rooms[0], { count: Infinity, tag, window: 10, ratePerSec: rate, stop: () => stop })).map((p) => p.catch((e) => e)));

    await sleep(2000);
    const retriesBefore = await sys.metric("persister", "chatify_persister_write_retries_total");
    const persisterPid = sys.pidOf("persister");
    await sys.down("harperdb");
    const downAt = Date.now();
    log(`HarperDB stopped; staying down ${sizes.FAULTS_HARPERDB_DOWN_MS} ms`);

    // history during the outage: a few probes spread over it
    const historyProbes = [];
    const probeTimes = [1000, sizes.FAULTS_HARPERDB_DOWN_MS / 2, sizes.FAULTS_HARPERDB_DOWN_MS - 1500].filter((t) => t >= 500);
    let consumerDuring;
    let consumerEarly;
    let storedEarly;
    for (const t of probeTimes) {
      const wait = downAt + t - Date.now();
      if (wait > 0) await sleep(wait);
      const t0 = Date.now();
      let res;
      try {
        res = await prober.socket.timeout(15_000).emitWithAck("get_history", { room: rooms[0], limit: 10 });
      } catch (e) {
        res = { ok: false, error: { code: "no answer", message: e.message } };
      }
      const ms = Date.now() - t0;
      const t1 = Date.now();
      const http = await sys.get(`${sys.urls.gateway2()}/api/rooms/${encodeURIComponent(rooms[1])}/messages?limit=10`, 15_000);
      historyProbes.push({ at: t, ms, code: res?.ok ? "ok" : res?.error?.code, httpStatus: http.status, httpMs: Date.now() - t1 });
      if (!consumerEarly) {
        consumerEarly = await sys.consumerState().catch((e) => ({ error: e.message }));
        storedEarly = await sys.metric("persister", "chatify_persister_messages_stored_total");
      }
    }
    try {
      consumerDuring = await sys.consumerState();
    } catch (e) {
      consumerDuring = { error: e.message };
    }
    const retriesDuring = await sys.metric("persister", "chatify_persister_write_retries_total");
    const storedDuring = await sys.metric("persister", "chatify_persister_messages_stored_total");
    const wait = downAt + sizes.FAULTS_HARPERDB_DOWN_MS - Date.now();
    if (wait > 0) await sleep(wait);
    const ackedDuringOutage = ledger.list().filter((a) => a.status === "ok" && a.createdTime >= downAt).length;
    const startMs = await sys.up("harperdb");
    const upAt = Date.now();
    log(`HarperDB started again by up.sh in ${startMs} ms (down ${upAt - downAt} ms)`);
    await sleep(2000);
    stop = true;
    const results = await load;
    const failedSenders = results.filter((r) => r instanceof Error);
    checks.check("every sender ran to the end", failedSenders.length === 0, failedSenders.map((e) => e.message).join("; "));

    const storedAtEnd = await sys.metric("persister", "chatify_persister_messages_stored_total");
    const outageS = (upAt - downAt) / 1000;
    checks.check("sends were acknowledged during the outage", ackedDuringOutage > 0, `${ackedDuringOutage} messages acknowledged while HarperDB was down`);
    const refused = ledger.list().filter((a) => a.status !== "ok");
    checks.check("no send failed because HarperDB was down", refused.length === 0, refused.length ? JSON.stringify(refused.slice(0, 3).map((a) => [a.key, a.status, a.code])) : "");

    // live delivery to every member (receivers on both gateways, and the other sender)
    const members = [...receivers, ...senders];
    let missing = [];
    await until(
      () => {
        missing = members.flatMap((c) => c.rooms.flatMap((r) => unseen(c, ledger, r).map((id) => `${c.name}:${id}`)));
        return missing.length === 0;
      },
      10_000,
      "",
    ).catch(() => {});
    checks.check("every acknowledged message was delivered live to every member during and after the outage", missing.length === 0, missing.length ? `${missing.length} deliveries missing, e.g. ${missing.slice(0, 5).join(" ")}` : `${members.length} members`);

    for (const p of historyProbes) log(`history probe at +${Math.round(p.at)} ms: get_history ${p.code} in ${p.ms} ms; HTTP ${p.httpStatus} in ${p.httpMs} ms`);
    checks.check(
      `get_history during the outage answered \`unavailable\` in < ${HISTORY_FAST_MS} ms`,
      historyProbes.length > 0 && historyProbes.every((p) => p.code === "unavailable" && p.ms < HISTORY_FAST_MS),
      historyProbes.map((p) => `${p.code} ${p.ms} ms`).join(", "),
    );
    checks.check(
      `GET /api/rooms/…/messages during the outage answered 503 in < ${HISTORY_FAST_MS} ms`,
      historyProbes.length > 0 && historyProbes.every((p) => p.httpStatus === 503 && p.httpMs < HISTORY_FAST_MS),
      historyProbes.map((p) => `${p.httpStatus} ${p.httpMs} ms`).join(", "),
    );

    // the persister kept the messages unacked, retried with back-off, and did not crash
    const retries = retriesDuring - retriesBefore;
    // exponential back-off from retry_initial_ms to retry_max_ms (100 ms .. 5 s by default) makes
    // about a dozen retries in 15 s and ~30 in 2 min; a loop without back-off would make thousands.
    const maxRetries = Math.ceil(outageS) + 15;
    checks.check("the persister retried the write during the outage, with back-off", retries > 0 && retries <= maxRetries, `${retries} retries in ${outageS.toFixed(1)} s (at most ${maxRetries} allowed)`);
    const held = (consumerDuring?.pending ?? 0) + (consumerDuring?.ackPending ?? 0);
    const heldEarly = (consumerEarly?.pending ?? 0) + (consumerEarly?.ackPending ?? 0);
    checks.check(
      "nothing was acked while HarperDB was down: the consumer's ack floor stood still and its backlog grew",
      consumerEarly?.ackFloor !== undefined && consumerDuring?.ackFloor === consumerEarly.ackFloor && held > heldEarly && storedDuring === storedEarly,
      `consumer 1 s into the outage ${JSON.stringify(consumerEarly)}, near its end ${JSON.stringify(consumerDuring)}; stored counter ${storedEarly} -> ${storedDuring}`,
    );
    checks.check("the persister rode out the outage without restarting", sys.pidOf("persister") === persisterPid, `PID ${persisterPid} -> ${sys.pidOf("persister")}`);
    log(`persister stored counter: ${storedDuring} during the outage, ${storedAtEnd} at the end`);
  },
};
