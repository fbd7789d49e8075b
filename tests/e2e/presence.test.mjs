// Large rooms: up to limits.presence_list_max members a room behaves as v1 (member lists and
// join/leave notices); above it, members get room_presence { room, count } at most once a second
// instead, and a join ack lists at most that many members next to count. This file starts two
// gateways with presence_list_max 3 on the shared NATS, so the limit is crossed with 4 members.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import {
  QUIET_MS, assertMemberIds, closeAll, connect, isChatBot, join, okAck, received, sleep, startGateway, uid, userName,
  waitFor,
} from "./helpers.mjs";

const LIST_MAX = 3;
let gwA;
let gwB;

before(async () => {
  [gwA, gwB] = await Promise.all([
    startGateway("e2e-presence-a", { CHATIFY_LIMITS__PRESENCE_LIST_MAX: String(LIST_MAX) }),
    startGateway("e2e-presence-b", { CHATIFY_LIMITS__PRESENCE_LIST_MAX: String(LIST_MAX) }),
  ]);
});

after(async () => {
  closeAll();
  await Promise.all([gwA?.proc.stop("SIGTERM"), gwB?.proc.stop("SIGTERM")]);
});

const isCount = (room, count) => (p) => p?.room === room && p?.count === count;

describe("a room past presence_list_max members", () => {
  test("is counted, not listed: room_presence instead of chatroom_users and notices; back to lists below it", { timeout: 30_000 }, async (t) => {
    const room = `e2e-presence-${uid()}`;
    const names = Array.from({ length: 5 }, (_, i) => userName(`p${i}`));
    const members = [];
    for (let i = 0; i < LIST_MAX; i++) {
      const s = await connect(i % 2 ? gwB.url : gwA.url, {}, t);
      const ack = await join(s, room, names[i]);
      assert.equal(ack.count, i + 1, "count");
      assert.equal(ack.users.length, i + 1, "listed");
      assertMemberIds(ack.users);
      members.push(s);
    }
    await waitFor(members[0], "receive_message", isChatBot(room, `${names[2]} has joined the chat room`));
    const first = members[0];
    const mark = first.rec.events.length;

    // The 4th member: past the limit.
    const fourth = await connect(gwB.url, {}, t);
    const ack4 = await join(fourth, room, names[3]);
    assert.equal(ack4.count, 4);
    assert.ok(ack4.users.length <= LIST_MAX, `a join ack lists at most ${LIST_MAX}: ${ack4.users.length}`);
    assertMemberIds(ack4.users);
    members.push(fourth);
    await waitFor(first, "room_presence", isCount(room, 4), { since: mark, timeoutMs: 3000 });
    // The 5th, then a departure: counts again (coalesced, at most one a second).
    const fifth = await connect(gwA.url, {}, t);
    const ack5 = await join(fifth, room, names[4]);
    assert.equal(ack5.count, 5);
    await waitFor(first, "room_presence", isCount(room, 5), { since: mark, timeoutMs: 3000 });
    const afterFive = first.rec.events.length;
    fifth.disconnect();
    await waitFor(first, "room_presence", isCount(room, 4), { since: afterFive, timeoutMs: 3000 });
    await sleep(QUIET_MS);
    for (const s of members.slice(0, 3)) {
      const notices = received(s, "receive_message", (m) => isChatBot(room, `${names[3]} has joined the chat room`)(m) || isChatBot(room, `${names[4]} has joined the chat room`)(m) || isChatBot(room, `${names[4]} has left the chat room`)(m));
      assert.deepEqual(notices, [], "no join or leave notices past the limit");
    }
    const counts = received(first, "room_presence", (p) => p?.room === room, mark).map((p) => p.count);
    assert.ok(counts.length >= 2 && counts.length <= 4, `room_presence sent a few times, not per change: ${counts}`);
    const listsPast = received(first, "chatroom_users", () => true, mark);
    assert.ok(listsPast.every((l) => l.length <= LIST_MAX), `no list past the limit: ${listsPast.map((l) => l.length)}`);

    // Back at the limit: lists again, with notices.
    const back = first.rec.events.length;
    fourth.disconnect();
    await waitFor(first, "chatroom_users", (l) => Array.isArray(l) && l.length === LIST_MAX, { since: back, timeoutMs: 3000 });
  });
});
