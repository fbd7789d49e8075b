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
let gwB; // a second one with the same secret
let gwAud; // with a secret and an audience

before(async () => {
  [gw, gwB, gwAud] = await Promise.all([
    startGateway("e2e-auth", { CHATIFY_AUTH__JWT_SECRET: SECRET }),
    startGateway("e2e-auth-b", { CHATIFY_AUTH__JWT_SECRET: SECRET }),
    startGateway("e2e-auth-aud", { CHATIFY_AUTH__JWT_SECRET: SECRET, CHATIFY_AUTH__JWT_AUDIENCE: AUDIENCE }),
  ]);
});

after(async () => {
  closeAll();
  await Promise.all([gw?.proc.stop("SIGTERM"), gwB?.proc.stop("SIGTERM"), gwAud?.proc.stop("SIGTERM")]);
});

/** Resolves when the socket disconnects (with the reason), or rejects after `ms`. */
function disconnected(socket, ms) {
  return new Promise((resolve, reject) => {
    if (!socket.connected) return resolve("already");
    const timer = setTimeout(() => reject(new Error(`still connected after ${ms} ms`)), ms);
    socket.once("disconnect", (reason) => {
      clearTimeout(timer);
      resolve(reason);
    });
  });
}

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

  test("at exp the connection gets error unauthorized and is disconnected; its rooms hear it left and it hears nothing more", { timeout: 30_000 }, async (t) => {
    const room = roomName("auth-exp");
    const exp = nowS() + 3;
    const token = makeToken({ exp });
    const a = await connect(gw.url, authed(token), t);
    const gone = disconnected(a, 10_000);
    const watcher = await connect(gw1Url(), {}, t);
    await join(watcher, room, userName("watch"));
    await okAck(a, "join_room", { room });
    const before = await send(a, room, "before expiry");
    await waitFor(watcher, "receive_message", isMsgId(before.id));
    const error = await waitFor(a, "error", (e) => e?.code === "unauthorized", { timeoutMs: 10_000 });
    assert.match(error.message, /expired/, show(error));
    assert.equal(await gone, "io server disconnect", "disconnected by the server");
    assert.ok(Date.now() >= exp * 1000 - 1000, "not before exp");
    await waitFor(watcher, "receive_message", isChatBot(room, `${nameOf(token)} has left the chat room`));
    await waitFor(watcher, "chatroom_users", (users) => Array.isArray(users) && !users.some((u) => u.username === nameOf(token)));
    const after = await send(watcher, room, "after expiry");
    await sleep(QUIET_MS);
    assert.deepEqual(received(a, "receive_message", isMsgId(after.id)), [], "an expired connection hears nothing");
  });

  test("refresh_token with the same user's new token keeps the connection past the old exp; another user's or a bad token is unauthorized", { timeout: 30_000 }, async (t) => {
    const room = roomName("auth-refresh");
    const sub = `user-${uid()}`;
    const exp = nowS() + 3;
    const a = await connect(gw.url, authed(makeToken({ sub, exp })), t);
    await okAck(a, "join_room", { room });
    await failAck(a, "refresh_token", { token: makeToken({ exp: nowS() + 600 }) }, "unauthorized", "another user's token");
    await failAck(a, "refresh_token", { token: "not.a.token" }, "unauthorized", "a garbage token");
    await failAck(a, "refresh_token", { token: makeToken({ sub, exp: nowS() + 600 }, { secret: "wrong" }) }, "unauthorized", "a token signed with another key");
    await failAck(a, "refresh_token", { token: 5 }, "invalid_payload", "a non-string token");
    const fresh = nowS() + 600;
    const ack = await okAck(a, "refresh_token", { token: makeToken({ sub, exp: fresh }) });
    assert.equal(ack.expiresAt, fresh, show(ack));
    await sleep(exp * 1000 + 2500 - Date.now());
    assert.equal(a.connected, true, "still connected after the first token's exp");
    assert.deepEqual(received(a, "error"), [], "no error event");
    const sent = await send(a, room, "after the first exp");
    await waitFor(a, "receive_message", isMsgId(sent.id));
  });

  test("a token before its nbf is refused at connect", async () => {
    const err = await connectRefused(gw.url, authed(makeToken({ nbf: nowS() + 600 })));
    assert.match(err.message, /not valid yet|nbf/, err.message);
    const ok = await connect(gw.url, authed(makeToken({ nbf: nowS() - 10 })));
    assert.equal(ok.connected, true);
    ok.disconnect();
  });

  test("a user with connections on two gateways is listed once by user id, joins once and leaves with the last connection; messages carry userId", { timeout: 30_000 }, async (t) => {
    const room = roomName("auth-multi");
    const sub = `user-${uid()}`;
    const name = `Multi ${uid()}`;
    const watcher = await connect(gw1Url(), {}, t);
    const watcherName = userName("watch");
    await join(watcher, room, watcherName);
    const a1 = await connect(gw.url, authed(makeToken({ sub, name })), t);
    const a2 = await connect(gwB.url, authed(makeToken({ sub, name }), { transports: ["websocket"] }), t);
    await okAck(a1, "join_room", { room });
    await waitFor(watcher, "receive_message", isChatBot(room, `${name} has joined the chat room`));
    const ack2 = await okAck(a2, "join_room", { room });
    assertUsers(ack2.users, [{ username: watcherName }, { username: name }]);
    assert.equal(ack2.count, 2, show(ack2));
    assert.equal(ack2.users.find((u) => u.username === name)?.id, sub, "the user's id is the token's sub");
    await sleep(QUIET_MS);
    const joins = received(watcher, "receive_message", isChatBot(room, `${name} has joined the chat room`));
    assert.equal(joins.length, 1, "one join notice for two connections");
    const lists = received(watcher, "chatroom_users");
    assertUsers(lists.at(-1), [{ username: watcherName }, { username: name }], "listed once");

    const sent = await send(a2, room, "from the second connection");
    const got = await waitFor(watcher, "receive_message", isMsgId(sent.id));
    assert.equal(got.userId, sub, show(got));
    const page = await okAck(watcher, "get_history", { room });
    assert.ok(page.messages.some((m) => m.id === sent.id), "stored");

    const mark = watcher.rec.events.length;
    a1.disconnect();
    await sleep(1000);
    assert.deepEqual(received(watcher, "receive_message", isChatBot(room, `${name} has left the chat room`), mark), [], "still in the room through the other connection");
    await okAck(a2, "leave_room", { room });
    await waitFor(watcher, "receive_message", isChatBot(room, `${name} has left the chat room`), { since: mark });
    await waitFor(watcher, "chatroom_users", (users) => Array.isArray(users) && users.length === 1, { since: mark });
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
