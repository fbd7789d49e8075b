// Smoke test of the reference peer: starts one process, then a 2-process cluster joined by the
// Redis adapter (through start.sh / stop.sh, on free ports), and checks the contract the benchmark
// relies on with the real socket.io-client.
//
//   cd bench/reference && npm ci && node --test smoke.test.mjs

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import { fileURLToPath } from "node:url";
import { io } from "socket.io-client";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const run = promisify(execFile);
const WAIT_MS = 3000;
const UUIDV7_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;
const ORIGIN = "http://localhost:3000";

function listen(port) {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.once("error", () => resolve(null));
    s.listen(port, "127.0.0.1", () => {
      const p = s.address().port;
      s.close(() => resolve(p));
    });
  });
}

/** A port p with p .. p+count-1 all free. */
async function freePorts(count) {
  for (let tries = 0; tries < 50; tries++) {
    const p = await listen(0);
    if (p + count > 65535) continue;
    let ok = true;
    for (let i = 1; i < count && ok; i++) ok = (await listen(p + i)) !== null;
    if (ok) return p;
  }
  throw new Error("no free ports");
}

/** Starts `count` processes with start.sh; returns { urls, stop }. */
async function startPeer(count) {
  const runDir = fs.mkdtempSync(path.join(os.tmpdir(), "chatify-ref-smoke-"));
  const port = await freePorts(count);
  const stop = () => run(path.join(HERE, "stop.sh"), [runDir]).finally(() => fs.rmSync(runDir, { recursive: true, force: true }));
  try {
    await run(path.join(HERE, "start.sh"), [String(count)], {
      env: { ...process.env, PORT: String(port), REF_RUN_DIR: runDir },
      timeout: 30_000,
    });
  } catch (e) {
    await stop().catch(() => {});
    throw new Error(`start.sh failed: ${e.stderr || e.message}`);
  }
  const urls = Array.from({ length: count }, (_, i) => `http://127.0.0.1:${port + i}`);
  return { urls, stop };
}

/** A connected client that records every event it receives. */
const clients = new Set();
async function connect(url, opts = {}) {
  const socket = io(url, { transports: ["websocket"], forceNew: true, reconnection: false, ...opts });
  clients.add(socket);
  socket.events = [];
  socket.onAny((event, ...args) => socket.events.push({ event, data: args[0] }));
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no connection to ${url}`)), WAIT_MS);
    socket.once("connect", () => (clearTimeout(timer), resolve()));
    socket.once("connect_error", (e) => (clearTimeout(timer), reject(e)));
  });
  return socket;
}

function closeAll() {
  for (const s of clients) s.disconnect();
  clients.clear();
}

/** Waits for (and consumes) the first recorded event matching `pred`. */
async function next(socket, event, pred = () => true) {
  const deadline = Date.now() + WAIT_MS;
  for (;;) {
    const i = socket.events.findIndex((e) => e.event === event && pred(e.data));
    if (i >= 0) return socket.events.splice(i, 1)[0].data;
    if (Date.now() > deadline) {
      throw new Error(`${event} did not arrive; got ${JSON.stringify(socket.events.map((e) => e.event))}`);
    }
    await new Promise((r) => setTimeout(r, 10));
  }
}

const notice = (text) => (m) => m.username === "ChatBot" && m.message === text && m.id === undefined;
const ack = (socket, event, payload) => socket.timeout(WAIT_MS).emitWithAck(event, payload);
const names = (users) => users.map((u) => u.username).sort();

describe("single process (in-memory adapter)", () => {
  let peer;
  let url;
  before(async () => {
    peer = await startPeer(1);
    [url] = peer.urls;
  });
  after(async () => {
    closeAll();
    await peer?.stop();
  });

  test("HTTP hello and health", async () => {
    assert.deepEqual(await (await fetch(`${url}/`)).json(), { message: "Hello from chatify backend" });
    assert.equal((await fetch(`${url}/healthz`)).status, 200);
  });

  test("join, send, deliver, history paging, typing, leave and disconnect notices", async () => {
    const room = `r-${Date.now()}`;
    const ann = await connect(url);
    const joined = await ack(ann, "join_room", { username: "ann", room });
    assert.deepEqual(joined, { ok: true, room, users: [{ id: ann.id, username: "ann" }], history: [] });
    await next(ann, "receive_message", notice("Welcome ann"));
    assert.deepEqual(await next(ann, "last_100_messages"), []);

    // The original client's payload shape.
    const bob = await connect(url);
    const bobJoined = await ack(bob, "join_room", { userName: "bob", userRoom: room });
    assert.deepEqual(names(bobJoined.users), ["ann", "bob"]);
    await next(ann, "receive_message", notice("bob has joined the chat room"));
    assert.deepEqual(names(await next(ann, "chatroom_users", (u) => u.length === 2)), ["ann", "bob"]);

    const ids = [];
    for (let i = 1; i <= 5; i++) {
      const sent = await ack(ann, "send_message", { room, message: ` m${i} `, clientId: `c${i}` });
      assert.equal(sent.ok, true);
      assert.match(sent.id, UUIDV7_RE);
      assert.equal(typeof sent.createdTime, "number");
      ids.push(sent.id);
      for (const s of [ann, bob]) {
        const m = await next(s, "receive_message", (m) => m.id === sent.id);
        assert.deepEqual(m, { id: sent.id, room, username: "ann", message: `m${i}`, createdTime: sent.createdTime });
      }
    }
    assert.deepEqual([...ids].sort(), ids, "ids sort in send order");

    // A clientId retry answers with the first id and is not delivered again.
    const retry = await ack(ann, "send_message", { room, message: "m5", clientId: "c5" });
    assert.equal(retry.id, ids[4]);

    // History pages, newest first.
    const p1 = await ack(bob, "get_history", { room, limit: 2 });
    assert.deepEqual(p1.messages.map((m) => m.id), [ids[4], ids[3]]);
    assert.equal(p1.hasMore, true);
    const p2 = await ack(bob, "get_history", { room, before: ids[3], limit: 2 });
    assert.deepEqual(p2.messages.map((m) => m.id), [ids[2], ids[1]]);
    assert.equal(p2.hasMore, true);
    const p3 = await ack(bob, "get_history", { room, before: ids[1] });
    assert.deepEqual(p3.messages.map((m) => m.id), [ids[0]]);
    assert.equal(p3.hasMore, false);

    // A later joiner gets the history oldest first; `since` gives what came after an id.
    const carol = await connect(url);
    const carolJoined = await ack(carol, "join_room", { username: "carol", room });
    assert.deepEqual(carolJoined.history.map((m) => m.id), ids);
    assert.deepEqual((await next(carol, "last_100_messages")).map((m) => m.id), ids);
    const since = await ack(carol, "join_room", { username: "carol", room, since: ids[2] });
    assert.deepEqual(since.history.map((m) => m.id), ids.slice(3));

    // Typing reaches the others only.
    assert.deepEqual(await ack(bob, "typing", { room, isTyping: true }), { ok: true });
    assert.deepEqual(await next(ann, "typing"), { room, username: "bob", isTyping: true });
    await next(carol, "typing");
    assert.equal(bob.events.some((e) => e.event === "typing"), false);

    // Leave and disconnect notices.
    assert.deepEqual(await ack(bob, "leave_room", { room }), { ok: true });
    await next(ann, "receive_message", notice("bob has left the chat room"));
    assert.deepEqual(names(await next(ann, "chatroom_users", (u) => u.length === 2)), ["ann", "carol"]);
    carol.disconnect();
    await next(ann, "receive_message", notice("carol has left the chat room"));
    assert.deepEqual(names(await next(ann, "chatroom_users", (u) => u.length === 1)), ["ann"]);
  });

  test("errors: acks and the error event, with the contract's codes", async () => {
    const s = await connect(url);
    const room = `e-${Date.now()}`;
    const code = async (event, payload) => (await ack(s, event, payload)).error?.code;
    assert.equal(await code("send_message", { room, message: "x" }), "not_in_room");
    assert.equal(await code("join_room", { room }), "invalid_payload");
    assert.equal(await code("join_room", "nope"), "invalid_payload");
    assert.equal(await code("join_room", { username: "u", room: "a\nb" }), "invalid_payload");
    await ack(s, "join_room", { username: "u", room });
    assert.equal(await code("send_message", { room, message: "   " }), "invalid_payload");
    assert.equal(await code("send_message", { room, message: "é".repeat(2049) }), "too_large");
    assert.equal((await ack(s, "send_message", { room, message: "é".repeat(2048) })).ok, true);
    assert.equal(await code("get_history", { room, limit: 0 }), "invalid_payload");
    assert.equal(await code("get_history", { room, before: "not-an-id" }), "invalid_payload");
    assert.equal(await code("leave_room", { room: "elsewhere" }), "not_in_room");
    s.emit("send_message", { room: "elsewhere", message: "x" });
    assert.equal((await next(s, "error")).code, "not_in_room");
    let limited = 0;
    const burst = await Promise.all(Array.from({ length: 45 }, (_, i) => ack(s, "send_message", { room, message: `b${i}` })));
    for (const r of burst) if (r.error?.code === "rate_limited") limited++;
    assert.ok(limited >= 1, "a burst above 40 is rate limited");
    assert.ok(s.connected, "bad events never close the connection");
  });

  test("long-polling with upgrade works too", async () => {
    const s = await connect(url, { transports: ["polling", "websocket"] });
    const joined = await ack(s, "join_room", { username: "poller", room: `p-${Date.now()}` });
    assert.equal(joined.ok, true);
  });

  test("a browser on another origin is refused, also on the WebSocket upgrade", async () => {
    await assert.rejects(connect(url, { extraHeaders: { origin: "http://evil.example.com" } }));
    const ok = await connect(url, { extraHeaders: { origin: ORIGIN } });
    assert.ok(ok.connected);
  });
});

describe("two processes joined by the Redis adapter", () => {
  let peer;
  before(async () => {
    peer = await startPeer(2);
  });
  after(async () => {
    closeAll();
    await peer?.stop();
  });

  test("members, messages, history and notices cross processes", async () => {
    const [a, b] = peer.urls;
    const room = `c-${Date.now()}`;
    const ann = await connect(a);
    await ack(ann, "join_room", { username: "ann", room });
    const bob = await connect(b);
    const bobJoined = await ack(bob, "join_room", { username: "bob", room });
    assert.deepEqual(bobJoined.users.map((u) => u.id).sort(), [ann.id, bob.id].sort());
    await next(ann, "receive_message", notice("bob has joined the chat room"));
    assert.deepEqual(names(await next(ann, "chatroom_users", (u) => u.length === 2)), ["ann", "bob"]);
    assert.deepEqual(names(await next(bob, "chatroom_users", (u) => u.length === 2)), ["ann", "bob"]);

    const ids = [];
    for (const [sender, text] of [[ann, "from a"], [bob, "from b"], [ann, "again a"]]) {
      const sent = await ack(sender, "send_message", { room, message: text, clientId: text });
      assert.equal(sent.ok, true);
      ids.push(sent.id);
      for (const s of [ann, bob]) await next(s, "receive_message", (m) => m.id === sent.id && m.message === text);
    }

    // Each process holds the whole history.
    for (const s of [ann, bob]) {
      const page = await ack(s, "get_history", { room, limit: 2 });
      assert.deepEqual(page.messages.map((m) => m.id), [ids[2], ids[1]]);
      assert.equal(page.hasMore, true);
    }
    const carol = await connect(b);
    const carolJoined = await ack(carol, "join_room", { username: "carol", room });
    assert.deepEqual(carolJoined.history.map((m) => m.id), ids);
    assert.deepEqual(names(carolJoined.users), ["ann", "bob", "carol"]);

    // A clientId retry after reconnecting to the other process gets the first id back.
    const ann2 = await connect(b);
    await ack(ann2, "join_room", { username: "ann", room });
    assert.equal((await ack(ann2, "send_message", { room, message: "from a", clientId: "from a" })).id, ids[0]);
    await ack(ann2, "leave_room", { room });

    // Typing crosses processes, a leave on one process is announced on the other.
    await ack(ann, "typing", { room, isTyping: false });
    assert.deepEqual(await next(carol, "typing"), { room, username: "ann", isTyping: false });
    bob.disconnect();
    await next(ann, "receive_message", notice("bob has left the chat room"));
    assert.deepEqual(names(await next(ann, "chatroom_users", (u) => u.length === 2 && u.some((x) => x.username === "carol"))), ["ann", "carol"]);
  });
});
