// The contract's limits and allowed origins are configurable: an extra gateway started with other
// values (CHATIFY_CORS__ALLOWED_ORIGINS, CHATIFY_LIMITS__*) applies them.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import {
  ALLOWED_ORIGIN, assertUsers, closeAll, connect, emitAck, failAck, join, me, pollingHandshake, show, startGateway,
  uid, wsUpgrade,
} from "./helpers.mjs";

let gw;

before(async () => {
  gw = await startGateway("e2e-config", {
    CHATIFY_CORS__ALLOWED_ORIGINS: "http://a.test,http://b.test:8080",
    CHATIFY_LIMITS__MESSAGE_MAX_BYTES: "10",
    CHATIFY_LIMITS__USERNAME_MAX_CHARS: "5",
    CHATIFY_LIMITS__ROOM_MAX_CHARS: "20",
    CHATIFY_LIMITS__ROOMS_PER_SOCKET: "2",
    CHATIFY_LIMITS__MESSAGES_PER_SECOND: "1",
    CHATIFY_LIMITS__MESSAGE_BURST: "3",
    CHATIFY_LIMITS__MAX_PAYLOAD_BYTES: "4096",
    // Misspelled: a single "_" and a wrong key. Reported at start, never silently ignored.
    CHATIFY_LIMITS_ROOMS_PER_SOCKET: "7",
    CHATIFY_LIMITS__ROOMS_PER_SOKCET: "7",
  });
});

after(async () => {
  closeAll();
  await gw?.proc.stop("SIGTERM");
});

describe("configured limits and origins", () => {
  test("a CHATIFY_ variable that is no setting is named in a warning at start", () => {
    const log = gw.proc.logTail(100_000);
    for (const name of ["CHATIFY_LIMITS_ROOMS_PER_SOCKET", "CHATIFY_LIMITS__ROOMS_PER_SOKCET"]) {
      assert.match(log, new RegExp(`WARN.*${name} is not a Chatify setting`), `no warning for ${name} in:\n${log.slice(0, 3000)}`);
    }
    assert.doesNotMatch(log, /CHATIFY_LIMITS__ROOMS_PER_SOCKET is not/, "a real setting was reported");
    assert.doesNotMatch(log, /CHATIFY_(RUN_DIR|LB_URL|NATS_URL) is not/, "the run dir's own variables reached the gateway");
  });

  test("allowed origins come from configuration", async () => {
    for (const origin of ["http://a.test", "http://b.test:8080"]) {
      const hs = await pollingHandshake(gw.url, { origin });
      assert.equal(hs.status, 200, `${origin}: ${hs.body.slice(0, 200)}`);
      assert.equal(hs.headers["access-control-allow-origin"], origin);
      assert.equal((await wsUpgrade(`${gw.url}/socket.io/?EIO=4&transport=websocket`, { origin })).status, 101, `${origin} upgrade`);
    }
    for (const origin of [ALLOWED_ORIGIN, "http://b.test", "http://a.test.evil.com"]) {
      assert.equal((await pollingHandshake(gw.url, { origin })).status, 403, `${origin} must be refused on polling`);
      assert.notEqual((await wsUpgrade(`${gw.url}/socket.io/?EIO=4&transport=websocket`, { origin })).status, 101, `${origin} must be refused on upgrade`);
    }
  });

  test("Engine.IO max payload, message size, name lengths, rooms per socket and rate limit follow the configuration", async (t) => {
    const hs = await pollingHandshake(gw.url);
    assert.equal(hs.open?.maxPayload, 4096, `handshake maxPayload: ${show(hs.open)}`);

    const s = await connect(gw.url, { transports: ["websocket"] }, t);
    const r1 = `c-${uid()}`; // 12 chars
    const r2 = `d-${uid()}`;
    await failAck(s, "join_room", { username: "abcdef", room: r1 }, "invalid_payload", "6-char username with a limit of 5");
    await failAck(s, "join_room", { username: "abc", room: `${r1}-123456789` }, "invalid_payload", "22-char room with a limit of 20");
    const ack = await join(s, r1, "abcde");
    assertUsers(ack.users, [me(s, "abcde")]);
    await join(s, r2, "abcde");
    await failAck(s, "join_room", { username: "abcde", room: `e-${uid()}` }, "too_many_rooms", "3rd room with a limit of 2");

    await failAck(s, "send_message", { room: r1, message: "12345678901" }, "too_large", "11 bytes with a limit of 10");
    const acks = await Promise.all(Array.from({ length: 6 }, (_, i) => emitAck(s, "send_message", { room: r1, message: `m${i}` })));
    const ok = acks.filter((a) => a?.ok === true).length;
    const limited = acks.filter((a) => a?.error?.code === "rate_limited").length;
    assert.equal(ok + limited, 6, show(acks));
    assert.ok(ok >= 3 && ok <= 4, `burst of 3 (+ at most one refill) accepted, got ${ok}: ${show(acks)}`);
    assert.equal(s.connected, true);
  });
});
