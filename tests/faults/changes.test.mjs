// Unit tests of the load's changes (lib/changes.mjs) against an in-memory fake of the server's
// rules, checked with checkChanges (no servers): what the load records must be what the checker
// needs, including changes of unknown outcome (answered `unavailable` or not at all, applied or
// not).

import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { CHANGE_FAILURE_COUNTS, checkChanges } from "./checker.mjs";
import { ChangeLedger, originalTexts, runChangers } from "./lib/changes.mjs";

const uuid = (n) => `01936b2a-1c00-7000-8000-${n.toString(16).padStart(12, "0")}`;

/**
 * A fake of the gateway's change rules: the author edits and deletes, a member reacts once per
 * emoji, changes of deleted messages are not_found. `flaky` of the answers are `unavailable`
 * and as many are lost (a timeout), each after the change was applied or not, at random.
 */
function fakeServer({ flaky = 0 } = {}) {
  const msgs = new Map();
  let clock = 1_700_000_000_000;
  const handle = (member, event, p) => {
    const m = msgs.get(p.id);
    if (!m || m.room !== p.room) return { ok: false, error: { code: "not_found" } };
    if (event === "delete_message") {
      if (m.deleted) return { ok: true, id: p.id };
      if (m.author !== member) return { ok: false, error: { code: "forbidden" } };
      Object.assign(m, { deleted: true, text: "", editedTime: undefined, reactors: new Map() });
      return { ok: true, id: p.id };
    }
    if (m.deleted) return { ok: false, error: { code: "not_found" } };
    if (event === "edit_message") {
      if (m.author !== member) return { ok: false, error: { code: "forbidden" } };
      m.text = p.message;
      m.editedTime = ++clock;
      return { ok: true, id: p.id, editedTime: m.editedTime };
    }
    const who = m.reactors.get(p.emoji) ?? new Set();
    if (p.add) who.add(member);
    else who.delete(member);
    if (who.size) m.reactors.set(p.emoji, who);
    else m.reactors.delete(p.emoji);
    return { ok: true, id: p.id, reactions: Object.fromEntries([...m.reactors].map(([e, w]) => [e, w.size])) };
  };
  const socketOf = (member) => ({
    connected: true,
    timeout: () => ({
      emit(event, payload, cb) {
        const r = Math.random();
        if (r < 2 * flaky) {
          if (Math.random() < 0.5) handle(member, event, payload);
          setImmediate(() => (r < flaky ? cb(null, { ok: false, error: { code: "unavailable" } }) : cb(new Error("operation has timed out"))));
        } else {
          const res = handle(member, event, payload);
          setImmediate(() => cb(null, res));
        }
      },
    }),
  });
  const rows = () =>
    [...msgs].map(([id, m]) => ({
      id,
      room: m.room,
      message: m.text,
      editedTime: m.editedTime,
      deleted: m.deleted || undefined,
      reactions: m.reactors.size ? Object.fromEntries([...m.reactors].map(([e, w]) => [e, w.size])) : undefined,
      reactors: m.reactors.size ? Object.fromEntries([...m.reactors].map(([e, w]) => [e, [...w]])) : undefined,
    }));
  return { msgs, socketOf, rows };
}

/** Clients of one room that each sent `n` acknowledged messages. */
function setup(server, { clients = 3, n = 200, tag = "t" } = {}) {
  const ledger = { attempts: new Map() };
  let next = 1;
  const list = [];
  for (let c = 0; c < clients; c++) {
    const name = `s${c}`;
    const client = { name, seq: n, sender: `${name}#0`, rooms: ["r"], connected: true, socket: server.socketOf(`${name}#0`) };
    for (let i = 0; i < n; i++) {
      const key = `${tag}.${name}.${i}`;
      const id = uuid(next++);
      ledger.attempts.set(key, { key, room: "r", sender: client.sender, seq: i, status: "ok", ids: [id] });
      server.msgs.set(id, { room: "r", author: client.sender, text: key, deleted: false, reactors: new Map() });
    }
    list.push(client);
  }
  return { ledger, clients: list, tag };
}

async function run(server, { ops = 600, ...opts } = {}) {
  const { ledger, clients, tag } = setup(server, opts);
  const changes = new ChangeLedger();
  const giveUpAt = Date.now() + 30_000;
  const { errors } = await runChangers(clients, { ledger, changes, tag, stop: () => changes.ops.length >= ops || Date.now() > giveUpAt, ratePerSec: 100_000, retryPauseMs: 0, maxTries: 3 });
  assert.deepEqual(errors, []);
  return { changes, originals: originalTexts(ledger.attempts.values()) };
}

const failures = (r) => Object.fromEntries(CHANGE_FAILURE_COUNTS.map((k) => [k, r[k]]));
const none = { changesLost: 0, changesDuplicated: 0, changesReordered: 0, changesUnexpected: 0 };

describe("the load's changes", () => {
  test("every change answered: the final state is exactly what the acks imply", async () => {
    const server = fakeServer();
    const { changes, originals } = await run(server);
    const r = checkChanges({ ops: changes.list(), rows: server.rows(), originals });
    assert.deepEqual(failures(r), none, JSON.stringify(r.details));
    for (const k of ["edit", "delete", "react"]) assert.ok(r.byKind[k]?.ok > 0, `some ${k} acknowledged: ${JSON.stringify(r.byKind)}`);
    assert.equal(r.changesUnknown, 0);
  });

  test("answers lost or unavailable (applied or not): resent, or of unknown outcome, and still no failure", async () => {
    const server = fakeServer({ flaky: 0.2 });
    const { changes, originals } = await run(server, { ops: 1000 });
    const r = checkChanges({ ops: changes.list(), rows: server.rows(), originals });
    assert.deepEqual(failures(r), none, JSON.stringify(r.details));
    assert.ok(r.changesUnknown > 0, "some outcomes stay unknown");
    assert.ok(changes.list().some((o) => o.status === "ok" && o.emissions > 1), "some resent changes were acknowledged");
  });

  test("a store that loses an acknowledged edit, or counts a reaction twice, fails the check", async () => {
    const server = fakeServer();
    const { changes, originals } = await run(server);
    const ops = changes.list();
    const rows = server.rows();
    const lastEdit = ops.findLast((o) => o.kind === "edit" && o.status === "ok" && !rows.find((x) => x.id === o.id).deleted);
    const edited = rows.find((x) => x.id === lastEdit.id);
    edited.message = lastEdit.key;
    edited.editedTime = undefined;
    const reacted = rows.find((x) => x.reactions && !x.deleted);
    const emoji = Object.keys(reacted.reactions)[0];
    reacted.reactions[emoji]++;
    reacted.reactors[emoji].push("someone#0");
    const r = checkChanges({ ops, rows, originals });
    assert.equal(r.changesLost, 1, JSON.stringify(r.details));
    assert.equal(r.changesDuplicated, 1, JSON.stringify(r.details));
  });
});
