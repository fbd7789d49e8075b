// Unit tests of the history checker (no servers): node --test tests/faults/

import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { CHANGE_FAILURE_COUNTS, ackOrderInversions, checkChanges, checkDeliveries, checkHistory, countInversions, historyOk, historyOrderInversions, historyStateDiffs, possibleReaction, possibleTextStates, sequenceOfId } from "./checker.mjs";

// Chatify message ids: a UUIDv7 whose low 62 bits are the stream sequence `n`; the storage key
// ends in the sequence as 16 hex digits
const id = (n) => `01936b2a-1c00-7000-8000-${n.toString(16).padStart(12, "0")}`;
const ok = (key, n, extra = {}) => ({ key, room: "r", sender: "s1", seq: n, status: "ok", ids: [id(n)], username: "ann", ...extra });
const row = (key, n, extra = {}) => ({ pk: `cg|${n.toString(16).padStart(16, "0")}`, id: id(n), room: "r", username: "ann", message: key, ...extra });

describe("checkHistory", () => {
  test("everything acknowledged is stored once, in order: all counts zero", () => {
    const attempts = [ok("m0", 0), ok("m1", 1), ok("m2", 2)];
    const rows = [row("m0", 0), row("m1", 1), row("m2", 2)];
    const r = checkHistory({ attempts, rows });
    assert.equal(r.attempted, 3);
    assert.equal(r.acknowledged, 3);
    assert.equal(r.stored, 3);
    assert.deepEqual([r.lost, r.duplicated, r.unexpected, r.reordered], [0, 0, 0, 0]);
    assert.ok(historyOk(r));
    assert.deepEqual(r.perRoom.r, { attempted: 3, acknowledged: 3, stored: 3, lost: 0, duplicated: 0, unexpected: 0, reordered: 0 });
  });

  test("an acknowledged id missing from the store is lost", () => {
    const r = checkHistory({ attempts: [ok("m0", 0), ok("m1", 1)], rows: [row("m0", 0)] });
    assert.equal(r.lost, 1);
    assert.equal(r.details.lost[0].key, "m1");
    assert.equal(historyOk(r), false);
  });

  test("an acknowledged message stored under another id is lost, and the other id is a second identity", () => {
    const r = checkHistory({ attempts: [ok("m0", 0)], rows: [row("m0", 7)] });
    assert.equal(r.lost, 1);
    assert.equal(r.duplicated, 1);
  });

  test("the same id stored twice is duplicated", () => {
    const r = checkHistory({ attempts: [ok("m0", 0)], rows: [row("m0", 0), row("m0", 0)] });
    assert.equal(r.duplicated, 1);
    assert.equal(r.lost, 0);
  });

  test("a retried message stored under two ids is duplicated", () => {
    const r = checkHistory({ attempts: [ok("m0", 0)], rows: [row("m0", 0), row("m0", 5)] });
    assert.equal(r.duplicated, 1);
    assert.equal(r.lost, 0);
  });

  test("a retry acknowledged with a second id (deduplication failed) is duplicated even if only one is stored", () => {
    const r = checkHistory({ attempts: [ok("m0", 0, { ids: [id(0), id(1)] })], rows: [row("m0", 0)] });
    assert.equal(r.duplicated, 1);
    assert.equal(r.lost, 1, "the second acked id is not stored");
  });

  test("unavailable and indeterminate attempts may or may not be stored, but at most once", () => {
    const attempts = [
      { key: "u0", room: "r", sender: "s1", seq: 0, status: "unavailable", username: "ann" },
      { key: "u1", room: "r", sender: "s1", seq: 1, status: "unavailable", username: "ann" },
      { key: "i2", room: "r", sender: "s1", seq: 2, status: "indeterminate", username: "ann" },
      { key: "i3", room: "r", sender: "s1", seq: 3, status: "indeterminate", username: "ann" },
    ];
    const fine = checkHistory({ attempts, rows: [row("u0", 0), row("i2", 2)] });
    assert.deepEqual([fine.lost, fine.duplicated, fine.unexpected, fine.reordered], [0, 0, 0, 0]);
    assert.equal(fine.acknowledged, 0);
    assert.equal(fine.unavailable, 2);
    assert.equal(fine.indeterminate, 2);
    const twice = checkHistory({ attempts, rows: [row("u0", 0), row("u0", 1)] });
    assert.equal(twice.duplicated, 1);
  });

  test("rows no attempt explains are unexpected: unknown text, rejected attempt, wrong room or user", () => {
    const attempts = [
      { key: "x", room: "r", sender: "s1", seq: 0, status: "rejected", code: "too_large", username: "ann" },
      ok("m1", 1),
      ok("m2", 2),
    ];
    const rows = [row("x", 0), row("m1", 1), row("m2", 2, { username: "bob" }), row("ghost", 3), row("m1", 4, { room: "other" })];
    const r = checkHistory({ attempts, rows });
    assert.equal(r.unexpected, 4);
    assert.equal(r.lost, 1, "m2 is stored only under another user's name");
    assert.equal(r.perRoom.other.unexpected, 1);
  });

  test("rows of one sender out of send order are reordered; other senders interleave freely", () => {
    const attempts = [
      ok("a0", 0, { sender: "a" }),
      ok("a1", 1, { sender: "a", ids: [id(3)] }),
      ok("b0", 0, { sender: "b", ids: [id(1)] }),
      ok("b1", 1, { sender: "b", ids: [id(2)] }),
    ];
    const inOrder = checkHistory({ attempts, rows: [row("a0", 0), row("b0", 1), row("b1", 2), row("a1", 3)] });
    assert.equal(inOrder.reordered, 0);
    const swapped = [ok("a0", 0, { sender: "a", ids: [id(5)] }), ok("a1", 1, { sender: "a", ids: [id(4)] })];
    const r = checkHistory({ attempts: swapped, rows: [row("a0", 5), row("a1", 4)] });
    assert.equal(r.reordered, 1);
    assert.deepEqual(r.details.reordered[0].before.key, "a1");
  });

  test("order is per room: one sender in two rooms", () => {
    const attempts = [ok("a0", 0), ok("a1", 1, { room: "q", ids: [id(1)] }), ok("a2", 2)];
    const rows = [row("a0", 0), row("a1", 1, { room: "q" }), row("a2", 2)];
    const r = checkHistory({ attempts, rows });
    assert.ok(historyOk(r));
    assert.equal(r.perRoom.q.stored, 1);
  });

  test("a duplicate key among attempts is a harness bug", () => {
    assert.throws(() => checkHistory({ attempts: [ok("m", 0), ok("m", 1)], rows: [] }), /appears twice/);
  });

  test("large histories are checked quickly", () => {
    const n = 100_000;
    const attempts = [];
    const rows = [];
    for (let i = 0; i < n; i++) {
      attempts.push(ok(`m${i}`, i, { sender: `s${i % 10}` }));
      rows.push(row(`m${i}`, i));
    }
    const started = Date.now();
    const r = checkHistory({ attempts, rows });
    assert.ok(historyOk(r));
    assert.ok(Date.now() - started < 5000, `took ${Date.now() - started} ms`);
  });
});

describe("order helpers", () => {
  test("countInversions counts adjacent descents", () => {
    assert.equal(countInversions([]), 0);
    assert.equal(countInversions([1, 2, 3]), 0);
    assert.equal(countInversions([1, 3, 2, 4, 0]), 2);
  });

  test("checkDeliveries: per room and sender order, duplicates, untracked messages ignored", () => {
    const origin = (m) => (m.message.startsWith("t:") ? { sender: m.message.split(":")[1], seq: Number(m.message.split(":")[2]) } : undefined);
    const ev = (room, n, sender, seq) => ({ id: id(n), room, message: `t:${sender}:${seq}` });
    const events = [
      ev("r", 1, "a", 0),
      ev("r", 2, "b", 0),
      ev("r", 4, "a", 2),
      ev("r", 3, "a", 1),
      ev("r", 3, "a", 1),
      { room: "r", username: "ChatBot", message: "x has joined the chat room" },
      { id: id(9), room: "r", message: "other" },
      ev("q", 5, "a", 0),
    ];
    const r = checkDeliveries(events, origin);
    assert.equal(r.reordered, 1);
    assert.equal(r.duplicates, 1);
    assert.deepEqual(Object.keys(r.bySender), ["r / a"]);
  });

  test("sequenceOfId reads the stream sequence out of a message id", () => {
    assert.equal(sequenceOfId(id(0)), 0n);
    assert.equal(sequenceOfId(id(123456)), 123456n);
    // as the Rust side makes them (shared/src/id.rs: message_id(1_700_000_000_123, 42))
    assert.equal(sequenceOfId("018bcfe5-687b-7000-8000-00000000002a"), 42n);
  });

  test("historyOrderInversions: a receiver must get a room's messages in history order", () => {
    const history = [id(3), id(1), id(2)]; // history order, whatever the ids
    assert.equal(historyOrderInversions([id(3), id(1), id(2)], history), 0);
    assert.equal(historyOrderInversions([id(3), id(2)], history), 0, "gaps are not inversions");
    assert.equal(historyOrderInversions([id(1), id(3), id(2)], history), 1);
    assert.equal(historyOrderInversions([id(9), id(3)], history), 0, "unknown ids are skipped");
  });

  test("ackOrderInversions: acked ids must increase with the send order of one sender", () => {
    const good = [ok("a", 0), ok("b", 1), { key: "c", room: "r", sender: "s1", seq: 2, status: "unavailable" }, ok("d", 3)];
    assert.equal(ackOrderInversions(good), 0);
    const bad = [ok("a", 0, { ids: [id(2)] }), ok("b", 1, { ids: [id(1)] }), ok("c", 2, { sender: "s2", ids: [id(0)] })];
    assert.equal(ackOrderInversions(bad), 1);
  });
});

// ---------------------------------------------------------------------------------------------
// Messages that change
// ---------------------------------------------------------------------------------------------

const M = id(1);
const originals = new Map([[M, "m1"], [id(2), "m2"]]);
let opN = 0;
const edit = (seq, text, status = "ok", extra = {}) => ({ n: opN++, id: M, room: "r", actor: "s1", seq, kind: "edit", text, status, emissions: 1, editedTime: status === "ok" ? 1000 + seq : undefined, ...extra });
const del = (seq, status = "ok", extra = {}) => ({ n: opN++, id: M, room: "r", actor: "s1", seq, kind: "delete", status, emissions: 1, ...extra });
const react = (actor, seq, emoji, add, status = "ok", extra = {}) => ({ n: opN++, id: M, room: "r", actor, seq, kind: "react", emoji, add, status, emissions: 1, ...extra });
const stored = (extra = {}) => ({ id: M, room: "r", username: "ann", message: "m1", ...extra });
const failures = (r) => Object.fromEntries(CHANGE_FAILURE_COUNTS.map((k) => [k, r[k]]));
const none = { changesLost: 0, changesDuplicated: 0, changesReordered: 0, changesUnexpected: 0 };

describe("checkChanges", () => {
  test("the last acknowledged edit stands, with its edit time, and reactions are exact: all counts zero", () => {
    const ops = [edit(0, "m1 e0"), edit(1, "m1 e1"), react("s2", 0, "+1", true), react("s3", 0, "+1", true), react("s3", 1, "+1", false), react("s3", 2, "+1", true), react("s2", 1, "ok", true)];
    const rows = [stored({ message: "m1 e1", editedTime: 1001, reactions: { "+1": 2, ok: 1 }, reactors: { "+1": ["a", "b"], ok: ["a"] } }), { id: id(2), room: "r", username: "ann", message: "m2" }];
    const r = checkChanges({ ops, rows, originals });
    assert.deepEqual(failures(r), none);
    assert.equal(r.changesAcknowledged, 7);
    assert.equal(r.changedMessages, 1);
    assert.deepEqual(r.byKind.edit, { attempted: 2, ok: 2, unknown: 0, rejected: 0 });
  });

  test("a lost edit: the row keeps the text before the last acknowledged edit (must fail)", () => {
    const r = checkChanges({ ops: [edit(0, "m1 e0"), edit(1, "m1 e1")], rows: [stored({ message: "m1 e0", editedTime: 1000 })], originals });
    assert.equal(r.changesLost, 1);
    assert.match(r.details.changesLost[0].why, /older than the last acknowledged edit/);
  });

  test("a lost edit of a message edited once: the original text stands (must fail)", () => {
    const r = checkChanges({ ops: [edit(0, "m1 e0")], rows: [stored()], originals });
    assert.equal(r.changesLost, 1);
  });

  test("a doubled reaction: one member's add counted twice (must fail)", () => {
    const r = checkChanges({ ops: [react("s2", 0, "+1", true), react("s2", 1, "+1", true)], rows: [stored({ reactions: { "+1": 2 } })], originals });
    assert.equal(r.changesDuplicated, 1);
    assert.equal(r.details.changesDuplicated[0].emoji, "+1");
  });

  test("a reaction taken back and counted still, or a redelivered add counted again (must fail)", () => {
    const ops = [react("s2", 0, "+1", true), react("s2", 1, "+1", false)];
    assert.equal(checkChanges({ ops, rows: [stored({ reactions: { "+1": 1 } })], originals }).changesDuplicated, 1);
    assert.deepEqual(failures(checkChanges({ ops, rows: [stored()], originals })), none);
  });

  test("counts that are not the number of reactors are duplicated (must fail)", () => {
    const r = checkChanges({ ops: [react("s2", 0, "+1", true)], rows: [stored({ reactions: { "+1": 1 }, reactors: { "+1": ["a", "a2"] } })], originals });
    assert.equal(r.changesDuplicated, 1);
  });

  test("a lost reaction: fewer than acknowledged (must fail)", () => {
    const r = checkChanges({ ops: [react("s2", 0, "+1", true), react("s3", 0, "+1", true)], rows: [stored({ reactions: { "+1": 1 } })], originals });
    assert.equal(r.changesLost, 1);
  });

  test("an out-of-order edit: an older edit applied after the newer one leaves the older text (must fail)", () => {
    // the store holds e0 with e0's time: e1 was applied before it, or not at all
    const r = checkChanges({ ops: [edit(0, "m1 e0"), edit(1, "m1 e1"), edit(2, "m1 e2")], rows: [stored({ message: "m1 e1", editedTime: 1001 })], originals });
    assert.equal(r.changesLost, 1);
    assert.deepEqual(r.details.changesLost[0].expected, ["m1 e2"]);
  });

  test("an out-of-order edit: the last text with another edit's time (must fail)", () => {
    const r = checkChanges({ ops: [edit(0, "m1 e0"), edit(1, "m1 e1")], rows: [stored({ message: "m1 e1", editedTime: 1000 })], originals });
    assert.equal(r.changesReordered, 1);
  });

  test("an edit acknowledged before a deletion must not resurrect the text (must fail)", () => {
    const ops = [edit(0, "m1 e0"), del(1)];
    const ok = checkChanges({ ops, rows: [stored({ message: "", username: "", deleted: true })], originals });
    assert.deepEqual(failures(ok), none);
    const resurrected = checkChanges({ ops, rows: [stored({ message: "m1 e0", username: "", deleted: true, editedTime: 1000 })], originals });
    assert.equal(resurrected.changesReordered, 1);
    const undeleted = checkChanges({ ops, rows: [stored({ message: "m1 e0", editedTime: 1000 })], originals });
    assert.equal(undeleted.changesLost, 1, "the acknowledged deletion is lost");
  });

  test("reactions on a deleted message are gone; a reaction kept past the deletion is out of order (must fail)", () => {
    const ops = [react("s2", 0, "+1", true), del(0)];
    assert.deepEqual(failures(checkChanges({ ops, rows: [stored({ message: "", username: "", deleted: true })], originals })), none);
    const r = checkChanges({ ops, rows: [stored({ message: "", username: "", deleted: true, reactions: { "+1": 1 } })], originals });
    assert.equal(r.changesReordered, 1);
  });

  test("changes of unknown outcome allow both states", () => {
    const ops = [edit(0, "m1 e0"), edit(1, "m1 e1", "unknown")];
    for (const row of [stored({ message: "m1 e0", editedTime: 1000 }), stored({ message: "m1 e1", editedTime: 4242 })]) {
      assert.deepEqual(failures(checkChanges({ ops, rows: [row], originals })), none);
    }
    const delUnknown = [edit(0, "m1 e0"), del(1, "unknown")];
    for (const row of [stored({ message: "m1 e0", editedTime: 1000 }), stored({ message: "", username: "", deleted: true })]) {
      assert.deepEqual(failures(checkChanges({ ops: delUnknown, rows: [row], originals })), none);
    }
    const reactUnknown = [react("s2", 0, "+1", true), react("s3", 0, "+1", true, "unknown")];
    for (const n of [1, 2]) assert.deepEqual(failures(checkChanges({ ops: reactUnknown, rows: [stored({ reactions: { "+1": n } })], originals })), none);
    assert.equal(checkChanges({ ops: reactUnknown, rows: [stored({ reactions: { "+1": 3 } })], originals }).changesDuplicated, 1);
    assert.equal(checkChanges({ ops: reactUnknown, rows: [stored()], originals }).changesLost, 1);
  });

  test("refused changes have no effect: a refused edit's text or a deletion nobody acknowledged is unexpected (must fail)", () => {
    const ops = [edit(0, "m1 e0", "rejected", { code: "rate_limited" })];
    assert.deepEqual(failures(checkChanges({ ops, rows: [stored()], originals })), none);
    assert.equal(checkChanges({ ops, rows: [stored({ message: "m1 e0", editedTime: 5 })], originals }).changesUnexpected, 1);
    assert.equal(checkChanges({ ops: [], rows: [stored({ message: "", username: "", deleted: true })], originals }).changesUnexpected, 1);
    assert.equal(checkChanges({ ops: [], rows: [stored({ reactions: { "+1": 1 } })], originals }).changesUnexpected, 1);
  });

  test("an edit acknowledged after a deletion of unknown outcome proves the deletion was not applied", () => {
    const ops = [del(0, "unknown"), edit(1, "m1 e1")];
    assert.deepEqual(failures(checkChanges({ ops, rows: [stored({ message: "m1 e1", editedTime: 1001 })], originals })), none);
    assert.equal(checkChanges({ ops, rows: [stored({ message: "", username: "", deleted: true })], originals }).changesUnexpected, 1);
  });

  test("possibleTextStates and possibleReaction", () => {
    assert.deepEqual(possibleTextStates("t", [edit(0, "a"), edit(1, "b", "unknown")]).map((s) => s.text), ["a", "b"]);
    assert.deepEqual(possibleReaction([react("x", 0, "e", true), react("x", 1, "e", false, "unknown")]), { min: 0, max: 1 });
    assert.deepEqual(possibleReaction([react("x", 0, "e", true, "rejected")].filter((o) => o.status !== "rejected")), { min: 0, max: 0 });
  });
});

describe("checkHistory with messages that change", () => {
  test("a deleted row (no text, no username) is known by its acknowledged id; an edited row by the key its text starts with", () => {
    const attempts = [ok("m0", 0), ok("m1", 1)];
    const rows = [row("m0", 0, { message: "", username: "", deleted: true }), row("m1", 1)];
    const r = checkHistory({ attempts, rows });
    assert.deepEqual([r.lost, r.duplicated, r.unexpected, r.reordered], [0, 0, 0, 0]);
  });

  test("a deleted row of an id nobody was acknowledged is unexpected", () => {
    const r = checkHistory({ attempts: [ok("m0", 0)], rows: [row("m0", 0), row("x", 3, { message: "", username: "", deleted: true })] });
    assert.equal(r.unexpected, 1);
  });
});

describe("historyStateDiffs", () => {
  test("a history answer must show each message as stored", () => {
    const rowsById = new Map([
      [id(1), { id: id(1), message: "a e1", editedTime: 7, reactions: { x: 1 } }],
      [id(2), { id: id(2), message: "", deleted: true }],
    ]);
    const good = [{ id: id(1), message: "a e1", editedTime: 7, reactions: { x: 1 } }, { id: id(2), room: "r", createdTime: 1, deleted: true }];
    assert.deepEqual(historyStateDiffs(good, rowsById), []);
    const stale = [{ id: id(1), message: "a", reactions: { x: 2 } }, { id: id(2), message: "b" }];
    assert.deepEqual(historyStateDiffs(stale, rowsById).map((d) => d.field), ["message", "editedTime", "reactions", "deleted", "message"]);
  });
});
