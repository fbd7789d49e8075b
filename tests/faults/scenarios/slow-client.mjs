// 7. Slow clients and backpressure: raw WebSocket clients join a room on gateway1 and stop
// reading (their TCP receive windows fill, then the gateway's per-socket queue), while two
// senders on gateway2 send many large messages to that room. Proves:
//   - gateway1's memory stays bounded: its peak RSS stays below the bound computed below,
//     whereas queueing what the slow clients missed would need far more,
//   - what could not be queued is dropped and counted, per socket
//     (chatify_gateway_delivery_drops_total{event="receive_message"}),
//   - a normal client in the same room (on the same gateway) receives every message in order
//     and stays connected; a normal pair in another room is unaffected too,
//   - half the slow clients read again (within the ping interval): they are still connected,
//     get what was buffered in order, and then new messages; a message each of them sent while
//     its queue was full is acknowledged once it reads again (the ack waited, it was not dropped);
//     when the heartbeat closed their sockets first, that ack ends with the disconnection,
//   - the other half never read again: the heartbeat ends them within ping interval + ping
//     timeout, and the room hears that they left (no ghost members, nothing held for them).

import { createRequire } from "node:module";
import path from "node:path";
import { E2E_DIR, sleep } from "../../e2e/helpers.mjs";
import { checkDeliveries } from "../checker.mjs";
import { serverSetting } from "../lib/config.mjs";
import { runSender, originOf, unseen, until } from "../lib/load.mjs";

// `ws` is what socket.io-client itself uses; it is installed with the e2e suite.
const WebSocket = createRequire(path.join(E2E_DIR, "helpers.mjs"))("ws");

const MAX_BUFFER_SIZE = serverSetting("CHATIFY_GATEWAY__MAX_BUFFER_SIZE", 128);
const pingInterval = serverSetting("CHATIFY_GATEWAY__PING_INTERVAL_MS", 25_000);
const pingTimeout = serverSetting("CHATIFY_GATEWAY__PING_TIMEOUT_MS", 20_000);
const MiB = 1024 * 1024;

/** A bare Engine.IO v4 / Socket.IO v5 client over one WebSocket, that can stop reading. */
class RawClient {
  constructor(url, name) {
    this.url = `${url.replace(/^http/, "ws")}/socket.io/?EIO=4&transport=websocket`;
    this.name = name;
    this.messages = 0;
    this.closed = false;
    this.acks = new Map();
    this.nextAck = 1;
    /** receive_message payloads with an id, in arrival order. */
    this.received = [];
  }

  open() {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(this.url);
      this.ws = ws;
      const timer = setTimeout(() => reject(new Error(`${this.name}: no Socket.IO connect within 5 s`)), 5000);
      ws.on("message", (data) => {
        const text = data.toString();
        if (text === "2") ws.send("3"); // ping -> pong (only while reading)
        else if (text.startsWith("0")) ws.send("40");
        else if (text.startsWith("40")) {
          clearTimeout(timer);
          resolve();
        } else if (text.startsWith("42")) {
          if (text.startsWith('42["receive_message"')) {
            const m = JSON.parse(text.slice(2))[1];
            if (m?.id) {
              this.messages++;
              this.received.push(m);
            }
          }
        } else if (text.startsWith("43")) {
          const m = /^43(\d+)(.*)$/s.exec(text);
          const cb = m && this.acks.get(Number(m[1]));
          if (cb) {
            this.acks.delete(Number(m[1]));
            cb(JSON.parse(m[2])[0]);
          }
        }
      });
      ws.on("close", () => {
        this.closed = true;
        // As socket.io-client does: acks still awaited will never come.
        for (const [id, cb] of this.acks) {
          this.acks.delete(id);
          cb(undefined, new Error(`${this.name}: disconnected`));
        }
      });
      ws.on("error", (e) => {
        clearTimeout(timer);
        reject(e);
      });
    });
  }

  emitWithAck(event, payload, timeoutMs = 5000) {
    return new Promise((resolve, reject) => {
      if (this.closed) {
        reject(new Error(`${this.name}: disconnected`));
        return;
      }
      const id = this.nextAck++;
      const timer = setTimeout(() => {
        this.acks.delete(id);
        reject(new Error(`${this.name}: no ack for ${event}`));
      }, timeoutMs);
      this.acks.set(id, (res, err) => {
        clearTimeout(timer);
        if (err) reject(err);
        else resolve(res);
      });
      this.ws.send(`42${id}${JSON.stringify([event, payload])}`);
    });
  }

  /** Stops reading from the socket: the kernel buffers fill, then the server's queue. */
  stopReading() {
    this.ws.pause();
  }

  resume() {
    this.ws.resume();
  }

  close() {
    this.ws?.terminate();
  }
}

export default {
  name: "slow-client",
  short: "sc",
  title: "clients that stop reading while a room gets many large messages",
  async run({ sizes, tag, checks, log, sys, room, client, ledger }) {
    const roomA = room(0);
    const roomB = room(1);
    const n = sizes.FAULTS_SLOW_MESSAGES;
    const slowCount = sizes.FAULTS_SLOW_CLIENTS;
    const bytes = sizes.FAULTS_SLOW_MESSAGE_BYTES;
    const filler = "x".repeat(Math.max(0, bytes - 40));
    const gw1 = sys.urls.gateway1();
    const gwPid = sys.pidOf("gateway1");

    const senders = [0, 1].map((i) => client({ name: `s${i}`, url: sys.urls.gateway2(), rooms: [roomA] }));
    const normal = client({ name: "normal", url: gw1, rooms: [roomA] });
    const otherSender = client({ name: "bs", url: sys.urls.gateway2(), rooms: [roomB] });
    const otherReceiver = client({ name: "br", url: gw1, rooms: [roomB] });
    await Promise.all([...senders, normal, otherSender, otherReceiver].map((c) => c.open()));

    // warm-up without slow clients: the gateway's RSS under this very load is the baseline
    const sample = (into) => {
      const kib = sys.rssKiB(gwPid);
      if (kib) into.push(kib);
    };
    const warm = [];
    sample(warm);
    let sampling = setInterval(() => sample(warm), 100);
    const warmCount = Math.min(1000, Math.ceil(n / 5));
    await Promise.all(senders.map((c) => runSender(c, roomA, { count: warmCount / 2, tag, window: 20, filler })));
    await until(() => unseen(normal, ledger, roomA).length === 0, 20_000, "warm-up delivered to the normal client").catch(() => {});
    clearInterval(sampling);
    const baseline = Math.max(...warm);

    const slow = [];
    for (let i = 0; i < slowCount; i++) {
      const c = new RawClient(gw1, `slow${i}`);
      await c.open();
      c.username = `slow${i}-${tag}`;
      const joined = await c.emitWithAck("join_room", { username: c.username, room: roomA });
      if (!joined?.ok) throw new Error(`slow${i}: join_room failed: ${JSON.stringify(joined)}`);
      slow.push(c);
    }
    await sleep(300);
    for (const c of slow) c.stopReading();
    const stoppedAt = Date.now();
    const dropsBefore = await sys.metric("gateway1", "chatify_gateway_delivery_drops_total", { event: "receive_message" });

    const peak = [];
    sampling = setInterval(() => sample(peak), 100);
    const started = Date.now();
    await Promise.all([
      ...senders.map((c) => runSender(c, roomA, { count: n / 2, tag, window: 20, filler })),
      runSender(otherSender, roomB, { count: Math.ceil(n / 10), tag, window: 5, ratePerSec: 200 }),
    ]);
    const sendMs = Date.now() - started;
    let missing = [];
    await until(() => (missing = unseen(normal, ledger, roomA)).length === 0, 30_000, "").catch(() => {});
    await sleep(500);
    clearInterval(sampling);
    const dropsAfter = await sys.metric("gateway1", "chatify_gateway_delivery_drops_total", { event: "receive_message" });
    const peakKiB = Math.max(...peak);
    const packetBytes = bytes + 200; // the receive_message packet: text plus JSON framing and fields
    // What a bounded queue may hold for the slow sockets (twice, for allocator slack), plus a
    // fixed 24 MiB for everything else that moves under this load (the warm-up measured the
    // same load without slow clients; growth beyond it was ~4 MiB when this was written).
    const allowedKiB = Math.ceil((slowCount * MAX_BUFFER_SIZE * packetBytes * 2 + 24 * MiB) / 1024);
    const boundKiB = baseline + allowedKiB;
    log(`sent ${n} messages of ${bytes} bytes in ${sendMs} ms; gateway1 RSS: baseline ${(baseline / 1024).toFixed(1)} MiB, peak ${(peakKiB / 1024).toFixed(1)} MiB; bound ${(boundKiB / 1024).toFixed(1)} MiB`);
    checks.check(
      "gateway1's RSS stayed bounded while clients did not read",
      peakKiB < boundKiB,
      `peak ${(peakKiB / 1024).toFixed(1)} MiB < bound ${(boundKiB / 1024).toFixed(1)} MiB = warm baseline + ${slowCount} slow × ${MAX_BUFFER_SIZE} packets × ${packetBytes} B × 2 + 24 MiB`,
    );
    checks.check("deliveries dropped for the slow clients were counted", dropsAfter > dropsBefore, `chatify_gateway_delivery_drops_total{event="receive_message"} ${dropsBefore} -> ${dropsAfter}`);

    checks.check("the normal client in the same room received every message", missing.length === 0, missing.length ? `${missing.length} missing` : `${normal.live.get(roomA).length} messages`);
    const order = checkDeliveries(normal.live.get(roomA), originOf(ledger));
    checks.check("the normal client received each sender's messages in order, once", order.reordered === 0 && order.duplicates === 0, JSON.stringify(order));
    checks.check("the normal client stayed connected", normal.connected && normal.disconnects.length === 0, JSON.stringify(normal.disconnects));
    let missingB = [];
    await until(() => (missingB = unseen(otherReceiver, ledger, roomB)).length === 0, 10_000, "").catch(() => {});
    checks.check("a client of another room on the same gateway received every message", missingB.length === 0 && otherReceiver.connected, `${missingB.length} missing`);

    // Half the slow clients read again ("resumed"), the other half never do ("stuck").
    const half = Math.ceil(slow.length / 2);
    const resumed = slow.slice(0, half);
    const stuck = slow.slice(half);
    // Before they read again, the resumed ones send a message each, with an ack: their queues
    // are full, so the ack has to wait for room in it rather than be dropped.
    const delayedBefore = await sys.metric("gateway1", "chatify_gateway_answers_delayed_total", { event: "send_message" });
    const pendingAcks = resumed.map((c) => {
      const a = ledger.attempt({ key: `${tag}.${c.name}.0`, room: roomA, sender: c.name, seq: 0, username: c.username });
      const at = Date.now();
      return c.emitWithAck("send_message", { room: roomA, message: a.key, clientId: a.key }, 60_000).then(
        (res) => {
          ledger.record(a, res?.ok === true && typeof res.id === "string" ? "ok" : (res?.error?.code ?? "bad_ack"), Date.now() - at, res, at);
          return res;
        },
        (e) => {
          const code = c.closed ? "disconnected" : "timeout";
          ledger.record(a, code, Date.now() - at, undefined, at);
          return { ok: false, error: { code, message: e.message } };
        },
      );
    });
    await until(
      async () => (await sys.metric("gateway1", "chatify_gateway_answers_delayed_total", { event: "send_message" })) - delayedBefore >= resumed.length,
      10_000,
      "",
    ).catch(() => {});
    const delayed = (await sys.metric("gateway1", "chatify_gateway_answers_delayed_total", { event: "send_message" })) - delayedBefore;
    const slowPhaseMs = Date.now() - stoppedAt;
    for (const c of resumed) c.resume();
    const acks = await Promise.all(pendingAcks);
    const ackCodes = JSON.stringify(acks.map((r) => (r?.ok ? "ok" : r?.error?.code)));
    if (slowPhaseMs < pingInterval) {
      checks.check(
        "acks to sockets whose queue was full waited for room and arrived once the clients read again",
        delayed >= resumed.length && acks.every((r) => r?.ok === true),
        `chatify_gateway_answers_delayed_total{event="send_message"} +${delayed}; acks: ${ackCodes}`,
      );
    } else {
      // The heartbeat closed the full sockets before they read again (a slow phase longer than
      // the ping interval): the waiting acks end with the disconnection, which the client sees.
      checks.check(
        "acks to sockets the heartbeat closed while their queue was full ended with the disconnection, not a hang",
        acks.every((r) => r?.ok === true || r?.error?.code === "disconnected"),
        `slow phase ${slowPhaseMs} ms > ping interval ${pingInterval} ms; acks: ${ackCodes}`,
      );
    }
    const counts = () => resumed.map((c) => c.messages).join(",");
    let before = "";
    await until(
      async () => {
        const now = counts();
        const stable = now === before;
        before = now;
        return stable;
      },
      20_000,
      "",
      500,
    ).catch(() => {});
    const expected = n; // the slow clients joined after the warm-up
    const wouldQueueKiB = Math.ceil((slow.length * (expected - Math.max(...resumed.map((c) => c.messages))) * packetBytes) / 1024);
    log(`after resuming, ${resumed.length} slow clients had read ${counts()} of ${expected} messages; queueing what the ${slow.length} missed would have taken ~${(wouldQueueKiB / 1024).toFixed(0)} MiB`);
    checks.check("the load was heavy enough: queueing what the slow clients missed would exceed the bound's allowance twice", wouldQueueKiB > 2 * allowedKiB, `${(wouldQueueKiB / 1024).toFixed(0)} MiB vs ${(allowedKiB / 1024).toFixed(0)} MiB allowed`);
    for (const c of resumed) {
      const d = checkDeliveries(c.received, originOf(ledger));
      if (d.reordered || d.duplicates) checks.check(`${c.name} got what it was sent in order, once`, false, JSON.stringify(d));
    }
    // per socket: every delivery a (resumed) slow client missed while the gateway still had its
    // socket is one dropped emit; the stuck ones missed at least as many each, so this is a lower
    // bound of what must be counted. Once the heartbeat closed a socket (its room heard it left),
    // nothing more was sent to it: messages from then on (and 5 s before, for delivery lag under
    // this load) are not counted as missed.
    const leftAt = (c) =>
      normal.notices.find((x) => x.at >= stoppedAt && x.event === "receive_message" && x.payload.message === `${c.username} has left the chat room`)?.at ?? Infinity;
    const flood = [...ledger.attempts.values()].filter((a) => a.room === roomA && a.status === "ok" && a.createdTime >= stoppedAt);
    const missed = resumed.reduce((x, c) => {
      const got = new Set(c.received.map((m) => m.id));
      const until = leftAt(c) - 5000;
      return x + flood.filter((a) => a.createdTime < until && !got.has(a.ids[0])).length;
    }, 0);
    const closedEarly = resumed.filter((c) => leftAt(c) < Infinity).length;
    checks.check(
      "every delivery dropped for a slow socket was counted (per socket)",
      dropsAfter - dropsBefore >= missed,
      `${missed} deliveries missed by ${resumed.length} of the ${slowCount} slow sockets while the gateway had them (${closedEarly} closed by the heartbeat before they read again); drop counter +${dropsAfter - dropsBefore}`,
    );
    // A slow socket stays connected while the heartbeat allows: read again before ping interval
    // + timeout, it gets new messages.
    if (slowPhaseMs < pingInterval) {
      const probe = await runSender(senders[0], roomA, { count: 1, tag: `${tag}-probe`, window: 1 }).then(() => [...ledger.attempts.values()].at(-1));
      await until(() => resumed.every((c) => c.received.some((m) => m.id === probe.ids[0])), 5000, "").catch(() => {});
      const got = resumed.filter((c) => c.received.some((m) => m.id === probe.ids[0])).length;
      checks.check(
        `slow clients that read again within the ping interval (${slowPhaseMs} ms < ${pingInterval} ms) stayed connected and get new messages`,
        probe.status === "ok" && got === resumed.length,
        `${got} of ${resumed.length} got a message sent afterwards`,
      );
    } else {
      log(`the slow phase (${slowPhaseMs} ms) outlasted the ping interval (${pingInterval} ms): the resumed clients may have been disconnected by the heartbeat`);
    }

    // A client that never reads again is dead to the room: the heartbeat must end it within
    // ping interval + ping timeout, and its room hear that it left (no ghost member, nothing
    // held for it).
    const deadline = stoppedAt + pingInterval + pingTimeout + 5000;
    const stuckNames = new Set(stuck.map((c) => c.username));
    const leftOf = (u) => normal.notices.find((x) => x.at >= stoppedAt && x.event === "receive_message" && x.payload.message === `${u} has left the chat room`);
    // (chatroom_users follows the notices by up to 50 ms: the gateway coalesces it per room)
    const ghostsNow = () => (normal.notices.filter((x) => x.event === "chatroom_users").at(-1)?.payload ?? []).filter((u) => stuckNames.has(u.username)).map((u) => u.username);
    await until(() => [...stuckNames].every((u) => leftOf(u)) && ghostsNow().length === 0, Math.max(0, deadline - Date.now()), "").catch(() => {});
    const left = [...stuckNames].filter((u) => leftOf(u));
    const ghosts = ghostsNow();
    const sockets = await sys.metric("gateway1", "chatify_gateway_connected_sockets");
    checks.check(
      `clients that never read again were disconnected and announced as gone within ping interval + timeout + 5 s (${pingInterval + pingTimeout + 5000} ms)`,
      left.length === stuck.length && ghosts.length === 0,
      `${left.length} of ${stuck.length} 'has left' notices; still in chatroom_users: ${ghosts.length}; gateway1 connected_sockets ${sockets} (normal clients: 2)`,
    );
    for (const c of slow) c.close();
  },
};
