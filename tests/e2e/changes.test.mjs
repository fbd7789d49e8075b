// Messages that change (contract v2): replies, edits, deletions, reactions, changes since a
// cursor, and read markers. Members sit on both gateways, so every change crosses the stream; the
// history checks read what the persister wrote to HarperDB. The auth part starts two gateways of its
// own with a JWT secret, on the running system's NATS.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import crypto from "node:crypto";
import jwt from "jsonwebtoken";
import {
  PERSIST_MS, closeAll, connect, emitAck, expectNone, failAck, fullHistory, gw1Url, gw2Url, isMsgId, join, mark,
  okAck, received, roomName, send, show, sleep, startGateway, uid, userName, waitFor,
} from "./helpers.mjs";

after(() => closeAll());

/** Two members of a fresh room, one on each gateway. */
async function pair(tag) {
  const room = roomName(tag);
  const [a, b] = await Promise.all([connect(gw1Url()), connect(gw2Url())]);
  const [ua, ub] = [userName("a"), userName("b")];
  await okAck(a, "join_room", { room, username: ua });
  await okAck(b, "join_room", { room, username: ub });
  return { room, a, b, ua, ub };
}

/** Polls the room's full history until `pred` holds for the message `id`. */
async function waitStored(socket, room, id, pred, what) {
  const deadline = Date.now() + PERSIST_MS;
  let last;
  while (Date.now() < deadline) {
    const list = await fullHistory(socket, room);
    last = list.find((m) => m.id === id);
    if (last && pred(last)) return last;
    await sleep(150);
  }
  assert.fail(`history never showed ${what} for ${id}: last ${show(last)}`);
}

describe("replies", () => {
  test("replyTo a message of the room reaches every member, and history keeps it", async () => {
    const { room, a, b } = await pair("reply");
    const first = await send(a, room, "question");
    const res = await okAck(b, "send_message", { room, message: "answer", replyTo: first.id });
    const got = await waitFor(a, "receive_message", isMsgId(res.id));
    assert.equal(got.replyTo, first.id);
    const stored = await waitStored(a, room, res.id, (m) => m.replyTo === first.id, "replyTo");
    assert.equal(stored.message, "answer");
  });

  test("replyTo an unknown id, or a message of another room, is not_found and sends nothing", async () => {
    const { room, a, b } = await pair("reply-bad");
    const other = roomName("reply-other");
    await okAck(a, "join_room", { room: other, username: userName("o") });
    const elsewhere = await send(a, other, "elsewhere");
    const since = mark(b);
    await failAck(a, "send_message", { room, message: "x", replyTo: crypto.randomUUID() }, "not_found");
    await failAck(a, "send_message", { room, message: "y", replyTo: elsewhere.id }, "not_found");
    await failAck(a, "send_message", { room, message: "z", replyTo: "not-a-uuid" }, "invalid_payload");
    await expectNone(b, "receive_message", (m) => m?.room === room && m.username !== "ChatBot", { since });
  });
});

describe("edits and deletions", () => {
  test("the author edits: ack, message_edited on both gateways, history shows the new text", async () => {
    const { room, a, b } = await pair("edit");
    const sent = await send(a, room, "tpyo");
    const res = await okAck(a, "edit_message", { room, id: sent.id, message: "typo" });
    assert.equal(res.id, sent.id);
    assert.ok(Number.isInteger(res.editedTime) && res.editedTime >= sent.createdTime, show(res));
    for (const s of [a, b]) {
      const ev = await waitFor(s, "message_edited", (e) => e?.id === sent.id);
      assert.deepEqual(ev, { room, id: sent.id, message: "typo", editedTime: res.editedTime });
    }
    const stored = await waitStored(b, room, sent.id, (m) => m.message === "typo", "the edit");
    assert.equal(stored.editedTime, res.editedTime);
  });

  test("someone else may neither edit nor delete; nothing is told", async () => {
    const { room, a, b } = await pair("edit-other");
    const sent = await send(a, room, "mine");
    const since = mark(a);
    await failAck(b, "edit_message", { room, id: sent.id, message: "yours" }, "forbidden");
    await failAck(b, "delete_message", { room, id: sent.id }, "forbidden");
    await failAck(b, "edit_message", { room, id: crypto.randomUUID(), message: "?" }, "not_found");
    await expectNone(a, "message_edited", () => true, { since });
    await expectNone(a, "message_deleted", () => true, { since });
  });

  test("the author deletes: message_deleted everywhere, history keeps { id, room, createdTime, deleted }", async () => {
    const { room, a, b } = await pair("delete");
    const sent = await send(a, room, "oops");
    assert.deepEqual(await okAck(a, "delete_message", { room, id: sent.id }), { ok: true, id: sent.id });
    for (const s of [a, b]) {
      const ev = await waitFor(s, "message_deleted", (e) => e?.id === sent.id);
      assert.deepEqual(ev, { room, id: sent.id });
    }
    // Deleting again answers the same; editing or reacting to it is not_found.
    assert.deepEqual(await okAck(a, "delete_message", { room, id: sent.id }), { ok: true, id: sent.id });
    await failAck(a, "edit_message", { room, id: sent.id, message: "back" }, "not_found");
    await failAck(b, "react", { room, id: sent.id, emoji: "👍", add: true }, "not_found");
    const stored = await waitStored(b, room, sent.id, (m) => m.deleted === true, "the deletion");
    assert.deepEqual(stored, { id: sent.id, room, createdTime: sent.createdTime, deleted: true });
  });
});

describe("reactions", () => {
  test("one reaction per member and emoji; counts reach both gateways and history", async () => {
    const { room, a, b, ua, ub } = await pair("react");
    const sent = await send(a, room, "react to me");
    assert.deepEqual(await okAck(a, "react", { room, id: sent.id, emoji: "👍", add: true }), {
      ok: true, id: sent.id, reactions: { "👍": 1 },
    });
    // Adding again changes nothing.
    assert.deepEqual((await okAck(a, "react", { room, id: sent.id, emoji: "👍", add: true })).reactions, { "👍": 1 });
    assert.deepEqual((await okAck(b, "react", { room, id: sent.id, emoji: "👍", add: true })).reactions, { "👍": 2 });
    assert.deepEqual((await okAck(b, "react", { room, id: sent.id, emoji: "🎉", add: true })).reactions, { "👍": 2, "🎉": 1 });
    assert.deepEqual((await okAck(a, "react", { room, id: sent.id, emoji: "👍", add: false })).reactions, { "👍": 1, "🎉": 1 });
    const ev = await waitFor(a, "reaction", (e) => e?.id === sent.id && e.emoji === "🎉");
    assert.deepEqual(ev, { room, id: sent.id, emoji: "🎉", add: true, reactions: { "👍": 2, "🎉": 1 }, username: ub });
    await waitFor(b, "reaction", (e) => e?.id === sent.id && e.add === false && e.username === ua);
    const stored = await waitStored(a, room, sent.id, (m) => m.reactions?.["👍"] === 1 && m.reactions?.["🎉"] === 1, "the reactions");
    assert.deepEqual(stored.reactions, { "👍": 1, "🎉": 1 });
    assert.equal(stored.message, "react to me");
  });

  test("bad emoji are invalid_payload; past the distinct-emoji limit nothing is stored", async () => {
    const { room, a } = await pair("react-bad");
    const sent = await send(a, room, "limits");
    for (const emoji of ["", "x".repeat(33), "a\u0007b", 5]) {
      await failAck(a, "react", { room, id: sent.id, emoji, add: true }, "invalid_payload");
    }
    // 20 distinct emoji by default; the 21st is refused.
    for (let i = 0; i < 20; i += 1) await okAck(a, "react", { room, id: sent.id, emoji: `e${i}`, add: true });
    await sleep(300); // the 20 used the change burst; let the rate refill (10 a second)
    await failAck(a, "react", { room, id: sent.id, emoji: "e20", add: true }, "invalid_payload");
    const stored = await waitStored(a, room, sent.id, (m) => Object.keys(m.reactions ?? {}).length === 20, "20 emoji");
    assert.equal(stored.reactions.e20, undefined);
  });
});

describe("join_room since a cursor", () => {
  test("the ack's changes hold the edits, deletions and reactions to older messages", async () => {
    const { room, a, b } = await pair("since");
    const m1 = await send(a, room, "one");
    const m2 = await send(a, room, "two");
    const m3 = await send(a, room, "three");
    await okAck(a, "edit_message", { room, id: m1.id, message: "ONE" });
    await okAck(b, "react", { room, id: m2.id, emoji: "👍", add: true });
    await okAck(a, "delete_message", { room, id: m3.id });
    const m4 = await send(a, room, "four");
    await okAck(a, "edit_message", { room, id: m4.id, message: "FOUR" });
    // Everything is stored before the late joiner asks.
    await waitStored(a, room, m4.id, (m) => m.message === "FOUR", "the last edit");
    const c = await connect(gw2Url());
    const ack = await okAck(c, "join_room", { room, username: userName("late"), since: m3.id });
    assert.deepEqual(ack.history?.map((m) => [m.id, m.message]), [[m4.id, "FOUR"]], show(ack));
    const byId = Object.fromEntries((ack.changes ?? []).map((e) => [`${e.type}:${e.id}`, e]));
    assert.equal(byId[`edited:${m1.id}`]?.message, "ONE", show(ack.changes));
    assert.deepEqual(byId[`reactions:${m2.id}`]?.reactions, { "👍": 1 }, show(ack.changes));
    assert.ok(byId[`deleted:${m3.id}`], show(ack.changes));
    assert.equal(ack.changesCut, false);
  });
});

describe("with auth: moderators and read markers", () => {
  const SECRET = crypto.randomBytes(32).toString("hex");
  let gwA;
  let gwB;
  before(async () => {
    [gwA, gwB] = await Promise.all([
      startGateway("e2e-changes-a", { CHATIFY_AUTH__JWT_SECRET: SECRET }),
      startGateway("e2e-changes-b", { CHATIFY_AUTH__JWT_SECRET: SECRET }),
    ]);
  });
  after(async () => {
    closeAll();
    await Promise.all([gwA?.proc.stop("SIGTERM"), gwB?.proc.stop("SIGTERM")]);
  });
  const token = (sub, extra = {}) =>
    jwt.sign({ sub, name: `N${uid()}`, exp: Math.floor(Date.now() / 1000) + 600, ...extra }, SECRET);
  const as = (url, tok) => connect(url, { auth: { token: tok } });

  test("a moderator deletes another user's message; a plain user may not", async () => {
    const room = roomName("mod");
    const author = await as(gwA.url, token(`u-${uid()}`));
    const other = await as(gwB.url, token(`u-${uid()}`));
    const moderator = await as(gwB.url, token(`m-${uid()}`, { roles: ["moderator"] }));
    for (const s of [author, other, moderator]) await okAck(s, "join_room", { room });
    const sent = await send(author, room, "rule breaking");
    await failAck(other, "delete_message", { room, id: sent.id }, "forbidden");
    await failAck(moderator, "edit_message", { room, id: sent.id, message: "censored" }, "forbidden");
    await okAck(moderator, "delete_message", { room, id: sent.id });
    await waitFor(author, "message_deleted", (e) => e?.id === sent.id);
  });

  test("the author is the token's sub: another connection of the same user may edit", async () => {
    const room = roomName("sub");
    const sub = `u-${uid()}`;
    const first = await as(gwA.url, token(sub));
    const second = await as(gwB.url, token(sub));
    await okAck(first, "join_room", { room });
    await okAck(second, "join_room", { room });
    const sent = await send(first, room, "draft");
    await okAck(second, "edit_message", { room, id: sent.id, message: "final" });
    await waitFor(first, "message_edited", (e) => e?.id === sent.id && e.message === "final");
    const r = await okAck(second, "react", { room, id: sent.id, emoji: "👀", add: true });
    assert.deepEqual(r.reactions, { "👀": 1 });
    const told = await waitFor(first, "reaction", (e) => e?.id === sent.id);
    assert.equal(told.userId, sub);
    assert.equal(told.username, undefined);
  });

  test("mark_read moves forward only, tells the user's other connections, and join tells lastRead and unread", async () => {
    const room = roomName("read");
    const reader = `u-${uid()}`;
    const writer = await as(gwA.url, token(`w-${uid()}`));
    const phone = await as(gwA.url, token(reader));
    const laptop = await as(gwB.url, token(reader));
    await okAck(writer, "join_room", { room });
    const fresh = await okAck(phone, "join_room", { room });
    assert.equal(fresh.lastRead, null, show(fresh));
    await okAck(laptop, "join_room", { room });
    const sent = [];
    for (let i = 0; i < 5; i += 1) sent.push(await send(writer, room, `m${i}`));
    const own = await send(phone, room, "my own message");
    await okAck(writer, "delete_message", { room, id: sent[4].id });

    assert.deepEqual(await okAck(phone, "mark_read", { room, id: sent[1].id }), { ok: true });
    const told = await waitFor(laptop, "read", (e) => e?.room === room);
    assert.deepEqual(told, { room, id: sent[1].id });
    // Back is a no-op, not an error.
    await okAck(laptop, "mark_read", { room, id: sent[0].id });
    await failAck(phone, "mark_read", { room, id: crypto.randomUUID() }, "not_found");

    // Wait until the last message is stored, then a new connection joins.
    await waitStored(writer, room, own.id, () => true, "the reader's own message");
    await waitStored(writer, room, sent[4].id, (m) => m.deleted === true, "the deletion");
    const tablet = await as(gwB.url, token(reader));
    const ack = await okAck(tablet, "join_room", { room });
    assert.equal(ack.lastRead, sent[1].id, show(ack));
    // After m1: m2 and m3 count; m4 is deleted and the reader's own message is not counted.
    assert.equal(ack.unread, 2, show(ack));
  });

  test("without auth, mark_read is refused", async () => {
    const s = await connect(gw1Url());
    const room = roomName("read-anon");
    await okAck(s, "join_room", { room, username: userName() });
    const sent = await send(s, room, "hi");
    await failAck(s, "mark_read", { room, id: sent.id }, "invalid_payload");
  });
});

describe("a storm of changes is bounded", () => {
  test("past the change rate a member is rate_limited, and the room is told only what was stored", async () => {
    const { room, a, b } = await pair("storm");
    // 40 distinct (message, emoji) pairs, so every stored reaction changes a count and is told.
    const targets = [await send(a, room, "target 1"), await send(a, room, "target 2")];
    const since = mark(b);
    const results = await Promise.all(
      Array.from({ length: 40 }, (_, i) => emitAck(a, "react", { room, id: targets[i % 2].id, emoji: `s${i}`, add: true })),
    );
    const ok = results.filter((r) => r?.ok === true).length;
    const limited = results.filter((r) => r?.ok === false && r.error?.code === "rate_limited").length;
    assert.equal(ok + limited, results.length, show(results.filter((r) => r?.ok !== true && r?.error?.code !== "rate_limited")));
    // The default burst is 20, refilled at 10 a second.
    assert.ok(limited > 0 && ok >= 20 && ok <= 25, `ok ${ok}, rate_limited ${limited}`);
    await sleep(500);
    const told = received(b, "reaction", (e) => e?.room === room, since).length;
    assert.equal(told, ok, `b was told ${told} reactions for ${ok} stored`);
  });
});
