// Room access: the `token` and `webhook` policies, checked the same way on every path into a
// room (join_room, send_message, typing, get_history, the HTTP history route), and direct
// messages: a reserved room only its two users may use, with `dm` notifications to a user's
// connections that are not in the room, across gateways.
//
// This file starts, on the shared NATS (logs in $TMPDIR/chatify-e2e-logs/):
//   e2e-access-token-a, e2e-access-token-b   auth, policy token
//   e2e-access-hook                           auth, policy webhook (an endpoint this file serves)
// and uses the shared system's gateways (no auth) for what anonymous clients may do.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import crypto from "node:crypto";
import http from "node:http";
import jwt from "jsonwebtoken";
import {
  QUIET_MS, closeAll, connect, failAck, freePort, gw1Url, httpGet, isMsgId, okAck, received, roomName, send, show, sleep,
  startGateway, uid, userName, waitFor,
} from "./helpers.mjs";

const SECRET = crypto.randomBytes(32).toString("hex");
let tokenA;
let tokenB;
let hook;

/** The access webhook: allows rooms starting with "ok-", denies the others; counts its calls. */
const webhook = { calls: [], mode: "normal", server: null, url: "" };

before(async () => {
  const port = await freePort();
  webhook.server = http.createServer((req, res) => {
    let body = "";
    req.on("data", (c) => (body += c));
    req.on("end", () => {
      const question = JSON.parse(body || "{}");
      webhook.calls.push({ ...question, authorization: req.headers.authorization });
      if (webhook.mode === "failing") {
        res.writeHead(500).end();
      } else if (webhook.mode === "silent") {
        // never answers
      } else {
        res.writeHead(String(question.room).startsWith("ok-") ? 204 : 403).end();
      }
    });
  });
  await new Promise((r) => webhook.server.listen(port, "127.0.0.1", r));
  webhook.url = `http://127.0.0.1:${port}/access`;
  const auth = { CHATIFY_AUTH__JWT_SECRET: SECRET };
  [tokenA, tokenB, hook] = await Promise.all([
    startGateway("e2e-access-token-a", { ...auth, CHATIFY_ACCESS__POLICY: "token" }),
    startGateway("e2e-access-token-b", { ...auth, CHATIFY_ACCESS__POLICY: "token" }),
    startGateway("e2e-access-hook", {
      ...auth,
      CHATIFY_ACCESS__POLICY: "webhook",
      CHATIFY_ACCESS__WEBHOOK_URL: webhook.url,
      CHATIFY_ACCESS__WEBHOOK_SECRET: "hook-secret",
      CHATIFY_ACCESS__WEBHOOK_TIMEOUT_MS: "500",
      CHATIFY_ACCESS__WEBHOOK_CACHE_MS: "60000",
    }),
  ]);
});

after(async () => {
  closeAll();
  webhook.server?.closeAllConnections?.();
  webhook.server?.close();
  await Promise.all([tokenA?.proc.stop("SIGTERM"), tokenB?.proc.stop("SIGTERM"), hook?.proc.stop("SIGTERM")]);
});

const nowS = () => Math.floor(Date.now() / 1000);
function makeToken(claims = {}) {
  return jwt.sign({ sub: `user-${uid()}`, name: `Name ${uid()}`, exp: nowS() + 600, ...claims }, SECRET, { algorithm: "HS256" });
}
const authed = (token, opts = {}) => ({ auth: { token }, ...opts });
const historyUrl = (gw, room) => `${gw.url}/api/rooms/${encodeURIComponent(room)}/messages`;

describe("policy token: the rooms claim", () => {
  test("names and prefixes in the claim are usable; every path into another room is forbidden; a refresh changes the grants", async (t) => {
    const team = `team-${uid()}/`;
    const general = roomName("general");
    const other = roomName("other");
    const sub = `user-${uid()}`;
    const token = makeToken({ sub, rooms: [general, `${team}*`] });
    const s = await connect(tokenA.url, authed(token), t);
    await okAck(s, "join_room", { room: general });
    await okAck(s, "join_room", { room: `${team}design` });
    await okAck(s, "typing", { room: general, isTyping: true });
    await okAck(s, "send_message", { room: `${team}design`, message: "in the team" });
    await okAck(s, "get_history", { room: general });
    await failAck(s, "join_room", { room: other }, "forbidden", "a room not in the claim");
    await failAck(s, "join_room", { room: `x${team}design` }, "forbidden", "a prefix must start the room");
    await failAck(s, "get_history", { room: other }, "forbidden", "history of a room not in the claim");
    // Without the claim nothing is usable.
    const none = await connect(tokenA.url, authed(makeToken()), t);
    await failAck(none, "join_room", { room: general }, "forbidden", "no rooms claim");

    // A refreshed token's claim counts from then on, for rooms already joined too: the
    // connection leaves the rooms it lost, and hears nothing more from them.
    const watcher = await connect(tokenB.url, authed(makeToken({ rooms: [general] })), t);
    await okAck(watcher, "join_room", { room: general });
    const refreshed = await okAck(s, "refresh_token", { token: makeToken({ sub, rooms: [other] }) });
    assert.deepEqual(refreshed.leftRooms.slice().sort(), [general, `${team}design`].sort(), show(refreshed));
    await failAck(s, "send_message", { room: general, message: "revoked" }, "not_in_room", "send after the grant was taken back");
    await failAck(s, "join_room", { room: general }, "forbidden", "join after the grant was taken back");
    const after = await send(watcher, general, "after the refresh");
    await sleep(QUIET_MS);
    assert.deepEqual(received(s, "receive_message", isMsgId(after.id)), [], "a room it lost is not delivered");
    await okAck(s, "join_room", { room: other });
  });

  test("the HTTP history route takes Authorization: Bearer — none or invalid is 401, no access 403", async () => {
    const room = roomName("http");
    const url = historyUrl(tokenA, room);
    assert.equal((await httpGet(url)).status, 401, "no token");
    assert.equal((await httpGet(url, { authorization: "Bearer not.a.token" })).status, 401, "an invalid token");
    assert.equal((await httpGet(url, { authorization: `Basic ${makeToken({ rooms: [room] })}` })).status, 401, "not a bearer token");
    const denied = await httpGet(url, { authorization: `Bearer ${makeToken({ rooms: ["elsewhere"] })}` });
    assert.equal(denied.status, 403, show(denied));
    assert.equal(denied.json?.error?.code, "forbidden", show(denied));
    const ok = await httpGet(url, { authorization: `Bearer ${makeToken({ rooms: [room] })}` });
    assert.equal(ok.status, 200, show(ok));
    assert.deepEqual(ok.json?.messages, []);
  });
});

describe("policy webhook", () => {
  test("the endpoint decides (2xx allows, 403 denies), with the user, room and action; answers are reused", async (t) => {
    const room = `ok-${uid()}`;
    const sub = `user-${uid()}`;
    const token = makeToken({ sub });
    const s = await connect(hook.url, authed(token), t);
    const before = webhook.calls.length;
    await okAck(s, "join_room", { room });
    await okAck(s, "send_message", { room, message: "one" });
    await okAck(s, "send_message", { room, message: "two" });
    await okAck(s, "send_message", { room, message: "three" });
    const calls = webhook.calls.slice(before);
    assert.deepEqual(
      calls.map((c) => [c.userId, c.room, c.action]),
      [[sub, room, "join"], [sub, room, "send"]],
      `one call per user, room and action: ${show(calls)}`,
    );
    assert.equal(calls[0].username, jwt.decode(token).name);
    assert.equal(calls[0].authorization, "Bearer hook-secret");
    await failAck(s, "join_room", { room: roomName("closed") }, "forbidden", "denied by the endpoint");
    const url = historyUrl(hook, room);
    assert.equal((await httpGet(url, { authorization: `Bearer ${token}` })).status, 200, "the HTTP route asks too");
    assert.equal((await httpGet(historyUrl(hook, roomName("closed")), { authorization: `Bearer ${token}` })).status, 403);
  });

  test("an endpoint that fails or does not answer makes the action unavailable, never allowed", async (t) => {
    const s = await connect(hook.url, authed(makeToken()), t);
    try {
      webhook.mode = "failing";
      await failAck(s, "join_room", { room: `ok-${uid()}` }, "unavailable", "the endpoint answers 500");
      webhook.mode = "silent";
      const started = Date.now();
      await failAck(s, "join_room", { room: `ok-${uid()}` }, "unavailable", "the endpoint never answers");
      assert.ok(Date.now() - started < 3000, `bounded in time: ${Date.now() - started} ms`);
    } finally {
      webhook.mode = "normal";
    }
    await okAck(s, "join_room", { room: `ok-${uid()}` }, "answers again once the endpoint does");
  });
});

describe("direct messages", () => {
  test("open_dm gives both users one reserved room; dm reaches the other's connections across gateways; a third user is kept out", { timeout: 30_000 }, async (t) => {
    const [ann, bob, cy] = ["ann", "bob", "cy"].map((n) => ({ sub: `${n}-${uid()}`, name: `${n} ${uid()}` }));
    const token = (u) => makeToken({ sub: u.sub, name: u.name, rooms: [] });
    const a = await connect(tokenA.url, authed(token(ann)), t);
    const b1 = await connect(tokenB.url, authed(token(bob)), t);
    const b2 = await connect(tokenA.url, authed(token(bob), { transports: ["websocket"] }), t);
    const c = await connect(tokenB.url, authed(token(cy)), t);
    const { room } = await okAck(a, "open_dm", { userId: bob.sub });
    assert.equal((await okAck(b1, "open_dm", { userId: ann.sub })).room, room, "the same room whoever opens it");
    await failAck(a, "open_dm", { userId: ann.sub }, "invalid_payload", "a dm with oneself");
    await okAck(a, "join_room", { room });

    // Bob has not joined: each of his connections gets `dm`, on both gateways.
    const sent = await send(a, room, "hello bob");
    for (const s of [b1, b2]) {
      const dm = await waitFor(s, "dm", (d) => d?.message?.id === sent.id);
      assert.equal(dm.room, room);
      assert.deepEqual(dm.from, { userId: ann.sub, username: ann.name });
      assert.equal(dm.message.message, "hello bob");
      assert.equal(dm.message.userId, ann.sub);
    }
    await sleep(QUIET_MS);
    assert.deepEqual(received(a, "dm"), [], "the sender, in the room, gets no dm");
    assert.deepEqual(received(c, "dm"), [], "a third user gets nothing");

    // Bob joins on one connection: it gets the message as a member from then on, the other still a dm.
    const joined = await okAck(b1, "join_room", { room });
    assert.ok(joined.history.some((m) => m.id === sent.id), "the conversation so far");
    const again = await send(a, room, "now you are here");
    await waitFor(b1, "receive_message", isMsgId(again.id));
    await waitFor(b2, "dm", (d) => d?.message?.id === again.id);
    await sleep(QUIET_MS);
    assert.deepEqual(received(b1, "dm", (d) => d?.message?.id === again.id), [], "a member gets receive_message, not dm");

    // Cy may not join, read or write it, nor make up another dm name.
    await failAck(c, "join_room", { room }, "forbidden", "a third user joins");
    await failAck(c, "get_history", { room }, "forbidden", "a third user reads");
    await failAck(c, "send_message", { room, message: "x" }, "not_in_room", "a third user writes");
    const http = await httpGet(historyUrl(tokenB, room), { authorization: `Bearer ${token(cy)}` });
    assert.equal(http.status, 403, "a third user reads over HTTP");
    assert.equal((await httpGet(historyUrl(tokenB, room), { authorization: `Bearer ${token(bob)}` })).status, 200);
    await failAck(c, "join_room", { room: `dm:${uid()}` }, "forbidden", "a made-up dm room");
  });

  test("without auth there are no direct messages, and dm: names are reserved", async (t) => {
    const s = await connect(gw1Url(), {}, t);
    await failAck(s, "open_dm", { userId: "someone" }, "forbidden", "open_dm without auth");
    await failAck(s, "join_room", { username: userName("anon"), room: `dm:${uid()}` }, "forbidden", "a dm: room without auth");
    const http = await httpGet(`${gw1Url()}/api/rooms/${encodeURIComponent(`dm:${uid()}`)}/messages`);
    assert.equal(http.status, 403, show(http));
  });
});
