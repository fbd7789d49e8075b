// Failures: ack shape, the `error` event without an ack, payload validation, size limits, rate limit.
// A failure never disconnects the socket and never reaches other clients or the history.

import { after, describe, test } from "node:test";
import assert from "node:assert/strict";
import {
  NO_PAYLOAD, QUIET_MS, WAIT_MS, closeAll, connect, emitAck, failAck, gw1Url, gw2Url, httpGet, ids, isMsgId, join,
  mark, okAck, received, roomName, send, show, sleep, userName, waitFor, waitForStored,
} from "./helpers.mjs";

after(closeAll);

const EVENTS = ["join_room", "send_message", "leave_room", "get_history", "typing"];
const NON_OBJECTS = [
  [NO_PAYLOAD, "no payload"],
  [42, "a number"],
  ["a room", "a string"],
  [["a", "b"], "an array"],
  [null, "null"],
  [true, "a boolean"],
];

/** Checks that the socket still works: a send in a joined room is acked and delivered. */
async function stillWorks(s, room) {
  assert.equal(s.connected, true, "socket still connected");
  const ack = await send(s, room, `still alive ${Date.now()}`);
  await waitFor(s, "receive_message", isMsgId(ack.id), { what: "a valid message after failures" });
  return ack;
}

describe("payload validation", () => {
  test("a non-object payload for every event is invalid_payload and the socket survives", async (t) => {
    const s = await connect(gw1Url(), {}, t);
    const room = roomName("nonobj");
    await join(s, room, userName("v"));
    for (const event of EVENTS) {
      for (const [payload, what] of NON_OBJECTS) await failAck(s, event, payload, "invalid_payload", `${event} with ${what}`);
    }
    await stillWorks(s, room);
  });

  test("send_message: not joined, empty, whitespace, non-string, missing fields", async (t) => {
    const s = await connect(gw1Url(), {}, t);
    const b = await connect(gw2Url(), {}, t);
    const room = roomName("sendval");
    const na = userName("a");
    await join(s, room, na);
    await join(b, room, userName("b"));
    const sb = mark(b);
    await failAck(s, "send_message", { room: roomName("never-joined"), message: "hi" }, "not_in_room", "room not joined");
    for (const [payload, what] of [
      [{ room, message: "" }, "empty text"],
      [{ room, message: "   \n\t  " }, "whitespace-only text"],
      [{ room, message: 42 }, "numeric text"],
      [{ room, message: null }, "null text"],
      [{ room, message: ["hi"] }, "array text"],
      [{ room }, "missing message"],
      [{ message: "hi" }, "missing room"],
      [{ room: 7, message: "hi" }, "numeric room"],
    ]) {
      await failAck(s, "send_message", payload, "invalid_payload", what);
    }
    const ok = await stillWorks(s, room);
    await waitFor(b, "receive_message", isMsgId(ok.id));
    const got = received(b, "receive_message", (m) => m?.username === na, sb);
    assert.deepEqual(ids(got), [ok.id], `only the valid message reaches other members: ${show(got)}`);
    const stored = await waitForStored(b, room, [ok.id]);
    assert.deepEqual(ids(stored), [ok.id], "only the valid message is stored");
  });

  test("typing, leave_room and get_history validation", async (t) => {
    const s = await connect(gw2Url(), {}, t);
    const room = roomName("otherval");
    const notJoined = roomName("notjoined");
    await join(s, room, userName("v"));
    await failAck(s, "typing", { room: notJoined, isTyping: true }, "not_in_room", "typing in a room not joined");
    await failAck(s, "typing", { room, isTyping: "yes" }, "invalid_payload", "typing with a string isTyping");
    await failAck(s, "typing", { isTyping: true }, "invalid_payload", "typing without room");
    await failAck(s, "leave_room", { room: notJoined }, "not_in_room", "leave a room not joined");
    await failAck(s, "leave_room", { room: 42 }, "invalid_payload", "leave with numeric room");
    await failAck(s, "leave_room", {}, "invalid_payload", "leave without room");
    await failAck(s, "get_history", {}, "invalid_payload", "get_history without room");
    await failAck(s, "get_history", { room: "" }, "invalid_payload", "get_history with empty room");
    for (const limit of [0, 101, 2.5, "10", -1, 1e9]) {
      await failAck(s, "get_history", { room, limit }, "invalid_payload", `get_history limit ${show(limit)}`);
    }
    await okAck(s, "typing", { room, isTyping: true });
    await stillWorks(s, room);
  });
});

describe("message size", () => {
  test("4096 bytes after trimming is accepted (trimmed); 4097 bytes and more are too_large and not delivered", async (t) => {
    const s = await connect(gw1Url(), { transports: ["websocket"] }, t);
    const b = await connect(gw2Url(), {}, t);
    const room = roomName("size");
    const na = userName("a");
    await join(s, room, na);
    await join(b, room, userName("b"));
    const exact = "日".repeat(1365) + "a"; // 4095 + 1 = 4096 bytes, 1366 characters
    assert.equal(Buffer.byteLength(exact), 4096);
    const okAckRes = await send(s, room, `  \n${exact}\t  `);
    const m = await waitFor(b, "receive_message", isMsgId(okAckRes.id));
    assert.equal(m.message, exact, "delivered text is trimmed and complete");
    const sb = mark(b);
    for (const [text, what] of [
      [exact + "b", "4097 bytes (multi-byte)"],
      ["x".repeat(4097), "4097 ASCII bytes"],
      ["日".repeat(1366), "4098 bytes in 1366 characters"],
      ["y".repeat(10_000), "10 KB"],
      ["z".repeat(60_000), "60 KB (below the Engine.IO limit)"],
    ]) {
      await failAck(s, "send_message", { room, message: text }, "too_large", what);
    }
    const last = await stillWorks(s, room);
    await waitFor(b, "receive_message", isMsgId(last.id));
    assert.deepEqual(ids(received(b, "receive_message", (x) => x?.username === na, sb)), [last.id], "too_large messages are not delivered");
    const stored = await waitForStored(b, room, [okAckRes.id, last.id]);
    assert.deepEqual(ids(stored), [last.id, okAckRes.id], "too_large messages are not stored");
    assert.equal(stored[1].message, exact);
  });

  for (const transports of [["websocket"], ["polling"]]) {
    test(`a ${transports[0]} packet over the Engine.IO max payload (100 KB) is never delivered and the gateway stays healthy`, async (t) => {
      const s = await connect(gw1Url(), { transports, upgrade: false }, t);
      const b = await connect(gw1Url(), {}, t);
      const room = roomName("huge");
      await join(s, room, userName("big"));
      await join(b, room, userName("b"));
      const sb = mark(b);
      const outcome = await new Promise((resolve) => {
        const timer = setTimeout(() => resolve({ kind: "nothing" }), WAIT_MS);
        s.once("disconnect", (reason) => {
          clearTimeout(timer);
          resolve({ kind: "disconnect", reason });
        });
        s.timeout(WAIT_MS).emit("send_message", { room, message: "h".repeat(100_000) }, (err, res) => {
          clearTimeout(timer);
          resolve(err ? { kind: "no ack", err: err.message } : { kind: "ack", res });
        });
      });
      t.diagnostic(`100 KB ${transports[0]} packet outcome: ${show(outcome)}`);
      if (outcome.kind === "ack") {
        assert.equal(outcome.res?.ok, false, `a 100 KB message must not be accepted: ${show(outcome.res)}`);
        assert.equal(outcome.res.error?.code, "too_large", show(outcome.res));
      } else {
        assert.equal(outcome.kind, "disconnect", `expected too_large or a closed connection, got ${show(outcome)}`);
      }
      await sleep(QUIET_MS);
      assert.deepEqual(received(b, "receive_message", (m) => (m?.message ?? "").length > 4096, sb), [], "nothing delivered");
      assert.equal((await httpGet(`${gw1Url()}/healthz`)).status, 200, "gateway still healthy");
      await stillWorks(b, room);
    });
  }
});

describe("error event without an ack callback", () => {
  test("failing events sent without a callback get an `error` event { code, message }; successes get none", async (t) => {
    const s = await connect(gw1Url(), {}, t);
    const room = roomName("errevt");
    await join(s, room, userName("e"));
    const cases = [
      ["send_message", { room: roomName("nope"), message: "hi" }, "not_in_room"],
      ["join_room", 42, "invalid_payload"],
      ["send_message", { room, message: "   " }, "invalid_payload"],
      ["send_message", { room, message: "x".repeat(5000) }, "too_large"],
      ["get_history", { room, limit: 0 }, "invalid_payload"],
      ["typing", { room: roomName("nope"), isTyping: true }, "not_in_room"],
      ["leave_room", { room: roomName("nope") }, "not_in_room"],
    ];
    for (const [event, payload, code] of cases) {
      const since = mark(s);
      s.emit(event, payload);
      const err = await waitFor(s, "error", () => true, { since, what: `error event for ${event} ${show(payload, 80)}` });
      assert.deepEqual(Object.keys(err ?? {}).sort(), ["code", "message"], `error event shape: ${show(err)}`);
      assert.equal(err.code, code, `${event}: ${show(err)}`);
      assert.ok(typeof err.message === "string" && err.message.length > 0);
      assert.equal(s.connected, true);
    }
    // emit without payload and without callback
    let since = mark(s);
    s.emit("send_message");
    assert.equal((await waitFor(s, "error", () => true, { since })).code, "invalid_payload");

    since = mark(s);
    s.emit("send_message", { room, message: "fine without ack" });
    s.emit("typing", { room, isTyping: true });
    await waitFor(s, "receive_message", (m) => m?.message === "fine without ack", { since });
    await sleep(QUIET_MS);
    assert.deepEqual(received(s, "error", () => true, since), [], "successful events without ack send no error event");
  });
});

describe("rate limit", () => {
  test("60 sends at once: at least one rate_limited, about 40 accepted; only accepted ones are delivered", async (t) => {
    const s = await connect(gw1Url(), { transports: ["websocket"] }, t);
    const b = await connect(gw2Url(), {}, t);
    const room = roomName("rate");
    const ns = userName("fast");
    await join(s, room, ns);
    await join(b, room, userName("b"));
    const acks = await Promise.all(Array.from({ length: 60 }, (_, i) => emitAck(s, "send_message", { room, message: `r${i}` }, 10000)));
    const ok = acks.filter((a) => a?.ok === true);
    const limited = acks.filter((a) => a?.ok === false && a.error?.code === "rate_limited");
    assert.equal(ok.length + limited.length, 60, `every ack is ok or rate_limited: ${show(acks.filter((a) => !ok.includes(a) && !limited.includes(a)))}`);
    assert.ok(limited.length >= 1, "at least one rate_limited");
    assert.ok(ok.length >= 40 && ok.length <= 45, `accepted ${ok.length}, expected the burst of 40 (+ a few refills)`);
    for (const l of limited) assert.ok(typeof l.error.message === "string" && l.error.message.length > 0);
    const got = await waitFor(b, "receive_message", isMsgId(ok.at(-1).id)).then(() => received(b, "receive_message", (m) => m?.username === ns));
    await sleep(QUIET_MS);
    assert.deepEqual(ids(received(b, "receive_message", (m) => m?.username === ns)).sort(), ids(ok).sort(), `delivered = accepted (${got.length})`);
    assert.equal(s.connected, true);
    await sleep(1500);
    await stillWorks(s, room);
  });
});

describe("history rate limit", () => {
  test("40 get_history at once: the burst of 20 is answered, the rest rate_limited; the connection stays", async (t) => {
    const s = await connect(gw1Url(), { transports: ["websocket"] }, t);
    const room = roomName("history-rate");
    const acks = await Promise.all(Array.from({ length: 40 }, () => emitAck(s, "get_history", { room }, 10000)));
    const ok = acks.filter((a) => a?.ok === true).length;
    const limited = acks.filter((a) => a?.ok === false && a.error?.code === "rate_limited").length;
    assert.equal(ok + limited, 40, show(acks.filter((a) => a?.ok !== true && a?.error?.code !== "rate_limited")));
    assert.ok(ok >= 20 && ok <= 24, `answered ${ok}, expected the burst of 20 (+ a few refills)`);
    assert.equal(s.connected, true);
  });
});
