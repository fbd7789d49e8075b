// Hostile clients get nothing and cost little: one test per way an attacker could take over
// another's session or make a small input cost the server much, each against processes of its
// own (so their RSS and CPU, read from /proc, are the attack's alone), asserting the outcome:
// status codes, refusals, who received what, and how much memory and CPU the attack cost.
// Every test prints what it measured (`# ...` diagnostics), the figures the README quotes.
//
// Processes this file starts on the shared NATS (logs in $TMPDIR/chatify-e2e-logs/):
//   e2e-hostile          a gateway with the default limits
//   e2e-hostile-headers  a gateway whose header read timeout is 1 s
//   e2e-hostile-cache    a persister keeping at most 1,000 rooms of recent messages
//   e2e-hostile-full     a gateway holding at most 200 connections

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import net from "node:net";
import {
  ENV, QUIET_MS, assertMemberIds, closeAll, connect, connectRefused, emitAck, failAck, ids, isMsgId, join, okAck, received,
  roomName, runScript, send, show, sleep, startGateway, startPersister, uid, userName, waitFor, waitForStored, wsUpgrade,
} from "./helpers.mjs";
import { RawWs, cpuSeconds, httpRequest, metric, rssKb } from "./raw.mjs";

let gw; // { url, proc }
let gwHeaders;
let cache; // the persister
let gwFull;

before(async () => {
  [gw, gwHeaders, cache, gwFull] = await Promise.all([
    // The shared system allows its one client address more history requests; not this one.
    startGateway("e2e-hostile", {
      CHATIFY_LIMITS__HTTP_HISTORY_PER_SECOND: undefined,
      CHATIFY_LIMITS__HTTP_HISTORY_BURST: undefined,
      // The history-cache test asks 10,000 times from one connection.
      CHATIFY_LIMITS__HISTORY_PER_SECOND: "100000",
      CHATIFY_LIMITS__HISTORY_BURST: "100000",
    }),
    startGateway("e2e-hostile-headers", { CHATIFY_GATEWAY__HEADER_READ_TIMEOUT_MS: "1000" }),
    startPersister("e2e-hostile-cache", { CHATIFY_PERSISTER__HISTORY_CACHE_ROOMS: "1000" }),
    startGateway("e2e-hostile-full", {
      CHATIFY_LIMITS__MAX_CONNECTIONS: "200",
      CHATIFY_GATEWAY__HEADER_READ_TIMEOUT_MS: "60000",
    }),
  ]);
});

after(async () => {
  closeAll();
  for (const r of RawWs.all) r.terminate();
  await Promise.all([gw?.proc.stop("SIGTERM"), gwHeaders?.proc.stop("SIGTERM"), cache?.proc.stop("SIGTERM"), gwFull?.proc.stop("SIGTERM")]);
});

const pidOf = (server) => server.proc.child.pid;

/** Polls `pred` (sync or async) every 50 ms until it holds, failing with `what` after 10 s. */
async function until(pred, what, timeoutMs = 10_000) {
  const end = Date.now() + timeoutMs;
  while (!(await pred())) {
    if (Date.now() > end) assert.fail(`timed out: ${what}`);
    await sleep(50);
  }
}
const mib = (kb) => (kb / 1024).toFixed(1);

/**
 * Runs `attack` while sampling the process's RSS every 100 ms; resolves the peak growth over
 * the RSS before it (KiB), and the CPU seconds it took, and prints both.
 */
async function measured(t, server, what, attack) {
  const pid = pidOf(server);
  const rss0 = rssKb(pid);
  const cpu0 = cpuSeconds(pid);
  let peak = rss0;
  const sampler = setInterval(() => {
    peak = Math.max(peak, rssKb(pid));
  }, 100);
  try {
    await attack();
  } finally {
    clearInterval(sampler);
  }
  peak = Math.max(peak, rssKb(pid));
  const growth = peak - rss0;
  const cpu = cpuSeconds(pid) - cpu0;
  t.diagnostic(`${what}: RSS ${mib(rss0)} -> peak ${mib(peak)} MiB (+${mib(growth)}), CPU ${cpu.toFixed(2)} s`);
  return { growth, cpu };
}

/** A raw client that joined `room` and then stopped reading (its socket is paused). */
async function nonReader(url, room) {
  const r = await RawWs.open(url);
  const answer = await r.connectNs();
  assert.ok(answer.startsWith("40{"), `raw CONNECT: ${answer}`);
  await r.join(room, userName("attacker"));
  r.ws._socket.pause();
  return r;
}

describe("identities", () => {
  test("a member's id is no session id: used as one, it opens nothing, and the member's session is untouched", async (t) => {
    const room = roomName("takeover");
    const victim = await connect(gw.url, { transports: ["polling"], upgrade: false }, t);
    const victimName = userName("victim");
    await join(victim, room, victimName);
    const attacker = await connect(gw.url, {}, t);
    const ack = await join(attacker, room, userName("attacker"));
    assertMemberIds(ack.users, "the attacker's view");
    const victimId = ack.users.find((u) => u.username === victimName)?.id;
    assert.ok(victimId, show(ack.users));
    for (const secret of [victim.id, victim.io.engine.id]) assert.notEqual(victimId, secret, "the member id is a session id");

    const base = `${gw.url}/socket.io/?EIO=4&transport=polling&sid=${encodeURIComponent(victimId)}`;
    const forged = `42${JSON.stringify(["send_message", { room, message: "forged" }])}`;
    const post = await httpRequest("POST", base, forged);
    assert.equal(post.status, 400, `POST with a member id as sid: ${show(post)}`);
    const get = await httpRequest("GET", base);
    assert.equal(get.status, 400, `GET with a member id as sid: ${show(get)}`);
    const upgrade = await wsUpgrade(`${gw.url}/socket.io/?EIO=4&transport=websocket&sid=${encodeURIComponent(victimId)}`);
    assert.notEqual(upgrade.status, 101, "an upgrade with a member id as sid");

    await sleep(QUIET_MS);
    assert.equal(victim.connected, true, "the victim is still connected");
    const sent = await send(victim, room, "still mine");
    await waitFor(attacker, "receive_message", isMsgId(sent.id));
    assert.deepEqual(received(attacker, "receive_message", (m) => m?.message === "forged"), [], "nothing was sent as the victim");
  });
});

describe("names", () => {
  test("names that pass for ChatBot or hide text are invalid_payload, as usernames and (hidden text) as rooms", async (t) => {
    const s = await connect(gw.url, {}, t);
    for (const username of ["ChatBot", "chatbot", "CHATBOT ", "Chat\u200BBot", "\uFEFFChatBot", "\u202Etob\u202C", "ann\u2066x\u2069"]) {
      await failAck(s, "join_room", { username, room: roomName("names") }, "invalid_payload", `username ${show(username)}`);
    }
    for (const room of ["a\u200Bb", "\u2060", "x\u202Ay"]) {
      await failAck(s, "join_room", { username: userName("n"), room }, "invalid_payload", `room ${show(room)}`);
    }
    const ok = await okAck(s, "join_room", { username: "ChatBotFan", room: `ChatBot ${uid()}` });
    assert.equal(ok.ok, true);
  });
});

describe("cheap inputs, bounded costs", () => {
  test("re-joining with an old `since` from a client that does not read: rate-limited, one page each, memory bounded", { timeout: 60_000 }, async (t) => {
    const room = roomName("rejoin");
    // 120 messages of 3,900 bytes: a page of history is about 400 KB.
    const writers = await Promise.all([0, 1, 2].map(() => connect(gw.url, { transports: ["websocket"] }, t)));
    for (const w of writers) await join(w, room, userName("writer"));
    const text = (i) => `${i} ${"h".repeat(3900)}`;
    const acks = [];
    for (let i = 0; i < 120; i += 3) acks.push(...(await Promise.all(writers.map((w, k) => send(w, room, text(i + k))))));
    const first = acks[0].id;
    const attacker = await nonReader(gw.url, room);
    const limited0 = await metric(gw.url, "chatify_gateway_rate_limited_total", 'event="join_room"');
    const { growth } = await measured(t, gw, "300 re-joins with since of the first message", async () => {
      const packet = (i) => `42${1000 + i}${JSON.stringify(["join_room", { username: "x", room, since: first }])}`;
      for (let i = 0; i < 300; i++) attacker.send(packet(i));
      await sleep(3000);
    });
    const limited = (await metric(gw.url, "chatify_gateway_rate_limited_total", 'event="join_room"')) - limited0;
    t.diagnostic(`re-joins refused rate_limited: ${limited} of 300`);
    assert.ok(limited >= 200, `re-joins count against the join rate: only ${limited} refused`);
    assert.ok(growth < 40 * 1024, `the gateway grew ${mib(growth)} MiB`);
    // Nobody else noticed.
    const sent = await send(writers[0], room, "after the attack");
    await waitFor(writers[1], "receive_message", isMsgId(sent.id));
    attacker.terminate();
  });

  test("a typing flood: every listener gets a few typing events, and the gateway is idle right after", { timeout: 60_000 }, async (t) => {
    const room = roomName("typing");
    const listeners = await Promise.all([0, 1, 2].map(() => connect(gw.url, { transports: ["websocket"] }, t)));
    for (const l of listeners) await join(l, room, userName("listener"));
    const attacker = await RawWs.open(gw.url);
    await attacker.connectNs();
    await attacker.join(room, userName("typist"));
    const marks = listeners.map((l) => l.rec.events.length);
    const limited0 = await metric(gw.url, "chatify_gateway_rate_limited_total", 'event="typing"');
    await measured(t, gw, "20,000 typing events", async () => {
      for (let i = 0; i < 20_000; i++) attacker.send(`42${JSON.stringify(["typing", { room, isTyping: i % 2 === 0 }])}`);
      await sleep(1500);
      attacker.terminate();
      await sleep(1000);
    });
    const { cpu } = await measured(t, gw, "the 3 s after the typist left", () => sleep(3000));
    const got = listeners.map((l, i) => received(l, "typing", () => true, marks[i]).length);
    t.diagnostic(`typing events each listener got: ${got.join(", ")}`);
    const limited = (await metric(gw.url, "chatify_gateway_rate_limited_total", 'event="typing"')) - limited0;
    assert.ok(got.every((n) => n >= 1 && n <= 30), `listeners got ${show(got)} typing events`);
    assert.ok(limited > 0, "refused typing events are counted");
    assert.ok(cpu < 0.5, `the gateway used ${cpu.toFixed(2)} s of CPU in the 3 s after the flood`);
  });

  test("events padded with junk from a client that does not read: refused past the queue's bound, memory bounded", { timeout: 60_000 }, async (t) => {
    const room = roomName("padded");
    const bystander = await connect(gw.url, { transports: ["websocket"] }, t);
    await join(bystander, room, userName("by"));
    const attacker = await nonReader(gw.url, room);
    const pad = "j".repeat(30 * 1024);
    const limited0 = await metric(gw.url, "chatify_gateway_rate_limited_total", 'event="send_message"');
    const { growth } = await measured(t, gw, "3,000 events of 30 KiB", async () => {
      for (let i = 0; i < 3000; i++) attacker.send(`42${i}${JSON.stringify(["send_message", { room, message: `m${i}`, pad }])}`);
      await sleep(4000);
    });
    const limited = (await metric(gw.url, "chatify_gateway_rate_limited_total", 'event="send_message"')) - limited0;
    t.diagnostic(`events refused rate_limited: ${limited}`);
    assert.ok(growth < 40 * 1024, `the gateway grew ${mib(growth)} MiB`);
    assert.ok(limited > 2000, `past the bound events are refused: ${limited}`);
    const sent = await send(bystander, room, "still fine");
    await waitFor(bystander, "receive_message", isMsgId(sent.id));
    attacker.terminate();
  });

  test("600 messages of 4,000 bytes into one room: its listener keeps 64 KiB of their states, not 2.4 MB", { timeout: 60_000 }, async (t) => {
    const room = roomName("states");
    const senders = await Promise.all(Array.from({ length: 20 }, () => connect(gw.url, { transports: ["websocket"] }, t)));
    for (const s of senders) await join(s, room, userName("sender"));
    const bytes0 = await metric(gw.url, "chatify_gateway_message_states_bytes");
    const dropped0 = await metric(gw.url, "chatify_gateway_message_states_dropped_total");
    const text = "x".repeat(4000);
    await measured(t, gw, "600 messages of 4,000 bytes from 20 members", async () => {
      await Promise.all(senders.map(async (s, i) => {
        for (let k = 0; k < 30; k++) await send(s, room, `${i}-${k} ${text}`);
      }));
      await sleep(500);
    });
    const kept = (await metric(gw.url, "chatify_gateway_message_states_bytes")) - bytes0;
    const dropped = (await metric(gw.url, "chatify_gateway_message_states_dropped_total")) - dropped0;
    t.diagnostic(`the room's listener keeps ${kept} bytes of states; ${dropped} states dropped past the bound`);
    assert.ok(kept > 0 && kept <= 64 * 1024, `kept ${kept} bytes (gateway.message_states_bytes_per_room: 65,536)`);
    assert.ok(dropped >= 500, `${dropped} states dropped`);
  });

  test("history of 10,000 rooms nobody has: the persister keeps at most its rooms bound, memory bounded", { timeout: 120_000 }, async (t) => {
    const s = await connect(gw.url, { transports: ["websocket"] }, t);
    const prefix = `unknown-${uid()}-`;
    const { growth } = await measured(t, cache, "10,000 history queries of rooms nobody has", async () => {
      for (let i = 0; i < 10_000; i += 50) {
        const batch = Array.from({ length: 50 }, (_, k) => emitAck(s, "get_history", { room: `${prefix}${i + k}` }, 30_000));
        for (const a of await Promise.all(batch)) assert.equal(a?.ok, true, show(a));
      }
    });
    const rooms = await metric(cache.url, "chatify_persister_history_cache_rooms");
    const bytes = await metric(cache.url, "chatify_persister_history_cache_bytes");
    t.diagnostic(`the persister keeps ${rooms} rooms, ${bytes} bytes`);
    assert.ok(rooms > 0 && rooms <= 1000, `rooms kept: ${rooms}`);
    assert.ok(bytes > 0, "empty rooms cost bytes too");
    assert.ok(growth < 20 * 1024, `the persister grew ${mib(growth)} MiB`);
  });

  test("1,000 connections sending half a request header are closed after the header read timeout", { timeout: 60_000 }, async (t) => {
    const port = Number(new URL(gwHeaders.url).port);
    const timeouts0 = await metric(gwHeaders.url, "chatify_gateway_http_timeouts_total");
    const sockets = [];
    let closed = 0;
    const { growth } = await measured(t, gwHeaders, "1,000 half headers", async () => {
      for (let i = 0; i < 1000; i++) {
        const c = net.connect(port, "127.0.0.1", () => c.write("GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\n"));
        c.on("close", () => closed++);
        c.on("error", () => {});
        sockets.push(c);
      }
      await sleep(3000);
    });
    t.diagnostic(`closed by the gateway within 3 s: ${closed} of 1000`);
    for (const c of sockets) c.destroy();
    assert.equal(closed, 1000, "every half-header connection was closed");
    const timeouts = (await metric(gwHeaders.url, "chatify_gateway_http_timeouts_total")) - timeouts0;
    assert.ok(timeouts >= 1000, `closures counted: ${timeouts}`);
    assert.ok(growth < 40 * 1024, `the gateway grew ${mib(growth)} MiB`);
  });

  test("connections past limits.max_connections are closed unread; the ones held are untouched", { timeout: 60_000 }, async (t) => {
    const port = Number(new URL(gwFull.url).port);
    const room = roomName("full");
    const member = await connect(gwFull.url, { transports: ["websocket"] }, t);
    await join(member, room, userName("member"));
    const rawOpen = (onClose) => new Promise((resolve) => {
      const c = net.connect(port, "127.0.0.1", () => resolve(c));
      c.on("close", onClose);
      c.on("error", () => {});
    });
    const held = [];
    let heldClosed = 0;
    let overClosed = 0;
    const { growth, cpu } = await measured(t, gwFull, "1,000 connections over a cap of 200", async () => {
      // 199 idle connections fill the port with the member's.
      for (let i = 0; i < 199; i++) held.push(await rawOpen(() => heldClosed++));
      await sleep(500);
      for (let i = 0; i < 1000; i++) await rawOpen(() => overClosed++);
      await until(() => overClosed === 1000, `every connection over the cap was closed (${overClosed}; held closed ${heldClosed}, member ${member.connected})`);
    });
    const refused = await connectRefused(gwFull.url, { transports: ["websocket"] }, 5000);
    t.diagnostic(`a new client while full: ${refused.message}`);
    // The member's connection still works.
    const { id } = await send(member, room, "still here");
    await waitFor(member, "receive_message", isMsgId(id));
    assert.equal(heldClosed, 0, "a connection under the cap was closed");
    for (const c of held) c.destroy();
    let refusals = 0;
    await until(async () => {
      refusals = await metric(gwFull.url, "chatify_gateway_port_full_refusals_total").catch(() => 0);
      return refusals >= 1001;
    }, "the refusals were counted");
    t.diagnostic(`refusals counted: ${refusals}`);
    const again = await connect(gwFull.url, { transports: ["websocket"] }, t);
    await join(again, room, userName("later"));
    assert.ok(growth < 20 * 1024, `the gateway grew ${mib(growth)} MiB`);
    assert.ok(cpu < 5, `the refusals cost ${cpu.toFixed(2)} s of CPU`);
  });

  test("the HTTP history route is rate-limited per client address (429 with rate_limited)", async () => {
    const url = `${gw.url}/api/rooms/${encodeURIComponent(roomName("http-rate"))}/messages`;
    const statuses = [];
    for (let i = 0; i < 40; i++) statuses.push((await httpRequest("GET", url)).status);
    const ok = statuses.filter((s) => s === 200).length;
    const limited = statuses.filter((s) => s === 429).length;
    assert.equal(ok + limited, 40, show(statuses));
    assert.ok(ok >= 20 && ok <= 26, `the burst of 20 (+ refills) is served: ${ok}`);
    const body = (await httpRequest("GET", url)).body;
    assert.match(body, /rate_limited/, body);
  });
});

describe("long rooms", () => {
  test("a room of 128 × 日 keeps its history after the persister's memory is gone (restart)", { timeout: 120_000 }, async (t) => {
    assert.ok(ENV.runDir, "CHATIFY_RUN_DIR must be known to restart the persister");
    // Only the shared system's persister from here on: its memory is what the restart clears.
    await cache.proc.stop("SIGTERM");
    // 128 characters, 364 bytes: a token far past what HarperDB ranges over.
    const room = `${"日".repeat(118)}${uid()}`;
    const s = await connect(gw.url, {}, t);
    await join(s, room, userName("long"));
    const acks = [];
    for (let i = 0; i < 3; i++) acks.push(await send(s, room, `long ${uid()}`));
    await waitForStored(s, room, ids(acks));
    const down = await runScript("deploy/local/down.sh", ["persister"]);
    assert.equal(down.code, 0, down.output.slice(-2000));
    const up = await runScript("deploy/local/up.sh", ["persister"]);
    assert.equal(up.code, 0, up.output.slice(-2000));
    const page = await okAck(s, "get_history", { room }, "get_history after the restart", 20_000);
    assert.deepEqual(ids(page.messages).reverse(), ids(acks), show(page));
    const again = await connect(gw.url, {}, t);
    const joined = await okAck(again, "join_room", { room, username: userName("since"), since: acks[0].id });
    assert.deepEqual(ids(joined.history), ids(acks.slice(1)), "since, from HarperDB");
  });
});
