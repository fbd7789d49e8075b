// Room names are opaque Unicode strings: NATS wildcards, dots, spaces, '|' and friends never leak
// between rooms; length limits count characters; 50 rooms per socket.

import { after, describe, test } from "node:test";
import assert from "node:assert/strict";
import {
  CHATBOT, QUIET_MS, assertUsers, closeAll, connect, emitAck, failAck, gw1Url, gw2Url, ids, isChatBot, isMsgId, join,
  me, okAck, received, send, show, sleep, uid, userName, waitFor, waitForStored,
} from "./helpers.mjs";

after(closeAll);

describe("room names never leak into each other", () => {
  test("wildcards, dots, spaces, '|', case and Unicode are separate rooms (live events and history)", async (t) => {
    const p = `e2e-iso-${uid()}`;
    const unique = [
      p, `${p}.b`, `${p}.*`, `${p}.>`, `${p} b`, `${p}|q`, `${p}|0`, `${p}%7Cq`, `${p}.日本語`, `日本語-${p}`,
      p.toUpperCase(), `${p}.`, `.${p}`, `${p}..b`, `${p}/b`,
    ];
    // the literal names from the contract; shared with other runs, so checked by unique tokens only
    const shared = ["a", "a.b", "a.*", "a.>", "a b", "*", ">", "日本語"];
    const rooms = [...unique, ...shared];
    const sockets = [];
    const names = [];
    for (let i = 0; i < rooms.length; i++) {
      const s = await connect(i % 2 ? gw2Url() : gw1Url(), {}, t);
      const name = userName(`iso${i}`);
      const ack = await join(s, rooms[i], name);
      assert.equal(ack.room, rooms[i], `ack room for ${show(rooms[i])}`);
      if (i < unique.length) assertUsers(ack.users, [me(s, name)], `users of ${show(rooms[i])}`);
      sockets.push(s);
      names.push(name);
    }
    const ourNames = new Set(names);
    const tokens = rooms.map((_, i) => `token ${i} ${p}`);
    const acks = [];
    for (let i = 0; i < rooms.length; i++) acks.push(await send(sockets[i], rooms[i], tokens[i]));
    for (let i = 0; i < rooms.length; i++) {
      const m = await waitFor(sockets[i], "receive_message", isMsgId(acks[i].id), { what: `own message in ${show(rooms[i])}` });
      assert.equal(m.room, rooms[i]);
      await okAck(sockets[i], "typing", { room: rooms[i], isTyping: true });
    }
    await sleep(QUIET_MS);
    for (let i = 0; i < rooms.length; i++) {
      const s = sockets[i];
      const foreign = received(s, "receive_message", (m) => m?.room !== rooms[i] || (tokens.includes(m?.message) && m.message !== tokens[i]));
      assert.deepEqual(foreign, [], `member of ${show(rooms[i])} got messages of other rooms`);
      const foreignJoin = received(s, "receive_message", (m) => m?.username === CHATBOT && m.message !== `Welcome ${names[i]}` && names.some((n) => m.message.startsWith(n)));
      assert.deepEqual(foreignJoin, [], `member of ${show(rooms[i])} got ChatBot notices of other rooms`);
      const typing = received(s, "typing", (p2) => p2?.room !== rooms[i] || names.includes(p2?.username));
      assert.deepEqual(typing, [], `member of ${show(rooms[i])} got typing of other rooms`);
      for (const list of received(s, "chatroom_users")) {
        const others = (list ?? []).filter((u) => u.username !== names[i] && ourNames.has(u.username));
        assert.deepEqual(others, [], `chatroom_users of ${show(rooms[i])} lists members of other rooms`);
      }
    }
    for (let i = 0; i < rooms.length; i++) {
      const stored = await waitForStored(sockets[0], rooms[i], [acks[i].id]);
      const leaked = stored.filter((m) => m.room !== rooms[i] || (tokens.includes(m.message) && m.message !== tokens[i]));
      assert.deepEqual(leaked, [], `history of ${show(rooms[i])} holds messages of other rooms`);
      if (i < unique.length) assert.deepEqual(ids(stored), [acks[i].id], `history of ${show(rooms[i])}`);
    }
  });
});

describe("length limits count Unicode characters", () => {
  test("room of 128 characters (multi-byte and astral) is accepted; 129 is invalid_payload", async (t) => {
    const s = await connect(gw1Url(), {}, t);
    const name = userName("len");
    const tag = uid(); // 10 chars
    const bmp = tag + "日".repeat(118);
    const astral = tag + "😀".repeat(118);
    assert.equal([...bmp].length, 128);
    assert.equal([...astral].length, 128);
    for (const room of [bmp, astral]) {
      const ack = await join(s, room, name);
      assert.equal(ack.room, room);
      const sent = await send(s, room, "long room");
      const m = await waitFor(s, "receive_message", isMsgId(sent.id));
      assert.equal(m.room, room);
    }
    await failAck(s, "join_room", { username: name, room: bmp + "x" }, "invalid_payload", "129-char room");
    await failAck(s, "join_room", { username: name, room: astral + "😀" }, "invalid_payload", "129-char astral room");
    await okAck(s, "typing", { room: bmp, isTyping: false }, "a valid event after the failures");
  });

  test("username of 64 characters is accepted and shown exactly; 65 is invalid_payload", async (t) => {
    const s = await connect(gw2Url(), {}, t);
    const room = `e2e-ulen-${uid()}`;
    const name64 = uid() + "ü".repeat(54);
    assert.equal([...name64].length, 64);
    const ack = await join(s, room, name64);
    assertUsers(ack.users, [me(s, name64)]);
    await waitFor(s, "receive_message", isChatBot(room, `Welcome ${name64}`));
    const sent = await send(s, room, "hi");
    assert.equal((await waitFor(s, "receive_message", isMsgId(sent.id))).username, name64);
    const s2 = await connect(gw2Url(), {}, t);
    await failAck(s2, "join_room", { username: name64 + "ü", room }, "invalid_payload", "65-char username");
    await failAck(s2, "join_room", { username: "😀".repeat(65), room }, "invalid_payload", "65-char astral username");
    const ok = await join(s2, room, "😀".repeat(64));
    assertUsers(ok.users, [me(s, name64), me(s2, "😀".repeat(64))]);
  });

  test("empty and non-string room or username are invalid_payload", async (t) => {
    const s = await connect(gw1Url(), {}, t);
    const room = `e2e-empty-${uid()}`;
    const name = userName("e");
    for (const [payload, what] of [
      [{ username: name, room: "" }, "empty room"],
      [{ username: "", room }, "empty username"],
      [{ username: name, room: 42 }, "numeric room"],
      [{ username: 42, room }, "numeric username"],
      [{ username: name, room: null }, "null room"],
      [{ username: name, room: ["a"] }, "array room"],
      [{ username: { n: 1 }, room }, "object username"],
      [{ username: name }, "missing room"],
      [{ room }, "missing username (no auth configured)"],
    ]) {
      await failAck(s, "join_room", payload, "invalid_payload", what);
    }
    const ack = await join(s, room, name);
    assertUsers(ack.users, [me(s, name)], "a valid join after the failures");
    await waitFor(s, "receive_message", isChatBot(room, `Welcome ${name}`));
    await sleep(QUIET_MS);
    const bots = received(s, "receive_message", (m) => m?.username === CHATBOT);
    assert.deepEqual(bots.map((m) => m.message), [`Welcome ${name}`], "failed joins send no notices");
  });
});

describe("rooms per socket", () => {
  test("50 rooms are allowed, the 51st is too_many_rooms; re-joining a joined room and joining after a leave work", async (t) => {
    const s = await connect(gw1Url(), { transports: ["websocket"] }, t);
    const name = userName("many");
    const p = `e2e-many-${uid()}`;
    for (let i = 0; i < 50; i++) await join(s, `${p}-${i}`, name);
    await failAck(s, "join_room", { username: name, room: `${p}-50` }, "too_many_rooms", "51st room");
    const rejoin = await join(s, `${p}-7`, name);
    assert.equal(rejoin.room, `${p}-7`, "re-joining one of the 50 rooms is not a 51st room");
    await okAck(s, "leave_room", { room: `${p}-0` });
    const ack = await join(s, `${p}-50`, name);
    assertUsers(ack.users, [me(s, name)]);
    await failAck(s, "join_room", { username: name, room: `${p}-51` }, "too_many_rooms", "again 51 rooms");
    // the failed joins did not make the socket a member
    const r = await emitAck(s, "send_message", { room: `${p}-51`, message: "x" });
    assert.equal(r?.error?.code, "not_in_room", show(r));
  });
});

describe("join storms", () => {
  test("40 members joining at once on two gateways: every member ends with the full list, sent a few times, not once per join", async (t) => {
    const room = `e2e-storm-${uid()}`;
    const observer = await connect(gw1Url(), {}, t);
    const observerName = userName("watch");
    await join(observer, room, observerName);
    const since = observer.rec.events.length;
    const members = await Promise.all(Array.from({ length: 40 }, (_, i) => connect(i % 2 ? gw2Url() : gw1Url(), {}, t)));
    const names = members.map((_, i) => userName(`storm${i}`));
    const acks = await Promise.all(members.map((s, i) => join(s, room, names[i])));
    for (const ack of acks) assert.equal(ack.ok, true, show(ack));
    const everyone = [me(observer, observerName), ...members.map((s, i) => me(s, names[i]))];
    // the latest list anyone holds ends up complete
    for (const s of [observer, ...members.slice(0, 4), ...members.slice(-4)]) {
      await waitFor(s, "chatroom_users", (users) => Array.isArray(users) && users.length === everyone.length);
      const lists = received(s, "chatroom_users");
      assertUsers(lists.at(-1), everyone, "the last chatroom_users of a member");
    }
    // one list per coalescing interval, not one per join (40 lists of up to 41 entries each)
    await sleep(QUIET_MS);
    const lists = received(observer, "chatroom_users", () => true, since);
    assert.ok(lists.length < 20, `the observer got ${lists.length} chatroom_users for 40 joins`);
    assert.equal(received(observer, "receive_message", (m) => isChatBot(m) && / has joined the chat room$/.test(m.message), since).length, 40, "one notice per join");
  });
});
