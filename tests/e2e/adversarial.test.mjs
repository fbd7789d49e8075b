// Adversarial inputs: what an attacker on the internet can send to a gateway, below and above the
// socket.io-client. Every input gets the contract's error or a clean refusal: never a crash, never
// a leak into other rooms, never a dropped connection for a client that did nothing wrong, and
// never a write to NATS or HarperDB.
//
// Raw protocol: Engine.IO v4 over WebSocket (the `ws` package, socket.io-client's own) and over
// HTTP long-polling, with packets written by hand. socketioxide closes the connection of a client
// whose Socket.IO packet cannot be decoded (bad framing): that is the clean refusal for garbage;
// the assertions are that the attacker's connection is the only one closed, the process keeps
// serving (/healthz, a chat exchange between bystanders in the attacked room) and nothing is
// stored. A well-framed event with a bad payload gets `invalid_payload` and the connection stays.
//
// Not repeated here (covered elsewhere): non-object payloads and wrong field types through the
// client (errors), Origin/CORS (transport, config), the token checks for missing/expired/bad
// signature/alg none/audience (auth), Unicode room isolation and length limits (rooms).
//
// This file starts its own processes on the shared NATS (logs in $TMPDIR/chatify-e2e-logs/):
//   e2e-adv-misc   join burst 3 at 1/s, connect timeout 1000 ms, debug logs
//   e2e-adv-cap    3 connections per client address
//   e2e-adv-auth   a JWT secret, a bogus HarperDB password, trace logs
//   e2e-adv-persister-trace (in the secrets test)  a persister with trace logs

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import jwt from "jsonwebtoken";
import {
  CHATBOT, ENV, QUIET_MS, WAIT_MS, closeAll, connect, connectRefused, disconnect, emitAck, expectNone, failAck, gw1Url,
  gw2Url, httpGet, ids, isMsgId, join, lbUrl, okAck, received, roomName, send, show, sleep, startGateway,
  startPersister, uid, userName, waitFor, waitForStored,
} from "./helpers.mjs";
import { RawPoll, RawWs, SERVER_TEXTS, httpRequest, metric, rssKb } from "./raw.mjs";

const JWT_SECRET = `jwt-${crypto.randomBytes(24).toString("hex")}`;
const BOGUS_HDB_PASSWORD = `hdb-${crypto.randomBytes(24).toString("hex")}`;
const CONNECT_TIMEOUT_MS = 1000;
const MAX_PAYLOAD = 65536; // limits.max_payload_bytes, the default
const CAP = 3;

let gwMisc; // { url, proc }
let gwCap;
let gwAuth;


before(async () => {
  // RUST_LOG would override CHATIFY_LOG__LEVEL: unset it for the extra gateways
  [gwMisc, gwCap, gwAuth] = await Promise.all([
    startGateway("e2e-adv-misc", {
      CHATIFY_LIMITS__JOIN_BURST: "3",
      CHATIFY_LIMITS__JOINS_PER_SECOND: "1",
      CHATIFY_GATEWAY__CONNECT_TIMEOUT_MS: String(CONNECT_TIMEOUT_MS),
      CHATIFY_LOG__LEVEL: "debug",
      RUST_LOG: undefined,
    }),
    startGateway("e2e-adv-cap", { CHATIFY_LIMITS__CONNECTIONS_PER_ADDRESS: String(CAP), RUST_LOG: undefined }),
    startGateway("e2e-adv-auth", {
      CHATIFY_AUTH__JWT_SECRET: JWT_SECRET,
      CHATIFY_HARPERDB__PASSWORD: BOGUS_HDB_PASSWORD,
      CHATIFY_LOG__LEVEL: "trace",
      RUST_LOG: undefined,
    }),
  ]);
});

after(async () => {
  closeAll();
  for (const r of RawWs.all) r.terminate();
  await Promise.all([gwMisc?.proc.stop("SIGTERM"), gwCap?.proc.stop("SIGTERM"), gwAuth?.proc.stop("SIGTERM")]);
});

// ---------------------------------------------------------------------------------------------
// Bystanders, health, metrics, storage
// ---------------------------------------------------------------------------------------------

/**
 * Two well-behaved clients in `room` on `url` (one websocket-only, one polling-only) whose
 * messages are the only legitimate ones of the room; `legit` collects their ids.
 */
async function bystanders(url, room, t) {
  const a = await connect(url, { transports: ["websocket"] }, t);
  // withCredentials keeps the load balancer's sticky cookie (polling through HAProxy needs it)
  const b = await connect(url, { transports: ["polling"], upgrade: false, withCredentials: true }, t);
  const na = userName("bya");
  const nb = userName("byb");
  await join(a, room, na);
  await join(b, room, nb);
  const ctx = { url, room, a, b, na, nb, legit: [] };
  await stillChatting(ctx, "before the attacks");
  return ctx;
}

/** The process is alive, and both bystanders are connected and see each other's messages. */
async function stillChatting(ctx, when) {
  const health = await httpGet(`${ctx.url}/healthz`);
  assert.equal(health.status, 200, `${ctx.url}/healthz ${when}`);
  assert.equal(ctx.a.connected, true, `bystander a (websocket) still connected ${when}`);
  assert.equal(ctx.b.connected, true, `bystander b (polling) still connected ${when}`);
  for (const [from, to] of [[ctx.a, ctx.b], [ctx.b, ctx.a]]) {
    const ack = await send(from, ctx.room, `bystander check ${when} ${uid()}`);
    ctx.legit.push(ack.id);
    await waitFor(to, "receive_message", isMsgId(ack.id), { what: `bystander message ${when}` });
  }
}

/** The bystanders got no chat message other than the legitimate ones (ChatBot notices aside). */
function assertNothingLeaked(ctx, extraLegit = []) {
  const ok = new Set([...ctx.legit, ...extraLegit]);
  for (const s of [ctx.a, ctx.b]) {
    const foreign = received(s, "receive_message", (m) => m?.username !== CHATBOT && !ok.has(m?.id));
    assert.deepEqual(foreign, [], `a bystander received messages no legitimate client sent: ${show(foreign)}`);
  }
}

/** Exactly the legitimate messages are stored in the room (after they all are). */
async function assertStoredExactly(socket, room, legitIds) {
  const stored = await waitForStored(socket, room, legitIds);
  assert.deepEqual(ids(stored).slice().sort(), legitIds.slice().sort(), `history of ${show(room)} holds exactly the legitimate messages`);
}

/** Opens a raw websocket, joins `room` as an attacker, and returns it. */
async function rawAttacker(url, room) {
  const r = await RawWs.open(url);
  const answer = await r.connectNs();
  assert.ok(answer.startsWith("40{"), `raw CONNECT: ${answer}`);
  await r.join(room, userName("attacker"));
  return r;
}

/** A send_message packet text of exactly `bytes` bytes (ASCII). */
function sendPacketOfSize(room, bytes, ackId = "") {
  const head = `42${ackId}["send_message",{"room":${JSON.stringify(room)},"message":"`;
  const tail = `"}]`;
  const fill = bytes - Buffer.byteLength(head) - Buffer.byteLength(tail);
  assert.ok(fill > 0);
  return head + "A".repeat(fill) + tail;
}

const deepArray = (depth) => "[".repeat(depth) + "]".repeat(depth);

// ---------------------------------------------------------------------------------------------
// Sizes
// ---------------------------------------------------------------------------------------------

describe("size limits", () => {
  test("WebSocket: 10 MB frame, 64 KiB + 1 message, 80 KB fragmented message close only that connection; exactly 64 KiB is too_large; RSS stays flat", async (t) => {
    const room = roomName("adv-wssize");
    const ctx = await bystanders(gwMisc.url, room, t);
    const received0 = await metric(gwMisc.url, "chatify_gateway_messages_received_total");
    const legit0 = ctx.legit.length;
    const rss0 = rssKb(gwMisc.proc.child.pid);

    // exactly max_payload bytes: accepted by Engine.IO, refused by the text limit, connection stays
    const edge = await rawAttacker(gwMisc.url, room);
    const since = edge.msgs.length;
    edge.send(sendPacketOfSize(room, MAX_PAYLOAD, "7"));
    const edgeAck = JSON.parse((await edge.waitMsg((m) => m.startsWith("437["), { since, what: "ack of the 64 KiB message" })).slice(3))[0];
    assert.equal(edgeAck?.ok, false, show(edgeAck));
    assert.equal(edgeAck.error?.code, "too_large", `a message of exactly ${MAX_PAYLOAD} bytes: ${show(edgeAck)}`);
    assert.equal(edge.isOpen, true, "the 64 KiB message does not close the connection");
    const edgeOk = await edge.ack("send_message", JSON.stringify({ room, message: "legit after too_large" }));
    assert.equal(edgeOk?.ok, true, show(edgeOk));
    ctx.legit.push(edgeOk.id);

    const attacks = [
      ["a single 10 MB text frame", (r) => r.send(sendPacketOfSize(room, 10 * 1024 * 1024))],
      [`a ${MAX_PAYLOAD + 1}-byte message`, (r) => r.send(sendPacketOfSize(room, MAX_PAYLOAD + 1))],
      ["an 80 KB message in two 40 KB fragments", (r) => {
        const whole = sendPacketOfSize(room, 80_000);
        r.send(whole.slice(0, 40_000), { fin: false });
        r.send(whole.slice(40_000), { fin: true });
      }],
      ["a 10 MB binary frame", (r) => r.send(Buffer.alloc(10 * 1024 * 1024, 0x41), { binary: true })],
    ];
    for (const [what, attack] of attacks) {
      const r = await rawAttacker(gwMisc.url, room);
      const since = r.msgs.length;
      const t0 = Date.now();
      attack(r);
      const closed = await r.waitClosed(WAIT_MS);
      assert.ok(closed, `${what}: the attacker's connection must be closed, still open after ${WAIT_MS} ms; got ${show(r.texts())}`);
      t.diagnostic(`${what}: closed with code ${closed.code} after ${closed.at - t0} ms`);
      assert.deepEqual(r.texts(since).filter((m) => m.startsWith("43") || m.startsWith("42[\"receive_message\",{\"id\"")), [], `${what}: no ack or message for the oversized packet`);
      await stillChatting(ctx, `after ${what}`);
    }
    assert.equal(edge.isOpen, true, "the other raw client (which sent nothing oversized) is still connected");

    await sleep(300);
    const rss1 = rssKb(gwMisc.proc.child.pid);
    t.diagnostic(`gateway RSS ${rss0} kB before, ${rss1} kB after the oversized frames`);
    assert.ok(rss1 - rss0 < 20 * 1024, `RSS grew by ${rss1 - rss0} kB (more than 20 MB) after the oversized frames`);

    assertNothingLeaked(ctx);
    assert.equal(await metric(gwMisc.url, "chatify_gateway_messages_received_total") - received0, ctx.legit.length - legit0, "only the legitimate messages reached JetStream");
    await assertStoredExactly(ctx.a, room, ctx.legit);
  });

  test("WebSocket: a 10 MB frame on gateway1 and through the load balancer closes only that connection", async (t) => {
    for (const [label, url] of [["gateway1", gw1Url()], ["load balancer", lbUrl()]]) {
      const room = roomName("adv-10mb");
      const ctx = await bystanders(url, room, t);
      const r = await rawAttacker(url, room);
      r.send(sendPacketOfSize(room, 10 * 1024 * 1024));
      const closed = await r.waitClosed(WAIT_MS + 2000);
      assert.ok(closed, `${label}: a 10 MB frame must close the attacker's connection`);
      await stillChatting(ctx, `${label}: after a 10 MB frame`);
      assertNothingLeaked(ctx);
      await assertStoredExactly(ctx.a, room, ctx.legit);
    }
  });

  test("polling: a body over max_payload gets 413 and closes only that session; a 10 MB body too; exactly 64 KiB is too_large", async (t) => {
    const room = roomName("adv-pollsize");
    const ctx = await bystanders(gw1Url(), room, t);

    const edge = await RawPoll.open(gw1Url());
    assert.match(await edge.connectNs(), /^40\{/);
    assert.equal((await edge.ack("join_room", JSON.stringify({ username: userName("pe"), room }))).ok, true);
    const body = sendPacketOfSize(room, MAX_PAYLOAD, "9");
    assert.equal(Buffer.byteLength(body), MAX_PAYLOAD);
    assert.equal((await edge.post(body)).status, 200, "a body of exactly max_payload bytes is accepted by Engine.IO");
    const edgeAck = JSON.parse((await edge.waitPacket((p) => p.startsWith("439["), "ack of the 64 KiB message")).slice(3))[0];
    assert.equal(edgeAck?.error?.code, "too_large", show(edgeAck));

    for (const [what, size] of [[`a ${MAX_PAYLOAD + 1}-byte body`, MAX_PAYLOAD + 1], ["a 10 MB body", 10 * 1024 * 1024]]) {
      const p = await RawPoll.open(gw1Url());
      assert.match(await p.connectNs(), /^40\{/);
      assert.equal((await p.ack("join_room", JSON.stringify({ username: userName("pa"), room }))).ok, true);
      const res = await p.post(sendPacketOfSize(room, size), WAIT_MS + 5000);
      t.diagnostic(`${what}: ${show(res)}`);
      if (size === MAX_PAYLOAD + 1) assert.equal(res.status, 413, `${what}: expected HTTP 413, got ${show(res)}`);
      else assert.ok(res.status === 413 || (res.error && /EPIPE|ECONNRESET|socket hang up/.test(res.error)), `${what}: expected 413 or the request cut off, got ${show(res)}`);
      const state = await p.isClosed();
      assert.equal(state.closed, true, `${what}: the session must be closed (${state.why})`);
      await stillChatting(ctx, `after ${what}`);
    }
    // the session that sent nothing oversized still works
    const ok = await edge.ack("send_message", JSON.stringify({ room, message: "legit polling" }));
    assert.equal(ok?.ok, true, show(ok));
    ctx.legit.push(ok.id);
    assertNothingLeaked(ctx);
    await assertStoredExactly(ctx.a, room, ctx.legit);
  });
});

// ---------------------------------------------------------------------------------------------
// Malformed packets
// ---------------------------------------------------------------------------------------------

describe("malformed packets", () => {
  test("garbage framing over WebSocket closes only the sender's connection; the gateway keeps serving", async (t) => {
    const room = roomName("adv-wsgarbage");
    const ctx = await bystanders(gw1Url(), room, t);
    const received0 = await metric(gw1Url(), "chatify_gateway_messages_received_total");
    const legit0 = ctx.legit.length;
    const cases = [
      ["random bytes in a text frame (invalid UTF-8)", (r) => r.send(crypto.randomBytes(64).fill(0xff, 0, 1), { binary: false })],
      ["42 followed by invalid UTF-8", (r) => r.send(Buffer.concat([Buffer.from('42["send_message",{"room":"'), Buffer.from([0xc3, 0x28, 0xff, 0xfe]), Buffer.from('"}]')]), { binary: false })],
      ["4 followed by junk", (r) => r.send("4zzz")],
      ["42 with unterminated JSON", (r) => r.send(`42["send_message",{"room":${JSON.stringify(room)},"message":"x"`)],
      ["42[\"send_message\" followed by 5000 nested [", (r) => r.send(`42["send_message"${"[".repeat(5000)}`)],
      ["an event name that is a number", (r) => r.send(`421[5,{"room":${JSON.stringify(room)},"message":"x"}]`)],
      ["an event name that is an object", (r) => r.send(`421[{"a":1},{"room":${JSON.stringify(room)},"message":"x"}]`)],
      ["an empty event array", (r) => r.send("421[]")],
      ["an event that is not an array", (r) => r.send(`421{"room":${JSON.stringify(room)}}`)],
      ["a non-numeric ack id", (r) => r.send(`42abc["send_message",{"room":${JSON.stringify(room)},"message":"x"}]`)],
      ["a binary frame without a binary packet announcing it", (r) => r.send(Buffer.from("hello"), { binary: true })],
      ["a string packet where the announced attachment should be", (r) => {
        r.send(`451-1["send_message",{"_placeholder":true,"num":0}]`);
        r.send(`421["send_message",{"room":${JSON.stringify(room)},"message":"x"}]`);
      }],
      ["an unknown Engine.IO packet type", (r) => r.send("9hello")],
      ["an empty message", (r) => r.send("")],
    ];
    for (const [what, attack] of cases) {
      const r = await rawAttacker(gw1Url(), room);
      const since = r.msgs.length;
      attack(r);
      const closed = await r.waitClosed(WAIT_MS);
      assert.ok(closed, `${what}: expected the connection to be closed, it is still open; got ${show(r.texts(since))}`);
      assert.deepEqual(r.texts(since).filter((m) => m.startsWith("43")), [], `${what}: no ack`);
    }
    await stillChatting(ctx, "after the garbage frames");
    assertNothingLeaked(ctx);
    assert.equal(await metric(gw1Url(), "chatify_gateway_messages_received_total") - received0, ctx.legit.length - legit0, "only the legitimate messages reached JetStream");
    await assertStoredExactly(ctx.a, room, ctx.legit);
  });

  test("garbage over polling closes only that session (400 or the session closed), never a 5xx", async (t) => {
    const room = roomName("adv-pollgarbage");
    const ctx = await bystanders(gw1Url(), room, t);
    const cases = [
      ["random bytes", crypto.randomBytes(64).fill(0xff, 0, 1), 400],
      ["42 followed by invalid UTF-8", Buffer.concat([Buffer.from('42["send_message",{"room":"'), Buffer.from([0xc3, 0x28, 0xff]), Buffer.from('"}]')]), 400],
      ["4 followed by junk", "4zzz", 200],
      ["42 with unterminated JSON", `42["send_message",{"room":${JSON.stringify(room)}`, 200],
      ["42[\"send_message\" followed by 5000 nested [", `42["send_message"${"[".repeat(5000)}`, 200],
      ["an event name that is a number", `421[5,{"room":${JSON.stringify(room)},"message":"x"}]`, 200],
      ["a valid event then an undecodable one in the same body", `42["typing",{"room":${JSON.stringify(room)},"isTyping":true}]\x1e4zz`, 200],
      ["an invalid base64 binary packet", "b!!!not base64!!!", 400],
    ];
    for (const [what, body, status] of cases) {
      const p = await RawPoll.open(gw1Url());
      assert.match(await p.connectNs(), /^40\{/);
      assert.equal((await p.ack("join_room", JSON.stringify({ username: userName("pg"), room }))).ok, true);
      const res = await p.post(body);
      t.diagnostic(`${what}: POST ${show(res)}`);
      assert.ok(res.status < 500, `${what}: never a server error, got ${show(res)}`);
      assert.equal(res.status, status, `${what}: POST answered ${show(res)}`);
      const state = await p.isClosed();
      assert.equal(state.closed, true, `${what}: the session must be closed (${state.why})`);
    }
    await stillChatting(ctx, "after the garbage bodies");
    assertNothingLeaked(ctx);
    await assertStoredExactly(ctx.a, room, ctx.legit);
  });

  test("well-framed events with bad payloads get invalid_payload over WebSocket and the connection stays up", async (t) => {
    const room = roomName("adv-badpayload");
    const ctx = await bystanders(gw2Url(), room, t);
    const received0 = await metric(gw2Url(), "chatify_gateway_messages_received_total");
    const legit0 = ctx.legit.length;
    const r = await rawAttacker(gw2Url(), room);
    const R = JSON.stringify(room);
    const placeholder = '{"_placeholder":true,"num":0}';
    const cases = [
      ["send_message", deepArray(10_000), [], "a 10,000-deep nested array as the payload"],
      ["send_message", `{"room":${R},"message":${deepArray(10_000)}}`, [], "a 10,000-deep nested array as the message"],
      ["send_message", `{"room":${R},"message":"x","clientId":${"{\"a\":".repeat(5000)}1${"}".repeat(5000)}}`, [], "a 5,000-deep nested object as the clientId"],
      ["join_room", `{"username":"x","room":${deepArray(10_000)}}`, [], "a 10,000-deep nested room"],
      ["get_history", `{"room":${R},"before":${deepArray(10_000)}}`, [], "a 10,000-deep nested before"],
      ["send_message", placeholder, [Buffer.from("binary payload")], "a binary attachment as the payload"],
      ["send_message", `{"room":${placeholder},"message":"x"}`, [Buffer.from(room)], "a binary attachment as the room"],
      ["send_message", `{"room":${R},"message":${placeholder}}`, [Buffer.from("hello")], "a binary attachment as the message"],
      ["join_room", `{"username":${placeholder},"room":${R}}`, [Buffer.from("admin")], "a binary attachment as the username"],
      ["send_message", `{"room":${R},"message":"\\ud800"}`, [], "a lone surrogate escape in the message"],
      ["send_message", `{"room":{"$gt":""},"message":"x"}`, [], "an operator object as the room"],
      ["send_message", `{"room":${R},"message":"x","clientId":5}`, [], "a numeric clientId"],
      ["send_message", `{"room":${R},"message":"x","clientId":${JSON.stringify("c".repeat(129))}}`, [], "a clientId of 129 characters"],
      ["join_room", `{"username":"x","room":${R},"since":"' OR 1=1 --"}`, [], "since that is not a message id"],
      ["join_room", `{"username":"x","room":${R},"since":42}`, [], "a numeric since"],
      ["get_history", `{"room":${R},"before":"' OR '1'='1"}`, [], "before that is not a message id"],
      ["get_history", `{"room":${R},"before":{}}`, [], "an object before"],
      ["typing", `{"room":${R},"isTyping":"true"}`, [], "a string isTyping"],
      ["send_message", "1e999999", [], "a number too large for a float"],
    ];
    for (const [event, payload, binary, what] of cases) {
      const res = await r.ack(event, payload, { binary });
      assert.equal(res?.ok, false, `${what}: ${show(res)}`);
      assert.equal(res.error?.code, "invalid_payload", `${what}: expected invalid_payload, got ${show(res)}`);
      assert.ok(typeof res.error.message === "string" && res.error.message.length > 0 && res.error.message.length < 1000, `${what}: a short reason, got ${show(res)}`);
      assert.equal(r.isOpen, true, `${what}: the connection stays up`);
    }
    // without an ack id, the same refusal comes as an `error` event
    let since = r.msgs.length;
    r.send(`42["send_message",{"room":${R},"message":${deepArray(10_000)}}]`);
    const errEvent = JSON.parse(await r.waitMsg((m) => m.startsWith('42["error"'), { since, what: "error event" }).then((m) => m.slice(2)));
    assert.equal(errEvent[1]?.code, "invalid_payload", show(errEvent));
    since = r.msgs.length;
    r.send(`451-["send_message",${placeholder}]`);
    r.send(Buffer.from("x"), { binary: true });
    const errBin = JSON.parse(await r.waitMsg((m) => m.startsWith('42["error"'), { since, what: "error event for a binary attachment" }).then((m) => m.slice(2)));
    assert.equal(errBin[1]?.code, "invalid_payload", show(errBin));

    // unknown events and other namespaces are ignored: no answer, the connection stays
    since = r.msgs.length;
    r.send(`421["bogus_event",{"room":${R},"message":"x"}]`);
    r.send(`42["__proto__",{"room":${R},"message":"x"}]`);
    r.send(`42/admin,1["send_message",{"room":${R},"message":"x"}]`);
    await sleep(QUIET_MS);
    // (room broadcasts may arrive meanwhile: chatroom_users follows a join by up to 50 ms)
    const broadcast = (m) => m === "2" || /^42\["(chatroom_users|receive_message|typing)",/.test(m);
    assert.deepEqual(r.texts(since).filter((m) => !broadcast(m)), [], "unknown events and namespaces get no answer");
    assert.equal(r.isOpen, true, "unknown events do not close the connection");
    // a CONNECT to a namespace that does not exist is refused, the main connection is untouched
    since = r.msgs.length;
    r.send("40/admin,");
    assert.equal(await r.waitMsg((m) => m.startsWith("44/admin,"), { since, what: "CONNECT_ERROR for /admin" }), '44/admin,{"message":"Invalid namespace"}');

    const ok = await r.ack("send_message", JSON.stringify({ room, message: "legit after bad payloads" }));
    assert.equal(ok?.ok, true, `a valid event after the bad ones: ${show(ok)}`);
    ctx.legit.push(ok.id);
    await waitFor(ctx.b, "receive_message", isMsgId(ok.id));
    await stillChatting(ctx, "after the bad payloads");
    assertNothingLeaked(ctx);
    assert.equal(await metric(gw2Url(), "chatify_gateway_messages_received_total") - received0, ctx.legit.length - legit0, "only the legitimate messages reached JetStream");
    await assertStoredExactly(ctx.a, room, ctx.legit);
  });

  test("well-framed events with bad payloads get invalid_payload over polling and the session stays up", async (t) => {
    const room = roomName("adv-pollpayload");
    const ctx = await bystanders(gw1Url(), room, t);
    const p = await RawPoll.open(gw1Url());
    assert.match(await p.connectNs(), /^40\{/);
    assert.equal((await p.ack("join_room", JSON.stringify({ username: userName("pp"), room }))).ok, true);
    const R = JSON.stringify(room);
    for (const [payload, binaryBase64, what] of [
      [deepArray(10_000), [], "a 10,000-deep nested array"],
      [`{"room":${R},"message":${deepArray(10_000)}}`, [], "a 10,000-deep nested message"],
      ['{"_placeholder":true,"num":0}', [Buffer.from("bin").toString("base64")], "a binary attachment as the payload"],
      [`{"room":${R},"message":{"_placeholder":true,"num":0}}`, [Buffer.from("bin").toString("base64")], "a binary attachment as the message"],
    ]) {
      const res = await p.ack("send_message", payload, { binaryBase64 });
      assert.equal(res?.error?.code, "invalid_payload", `${what}: ${show(res)}`);
    }
    const ok = await p.ack("send_message", JSON.stringify({ room, message: "legit polling after bad payloads" }));
    assert.equal(ok?.ok, true, show(ok));
    ctx.legit.push(ok.id);
    await stillChatting(ctx, "after bad polling payloads");
    assertNothingLeaked(ctx);
    await assertStoredExactly(ctx.a, room, ctx.legit);
  });

  test("the history route refuses a `before` that is not a message id and a room with control characters with 400", async () => {
    for (const [room, query] of [
      [roomName("adv-http"), "?before=%27%20OR%201%3D1%20--"],
      [roomName("adv-http"), "?before=01a2125c-4315-73af-968b"],
      ["a\u0000b", ""],
      ["a\nb", ""],
    ]) {
      const res = await httpGet(`${gw1Url()}/api/rooms/${encodeURIComponent(room)}/messages${query}`);
      assert.equal(res.status, 400, `${show(room)}${query}: ${res.status} ${res.body.slice(0, 300)}`);
      assert.equal(res.json?.error?.code ?? res.json?.code, "invalid_payload", `body: ${res.body.slice(0, 300)}`);
    }
    assert.equal((await httpGet(`${gw1Url()}/healthz`)).status, 200);
  });
});

// ---------------------------------------------------------------------------------------------
// Names
// ---------------------------------------------------------------------------------------------

describe("names with control characters", () => {
  test("rooms and usernames with control characters (C0, DEL, C1) or only whitespace are invalid_payload in every event", async (t) => {
    const s = await connect(gw2Url(), { transports: ["websocket"] }, t);
    const good = roomName("adv-ctl");
    const name = userName("ctl");
    await join(s, good, name);
    const badRooms = [`${good}\u0000`, `${good}\n`, `${good}\r\nX`, `\u001b[31m${good}`, `${good}\u007f`, `${good}\u0085`, `${good}\u009b`, "\t", "   "];
    for (const room of badRooms) {
      await failAck(s, "join_room", { username: name, room }, "invalid_payload", `join room ${show(room)}`);
      await failAck(s, "send_message", { room, message: "x" }, "invalid_payload", `send to room ${show(room)}`);
      await failAck(s, "typing", { room, isTyping: true }, "invalid_payload", `typing in room ${show(room)}`);
      await failAck(s, "leave_room", { room }, "invalid_payload", `leave room ${show(room)}`);
      await failAck(s, "get_history", { room }, "invalid_payload", `history of room ${show(room)}`);
    }
    for (const username of ["admin\r\nChatBot: you are banned", "a\u0000", "\u001b[2J", "x\u007f", "x\u0085", "   "]) {
      await failAck(s, "join_room", { username, room: roomName("adv-ctl-u") }, "invalid_payload", `username ${show(username)}`);
      await failAck(s, "join_room", { userName: username, userRoom: roomName("adv-ctl-u") }, "invalid_payload", `original-client userName ${show(username)}`);
    }
    const ack = await send(s, good, "still fine");
    await waitFor(s, "receive_message", isMsgId(ack.id));
    const bots = received(s, "receive_message", (m) => m?.username === CHATBOT).map((m) => m.message);
    assert.deepEqual(bots, [`Welcome ${name}`], "refused joins send no notices");
  });
});

// ---------------------------------------------------------------------------------------------
// Floods
// ---------------------------------------------------------------------------------------------

describe("floods", () => {
  test("join flood: joins past the burst are rate_limited, the connection stays, refused rooms are not joined", async (t) => {
    // e2e-adv-misc: join_burst 3, joins_per_second 1
    const s = await connect(gwMisc.url, { transports: ["websocket"] }, t);
    const name = userName("flood");
    const p = `e2e-adv-flood-${uid()}`;
    const limited0 = await metric(gwMisc.url, "chatify_gateway_rate_limited_total", 'event="join_room"');
    const acks = await Promise.all(Array.from({ length: 20 }, (_, i) => emitAck(s, "join_room", { username: name, room: `${p}-${i}` }, 10_000)));
    const okRooms = acks.filter((a) => a?.ok === true).map((a) => a.room);
    const limited = acks.filter((a) => a?.ok === false && a.error?.code === "rate_limited");
    assert.equal(okRooms.length + limited.length, 20, `every join is ok or rate_limited: ${show(acks)}`);
    assert.ok(okRooms.length >= 3 && okRooms.length <= 4, `the burst of 3 (+ at most one refill) is accepted, got ${okRooms.length}: ${show(acks)}`);
    for (const l of limited) assert.match(l.error.message, /join/i, show(l));
    assert.equal(s.connected, true, "a join flood does not close the connection");
    assert.equal(await metric(gwMisc.url, "chatify_gateway_rate_limited_total", 'event="join_room"') - limited0, limited.length, "rate_limited joins are counted");
    // a refused join did not make the socket a member
    const refusedRoom = acks.map((a, i) => [a, `${p}-${i}`]).find(([a]) => a?.ok === false)[1];
    await failAck(s, "send_message", { room: refusedRoom, message: "x" }, "not_in_room", "send to a room whose join was rate_limited");
    // re-joining a room it is in answers with history too: it counts against the join rate
    await failAck(s, "join_room", { username: name, room: okRooms[0] }, "rate_limited", "re-join while rate limited");
    await sleep(QUIET_MS);
    const welcomes = received(s, "receive_message", (m) => m?.username === CHATBOT && m.message === `Welcome ${name}`);
    assert.deepEqual(welcomes.map((m) => m.room).sort(), okRooms.slice().sort(), "Welcome only for the joins that were accepted");
    // the bucket refills at 1 a second
    await sleep(1100);
    const later = await okAck(s, "join_room", { username: name, room: refusedRoom }, "a join after the refill");
    assert.equal(later.room, refusedRoom);
    const sent = await send(s, refusedRoom, "member now");
    await waitFor(s, "receive_message", isMsgId(sent.id));
  });

  test("per-address connection cap: the peer, or the last X-Forwarded-For entry from a trusted proxy; a freed place is reusable", async (t) => {
    // e2e-adv-cap: 3 connections per address; the peer 127.0.0.1 is a trusted proxy (default)
    const url = gwCap.url;
    const refusals0 = await metric(url, "chatify_gateway_connection_refusals_total");
    let refusals = 0;
    const ws = (opts = {}) => ({ transports: ["websocket"], ...opts });
    const xff = (v, opts = {}) => ws({ extraHeaders: { "x-forwarded-for": v }, ...opts });
    // The handshake itself is refused (429), before the client can send anything: the client
    // sees its transport fail.
    const refused = async (opts, what) => {
      const err = await connectRefused(url, opts);
      SERVER_TEXTS.push(err.message);
      assert.match(err.message, /websocket error|xhr poll error/, `${what}: ${err.message}`);
      refusals++;
    };

    // Engine.IO sessions that never join the namespace hold places too, until connect_timeout
    // closes them (the default 5 s on this gateway)
    const raw = [];
    for (let i = 0; i < CAP; i++) raw.push(await RawPoll.open(url));
    const handshake = await httpGet(`${url}/socket.io/?EIO=4&transport=polling`);
    assert.equal(handshake.status, 429, `a 4th handshake while 3 raw sessions are open: ${show(handshake)}`);
    assert.equal(handshake.json?.message, "too many connections from your address", show(handshake));
    refusals++;
    await refused(ws(), "a socket.io client while raw sessions hold every place");
    const freedAt = Date.now();
    let plain0;
    for (;;) {
      try {
        plain0 = await connect(url, ws(), t);
        break;
      } catch (e) {
        assert.ok(Date.now() - freedAt < 10_000, `the raw sessions' places were not freed: ${e.message}`);
        refusals++;
        await sleep(250);
      }
    }
    t.diagnostic(`raw sessions freed their places after ${Date.now() - freedAt} ms`);

    // the peer itself (no X-Forwarded-For)
    const plain = [plain0];
    for (let i = 1; i < CAP; i++) plain.push(await connect(url, i === 1 ? { transports: ["polling"], upgrade: false } : ws(), t));
    await refused(ws(), "a 4th connection from 127.0.0.1");
    await refused(xff("not-an-address"), "an unparsable X-Forwarded-For counts as the peer");

    // a trusted proxy's X-Forwarded-For names the client
    const xs = [];
    for (let i = 0; i < CAP; i++) xs.push(await connect(url, xff("10.66.0.1"), t));
    await refused(xff("10.66.0.1"), "a 4th connection from 10.66.0.1");
    await refused(xff("10.99.9.9, 10.66.0.1"), "the last X-Forwarded-For entry is the client (10.66.0.1)");
    const other = await connect(url, xff("10.66.0.1, 10.66.0.2"), t); // counts as 10.66.0.2
    assert.equal(other.connected, true);

    // an untrusted peer's X-Forwarded-For is ignored (127.0.0.2 is not in trusted_proxies)
    const untrusted = [];
    for (let i = 0; i < CAP; i++) untrusted.push(await connect(url, xff(`10.77.0.${i + 1}`, { localAddress: "127.0.0.2" }), t));
    await refused(xff("10.77.0.9", { localAddress: "127.0.0.2" }), "X-Forwarded-For from an untrusted peer (127.0.0.2) cannot dodge the cap");

    // everyone who got in works, and the refusals did not disturb them
    const room = roomName("adv-cap");
    const members = [plain[0], plain[1], xs[0], xs[2], other, untrusted[0]];
    for (const [i, s] of members.entries()) await join(s, room, userName(`cap${i}`));
    const ack = await send(xs[2], room, "after the refusals");
    for (const s of members) await waitFor(s, "receive_message", isMsgId(ack.id));
    assert.ok([...plain, ...xs, other, ...untrusted].every((s) => s.connected), "no accepted connection was dropped");

    // a disconnect frees its place (the server may take a moment to drop the session)
    await disconnect(xs[1]);
    await disconnect(plain[2]);
    for (const [opts, what] of [[xff("10.66.0.1"), "10.66.0.1"], [ws(), "127.0.0.1"]]) {
      const deadline = Date.now() + WAIT_MS;
      let s;
      for (;;) {
        try {
          s = await connect(url, opts, t);
          break;
        } catch (e) {
          if (Date.now() > deadline) throw new Error(`${what}: the freed place was not reusable within ${WAIT_MS} ms: ${e.message}`);
          if (!/websocket error|xhr poll error/.test(e.message)) throw e;
          refusals++;
          await sleep(100);
        }
      }
      assert.equal(s.connected, true);
    }
    await refused(xff("10.66.0.1"), "10.66.0.1 is full again");
    assert.equal(await metric(url, "chatify_gateway_connection_refusals_total") - refusals0, refusals, "refusals are counted");
  });

  test(`a raw Engine.IO session that never sends CONNECT is closed after connect_timeout (${CONNECT_TIMEOUT_MS} ms); one that does stays`, async (t) => {
    const url = gwMisc.url;
    const bystander = await connect(url, { transports: ["websocket"] }, t);
    const idleWs = await RawWs.open(url);
    const lateWs = await RawWs.open(url);
    const idlePoll = await RawPoll.open(url);
    // the late one joins the namespace in time
    await sleep(CONNECT_TIMEOUT_MS / 2);
    assert.match(await lateWs.connectNs(), /^40\{/);

    // polling: GET until the CLOSE packet or an unknown-session answer
    const pollClosedAt = (async () => {
      const deadline = idlePoll.openedAt + CONNECT_TIMEOUT_MS + 3000;
      while (Date.now() < deadline) {
        const res = await idlePoll.get(Math.max(100, deadline - Date.now()));
        if (res.status === 400 || res.packets?.includes("1")) return Date.now();
        if (res.error) return null;
      }
      return null;
    })();
    const wsClosed = await idleWs.waitClosed(CONNECT_TIMEOUT_MS + 3000);
    assert.ok(wsClosed, `the idle websocket was not closed within ${CONNECT_TIMEOUT_MS + 3000} ms`);
    const wsAfter = wsClosed.at - idleWs.openedAt;
    t.diagnostic(`idle websocket closed after ${wsAfter} ms`);
    assert.ok(wsAfter >= CONNECT_TIMEOUT_MS - 200 && wsAfter <= CONNECT_TIMEOUT_MS + 1000, `idle websocket closed after ${wsAfter} ms, expected about ${CONNECT_TIMEOUT_MS}`);
    const pollAt = await pollClosedAt;
    assert.ok(pollAt, "the idle polling session was not closed");
    const pollAfter = pollAt - idlePoll.openedAt;
    t.diagnostic(`idle polling session closed after ${pollAfter} ms`);
    assert.ok(pollAfter >= CONNECT_TIMEOUT_MS - 200 && pollAfter <= CONNECT_TIMEOUT_MS + 1000, `idle polling session closed after ${pollAfter} ms, expected about ${CONNECT_TIMEOUT_MS}`);

    await sleep(CONNECT_TIMEOUT_MS);
    assert.equal(lateWs.isOpen, true, "a session that sent CONNECT in time stays open");
    const room = roomName("adv-ctimeout");
    await lateWs.join(room, userName("late"));
    assert.equal(bystander.connected, true, "a connected client is never timed out");
    await join(bystander, room, userName("by"));
  });
});

// ---------------------------------------------------------------------------------------------
// Origins (the handshake and the upgrade are covered by transport.test.mjs)
// ---------------------------------------------------------------------------------------------

describe("origins", () => {
  test("every request of an existing polling session is Origin-checked: a foreign POST is 403 and never processed; Origin: null is refused", async () => {
    const evil = { origin: "http://evil.example.com" };
    const p = await RawPoll.open(gw1Url());
    assert.match(await p.connectNs(), /^40\{/);
    const room = roomName("adv-origin");
    // a cross-site page that learned the sid posts an event (text/plain needs no CORS preflight)
    const forged = await httpRequest("POST", p.url, `4277["join_room",${JSON.stringify({ username: "forged", room })}]`, evil);
    assert.equal(forged.status, 403, `foreign-origin POST: ${show(forged)}`);
    const forgedGet = await httpRequest("GET", p.url, undefined, evil);
    assert.equal(forgedGet.status, 403, `foreign-origin GET: ${show(forgedGet)}`);
    // the session is untouched and the forged event was never handled
    const res = await p.ack("get_history", JSON.stringify({ room }));
    assert.deepEqual(res, { ok: true, messages: [], hasMore: false }, show(res));
    assert.deepEqual(p.packets.filter((x) => x.startsWith("4377[")), [], "no answer to the forged join");
    const s = await connect(gw1Url(), {}, undefined);
    const joined = await join(s, room, userName("o"));
    assert.deepEqual(joined.users.map((u) => u.username), [joined.users[0].username], `only the real member is in the room: ${show(joined.users)}`);
    assert.notEqual(joined.users[0].username, "forged");
    await disconnect(s);
    for (const origin of ["null", "http://localhost:3000.evil.example.com", "http://localhost:3001", "https://localhost:3000"]) {
      const hs = await httpRequest("GET", `${gw1Url()}/socket.io/?EIO=4&transport=polling`, undefined, { origin });
      assert.equal(hs.status, 403, `Origin ${origin}: ${show(hs)}`);
    }
  });
});

// ---------------------------------------------------------------------------------------------
// Auth
// ---------------------------------------------------------------------------------------------

const nowS = () => Math.floor(Date.now() / 1000);
function token(claims = {}, { secret = JWT_SECRET, algorithm = "HS256" } = {}) {
  return jwt.sign({ sub: `user-${uid()}`, name: `Name ${uid()}`, exp: nowS() + 600, ...claims }, secret, { algorithm });
}

describe("auth", () => {
  test("clientId retries are scoped per user (sub): two users with the same name and clientId both get their message through", async (t) => {
    const room = roomName("adv-dedup");
    const sameName = `Same ${uid()}`;
    const ta = token({ sub: `a-${uid()}`, name: sameName });
    const tb = token({ sub: `b-${uid()}`, name: sameName });
    const a = await connect(gwAuth.url, { auth: { token: ta }, transports: ["websocket"] }, t);
    const b = await connect(gwAuth.url, { auth: { token: tb } }, t);
    const watcher = await connect(gw1Url(), {}, t); // an anonymous member on a main gateway
    await okAck(a, "join_room", { room });
    await okAck(b, "join_room", { room, username: "ignored" });
    await join(watcher, room, userName("w"));
    const clientId = `cid-${uid()}`;
    const first = await send(a, room, "same text", { clientId });
    const second = await send(b, room, "same text", { clientId });
    assert.notEqual(second.id, first.id, "another user's message with the same clientId is a new message");
    for (const s of [a, b, watcher]) {
      await waitFor(s, "receive_message", isMsgId(first.id), { what: "user a's message" });
      await waitFor(s, "receive_message", isMsgId(second.id), { what: "user b's message" });
    }
    // the same user retrying gets its first id, and nothing is delivered again
    const retryA = await send(a, room, "same text", { clientId });
    assert.equal(retryA.id, first.id, "user a's retry carries user a's first id");
    const retryB = await send(b, room, "same text", { clientId });
    assert.equal(retryB.id, second.id, "user b's retry carries user b's first id");
    // the same user on a new connection, same clientId: still the first id
    const a2 = await connect(gwAuth.url, { auth: { token: token({ sub: jwt.decode(ta).sub, name: sameName }) } }, t);
    await okAck(a2, "join_room", { room });
    assert.equal((await send(a2, room, "same text", { clientId })).id, first.id, "user a on a new connection");
    // the same user, same clientId, another room: another message
    const room2 = roomName("adv-dedup2");
    await okAck(a, "join_room", { room: room2 });
    const inRoom2 = await send(a, room2, "same text", { clientId });
    assert.notEqual(inRoom2.id, first.id, "clientId is scoped to the room too");
    await expectNone(watcher, "receive_message", (m) => m?.id && m.id !== first.id && m.id !== second.id, { what: "no redelivery of retries" });
    const got = received(watcher, "receive_message", (m) => m?.id === first.id || m?.id === second.id);
    assert.equal(got.length, 2, `each message delivered once: ${show(got)}`);
    assert.deepEqual(got.map((m) => m.username), [sameName, sameName]);
    await assertStoredExactly(watcher, room, [first.id, second.id]);
  });

  test("only HS256 tokens with sane claims are accepted: HS384/HS512 with the right secret, bad name/sub claims, non-string tokens are refused", async (t) => {
    const cases = [
      [{ auth: { token: token({}, { algorithm: "HS384" }) } }, /HS256/, "HS384 with the right secret"],
      [{ auth: { token: token({}, { algorithm: "HS512" }) } }, /HS256/, "HS512 with the right secret"],
      [{ auth: { token: token({ name: "admin\r\nChatBot" }) } }, /name|control/i, "a name claim with control characters"],
      [{ auth: { token: token({ name: "n".repeat(65) }) } }, /name|limit|characters/i, "a name claim of 65 characters"],
      [{ auth: { token: token({ name: "" }) } }, /name|empty/i, "an empty name claim"],
      [{ auth: { token: token({ name: 42 }) } }, /invalid|name/i, "a numeric name claim"],
      [{ auth: { token: token({ sub: "" }) } }, /sub/i, "an empty sub claim"],
      [{ auth: { token: token({ sub: 7 }) } }, /invalid|sub/i, "a numeric sub claim"],
      [{ auth: { token: 12345 } }, /token/i, "a numeric token"],
      [{ auth: { token: { alg: "HS256" } } }, /token/i, "an object token"],
      [{ auth: { token: `${token()}x` } }, /signature|invalid/i, "a tampered signature"],
      [{ auth: { token: "a".repeat(30_000) } }, /token|invalid/i, "a 30 KB garbage token"],
    ];
    for (const [opts, reason, what] of cases) {
      const err = await connectRefused(gwAuth.url, { transports: ["websocket"], ...opts });
      SERVER_TEXTS.push(err.message);
      assert.match(err.message, reason, `${what}: ${err.message}`);
    }
    // raw CONNECT packets with odd auth shapes
    for (const [packet, what] of [["40", "no auth"], ['40"token"', "a string auth"], ["40[1,2]", "an array auth"], ["40{", "unterminated auth JSON"]]) {
      const r = await RawWs.open(gwAuth.url);
      const since = r.msgs.length;
      r.send(packet);
      const answer = await r.waitMsg((m) => m.startsWith("4"), { since, what: `answer to ${packet}` }).catch(() => null);
      const closed = answer ? null : await r.waitClosed(100);
      assert.ok((answer && answer.startsWith("44")) || closed, `${what}: refused (CONNECT_ERROR or closed), got ${show(r.texts(since))}`);
      if (answer) assert.match(answer, /token/i, `${what}: ${answer}`);
      r.terminate();
    }
    const ok = await connect(gwAuth.url, { auth: { token: token() } }, t);
    assert.equal(ok.connected, true, "a valid token still connects");
  });
});

// ---------------------------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------------------------

describe("secrets", () => {
  test("the JWT secret, HarperDB and NATS passwords never appear in logs (debug/trace), /metrics or error messages", { timeout: 60_000 }, async (t) => {
    const runDir = ENV.runDir;
    const hdbPassword = ENV.vars.CHATIFY_HARPERDB__PASSWORD;
    const hdbUser = ENV.vars.CHATIFY_HARPERDB__USERNAME || "chatify";
    assert.ok(runDir && hdbPassword, "CHATIFY_RUN_DIR with an env file holding CHATIFY_HARPERDB__PASSWORD is needed");

    // a persister logging at trace level, on the shared HarperDB with the real password
    const persister = await startPersister("e2e-adv-persister-trace", {
      CHATIFY_LOG__LEVEL: "trace",
      ...(process.env.RUST_LOG ? { RUST_LOG: "trace" } : {}),
    });
    try {
      // exercise the auth gateway: good and bad tokens, events, errors, history
      const room = roomName("adv-secrets");
      const good = await connect(gwAuth.url, { auth: { token: token() } }, t);
      await okAck(good, "join_room", { room });
      const acks = [];
      for (let i = 0; i < 5; i++) acks.push(await send(good, room, `secret test ${i}`));
      for (const [payload, code] of [[{ room, message: "" }, "invalid_payload"], [{ room: roomName("x"), message: "x" }, "not_in_room"], [{ room, message: "x".repeat(5000) }, "too_large"]]) {
        const res = await emitAck(good, "send_message", payload);
        assert.equal(res?.error?.code, code);
        SERVER_TEXTS.push(JSON.stringify(res));
      }
      for (const opts of [
        {},
        { auth: { token: token({}, { secret: "wrong-key" }) } },
        { auth: { token: token({ exp: nowS() - 3600 }) } },
        { auth: { token: token({}, { algorithm: "HS512" }) } },
        { auth: { token: `${Buffer.from('{"alg":"none"}').toString("base64url")}.${Buffer.from('{"sub":"x"}').toString("base64url")}.` } },
      ]) {
        SERVER_TEXTS.push((await connectRefused(gwAuth.url, opts)).message);
      }
      SERVER_TEXTS.push(...(await Promise.all([
        httpGet(`${gwAuth.url}/api/rooms/${encodeURIComponent(room)}/messages?limit=0`),
        httpGet(`${gwAuth.url}/api/rooms/${encodeURIComponent(room)}/messages`),
      ])).map((r) => r.body));
      // messages flow through the persisters (the trace one among them) and history
      const main = await connect(gw1Url(), {}, t);
      await join(main, room, userName("s"));
      for (let i = 0; i < 5; i++) acks.push(await send(main, room, `secret test main ${i}`));
      await waitForStored(main, room, acks.map((a) => a.id));
      for (let i = 0; i < 4; i++) SERVER_TEXTS.push(JSON.stringify(await emitAck(main, "get_history", { room, limit: 100 })));
    } finally {
      await persister.proc.stop("SIGTERM");
    }
    await gwAuth.proc.stop("SIGTERM"); // its shutdown lines are checked too; the last test using it

    const secrets = [
      ["the JWT secret", JWT_SECRET],
      ["the bogus HarperDB password", BOGUS_HDB_PASSWORD],
      ["the HarperDB password", hdbPassword],
      ["the HarperDB admin password", ENV.vars.CHATIFY_HDB_ADMIN_PASSWORD],
      ["the NATS password of the gateways", ENV.vars.CHATIFY_NATS_GATEWAY_PASSWORD],
      ["the NATS password of the persisters", ENV.vars.CHATIFY_NATS_PERSISTER_PASSWORD],
    ].filter(([, value]) => value);
    const forms = (value) => [
      value,
      Buffer.from(value).toString("base64"),
      Buffer.from(`${hdbUser}:${value}`).toString("base64"), // an HTTP Basic header
      encodeURIComponent(value),
    ];
    const leaks = [];
    const check = (where, text) => {
      for (const [what, value] of secrets) {
        for (const form of forms(value)) if (text.includes(form)) leaks.push(`${what} (${form === value ? "as is" : `as ${form.slice(0, 12)}...`}) in ${where}`);
      }
    };

    // logs: the extra processes of this file and every Chatify process of the shared system
    const logs = [gwMisc.proc.logPath, gwCap.proc.logPath, gwAuth.proc.logPath, persister.proc.logPath];
    for (const f of fs.readdirSync(path.join(runDir, "logs"))) if (/^(gateway|persister)/.test(f)) logs.push(path.join(runDir, "logs", f));
    for (const f of logs) {
      const text = fs.readFileSync(f, "utf8");
      t.diagnostic(`${path.basename(f)}: ${text.length} bytes checked`);
      check(f, text);
    }
    const authLog = fs.readFileSync(gwAuth.proc.logPath, "utf8");
    assert.ok(/TRACE|"level":"TRACE"/.test(authLog), "the auth gateway logged at trace level (else this check proves little)");
    assert.ok(/TRACE|"level":"TRACE"/.test(fs.readFileSync(persister.proc.logPath, "utf8")), "the extra persister logged at trace level");

    // /metrics of every live process
    for (const url of [gwMisc.url, gwCap.url, gw1Url(), gw2Url(), ENV.vars.CHATIFY_PERSISTER_URL].filter(Boolean)) {
      const res = await httpGet(`${url.replace(/\/+$/, "")}/metrics`);
      assert.equal(res.status, 200, `${url}/metrics`);
      check(`${url}/metrics`, res.body);
    }
    // everything the servers told our clients: acks, error events, connect_error reasons, HTTP bodies
    check("answers to clients", SERVER_TEXTS.join("\n"));
    assert.deepEqual(leaks, [], "secrets leaked");

    // not a secret, but a credential: packet-logging libraries stay at info unless named
    const tokenLogged = /eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}/.test(authLog);
    assert.equal(tokenLogged, false, "client JWTs appear in the trace-level gateway log");
  });
});
