// Any load balancer, any client: a default socket.io-client (no withCredentials, so no sticky
// cookie) through a plain round-robin HAProxy without cookies, polling only and polling with
// upgrade, chats across both gateways (a polling request reaching the gateway that does not hold
// its session is forwarded to the one that does); and python-socketio's default WebSocket
// client, which sends its target's own origin as Origin, is served.
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
  REPO_DIR, closeAll, connect, freePort, gw1Url, gw2Url, isMsgId, join, send, show, startProcess, userName, waitFor,
  waitHttp200, roomName, waitForWebSocket,
} from "./helpers.mjs";
import { metric } from "./raw.mjs";

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
        // The upgrade goes through when it reaches the session's gateway, and the client stays
        // on polling otherwise: either way it keeps working.
        await Promise.allSettled(clients.map((s) => waitForWebSocket(s, 3000)));
        t.diagnostic(`transports after the upgrade attempts: ${clients.map((s) => s.io.engine.transport.name).join(", ")}`);
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
