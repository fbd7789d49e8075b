// Transports: Engine.IO handshake, polling -> websocket upgrade through the sticky load balancer,
// websocket-only, polling-only, and the Origin check on polling and on the WebSocket upgrade.

import { after, describe, test } from "node:test";
import assert from "node:assert/strict";
import http from "node:http";
import {
  ALLOWED_ORIGIN, EVIL_ORIGIN, assertUsers, closeAll, connect, connectRefused, emitAck, gw1Url, gw2Url, isChatBot,
  isMsgId, join, lbUrl, me, okAck, pollingHandshake, roomName, sameUsers, send, show, sleep, userName, waitFor,
  waitForWebSocket, wsUpgrade,
} from "./helpers.mjs";

after(closeAll);

/** Joins all clients to one room, then each sends one message which every client must receive. */
async function chatExchange(clients, room) {
  const names = clients.map((_, i) => userName(`tx${i}`));
  for (let i = 0; i < clients.length; i++) {
    const ack = await join(clients[i], room, names[i]);
    assertUsers(ack.users, clients.slice(0, i + 1).map((c, j) => me(c, names[j])), `join ack users for client ${i}`);
  }
  const everyone = clients.map((c, i) => me(c, names[i]));
  for (const c of clients) await waitFor(c, "chatroom_users", sameUsers(everyone), { what: "chatroom_users with everyone" });
  for (let i = 0; i < clients.length; i++) {
    const text = `hello from ${names[i]} ${i}`;
    const ack = await send(clients[i], room, text);
    for (const c of clients) {
      const m = await waitFor(c, "receive_message", isMsgId(ack.id), { what: `message ${i} on ${c.id}` });
      assert.deepEqual(
        { id: m.id, room: m.room, username: m.username, message: m.message, createdTime: m.createdTime },
        { id: ack.id, room, username: names[i], message: text, createdTime: ack.createdTime },
      );
    }
  }
  return names;
}

describe("Engine.IO handshake", () => {
  for (const [label, url] of [["gateway1", gw1Url], ["gateway2", gw2Url], ["load balancer", lbUrl]]) {
    test(`polling handshake at /socket.io/ on ${label}: sid, websocket upgrade offered, maxPayload 64 KiB`, async () => {
      const hs = await pollingHandshake(url());
      assert.equal(hs.status, 200, `handshake status, body ${hs.body.slice(0, 200)}`);
      assert.ok(hs.open, `handshake body must be an Engine.IO OPEN packet '0{...}', got ${hs.body.slice(0, 200)}`);
      assert.equal(typeof hs.open.sid, "string");
      assert.ok(hs.open.sid.length > 0);
      assert.deepEqual(hs.open.upgrades, ["websocket"], `upgrades: ${show(hs.open)}`);
      assert.equal(hs.open.maxPayload, 65536, `Engine.IO max payload must be 64 KiB: ${show(hs.open)}`);
      assert.ok(Number.isInteger(hs.open.pingInterval) && Number.isInteger(hs.open.pingTimeout), show(hs.open));
    });
  }

  test("load balancer sets a sticky cookie on the polling handshake", async () => {
    const hs = await pollingHandshake(lbUrl());
    assert.equal(hs.status, 200);
    const cookies = [].concat(hs.headers["set-cookie"] ?? []);
    assert.ok(cookies.length > 0, `expected a Set-Cookie (HAProxy stickiness) on the LB handshake, headers ${show(hs.headers)}`);
  });
});

describe("load balancer: polling then upgrade to websocket (withCredentials keeps the sticky cookie)", () => {
  test("six clients upgrade to websocket and chat across both gateways", async (t) => {
    const clients = [];
    const cookieSeen = [];
    for (let i = 0; i < 6; i++) {
      const c = await connect(lbUrl(), { withCredentials: true }, t);
      await waitForWebSocket(c);
      assert.equal(c.io.engine.transport.name, "websocket", `client ${i} transport after upgrade`);
      const jar = c.io.engine._cookieJar;
      cookieSeen.push(jar ? [...jar.cookies].map(([n, v]) => `${n}=${v.value}`).join(";") : "(no jar)");
      clients.push(c);
    }
    t.diagnostic(`sticky cookies per client: ${cookieSeen.join(" | ")}`);
    assert.ok(cookieSeen.every((s) => s && s !== "(no jar)"), `every LB client must hold the sticky cookie: ${cookieSeen}`);
    // Round robin + cookie: both gateways should get clients.
    assert.ok(new Set(cookieSeen).size >= 2, `expected clients to be spread over both gateways, cookies: ${cookieSeen}`);
    await chatExchange(clients, roomName("lb-upgrade"));
    for (const c of clients) assert.equal(c.io.engine.transport.name, "websocket");
  });
});

describe("websocket only", () => {
  test("directly to each gateway: chat across gateways", async (t) => {
    const a = await connect(gw1Url(), { transports: ["websocket"] }, t);
    const b = await connect(gw2Url(), { transports: ["websocket"] }, t);
    assert.equal(a.io.engine.transport.name, "websocket");
    assert.equal(b.io.engine.transport.name, "websocket");
    await chatExchange([a, b], roomName("ws-direct"));
  });

  test("via the load balancer (no cookie needed)", async (t) => {
    const clients = [];
    for (let i = 0; i < 4; i++) clients.push(await connect(lbUrl(), { transports: ["websocket"] }, t));
    for (const c of clients) assert.equal(c.io.engine.transport.name, "websocket");
    await chatExchange(clients, roomName("ws-lb"));
  });
});

describe("polling only", () => {
  test("via the load balancer with withCredentials: full chat exchange stays on polling", async (t) => {
    const clients = [];
    for (let i = 0; i < 4; i++) {
      clients.push(await connect(lbUrl(), { transports: ["polling"], upgrade: false, withCredentials: true }, t));
    }
    const room = roomName("poll-lb");
    const names = await chatExchange(clients, room);
    // typing and leave notices also travel over polling
    assert.deepEqual(await emitAck(clients[0], "typing", { room, isTyping: true }), { ok: true });
    for (const c of clients.slice(1)) {
      await waitFor(c, "typing", (p) => p?.room === room && p.username === names[0] && p.isTyping === true);
    }
    await okAck(clients[0], "leave_room", { room });
    for (const c of clients.slice(1)) {
      await waitFor(c, "receive_message", isChatBot(room, `${names[0]} has left the chat room`));
    }
    for (const c of clients) assert.equal(c.io.engine.transport.name, "polling");
    assert.ok(clients.every((c) => c.connected));
  });

  test("directly to gateway2: join and send", async (t) => {
    const a = await connect(gw2Url(), { transports: ["polling"], upgrade: false }, t);
    const b = await connect(gw1Url(), { transports: ["polling"], upgrade: false }, t);
    await chatExchange([a, b], roomName("poll-direct"));
  });
});

describe("Origin check", () => {
  for (const [label, url] of [["gateway1", gw1Url], ["gateway2", gw2Url], ["load balancer", lbUrl]]) {
    test(`polling handshake on ${label}: allowed origin 200 with CORS header, no origin 200, other origin 403`, async () => {
      const ok = await pollingHandshake(url(), { origin: ALLOWED_ORIGIN });
      assert.equal(ok.status, 200, `allowed origin: ${ok.body.slice(0, 200)}`);
      assert.ok(ok.open?.sid, `allowed origin gets an OPEN packet: ${ok.body.slice(0, 200)}`);
      assert.equal(ok.headers["access-control-allow-origin"], ALLOWED_ORIGIN, `CORS header for the allowed origin: ${show(ok.headers)}`);
      // browsers behind the sticky LB must send withCredentials, which needs this header
      assert.equal(ok.headers["access-control-allow-credentials"], "true", `credentials allowed: ${show(ok.headers)}`);

      const none = await pollingHandshake(url());
      assert.equal(none.status, 200, "a request without Origin (non-browser client) is allowed");

      const evil = await pollingHandshake(url(), { origin: EVIL_ORIGIN });
      assert.equal(evil.status, 403, `other origin must get 403, got ${evil.status} ${evil.body.slice(0, 200)}`);
      assert.notEqual(evil.headers["access-control-allow-origin"], EVIL_ORIGIN, "no CORS grant for a refused origin");
    });

    test(`CORS preflight on ${label}: allowed origin granted, other origin not`, async () => {
      const preflight = (origin) =>
        new Promise((resolve, reject) => {
          const req = http.request(`${url()}/socket.io/?EIO=4&transport=polling`, {
            method: "OPTIONS",
            agent: false,
            headers: { origin, "access-control-request-method": "POST", "access-control-request-headers": "content-type" },
          }, (res) => {
            res.resume();
            res.on("end", () => resolve(res));
          });
          req.on("error", reject);
          req.end();
        });
      const ok = await preflight(ALLOWED_ORIGIN);
      assert.ok(ok.statusCode >= 200 && ok.statusCode < 300, `preflight status ${ok.statusCode}`);
      assert.equal(ok.headers["access-control-allow-origin"], ALLOWED_ORIGIN);
      assert.match(String(ok.headers["access-control-allow-methods"]), /POST/i);
      const evil = await preflight(EVIL_ORIGIN);
      assert.notEqual(evil.headers["access-control-allow-origin"], EVIL_ORIGIN, "no grant for another origin");
      assert.notEqual(evil.headers["access-control-allow-origin"], "*", "no wildcard grant");
    });

    test(`websocket handshake on ${label}: other origin refused, allowed origin and no origin accepted`, async () => {
      const wsUrl = `${url()}/socket.io/?EIO=4&transport=websocket`;
      assert.equal((await wsUpgrade(wsUrl, { origin: ALLOWED_ORIGIN })).status, 101, "allowed origin upgrade");
      assert.equal((await wsUpgrade(wsUrl)).status, 101, "upgrade without Origin");
      const evil = await wsUpgrade(wsUrl, { origin: EVIL_ORIGIN });
      assert.notEqual(evil.status, 101, "upgrade from another origin must be refused");
    });
  }

  test("upgrading an existing polling session with another origin is refused", async () => {
    for (const url of [gw1Url(), gw2Url()]) {
      const hs = await pollingHandshake(url, { origin: ALLOWED_ORIGIN });
      assert.equal(hs.status, 200);
      const res = await wsUpgrade(`${url}/socket.io/?EIO=4&transport=websocket&sid=${encodeURIComponent(hs.open.sid)}`, { origin: EVIL_ORIGIN });
      assert.notEqual(res.status, 101, `${url}: the upgrade of session ${hs.open.sid} from ${EVIL_ORIGIN} must be refused`);
    }
  });

  test("socket.io-client: other origin gets connect_error on polling and on websocket; allowed origin connects", async (t) => {
    for (const transports of [["polling"], ["websocket"]]) {
      const err = await connectRefused(gw1Url(), { transports, extraHeaders: { origin: EVIL_ORIGIN } });
      assert.ok(err instanceof Error, `${transports}: connect_error`);
      const good = await connect(gw1Url(), { transports, extraHeaders: { origin: ALLOWED_ORIGIN } }, t);
      assert.equal(good.connected, true, `${transports}: allowed origin connects`);
      good.disconnect();
    }
  });

  test("a refused origin does not break the gateway for others", async (t) => {
    await connectRefused(lbUrl(), { transports: ["websocket"], extraHeaders: { origin: EVIL_ORIGIN } });
    await sleep(50);
    const c = await connect(lbUrl(), { transports: ["websocket"] }, t);
    const room = roomName("after-refusal");
    const name = userName("ok");
    const ack = await join(c, room, name);
    assertUsers(ack.users, [me(c, name)]);
  });
});
