// Chat flow: join notices, messages, typing, leave/disconnect notices, ordering, dedup, across gateways.

import { after, describe, test } from "node:test";
import assert from "node:assert/strict";
import {
  QUIET_MS, UUIDV7_RE, sleep, assertChatBot, assertUsers, closeAll, connect, disconnect, emitAck, expectNone, gw1Url, gw2Url, ids,
  isChatBot, isMsgId, join, mark, me, msgFields, msgList, okAck, received, roomName, sameUsers, send, show, userName,
  uuidv7Ms, waitFor, waitForCount, waitForStored,
} from "./helpers.mjs";

after(closeAll);

const isText = (room, username, text) => (m) => m?.room === room && m?.username === username && m?.message === text;

describe("join_room", () => {
  test("ack, Welcome, chatroom_users and last_100_messages; others get 'has joined', the joiner does not", async (t) => {
    const room = roomName("join");
    const na = userName("a");
    const nb = userName("b");
    const a = await connect(gw1Url(), {}, t);
    const ackA = await join(a, room, na);
    assert.equal(ackA.room, room, `ack room: ${show(ackA)}`);
    assertUsers(ackA.users, [me(a, na)], "first joiner's ack users");
    assert.deepEqual(ackA.history, [], "new room: empty history");
    assertChatBot(await waitFor(a, "receive_message", isChatBot(room, `Welcome ${na}`)), room, `Welcome ${na}`);
    await waitFor(a, "chatroom_users", sameUsers([me(a, na)]));
    assert.deepEqual(await waitFor(a, "last_100_messages"), []);

    const sinceA = mark(a);
    const b = await connect(gw1Url(), {}, t);
    const ackB = await join(b, room, nb);
    assert.equal(ackB.room, room);
    assertUsers(ackB.users, [me(a, na), me(b, nb)], "second joiner's ack users");
    assert.deepEqual(ackB.history, []);
    const joined = await waitFor(a, "receive_message", isChatBot(room, `${nb} has joined the chat room`), { since: sinceA });
    assertChatBot(joined, room, `${nb} has joined the chat room`);
    await waitFor(a, "chatroom_users", sameUsers([me(a, na), me(b, nb)]), { since: sinceA });
    await waitFor(b, "chatroom_users", sameUsers([me(a, na), me(b, nb)]));
    assertChatBot(await waitFor(b, "receive_message", isChatBot(room, `Welcome ${nb}`)), room, `Welcome ${nb}`);
    assert.deepEqual(await waitFor(b, "last_100_messages"), []);

    // negatives: the joiner gets no "has joined" for itself, the other member no Welcome for b
    await expectNone(b, "receive_message", (m) => /has joined the chat room$/.test(m?.message ?? ""), { what: "joiner must not get 'has joined'" });
    await expectNone(a, "receive_message", isChatBot(room, `Welcome ${nb}`), { what: "other member must not get the joiner's Welcome" });
    assert.equal(received(a, "receive_message", isChatBot(room, `Welcome ${na}`)).length, 1, "exactly one Welcome");
    assert.equal(received(a, "last_100_messages").length, 1, "last_100_messages goes to the joiner only");
  });

  test("the original client's { userName, userRoom } payload is accepted", async (t) => {
    const room = roomName("legacy");
    const na = userName("legacy");
    const nb = userName("modern");
    const b = await connect(gw2Url(), {}, t);
    await join(b, room, nb);
    const a = await connect(gw1Url(), {}, t);
    const ack = await okAck(a, "join_room", { userName: na, userRoom: room }, "legacy join_room");
    assert.equal(ack.room, room);
    assertUsers(ack.users, [me(a, na), me(b, nb)]);
    await waitFor(a, "receive_message", isChatBot(room, `Welcome ${na}`));
    await waitFor(b, "receive_message", isChatBot(room, `${na} has joined the chat room`));
    const sent = await send(a, room, "legacy hello");
    const m = await waitFor(b, "receive_message", isMsgId(sent.id));
    assert.deepEqual(msgFields(m), { id: sent.id, room, username: na, message: "legacy hello", createdTime: sent.createdTime });
  });

  test("joining a room again succeeds without new notices and without duplicate delivery", async (t) => {
    const room = roomName("rejoin");
    const na = userName("a");
    const nb = userName("b");
    const a = await connect(gw1Url(), {}, t);
    const b = await connect(gw2Url(), {}, t);
    await join(a, room, na);
    await join(b, room, nb);
    await waitFor(a, "chatroom_users", sameUsers([me(a, na), me(b, nb)]));
    const first = await send(a, room, "before rejoin");
    await waitForStored(a, room, [first.id]);
    await waitFor(b, "receive_message", isMsgId(first.id));

    const sa = mark(a);
    const sb = mark(b);
    const again = await join(a, room, na);
    assert.equal(again.room, room);
    assertUsers(again.users, [me(a, na), me(b, nb)], "re-join ack users (no duplicate entry)");
    assert.deepEqual(ids(again.history), [first.id], "re-join ack history");
    await expectNone(a, "receive_message", (m) => m?.username === "ChatBot", { since: sa, what: "no new notice to the re-joiner" });
    await expectNone(b, "receive_message", (m) => m?.username === "ChatBot", { since: sb, what: "no new notice to the others" });

    const second = await send(b, room, "after rejoin");
    await waitFor(a, "receive_message", isMsgId(second.id));
    await sleep(QUIET_MS);
    assert.equal(received(a, "receive_message", isMsgId(second.id)).length, 1, "a socket that joined twice gets each message once");
  });
});

describe("send_message", () => {
  test("every member including the sender gets the exact message; ack has a UUIDv7 id and createdTime; others don't", async (t) => {
    const room = roomName("send");
    const other = roomName("send-other");
    const na = userName("a");
    const nb = userName("b");
    const a = await connect(gw1Url(), {}, t);
    const b = await connect(gw1Url(), {}, t);
    const c = await connect(gw1Url(), {}, t);
    await join(a, room, na);
    await join(b, room, nb);
    await join(c, other, userName("c"));
    const t0 = Date.now();
    const ack = await send(a, room, "   hello world \n ");
    const t1 = Date.now();
    assert.match(ack.id, UUIDV7_RE, `id must be a UUIDv7: ${show(ack)}`);
    assert.ok(ack.createdTime >= t0 - 50 && ack.createdTime <= t1 + 50, `createdTime ${ack.createdTime} not within [${t0}, ${t1}]`);
    assert.ok(Math.abs(uuidv7Ms(ack.id) - ack.createdTime) < 5000, `UUIDv7 time ${uuidv7Ms(ack.id)} far from createdTime ${ack.createdTime}`);
    const expected = { id: ack.id, room, username: na, message: "hello world", createdTime: ack.createdTime };
    for (const s of [a, b]) assert.deepEqual(msgFields(await waitFor(s, "receive_message", isMsgId(ack.id))), expected);
    await expectNone(c, "receive_message", (m) => m?.room !== other, { what: "member of another room" });
    for (const s of [a, b]) assert.equal(received(s, "receive_message", isMsgId(ack.id)).length, 1, "delivered once");
  });

  test("ids of consecutive messages increase (time-sortable) and createdTime does not go back", async (t) => {
    const room = roomName("sortable");
    const a = await connect(gw2Url(), {}, t);
    await join(a, room, userName("a"));
    const acks = [];
    for (let i = 0; i < 8; i++) acks.push(await send(a, room, `m${i}`));
    for (let i = 1; i < acks.length; i++) {
      assert.ok(acks[i].id > acks[i - 1].id, `id ${acks[i].id} must sort after ${acks[i - 1].id}`);
      assert.ok(acks[i].createdTime >= acks[i - 1].createdTime, "createdTime monotonic");
    }
    assert.equal(new Set(ids(acks)).size, acks.length, "unique ids");
  });

  test("a burst of 30 without waiting for acks is delivered on both gateways and stored in send order", async (t) => {
    const room = roomName("order");
    const ns = userName("sender");
    const s = await connect(gw1Url(), {}, t);
    const r1 = await connect(gw1Url(), {}, t);
    const r2 = await connect(gw2Url(), {}, t);
    await join(s, room, ns);
    await join(r1, room, userName("r1"));
    await join(r2, room, userName("r2"));
    await waitFor(s, "chatroom_users", (l) => Array.isArray(l) && l.length === 3);
    const texts = Array.from({ length: 30 }, (_, i) => `burst ${String(i).padStart(2, "0")}`);
    const pending = texts.map((message) => emitAck(s, "send_message", { room, message }, 10000));
    const acks = await Promise.all(pending);
    acks.forEach((a, i) => assert.equal(a?.ok, true, `ack ${i}: ${show(a)}`));
    for (let i = 1; i < acks.length; i++) assert.ok(acks[i].id > acks[i - 1].id, `ack ids out of send order at ${i}: ${acks[i - 1].id} then ${acks[i].id}`);
    for (const [label, r] of [["sender", s], ["gateway1 receiver", r1], ["gateway2 receiver", r2]]) {
      const got = await waitForCount(r, "receive_message", (m) => m?.username === ns && m?.room === room, 30, { what: label });
      assert.deepEqual(got.map((m) => m.message), texts, `${label}: delivery order`);
      assert.deepEqual(ids(got), ids(acks), `${label}: ids`);
    }
    const stored = await waitForStored(r2, room, ids(acks));
    assert.deepEqual([...stored].reverse().map((m) => m.message), texts, "history order (oldest first after reversing)");
    assert.deepEqual(msgList([...stored].reverse()), acks.map((a, i) => ({ id: a.id, room, username: ns, message: texts[i], createdTime: a.createdTime })));
  });
});

describe("clientId dedup", () => {
  test("the same clientId from the same user in the same room is stored and delivered once; the retry gets the first id", async (t) => {
    const room = roomName("dedup");
    const room2 = roomName("dedup2");
    const na = userName("a");
    const nb = userName("b");
    const a = await connect(gw1Url(), {}, t);
    const b = await connect(gw2Url(), {}, t);
    await join(a, room, na);
    await join(b, room, nb);
    await join(a, room2, na);
    const cid = `cid-${Date.now()}`;

    const first = await send(a, room, "dedup me", { clientId: cid });
    const retry = await send(a, room, "dedup me", { clientId: cid });
    assert.deepEqual({ id: retry.id, createdTime: retry.createdTime }, { id: first.id, createdTime: first.createdTime }, "retry ack carries the first id and createdTime");

    // two concurrent sends with one clientId
    const cid2 = `${cid}-concurrent`;
    const [c1, c2] = await Promise.all([
      emitAck(a, "send_message", { room, message: "concurrent", clientId: cid2 }),
      emitAck(a, "send_message", { room, message: "concurrent", clientId: cid2 }),
    ]);
    assert.equal(c1?.ok, true, show(c1));
    assert.equal(c2?.ok, true, show(c2));
    assert.equal(c2.id, c1.id, "concurrent retry carries the same id");

    // the same clientId elsewhere is a different message
    const otherRoom = await send(a, room2, "dedup me", { clientId: cid });
    const otherUser = await send(b, room, "dedup me", { clientId: cid });
    assert.notEqual(otherRoom.id, first.id, "same clientId in another room is a new message");
    assert.notEqual(otherUser.id, first.id, "same clientId from another user is a new message");
    assert.notEqual(otherUser.id, otherRoom.id);

    for (const s of [a, b]) {
      await waitFor(s, "receive_message", isMsgId(otherUser.id));
      await sleep(QUIET_MS);
      assert.equal(received(s, "receive_message", isText(room, na, "dedup me")).length, 1, `${s.id}: 'dedup me' delivered once`);
      assert.equal(received(s, "receive_message", isText(room, na, "concurrent")).length, 1, `${s.id}: 'concurrent' delivered once`);
    }
    const stored = await waitForStored(b, room, [first.id, c1.id, otherUser.id]);
    assert.equal(stored.filter(isText(room, na, "dedup me")).length, 1, `history holds the message once: ${show(stored)}`);
    assert.equal(stored.filter(isText(room, na, "concurrent")).length, 1, `history holds the concurrent message once: ${show(stored)}`);
    assert.equal(stored.length, 3, `history: ${show(stored)}`);
  });
});

describe("clientId retry after a reconnect", () => {
  test("same user, new socket on the other gateway, same clientId: the first id comes back and nothing is delivered again", async (t) => {
    const room = roomName("retry");
    const na = userName("a");
    const a1 = await connect(gw1Url(), {}, t);
    const b = await connect(gw2Url(), {}, t);
    await join(a1, room, na);
    await join(b, room, userName("b"));
    const payload = { room, message: "sent once, retried after reconnect", clientId: `cid-${Date.now()}` };
    const first = await send(a1, room, payload.message, { clientId: payload.clientId });
    await waitFor(b, "receive_message", isMsgId(first.id));
    await disconnect(a1);

    const a2 = await connect(gw2Url(), {}, t);
    await join(a2, room, na);
    const retry = await send(a2, room, payload.message, { clientId: payload.clientId });
    assert.deepEqual({ id: retry.id, createdTime: retry.createdTime }, { id: first.id, createdTime: first.createdTime }, "retry from the new socket");
    await sleep(QUIET_MS);
    assert.equal(received(b, "receive_message", isMsgId(first.id)).length, 1, "the other member got it once");
    assert.deepEqual(received(a2, "receive_message", (m) => m?.message === payload.message), [], "not delivered again to the reconnected sender");
    const stored = await waitForStored(b, room, [first.id]);
    assert.deepEqual(ids(stored), [first.id], "stored once");
  });
});

describe("typing", () => {
  test("other members on both gateways get typing; the sender and other rooms do not; typing is never stored", async (t) => {
    const room = roomName("typing");
    const other = roomName("typing-other");
    const na = userName("a");
    const a = await connect(gw1Url(), {}, t);
    const b = await connect(gw1Url(), {}, t);
    const c = await connect(gw2Url(), {}, t);
    const d = await connect(gw2Url(), {}, t);
    await join(a, room, na);
    await join(b, room, userName("b"));
    await join(c, room, userName("c"));
    await join(d, other, userName("d"));
    assert.deepEqual(await emitAck(a, "typing", { room, isTyping: true }), { ok: true });
    for (const s of [b, c]) {
      assert.deepEqual(await waitFor(s, "typing", (p) => p?.isTyping === true), { room, username: na, isTyping: true });
    }
    assert.deepEqual(await emitAck(a, "typing", { room, isTyping: false }), { ok: true });
    for (const s of [b, c]) {
      assert.deepEqual(await waitFor(s, "typing", (p) => p?.isTyping === false), { room, username: na, isTyping: false });
    }
    await expectNone(a, "typing", () => true, { what: "the typer must not get its own typing" });
    await expectNone(d, "typing", () => true, { what: "member of another room" });
    for (const s of [b, c]) assert.equal(received(s, "typing").length, 2, "exactly two typing events");

    const msg = await send(a, room, "after typing");
    const stored = await waitForStored(b, room, [msg.id]);
    assert.deepEqual(ids(stored), [msg.id], `typing must not be stored: ${show(stored)}`);
  });
});

describe("across gateways", () => {
  test("clients on gateway1 and gateway2 see each other, their messages, typing and notices", async (t) => {
    const room = roomName("cross");
    const na = userName("gw1");
    const nb = userName("gw2");
    const a = await connect(gw1Url(), {}, t);
    const b = await connect(gw2Url(), {}, t);
    await join(a, room, na);
    const ackB = await join(b, room, nb);
    const both = [me(a, na), me(b, nb)];
    assertUsers(ackB.users, both, "gateway2 joiner sees the gateway1 member in users");
    await waitFor(a, "chatroom_users", sameUsers(both), { what: "gateway1 chatroom_users lists both" });
    await waitFor(b, "chatroom_users", sameUsers(both), { what: "gateway2 chatroom_users lists both" });
    assertChatBot(await waitFor(a, "receive_message", isChatBot(room, `${nb} has joined the chat room`)), room, `${nb} has joined the chat room`);

    const m1 = await send(a, room, "from gateway1");
    const m2 = await send(b, room, "from gateway2");
    for (const s of [a, b]) {
      assert.deepEqual(msgFields(await waitFor(s, "receive_message", isMsgId(m1.id))), { id: m1.id, room, username: na, message: "from gateway1", createdTime: m1.createdTime });
      assert.deepEqual(msgFields(await waitFor(s, "receive_message", isMsgId(m2.id))), { id: m2.id, room, username: nb, message: "from gateway2", createdTime: m2.createdTime });
    }
    await okAck(b, "typing", { room, isTyping: true });
    assert.deepEqual(await waitFor(a, "typing"), { room, username: nb, isTyping: true });
    await okAck(a, "typing", { room, isTyping: true });
    assert.deepEqual(await waitFor(b, "typing"), { room, username: na, isTyping: true });

    const sa = mark(a);
    await okAck(b, "leave_room", { room });
    assertChatBot(await waitFor(a, "receive_message", isChatBot(room, `${nb} has left the chat room`), { since: sa }), room, `${nb} has left the chat room`);
    await waitFor(a, "chatroom_users", sameUsers([me(a, na)]), { since: sa });
  });
});

describe("leave_room and disconnect", () => {
  test("leave_room: ack, notices to the others, no more messages; leaving again is not_in_room", async (t) => {
    const room = roomName("leave");
    const na = userName("a");
    const nb = userName("b");
    const a = await connect(gw1Url(), {}, t);
    const b = await connect(gw2Url(), {}, t);
    await join(a, room, na);
    await join(b, room, nb);
    await waitFor(b, "chatroom_users", sameUsers([me(a, na), me(b, nb)]));
    const sb = mark(b);
    const sa = mark(a);
    assert.deepEqual(await emitAck(a, "leave_room", { room }), { ok: true });
    await waitFor(b, "receive_message", isChatBot(room, `${na} has left the chat room`), { since: sb });
    await waitFor(b, "chatroom_users", sameUsers([me(b, nb)]), { since: sb });
    const after = await send(b, room, "after a left");
    await waitFor(b, "receive_message", isMsgId(after.id));
    await expectNone(a, "receive_message", () => true, { since: sa, what: "left member gets nothing from the room" });
    await expectNone(a, "chatroom_users", () => true, { since: sa, what: "left member gets no chatroom_users" });
    const res = await emitAck(a, "send_message", { room, message: "not a member" });
    assert.equal(res?.ok, false, show(res));
    assert.equal(res.error?.code, "not_in_room", show(res));
    const again = await emitAck(a, "leave_room", { room });
    assert.equal(again?.error?.code, "not_in_room", `leaving a room not joined: ${show(again)}`);
    assert.equal(a.connected, true);
  });

  test("disconnect: notices and fresh chatroom_users in every room the socket was in, on both gateways", async (t) => {
    const r1 = roomName("dc1");
    const r2 = roomName("dc2");
    const na = userName("leaver");
    const nb = userName("b");
    const nc = userName("c");
    const a = await connect(gw1Url(), {}, t);
    const b = await connect(gw1Url(), {}, t);
    const c = await connect(gw2Url(), {}, t);
    await join(a, r1, na);
    await join(a, r2, na);
    await join(b, r1, nb);
    await join(c, r2, nc);
    await waitFor(b, "chatroom_users", sameUsers([me(a, na), me(b, nb)]));
    await waitFor(c, "chatroom_users", sameUsers([me(a, na), me(c, nc)]));
    const sb = mark(b);
    const sc = mark(c);
    const aId = a.id;
    await disconnect(a);
    await waitFor(b, "receive_message", isChatBot(r1, `${na} has left the chat room`), { since: sb, what: "gateway1 member" });
    await waitFor(c, "receive_message", isChatBot(r2, `${na} has left the chat room`), { since: sc, what: "gateway2 member" });
    await waitFor(b, "chatroom_users", sameUsers([me(b, nb)]), { since: sb });
    await waitFor(c, "chatroom_users", sameUsers([me(c, nc)]), { since: sc });
    // a later joiner no longer sees the disconnected socket
    const d = await connect(gw2Url(), {}, t);
    const nd = userName("d");
    const ackD = await join(d, r1, nd);
    assertUsers(ackD.users, [me(b, nb), me(d, nd)], `users after ${aId} disconnected`);
    await expectNone(b, "receive_message", isChatBot(r2, `${na} has left the chat room`), { since: sb, what: "notice only to the room's own members" });
  });
});
