// Any load balancer, any client: a default socket.io-client (no withCredentials, so no sticky
// cookie) through a plain round-robin HAProxy without cookies, polling only and polling with
// upgrade, chats across both gateways (a polling request reaching the gateway that does not hold
// its session is forwarded to the one that does, and an upgrade reaching it is handed over, so
// every client ends on WebSocket); and python-socketio's default WebSocket client, which sends
// its target's own origin as Origin, is served.
//
// This file starts its own HAProxy (round robin, no cookie, no stickiness) in front of the
// shared system's two gateways.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import {
  REPO_DIR, closeAll, connect, freePort, gw1Url, gw2Url, isMsgId, join, send, show, sleep, startGateway, startProcess,
  userName, waitFor, waitHttp200, roomName, waitForWebSocket,
} from "./helpers.mjs";
import { RawPoll, RawWs, metric, rssKb } from "./raw.mjs";
import fs2 from "node:fs";

let lb; // { url, proc }

before(async () => {
  const port = await freePort();
  const cfg = path.join(fs.mkdtempSync(path.join(os.tmpdir(), "chatify-rr-")), "haproxy.cfg");
  const server = (name, url) => `    server ${name} ${new URL(url).host} check inter 1s`;
  fs.writeFileSync(
    cfg,
    [
      "defaults",
      "    mode http",
      "    timeout connect 5s",
      "    timeout client 60s",
      "    timeout server 60s",
      "    timeout tunnel 1h",
      "frontend rr",
      `    bind 127.0.0.1:${port}`,
      "    default_backend gateways",
      "backend gateways",
      "    balance roundrobin",
      "    option httpchk GET /healthz",
      server("gateway1", gw1Url()),
      server("gateway2", gw2Url()),
      "",
    ].join("\n"),
  );
  const proc = startProcess("haproxy", ["-W", "-db", "-f", cfg], { env: process.env, name: "e2e-round-robin" });
  lb = { url: `http://127.0.0.1:${port}`, proc };
  await waitHttp200(`${lb.url}/healthz`, 10_000, () => !proc.exited);
});

after(async () => {
  closeAll();
  await lb?.proc.stop("SIGTERM");
});

const forwarded = async () =>
  (await metric(gw1Url(), "chatify_gateway_forwarded_requests_total", 'side="served"')) +
  (await metric(gw2Url(), "chatify_gateway_forwarded_requests_total", 'side="served"'));

describe("a round-robin balancer without cookies", () => {
  for (const [label, opts] of [
    ["polling only", { transports: ["polling"] }],
    ["polling, then upgrade", {}],
  ]) {
    test(`a default socket.io-client, ${label}: connects, joins, and chats with a member on each gateway`, { timeout: 30_000 }, async (t) => {
      const before = await forwarded();
      const room = roomName("rr");
      const clients = [];
      for (let i = 0; i < 4; i++) clients.push(await connect(lb.url, opts, t));
      const direct = [await connect(gw1Url(), { transports: ["websocket"] }, t), await connect(gw2Url(), { transports: ["websocket"] }, t)];
      for (const s of [...clients, ...direct]) await join(s, room, userName("rr"));
      for (const [i, s] of clients.entries()) {
        const sent = await send(s, room, `through the balancer ${i}`);
        for (const other of [...clients, ...direct]) await waitFor(other, "receive_message", isMsgId(sent.id));
      }
      if (!opts.transports) {
        // Each upgrade goes through: on the session's gateway, or handed over to it.
        await Promise.all(clients.map((s) => waitForWebSocket(s, 5000)));
        const sent = await send(clients[0], room, "after the upgrades");
        for (const other of clients) await waitFor(other, "receive_message", isMsgId(sent.id));
      }
      const served = (await forwarded()) - before;
      t.diagnostic(`polling requests forwarded between the gateways: ${served}`);
      assert.ok(served > 0, "some polling requests reached the gateway that does not hold their session");
      assert.ok(clients.every((s) => s.connected), "every client stayed connected");
    });
  }
});

const handedOver = async (url) => metric(url, "chatify_gateway_handed_over_upgrades_total", 'outcome="tunneled"');

describe("a WebSocket upgrade that reaches the other gateway", () => {
  test("is handed to the session's gateway: the probe, the upgrade, then the session chats over it", { timeout: 30_000 }, async (t) => {
    const before = await handedOver(gw2Url());
    const room = roomName("handover");
    // The session lives on gateway 1; its upgrade goes to gateway 2.
    const { poll, ws } = await handedOverSession(gw1Url(), gw2Url());
    const joined = await ws.ack("join_room", JSON.stringify({ room, username: userName("handover") }));
    assert.equal(joined?.ok, true, show(joined));
    assert.equal((await handedOver(gw2Url())) - before, 1, "gateway 2 handed the upgrade over");

    const other = await connect(gw2Url(), { transports: ["websocket"] }, t);
    await join(other, room, userName("other"));
    const sent = await send(other, room, "to the handed-over websocket");
    await ws.waitMsg((m) => m.startsWith('42["receive_message"') && m.includes(sent.id), { what: "the message over the upgraded transport" });
    const mine = await ws.ack("send_message", JSON.stringify({ room, message: "from the handed-over websocket" }));
    assert.equal(mine?.ok, true, show(mine));
    await waitFor(other, "receive_message", isMsgId(mine.id));
    const polled = await poll.get();
    assert.notEqual(polled.status, 200, `the session left polling: ${show(polled)}`);
    ws.terminate();
  });

  test("of an unknown session is refused, not handed anywhere", { timeout: 10_000 }, async () => {
    const before = await handedOver(gw2Url());
    await assert.rejects(RawWs.open(gw2Url(), { sid: "nosuchsessionid00000" }), /HTTP 400/);
    assert.equal(await handedOver(gw2Url()), before);
  });
});

/** A polling session on `holder`, upgraded through `relay`: resolves the WebSocket. */
async function handedOverSession(holder, relay) {
  const poll = await RawPoll.open(holder);
  await poll.connectNs();
  const ws = await RawWs.open(relay, { sid: poll.sid });
  ws.send("2probe");
  await ws.waitMsg((m) => m === "3probe", { what: "the answer to the probe" });
  ws.send("5");
  return { poll, ws };
}

describe("handed-over upgrades, as an attacker would use them", () => {
  // The relay's cap: N handed-over WebSockets take 2N places (the client's connection and the
  // one to the holder); the next client's connection takes the last place and its hand-over
  // finds none.
  const N = 100;
  const CAP = 2 * N + 1;
  let holder;
  let relay;
  before(async () => {
    [holder, relay] = await Promise.all([
      startGateway("e2e-handover-holder"),
      // Kept-alive HTTP connections (the readiness check's) close after a second.
      startGateway("e2e-handover-relay", { CHATIFY_LIMITS__MAX_CONNECTIONS: String(CAP), CHATIFY_GATEWAY__HEADER_READ_TIMEOUT_MS: "1000" }),
    ]);
    // Each has heard the other's heartbeat (every 2 s), and the readiness checks' kept-alive
    // connections are closed.
    await sleep(3000);
  });
  after(async () => {
    await Promise.all([holder?.proc.stop("SIGTERM"), relay?.proc.stop("SIGTERM")]);
  });

  test(`each costs the relay two places under its connection cap and about 10 KiB; past the cap the upgrade is refused and the session goes on polling`, { timeout: 60_000 }, async (t) => {
    const [holderPid, relayPid] = [holder.proc.child.pid, relay.proc.child.pid];
    const fds = (pid) => fs2.readdirSync(`/proc/${pid}/fd`).length;
    const before = { relayRss: rssKb(relayPid), relayFds: fds(relayPid), holderRss: rssKb(holderPid), holderFds: fds(holderPid) };
    const sessions = [];
    for (let i = 0; i < N; i++) sessions.push(await handedOverSession(holder.url, relay.url));
    await sleep(500);
    const relayKiB = (rssKb(relayPid) - before.relayRss) / N;
    const holderKiB = (rssKb(holderPid) - before.holderRss) / N;
    const relayFds = fds(relayPid) - before.relayFds;
    const holderFds = fds(holderPid) - before.holderFds;
    t.diagnostic(`${N} handed-over WebSockets: relay +${relayKiB.toFixed(1)} KiB and ${relayFds / N} files each, holder +${holderKiB.toFixed(1)} KiB and ${holderFds / N} files each`);
    assert.equal(relayFds, 2 * N, "the relay holds two connections per handed-over WebSocket");
    assert.ok(relayKiB < 32, `relay RSS per handed-over WebSocket: ${relayKiB} KiB`);

    // One more: its connection takes the last place, and its hand-over finds none.
    const poll = await RawPoll.open(holder.url);
    await poll.connectNs();
    await assert.rejects(RawWs.open(relay.url, { sid: poll.sid }), /HTTP 503/);
    const joined = await poll.ack("join_room", JSON.stringify({ room: roomName("still-polling"), username: userName("p") }));
    assert.equal(joined?.ok, true, `the session goes on polling: ${show(joined)}`);
    assert.ok(sessions.every(({ ws }) => ws.isOpen), "the handed-over WebSockets are untouched");

    for (const { ws } of sessions) ws.terminate();
    await sleep(1500);
    assert.equal(await metric(relay.url, "chatify_gateway_handed_over_upgrades_total", 'outcome="full"'), 1);
    assert.equal(await metric(relay.url, "chatify_gateway_handed_over_upgrades_total", 'outcome="tunneled"'), N);
  });
});

describe("python-socketio", () => {
  test("its default WebSocket client (Origin: the target's own origin) connects, joins, sends and receives", { timeout: 60_000 }, async () => {
    const python = path.join(REPO_DIR, "target", "pyenv", "bin", "python");
    assert.ok(fs.existsSync(python), `${python} is missing: run tests/e2e/python/setup.sh (scripts/test.sh does)`);
    const room = roomName("python");
    const text = `hello from python ${Date.now()}`;
    const watcher = await connect(gw2Url(), {});
    await join(watcher, room, userName("watcher"));
    const out = await new Promise((resolve, reject) => {
      execFile(python, [path.join(REPO_DIR, "tests/e2e/python/chat.py"), gw1Url(), room, userName("py"), text], { timeout: 30_000 }, (err, stdout, stderr) => {
        if (err) reject(new Error(`chat.py failed: ${err.message}\n${stderr}`));
        else resolve(JSON.parse(stdout.trim().split("\n").at(-1)));
      });
    });
    assert.equal(out.transport, "websocket", show(out));
    assert.equal(out.join?.ok, true, show(out));
    assert.equal(out.send?.ok, true, show(out));
    assert.equal(out.received?.id, out.send.id, show(out));
    await waitFor(watcher, "receive_message", isMsgId(out.send.id));
    watcher.disconnect();
  });
});
