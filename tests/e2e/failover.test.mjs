// A gateway going away: its sockets count as disconnected for everyone else.
// Starts extra gateways on the shared NATS and stops them (SIGTERM, SIGKILL); the shared gateways
// are never touched.

import { after, describe, test } from "node:test";
import assert from "node:assert/strict";
import {
  assertChatBot, assertUsers, closeAll, connect, gw1Url, gw2Url, isChatBot, join, mark, me, roomName, sameUsers,
  startGateway, userName, waitFor,
} from "./helpers.mjs";

after(closeAll);

/** Default gateway.gateway_timeout_ms (7 s) + heartbeat_interval_ms (2 s) + margin. */
const CRASH_DETECT_MS = Number(process.env.CHATIFY_E2E_CRASH_DETECT_MS || 14_000);

async function setup(t, tag) {
  const extra = await startGateway(`e2e-${tag}`);
  t.after(() => extra.proc.stop("SIGKILL"));
  const room = roomName(tag);
  const nx = userName("x");
  const na = userName("a");
  const x = await connect(extra.url, { transports: ["websocket"] }, t);
  const a = await connect(gw1Url(), {}, t);
  await join(x, room, nx);
  await join(a, room, na);
  await waitFor(a, "chatroom_users", sameUsers([me(x, nx), me(a, na)]), { what: "member list across gateways" });
  return { extra, room, x, nx, a, na };
}

describe("a gateway stops", () => {
  test("SIGTERM: its sockets are disconnected and the others get 'has left' and fresh chatroom_users", { timeout: 30_000 }, async (t) => {
    const { extra, room, x, nx, a, na } = await setup(t, "sigterm");
    const since = mark(a);
    const disconnected = new Promise((resolve) => x.once("disconnect", resolve));
    const sentAt = Date.now();
    extra.proc.child.once("exit", (code, signal) => t.diagnostic(`stopped gateway exited (code ${code}, signal ${signal}) ${Date.now() - sentAt} ms after SIGTERM`));
    extra.proc.child.kill("SIGTERM");
    const reason = await Promise.race([disconnected, new Promise((r) => setTimeout(() => r("(no disconnect event)"), 3000))]);
    t.diagnostic(`client of the stopped gateway: disconnect reason ${reason}`);
    assert.notEqual(reason, "(no disconnect event)", "the client of a stopped gateway sees a disconnect");
    const left = await waitFor(a, "receive_message", isChatBot(room, `${nx} has left the chat room`), { since, what: "left notice after a graceful stop" }).catch((e) => {
      throw new Error(`${e.message}\n--- the stopped gateway's log ---\n${extra.proc.logTail()}`);
    });
    assertChatBot(left, room, `${nx} has left the chat room`);
    await waitFor(a, "chatroom_users", sameUsers([me(a, na)]), { since });
  });

  test("SIGKILL: after the gateway timeout its members are dropped everywhere", { timeout: 40_000 }, async (t) => {
    const { extra, room, x, nx, a, na } = await setup(t, "sigkill");
    const since = mark(a);
    const xId = x.id;
    await extra.proc.stop("SIGKILL");
    const started = Date.now();
    await waitFor(a, "chatroom_users", sameUsers([me(a, na)]), { since, timeoutMs: CRASH_DETECT_MS, what: `member ${xId} of a crashed gateway dropped` });
    t.diagnostic(`crashed gateway's member dropped after ${Date.now() - started} ms`);
    await waitFor(a, "receive_message", isChatBot(room, `${nx} has left the chat room`), { since, timeoutMs: 2000, what: "left notice for a member of a crashed gateway" });
    const b = await connect(gw2Url(), {}, t);
    const nb = userName("b");
    const ack = await join(b, room, nb);
    assertUsers(ack.users, [me(a, na), me(b, nb)], "a later joiner does not see the crashed gateway's member");
  });
});
