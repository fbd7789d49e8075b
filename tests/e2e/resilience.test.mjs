// NATS outages: /readyz follows the NATS connection, send_message answers `unavailable` while NATS
// is down, and everything works again once NATS is back.
// Each test starts a private stack: its own nats-server (fresh store), persister and gateway (the
// persister writes to the shared HarperDB, in rooms of its own); the shared NATS is never touched.

import { after, describe, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import {
  ENV, QUIET_MS, REPO_DIR, assertUsers, closeAll, connect, emitAck, freePort, httpGet, isChatBot, isMsgId, join, me, msgFields,
  received, roomName, sameUsers, show, sleep, startGateway, startPersister, startProcess, userName, waitFor,
  waitForStored,
} from "./helpers.mjs";

const NATS_BIN = process.env.CHATIFY_NATS_SERVER_BIN || "nats-server";

after(closeAll);

function tcpOpen(port) {
  return new Promise((resolve) => {
    const s = net.connect(port, "127.0.0.1");
    s.once("connect", () => {
      s.destroy();
      resolve(true);
    });
    s.once("error", () => resolve(false));
  });
}

async function waitStatus(url, status, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await httpGet(url, {}, 1000);
      if (last.status === status) return last;
    } catch (e) {
      last = { status: e.message };
    }
    if (Date.now() > deadline) throw new Error(`${url}: expected ${status} within ${timeoutMs} ms, last ${last?.status} ${last?.body ?? ""}`);
    await sleep(100);
  }
}

/** A private nats-server + persister + gateway, torn down when the test ends. */
async function privateStack(t, tag, gateways = 1) {
  const port = await freePort();
  const storeDir = fs.mkdtempSync(path.join(os.tmpdir(), "chatify-e2e-nats-"));
  const stack = { nats: undefined, gws: [], persister: undefined };
  t.after(async () => {
    closeAll();
    for (const g of stack.gws) await g.proc.stop("SIGTERM");
    await stack.persister?.proc.stop("SIGTERM");
    await stack.nats?.stop("SIGTERM");
    fs.rmSync(storeDir, { recursive: true, force: true });
  });
  const monitorPort = await freePort();
  // Started as up.sh starts NATS: deploy/nats/start.sh, with the users and permissions of
  // deploy/nats/permissions.conf and the run dir's passwords (startGateway and startPersister log
  // in with them).
  const natsEnv = {
    ...process.env,
    NATS_SERVER: NATS_BIN,
    CHATIFY_NATS_SYNC: "default",
    CHATIFY_NATS_GATEWAY_PASSWORD: ENV.vars.CHATIFY_NATS_GATEWAY_PASSWORD,
    CHATIFY_NATS_PERSISTER_PASSWORD: ENV.vars.CHATIFY_NATS_PERSISTER_PASSWORD,
  };
  stack.startNats = async () => {
    stack.nats = startProcess(
      path.join(REPO_DIR, "deploy/nats/start.sh"),
      [path.join(REPO_DIR, "deploy/nats/nats.conf"), path.join(storeDir, "nats.conf"),
        "-js", "-a", "127.0.0.1", "-p", String(port), "-m", String(monitorPort), "-sd", path.join(storeDir, "data")],
      { env: natsEnv, name: `nats-${tag}` },
    );
    const deadline = Date.now() + 10_000;
    while (!(await tcpOpen(port))) {
      if (stack.nats.exited) throw new Error(`nats-server exited (${stack.nats.exitCode}): ${stack.nats.logTail()}`);
      if (Date.now() > deadline) throw new Error(`nats-server not listening: ${stack.nats.logTail()}`);
      await sleep(50);
    }
  };
  stack.down = async () => {
    await stack.nats.stop("SIGTERM");
    for (const g of stack.gws) await waitStatus(`${g.url}/readyz`, 503, 10_000);
  };
  stack.up = async () => {
    await stack.startNats();
    for (const g of stack.gws) await waitStatus(`${g.url}/readyz`, 200, 20_000);
  };
  await stack.startNats();
  const env = { CHATIFY_NATS__URL: `nats://127.0.0.1:${port}` };
  stack.persister = await startPersister(`${tag}-persister`, env);
  for (let i = 0; i < gateways; i++) stack.gws.push(await startGateway(`${tag}-gw${i + 1}`, env));
  return stack;
}

/** A private stack with two gateways, and one member of a fresh room on each. */
async function membersOnBothGateways(t, tag, roomTag) {
  const stack = await privateStack(t, tag, 2);
  const [g1, g2] = stack.gws;
  const room = roomName(roomTag);
  const na = userName("a");
  const nb = userName("b");
  const a = await connect(g1.url, { transports: ["websocket"] }, t);
  const b = await connect(g2.url, { transports: ["websocket"] }, t);
  await join(a, room, na);
  await join(b, room, nb);
  await waitFor(a, "chatroom_users", sameUsers([me(a, na), me(b, nb)]));
  return { stack, g1, g2, room, a, na, b, nb };
}

async function untilOk(s, event, payload, timeoutMs = 15_000) {
  const deadline = Date.now() + timeoutMs;
  let res;
  do {
    res = await emitAck(s, event, payload, 8000);
    if (res?.ok) return res;
    await sleep(250);
  } while (Date.now() < deadline);
  assert.fail(`${event} ${show(payload, 200)} still failing ${timeoutMs} ms after NATS came back: ${show(res)}`);
}

describe("NATS outage", () => {
  test("readyz 503 and send_message unavailable while NATS is down; both recover when it is back", { timeout: 60_000 }, async (t) => {
    const stack = await privateStack(t, "e2e-outage");
    const gw = stack.gws[0];
    const s = await connect(gw.url, { transports: ["websocket"] }, t);
    const room = roomName("outage");
    await join(s, room, userName("o"));
    const beforeRes = await emitAck(s, "send_message", { room, message: "while NATS is up" });
    assert.equal(beforeRes?.ok, true, `send with NATS up: ${show(beforeRes)}`);

    await stack.down();
    assert.equal((await httpGet(`${gw.url}/healthz`)).status, 200, "healthz stays 200 while the process runs");
    const started = Date.now();
    const res = await emitAck(s, "send_message", { room, message: "while NATS is down" }, 12_000);
    t.diagnostic(`send_message during the outage answered in ${Date.now() - started} ms: ${show(res)}`);
    assert.equal(res?.ok, false, `send_message must not succeed without JetStream: ${show(res)}`);
    assert.equal(res.error?.code, "unavailable", show(res));
    assert.ok(typeof res.error.message === "string" && res.error.message.length > 0);
    assert.equal(s.connected, true, "the socket stays connected");

    await stack.up();
    const again = await untilOk(s, "send_message", { room, message: "after NATS is back" });
    await waitFor(s, "receive_message", isMsgId(again.id), { what: "live delivery after NATS is back" });
    const stored = await waitForStored(s, room, [beforeRes.id, again.id]);
    // Not a contract rule, reported only: was the message refused as `unavailable` stored anyway
    // (the NATS client may buffer the publish and send it after reconnecting)?
    const ghost = stored.filter((m) => m.message === "while NATS is down");
    t.diagnostic(`message refused as unavailable found in history afterwards: ${ghost.length ? show(ghost) : "no"}`);
    const live = received(s, "receive_message", (m) => m?.message === "while NATS is down");
    t.diagnostic(`message refused as unavailable delivered live afterwards: ${live.length ? show(live) : "no"}`);
  });

  test("a send refused as unavailable, retried with its clientId after NATS is back, is stored once and delivered to every member", { timeout: 60_000 }, async (t) => {
    const stack = await privateStack(t, "e2e-retry");
    const gw = stack.gws[0];
    const s = await connect(gw.url, { transports: ["websocket"] }, t);
    const m = await connect(gw.url, {}, t);
    const room = roomName("outage-retry");
    const ns = userName("retry");
    await join(s, room, ns);
    await join(m, room, userName("member"));
    const payload = { room, message: "retried after an outage", clientId: `cid-${Date.now()}` };

    await stack.down();
    const res = await emitAck(s, "send_message", payload, 12_000);
    assert.equal(res?.error?.code, "unavailable", `during the outage: ${show(res)}`);
    await stack.up();

    const ack = await untilOk(s, "send_message", payload);
    for (const [label, sock] of [["sender", s], ["other member", m]]) {
      const got = await waitFor(sock, "receive_message", isMsgId(ack.id), { what: `${label} gets the acked retry (id ${ack.id})` });
      assert.deepEqual(msgFields(got), { id: ack.id, room, username: ns, message: payload.message, createdTime: ack.createdTime });
    }
    const stored = await waitForStored(s, room, [ack.id]);
    assert.deepEqual(stored.filter((x) => x.message === payload.message).map((x) => x.id), [ack.id], `stored once: ${show(stored)}`);
    await sleep(QUIET_MS);
    assert.equal(received(m, "receive_message", (x) => x?.message === payload.message).length, 1, "delivered once");
  });

  test("after a NATS restart: new joins work and members across gateways still see each other", { timeout: 60_000 }, async (t) => {
    const { stack, g1, room, a, na, b, nb } = await membersOnBothGateways(t, "e2e-rejoin", "after-restart");

    await stack.down();
    await stack.up();

    const c = await connect(g1.url, {}, t);
    const nc = userName("c");
    const started = Date.now();
    const ack = await untilOk(c, "join_room", { room, username: nc });
    t.diagnostic(`join_room succeeded ${Date.now() - started} ms after readyz was 200 again`);
    assertUsers(ack.users, [me(a, na), me(b, nb), me(c, nc)], "users across gateways after the NATS restart");
    await waitFor(b, "receive_message", isChatBot(room, `${nc} has joined the chat room`), { what: "gateway2 member sees the join" });
    const sent = await untilOk(b, "send_message", { room, message: "after the restart" });
    for (const sock of [a, b, c]) await waitFor(sock, "receive_message", isMsgId(sent.id));
  });

  test("an outage longer than the gateway timeout declares nobody dead: members stay listed, no 'has left'", { timeout: 90_000 }, async (t) => {
    const { stack, g1, room, a, na, b, nb } = await membersOnBothGateways(t, "e2e-long-outage", "long-outage");
    const since = a.rec.events.length;

    await stack.down();
    // Longer than gateway.gateway_timeout_ms (7 s) plus a heartbeat.
    await sleep(10_000);
    await stack.up();
    // Past another gateway timeout with NATS up: a wrong declaration would have happened by now.
    await sleep(9_000);

    const left = received(a, "receive_message", isChatBot(room, `${nb} has left the chat room`), since);
    assert.equal(left.length, 0, `a member of the other gateway was declared gone: ${show(left)}`);
    const c = await connect(g1.url, {}, t);
    const nc = userName("c");
    const ack = await untilOk(c, "join_room", { room, username: nc });
    assertUsers(ack.users, [me(a, na), me(b, nb), me(c, nc)], "users across gateways after a long NATS outage");
    const sent = await untilOk(a, "send_message", { room, message: "after the long outage" });
    for (const sock of [a, b, c]) await waitFor(sock, "receive_message", isMsgId(sent.id));
  });
});
