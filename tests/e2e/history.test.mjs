// History: get_history paging, last_100_messages / join history, `since` recovery, persister restart.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import {
  ENV, PERSIST_MS, REPO_DIR, closeAll, connect, disconnect, emitAck, getHistory, gw1Url, gw2Url, ids, isMsgId, join,
  lbUrl, msgList, roomName, runScript, send, sendPaced, show, userName, waitFor, waitForCount, waitForStored,
} from "./helpers.mjs";

after(closeAll);

const expectedMsgs = (acks, room, username, texts) =>
  acks.map((a, i) => ({ id: a.id, room, username, message: texts[i], createdTime: a.createdTime }));

describe("a room with 120 stored messages", () => {
  const room = roomName("hist120");
  const senderName = userName("h");
  const texts = Array.from({ length: 120 }, (_, i) => `history message ${String(i).padStart(3, "0")}`);
  let all; // expected messages, oldest first
  let newestFirst;

  before(async () => {
    const sender = await connect(gw1Url(), { transports: ["websocket"] });
    await join(sender, room, senderName);
    const acks = await sendPaced(sender, room, texts);
    for (let i = 1; i < acks.length; i++) assert.ok(acks[i].id > acks[i - 1].id, `ids must increase: ${acks[i - 1].id} then ${acks[i].id}`);
    all = expectedMsgs(acks, room, senderName, texts);
    newestFirst = [...all].reverse();
    await waitForStored(sender, room, ids(acks), PERSIST_MS + 7000);
    sender.disconnect();
  });

  test("paging with limit 50 gives 50, 50, 20 with hasMore true, true, false; newest first, no overlap or gap", async (t) => {
    const s = await connect(gw2Url(), {}, t);
    const p1 = await getHistory(s, room, { limit: 50 });
    assert.deepEqual(msgList(p1.messages), newestFirst.slice(0, 50), "page 1");
    assert.equal(p1.hasMore, true);
    const p2 = await getHistory(s, room, { limit: 50, before: p1.messages.at(-1).id });
    assert.deepEqual(msgList(p2.messages), newestFirst.slice(50, 100), "page 2");
    assert.equal(p2.hasMore, true);
    const p3 = await getHistory(s, room, { limit: 50, before: p2.messages.at(-1).id });
    assert.deepEqual(msgList(p3.messages), newestFirst.slice(100), "page 3");
    assert.equal(p3.hasMore, false);
  });

  test("limit default 50, 1 and 100; `before` is exclusive; hasMore is exact at the boundary", async (t) => {
    const s = await connect(gw1Url(), {}, t);
    const def = await getHistory(s, room);
    assert.deepEqual(ids(def.messages), ids(newestFirst.slice(0, 50)), "default limit is 50");
    assert.equal(def.hasMore, true);
    const one = await getHistory(s, room, { limit: 1 });
    assert.deepEqual(ids(one.messages), [newestFirst[0].id]);
    assert.equal(one.hasMore, true);
    const hundred = await getHistory(s, room, { limit: 100 });
    assert.deepEqual(ids(hundred.messages), ids(newestFirst.slice(0, 100)));
    assert.equal(hundred.hasMore, true);
    const mid = await getHistory(s, room, { limit: 3, before: newestFirst[10].id });
    assert.deepEqual(ids(mid.messages), ids(newestFirst.slice(11, 14)), "strictly older than `before`");
    const exact = await getHistory(s, room, { limit: 50, before: newestFirst[69].id });
    assert.deepEqual(ids(exact.messages), ids(newestFirst.slice(70)), "the last 50");
    assert.equal(exact.hasMore, false, "no more messages after exactly the last page");
    const oldest = await getHistory(s, room, { before: all[0].id });
    assert.deepEqual(oldest.messages, []);
    assert.equal(oldest.hasMore, false);
  });

  test("get_history does not require membership and is the same on every gateway and via the LB", async (t) => {
    const pages = [];
    for (const url of [gw1Url(), gw2Url(), lbUrl()]) {
      const s = await connect(url, { transports: ["websocket"] }, t);
      pages.push(await getHistory(s, room, { limit: 20, before: newestFirst[5].id }));
    }
    for (const p of pages) assert.deepEqual(msgList(p.messages), newestFirst.slice(6, 26));
  });

  test("a new joiner gets the 100 newest messages oldest first in the ack and in last_100_messages", async (t) => {
    const s = await connect(gw2Url(), {}, t);
    const ack = await join(s, room, userName("late"));
    const expected = all.slice(20);
    assert.deepEqual(msgList(ack.history), expected, "ack history: 100 newest, oldest first");
    const l100 = await waitFor(s, "last_100_messages");
    assert.deepEqual(msgList(l100), expected, "last_100_messages");
  });
});

describe("join with `since`", () => {
  async function scenario(t, { waitPersisted }) {
    const room = roomName("since");
    const na = userName("a");
    const nb = userName("b");
    const a = await connect(gw1Url(), {}, t);
    const b = await connect(gw2Url(), {}, t);
    await join(a, room, na);
    await join(b, room, nb);
    const seenTexts = ["seen 1", "seen 2", "seen 3"];
    const seen = await sendPaced(b, room, seenTexts);
    const got = await waitForCount(a, "receive_message", (m) => m?.username === nb, 3);
    const lastSeen = got.at(-1).id;
    assert.equal(lastSeen, seen.at(-1).id);
    await disconnect(a);
    const missedTexts = ["missed 1", "missed 2", "missed 3", "missed 4"];
    const missed = await sendPaced(b, room, missedTexts);
    if (waitPersisted) await waitForStored(b, room, [...ids(seen), ...ids(missed)]);

    const a2 = await connect(gw1Url(), {}, t);
    const ack = await join(a2, room, na, { since: lastSeen });
    const expected = expectedMsgs(missed, room, nb, missedTexts);
    assert.deepEqual(msgList(ack.history), expected, `history with since must be exactly the missed messages, oldest first`);
    assert.deepEqual(msgList(await waitFor(a2, "last_100_messages")), expected, "last_100_messages with since");

    const a3 = await connect(gw2Url(), {}, t);
    const none = await join(a3, room, userName("c"), { since: missed.at(-1).id });
    assert.deepEqual(none.history, [], "since the newest id: nothing missed");
  }

  test("a reconnecting client recovers exactly the messages it missed (after they are persisted)", async (t) => {
    await scenario(t, { waitPersisted: true });
  });

  // History includes messages JetStream acked but the persister has not written yet.
  test("recovery right after the acks, before the persister's batch (a client reconnecting quickly)", async (t) => {
    await scenario(t, { waitPersisted: false });
  });
});

describe("persister restart", () => {
  test("messages sent before and while the persister is down are in history after it restarts", { timeout: 120_000 }, async (t) => {
    assert.ok(ENV.runDir, "CHATIFY_RUN_DIR must be known to restart the persister");
    for (const script of ["deploy/local/up.sh", "deploy/local/down.sh"]) {
      assert.ok(fs.existsSync(path.join(REPO_DIR, script)), `${script} is missing`);
    }
    const room = roomName("restart");
    const ns = userName("p");
    const s = await connect(gw1Url(), {}, t);
    await join(s, room, ns);
    const beforeTexts = ["before restart 1", "before restart 2", "before restart 3"];
    const beforeAcks = await sendPaced(s, room, beforeTexts);
    await waitForStored(s, room, ids(beforeAcks));

    const down = await runScript("deploy/local/down.sh", ["persister"]);
    assert.equal(down.code, 0, `down.sh persister failed:\n${down.output.slice(-2000)}`);
    let upDone = false;
    t.after(async () => {
      if (!upDone) await runScript("deploy/local/up.sh", ["persister"]).catch(() => {});
    });
    const whileTexts = ["while down 1", "while down 2", "while down 3"];
    const whileAcks = await sendPaced(s, room, whileTexts);
    const up = await runScript("deploy/local/up.sh", ["persister"]);
    upDone = true;
    assert.equal(up.code, 0, `up.sh persister failed:\n${up.output.slice(-2000)}`);

    const expected = [
      ...expectedMsgs(beforeAcks, room, ns, beforeTexts),
      ...expectedMsgs(whileAcks, room, ns, whileTexts),
    ];
    await waitForStored(s, room, ids(expected), PERSIST_MS + 15000);
    const c = await connect(gw2Url(), {}, t);
    const ack = await join(c, room, userName("new"));
    assert.deepEqual(msgList(ack.history), expected, "join history after the restart");
    assert.deepEqual(msgList(await waitFor(c, "last_100_messages")), expected);
    const p1 = await getHistory(c, room, { limit: 4 });
    assert.deepEqual(msgList(p1.messages), [...expected].reverse().slice(0, 4));
    assert.equal(p1.hasMore, true);
    const p2 = await getHistory(c, room, { limit: 4, before: p1.messages.at(-1).id });
    assert.deepEqual(msgList(p2.messages), [...expected].reverse().slice(4));
    assert.equal(p2.hasMore, false);
    // no duplicates from the redelivery after the restart
    const res = await emitAck(c, "get_history", { room, limit: 100 });
    assert.equal(res.messages.length, 6, `stored once each: ${show(ids(res.messages))}`);
    const fresh = await send(s, room, "after restart");
    await waitFor(c, "receive_message", isMsgId(fresh.id), { what: "live delivery is unaffected" });
  });
});
