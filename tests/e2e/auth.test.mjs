// JWT auth: this file starts its own gateways with a JWT secret (and one with an audience), connected
// to the same NATS as the running system, and stops them at the end.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import crypto from "node:crypto";
import jwt from "jsonwebtoken";
import {
  QUIET_MS, assertUsers, closeAll, connect, connectRefused, emitAck, failAck, gw1Url, isChatBot, isMsgId, join, me,
  msgFields, okAck, received, roomName, send, sameUsers, show, sleep, startGateway, uid, userName, waitFor,
} from "./helpers.mjs";

const SECRET = crypto.randomBytes(32).toString("hex");
const AUDIENCE = "chatify-e2e";
let gw; // { url, proc } with a secret
let gwAud; // with a secret and an audience

before(async () => {
  [gw, gwAud] = await Promise.all([
    startGateway("e2e-auth", { CHATIFY_AUTH__JWT_SECRET: SECRET }),
    startGateway("e2e-auth-aud", { CHATIFY_AUTH__JWT_SECRET: SECRET, CHATIFY_AUTH__JWT_AUDIENCE: AUDIENCE }),
  ]);
});

after(async () => {
  closeAll();
  await Promise.all([gw?.proc.stop("SIGTERM"), gwAud?.proc.stop("SIGTERM")]);
});

const nowS = () => Math.floor(Date.now() / 1000);
const b64url = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
function makeToken(claims = {}, { secret = SECRET, algorithm = "HS256" } = {}) {
  return jwt.sign({ sub: `user-${uid()}`, name: `Name ${uid()}`, exp: nowS() + 600, ...claims }, secret, { algorithm, noTimestamp: false });
}
const nameOf = (token) => jwt.decode(token).name;
const authed = (token, opts = {}) => ({ auth: { token }, ...opts });

describe("handshake refused without a valid token", () => {
  test("missing token", async () => {
    for (const opts of [{}, { auth: {} }, { auth: { token: "" } }]) {
      const err = await connectRefused(gw.url, opts);
      assert.ok(err.message.trim().length > 0, `non-empty reason for ${show(opts)}`);
      assert.match(err.message, /token/i, `reason should mention the token: ${err.message}`);
    }
  });

  test("bad signature", async () => {
    const err = await connectRefused(gw.url, authed(makeToken({}, { secret: "not-the-secret" })));
    assert.ok(err.message.trim().length > 0);
    assert.match(err.message, /signature|invalid|token/i, err.message);
  });

  test("expired token", async () => {
    const err = await connectRefused(gw.url, authed(makeToken({ exp: nowS() - 3600 })));
    assert.match(err.message, /expired/i, err.message);
  });

  test("alg: none", async () => {
    const token = `${b64url({ alg: "none", typ: "JWT" })}.${b64url({ sub: "x", name: "Mallory", exp: nowS() + 600 })}.`;
    const err = await connectRefused(gw.url, authed(token));
    assert.ok(err.message.trim().length > 0);
    assert.match(err.message, /token|alg|invalid/i, err.message);
  });

  test("garbage token, token without exp", async () => {
    const garbage = await connectRefused(gw.url, authed("not.a.jwt"));
    assert.match(garbage.message, /token|invalid/i, garbage.message);
    const noExp = jwt.sign({ sub: "x", name: "NoExp" }, SECRET, { algorithm: "HS256" });
    const err = await connectRefused(gw.url, authed(noExp));
    assert.ok(err.message.trim().length > 0, "a token that never expires is refused");
  });

  test("the same checks on websocket-only", async () => {
    const err = await connectRefused(gw.url, { transports: ["websocket"] });
    assert.match(err.message, /token/i, err.message);
    const expired = await connectRefused(gw.url, authed(makeToken({ exp: nowS() - 3600 }), { transports: ["websocket"] }));
    assert.match(expired.message, /expired/i, expired.message);
  });
});

describe("with a valid token", () => {
  test("the username is the token's name, whatever the client claims; shown across gateways", async (t) => {
    const room = roomName("auth");
    const ta = makeToken({ name: `Alice ${uid()}` });
    const tb = makeToken({ name: `Bob ${uid()}` });
    const a = await connect(gw.url, authed(ta), t);
    const b = await connect(gw.url, authed(tb, { transports: ["websocket"] }), t);
    const ackA = await okAck(a, "join_room", { room }, "join with { room } only");
    assertUsers(ackA.users, [me(a, nameOf(ta))]);
    await waitFor(a, "receive_message", isChatBot(room, `Welcome ${nameOf(ta)}`));
    const ackB = await okAck(b, "join_room", { room, username: "spoofed-admin" }, "join with a claimed username");
    assertUsers(ackB.users, [me(a, nameOf(ta)), me(b, nameOf(tb))]);
    await waitFor(a, "receive_message", isChatBot(room, `${nameOf(tb)} has joined the chat room`));
    await waitFor(b, "receive_message", isChatBot(room, `Welcome ${nameOf(tb)}`));
    await waitFor(a, "chatroom_users", sameUsers([me(a, nameOf(ta)), me(b, nameOf(tb))]));

    // an anonymous client on a main gateway in the same room sees the token names
    const c = await connect(gw1Url(), {}, t);
    const nc = userName("anon");
    const ackC = await join(c, room, nc);
    assertUsers(ackC.users, [me(a, nameOf(ta)), me(b, nameOf(tb)), me(c, nc)], "users across gateways");
    const sent = await send(b, room, "hello from bob", {});
    for (const s of [a, b, c]) {
      assert.deepEqual(msgFields(await waitFor(s, "receive_message", isMsgId(sent.id))), {
        id: sent.id, room, username: nameOf(tb), message: "hello from bob", createdTime: sent.createdTime,
      });
    }
    await okAck(b, "typing", { room, isTyping: true });
    assert.deepEqual(await waitFor(c, "typing"), { room, username: nameOf(tb), isTyping: true });
    await sleep(QUIET_MS);
    const spoofed = [...received(a, "receive_message"), ...received(c, "receive_message"), ...received(c, "chatroom_users").flat()]
      .filter((m) => m?.username === "spoofed-admin" || String(m?.message).includes("spoofed-admin"));
    assert.deepEqual(spoofed, [], "the client-supplied username never shows");
  });

  test("an event after the token's exp gets unauthorized (socket stays connected, nothing is sent)", async (t) => {
    const room = roomName("auth-exp");
    const exp = nowS() + 3;
    const token = makeToken({ exp });
    const a = await connect(gw.url, authed(token), t);
    await okAck(a, "join_room", { room });
    const before = await send(a, room, "before expiry");
    await waitFor(a, "receive_message", isMsgId(before.id));
    const wait = exp * 1000 + 800 - Date.now();
    if (wait > 0) await sleep(wait);
    await failAck(a, "send_message", { room, message: "after expiry" }, "unauthorized", "send after exp");
    await failAck(a, "typing", { room, isTyping: true }, "unauthorized", "typing after exp");
    await failAck(a, "join_room", { room: roomName("auth-exp2") }, "unauthorized", "join after exp");
    await sleep(QUIET_MS);
    assert.deepEqual(received(a, "receive_message", (m) => m?.message === "after expiry"), [], "nothing sent after expiry");
  });
});

describe("audience", () => {
  test("with an audience configured: matching aud accepted; wrong aud refused", async (t) => {
    const good = await connect(gwAud.url, authed(makeToken({ aud: AUDIENCE })), t);
    assert.equal(good.connected, true);
    const wrong = await connectRefused(gwAud.url, authed(makeToken({ aud: "someone-else" })));
    assert.ok(wrong.message.trim().length > 0, "wrong aud refused with a reason");
    assert.match(wrong.message, /aud|audience|token/i, wrong.message);
    const res = await emitAck(good, "join_room", { room: roomName("aud") });
    assert.equal(res?.ok, true, show(res));
  });

  test("with an audience configured: a token without aud is refused", async () => {
    let err;
    try {
      err = await connectRefused(gwAud.url, authed(makeToken({})));
    } catch (e) {
      assert.fail(`a token without an aud claim must be refused when CHATIFY_AUTH__JWT_AUDIENCE is set: ${e.message}`);
    }
    assert.ok(err.message.trim().length > 0, "missing aud refused with a reason");
  });
});
