// The history checker of the fault scenarios, in the spirit of Jepsen's queue checker.
//
// Pure functions, no I/O: the scenarios record what clients attempted and what the server
// answered, read what HarperDB finally holds, and hand both to `checkHistory`.
//
// Vocabulary
//   attempt   one logical message a client tried to send: `key` is unique in the run (it is the
//             message text and also the clientId, so a retry of the same message has the same
//             key). `sender` names one connection (a reconnect is a new sender, because only one
//             connection's order is promised), `seq` is the message's position in that
//             connection's send order, `status` is the best answer the client got:
//               "ok"             acknowledged ({ ok: true, id }), `ids` holds every id acked
//               "unavailable"    answered { ok: false, error: { code: "unavailable" } }: may or
//                                may not be stored (the server says so), never a promise
//               "indeterminate"  no answer (ack timeout, connection lost): may or may not be stored
//               "rejected"       any other error code: must never be stored
//   row       one record HarperDB holds: { pk, id, room, username, message, deleted? } where
//             `message` is the attempt's key (an edited text starts with it; a deleted row has no
//             text nor username and is known by the id its attempt was acknowledged with)
//
// Counts (each must be 0)
//   lost        acknowledged ids that HarperDB does not hold (acknowledged − stored)
//   duplicated  extra rows of one id (rows − distinct ids), plus, per logical message, every id
//               beyond the first among the ids stored or acknowledged for it (a retry stored or
//               acknowledged twice)
//   unexpected  rows that no attempt can explain: unknown text, a rejected attempt, a room or
//               username other than the attempt's (stored − attempted)
//   reordered   per room and sender, adjacent pairs of stored rows (in primary key order, which
//               is the history order) whose send order is inverted

/** Number of adjacent inversions in a sequence of numbers (0 when sorted ascending). */
export function countInversions(seqs) {
  let n = 0;
  for (let i = 1; i < seqs.length; i++) if (seqs[i] < seqs[i - 1]) n++;
  return n;
}

/** Compares UUIDv7 (or any fixed-width, time-sortable) id strings. */
export const compareIds = (a, b) => (a < b ? -1 : a > b ? 1 : 0);

/**
 * The stream sequence a message id carries (see shared/src/id.rs: the low 62 bits of a UUIDv7
 * made by Chatify), as a BigInt.
 */
export function sequenceOfId(id) {
  const hex = id.replace(/-/g, "").slice(16);
  return BigInt(`0x${hex}`) & ((1n << 62n) - 1n);
}

/**
 * Per room, history order must be delivery order: `delivered` is one receiver's ids of one
 * room in arrival order, `historyIds` the room's stored ids in history order. Returns the
 * number of adjacent pairs the receiver got in another order than history has them (ids
 * history does not hold are skipped; the loss counts catch those).
 */
export function historyOrderInversions(delivered, historyIds) {
  const position = new Map(historyIds.map((id, i) => [id, i]));
  return countInversions(delivered.filter((id) => position.has(id)).map((id) => position.get(id)));
}

/**
 * Order check of deliveries: `events` is one receiver's `receive_message` payloads in arrival
 * order, `senderOf(message)` maps a payload to { sender, seq } (or undefined for messages the
 * scenario does not track). Returns { reordered, duplicates, bySender } where reordered counts
 * adjacent inversions per (room, sender) and duplicates counts ids delivered more than once.
 */
export function checkDeliveries(events, senderOf) {
  const streams = new Map();
  const seen = new Set();
  let duplicates = 0;
  for (const m of events) {
    if (!m || typeof m.id !== "string") continue;
    const origin = senderOf(m);
    if (!origin) continue;
    const dk = `${m.room}\u0000${m.id}`;
    if (seen.has(dk)) {
      duplicates++;
      continue;
    }
    seen.add(dk);
    const sk = `${m.room}\u0000${origin.sender}`;
    if (!streams.has(sk)) streams.set(sk, []);
    streams.get(sk).push(origin.seq);
  }
  let reordered = 0;
  const bySender = {};
  for (const [sk, seqs] of streams) {
    const inv = countInversions(seqs);
    reordered += inv;
    if (inv) bySender[sk.replace("\u0000", " / ")] = inv;
  }
  return { reordered, duplicates, bySender };
}

/**
 * The acknowledged ids of one sender in send order must increase (ids are time-sortable and
 * one connection's messages are stored in send order). Returns the number of inversions.
 */
export function ackOrderInversions(attempts) {
  const bySender = new Map();
  for (const a of attempts) {
    if (a.status !== "ok" || !a.ids?.length) continue;
    const k = `${a.room}\u0000${a.sender}`;
    if (!bySender.has(k)) bySender.set(k, []);
    bySender.get(k).push(a);
  }
  let n = 0;
  for (const list of bySender.values()) {
    list.sort((x, y) => x.seq - y.seq);
    for (let i = 1; i < list.length; i++) if (sequenceOfId(list[i].ids[0]) < sequenceOfId(list[i - 1].ids[0])) n++;
  }
  return n;
}

const MAX_DETAILS = 20;
const pushLimited = (arr, v) => {
  if (arr.length < MAX_DETAILS) arr.push(v);
};

/**
 * Checks what HarperDB holds (`rows`) against what clients attempted (`attempts`).
 * Returns the counts (attempted, acknowledged, unavailable, indeterminate, rejected, stored,
 * lost, duplicated, unexpected, reordered), per-room counts, and a few examples of each problem.
 */
export function checkHistory({ attempts, rows }) {
  const byKey = new Map();
  // a deleted message's row has no text (nor username): it is known by its acknowledged id
  const byAckedId = new Map();
  for (const a of attempts) {
    if (byKey.has(a.key)) throw new Error(`checkHistory: attempt key ${a.key} appears twice`);
    byKey.set(a.key, a);
    if (a.status === "ok") for (const id of a.ids ?? []) byAckedId.set(id, a);
  }
  const attemptOf = (r) => byKey.get(r.message) ?? (r.deleted === true && !r.message ? byAckedId.get(r.id) : undefined);
  const details = { lost: [], duplicated: [], unexpected: [], reordered: [] };
  const perRoom = {};
  const room = (r) =>
    (perRoom[r] ??= { attempted: 0, acknowledged: 0, stored: 0, lost: 0, duplicated: 0, unexpected: 0, reordered: 0 });

  const counts = {
    attempted: attempts.length,
    acknowledged: 0,
    unavailable: 0,
    indeterminate: 0,
    rejected: 0,
    stored: rows.length,
    lost: 0,
    duplicated: 0,
    unexpected: 0,
    reordered: 0,
  };
  for (const a of attempts) {
    room(a.room).attempted++;
    if (a.status === "ok") {
      counts.acknowledged++;
      room(a.room).acknowledged++;
    } else if (a.status === "unavailable") counts.unavailable++;
    else if (a.status === "indeterminate") counts.indeterminate++;
    else if (a.status === "rejected") counts.rejected++;
    else throw new Error(`checkHistory: attempt ${a.key} has unknown status ${a.status}`);
  }

  // Rows: the same (room, id) twice is a duplicate outright.
  const rowIds = new Map(); // room\0id -> count
  const storedIdsByKey = new Map(); // key -> Set(id)
  for (const r of rows) {
    room(r.room).stored++;
    const rk = `${r.room}\u0000${r.id}`;
    const seen = rowIds.get(rk) ?? 0;
    rowIds.set(rk, seen + 1);
    if (seen > 0) {
      counts.duplicated++;
      room(r.room).duplicated++;
      pushLimited(details.duplicated, { why: "same id stored twice", id: r.id, room: r.room });
      continue;
    }
    const a = attemptOf(r);
    let why;
    if (!a) why = r.deleted === true ? "a deleted row of no acknowledged id" : "no attempt sent this text";
    else if (a.status === "rejected") why = `attempt was rejected (${a.code})`;
    else if (a.room !== r.room) why = `attempt was for room ${a.room}`;
    else if (a.username !== undefined && r.deleted !== true && a.username !== r.username) why = `attempt was sent as ${a.username}`;
    if (why) {
      counts.unexpected++;
      room(r.room).unexpected++;
      pushLimited(details.unexpected, { why, id: r.id, room: r.room, message: r.message, username: r.username });
      continue;
    }
    if (!storedIdsByKey.has(a.key)) storedIdsByKey.set(a.key, new Set());
    storedIdsByKey.get(a.key).add(r.id);
  }

  for (const a of attempts) {
    const stored = storedIdsByKey.get(a.key) ?? new Set();
    const acked = new Set(a.status === "ok" ? a.ids ?? [] : []);
    for (const id of acked) {
      if (!stored.has(id)) {
        counts.lost++;
        room(a.room).lost++;
        pushLimited(details.lost, { key: a.key, id, room: a.room, sender: a.sender, seq: a.seq });
      }
    }
    const identities = new Set([...stored, ...acked]);
    if (identities.size > 1) {
      counts.duplicated += identities.size - 1;
      room(a.room).duplicated += identities.size - 1;
      pushLimited(details.duplicated, { why: "one message stored or acknowledged under several ids", key: a.key, stored: [...stored], acked: [...acked] });
    }
  }

  // Order: per room and sender, the stored rows in history order (primary key order; rows
  // without a key fall back to id order) must follow the send order.
  const streams = new Map();
  const historyKey = (r) => r.pk ?? r.id;
  for (const r of [...rows].sort((x, y) => compareIds(historyKey(x), historyKey(y)))) {
    const a = attemptOf(r);
    if (!a || a.room !== r.room || a.status === "rejected") continue;
    const k = `${r.room}\u0000${a.sender}`;
    if (!streams.has(k)) streams.set(k, { list: [], keys: new Set() });
    const stream = streams.get(k);
    // a message stored under several ids is counted once (as duplicated), at its first id
    if (stream.keys.has(a.key)) continue;
    stream.keys.add(a.key);
    stream.list.push({ key: a.key, seq: a.seq, id: r.id });
  }
  for (const [k, { list }] of streams) {
    for (let i = 1; i < list.length; i++) {
      if (list[i].seq < list[i - 1].seq) {
        const [r, sender] = k.split("\u0000");
        counts.reordered++;
        room(r).reordered++;
        pushLimited(details.reordered, { room: r, sender, before: list[i - 1], after: list[i] });
      }
    }
  }
  return { ...counts, perRoom, details };
}

/** The counts that must all be zero. */
export const FAILURE_COUNTS = ["lost", "duplicated", "unexpected", "reordered"];

/** True when every failure count of a checkHistory result is zero. */
export const historyOk = (result) => FAILURE_COUNTS.every((k) => result[k] === 0);

// ---------------------------------------------------------------------------------------------
// Messages that change: edits, deletions and reactions
// ---------------------------------------------------------------------------------------------
//
// The load changes acknowledged messages with a model kept exact and simple:
//   - only a message's author (the connection that sent it) edits or deletes it, one change at a
//     time, waiting for each answer, so that author's send order is the order of its changes;
//   - every member of a room toggles its own reaction (one emoji at a time) to messages of the
//     room, one change at a time, waiting for each answer.
// A change (`op`) is { n, id, room, key, actor, seq, kind: "edit" | "delete" | "react", text?,
// emoji?, add?, status, emissions, editedTime?, reactions?, code? } where `seq` orders one actor's
// changes and `status` is the best answer the actor got:
//   "ok"        acknowledged: the change is stored (edit: `editedTime` is the ack's; react:
//               `reactions` the counts after it)
//   "unknown"   `unavailable` or no answer, resent (safe) until the actor gave up: it may or may
//               not have been stored. An actor makes no further change of that kind to that
//               message (edit/delete) or that emoji of that message (react) afterwards.
//   "rejected"  a definite refusal (`not_found`, `forbidden`, `rate_limited`...): no effect.
//
// The final state of each message (a row of HarperDB: { id, message, editedTime, deleted,
// reactions, reactors }) must be one the acknowledged changes, applied in their actors' order,
// allow (each change of unknown outcome applied or not):
//   - deleted when a deletion was acknowledged, without text, edit time or reactions (a change
//     applied after the deletion would bring them back);
//   - otherwise the text and edit time of the last acknowledged edit (the original text when
//     none), and for each emoji exactly as many reactors as there are members whose last
//     acknowledged reaction was an add.
//
// Counts (each must be 0)
//   changesLost        an acknowledged change whose effect the row lacks: a deletion not applied,
//                      an older text than the last acknowledged edit, fewer reactions than acked
//   changesDuplicated  a change counted twice: more reactions of an emoji than members who have
//                      it, or reactors that do not match the counts
//   changesReordered   a state no order of the acknowledged changes gives: text, edit time or
//                      reactions on a deleted message, the right text with another edit's time
//   changesUnexpected  a change nobody made or that was refused: a deletion, text or reaction
//                      no acknowledged or unknown change explains

/** Counts of an emoji map, without zero counts, as a plain object with sorted keys. */
const normCounts = (m) =>
  Object.fromEntries(
    Object.entries(m ?? {})
      .filter(([, v]) => Number(v) > 0)
      .map(([k, v]) => [k, Number(v)])
      .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)),
  );

const MAX_STATES = 256;

/**
 * The author's edits and deletions of one message (status ok or unknown, in the author's order)
 * folded into every final state they allow: [{ deleted, text, editedTime, via }] where
 * `editedTime` is undefined for the original text and null when the edit's time is not known
 * (a change of unknown outcome), and `via` is the index of the edit whose text stands (-1: the
 * original).
 */
export function possibleTextStates(originalText, ops) {
  let states = [{ deleted: false, text: originalText, editedTime: undefined, via: -1 }];
  const key = (s) => `${s.deleted}\u0000${s.text}\u0000${s.editedTime}\u0000${s.via}`;
  const dedupe = (list) => [...new Map(list.map((s) => [key(s), s])).values()].slice(0, MAX_STATES);
  ops.forEach((op, i) => {
    const apply = (s) => {
      if (s.deleted) return s;
      if (op.kind === "delete") return { deleted: true, text: "", editedTime: undefined, via: -1 };
      return { deleted: false, text: op.text, editedTime: op.status === "ok" ? op.editedTime : null, via: i };
    };
    if (op.status === "ok") {
      // an acknowledged edit met a message that was not deleted (else it was not_found)
      const before = op.kind === "edit" ? states.filter((s) => !s.deleted) : states;
      states = dedupe((before.length ? before : states).map(apply));
    } else if (op.status === "unknown") {
      states = dedupe([...states, ...states.map(apply)]);
    }
  });
  return states;
}

/**
 * One member's reactions with one emoji to one message (status ok or unknown, in its order):
 * the set of final memberships they allow, as { min, max } (0 or 1 each).
 */
export function possibleReaction(ops) {
  let states = new Set([false]);
  for (const op of ops) {
    if (op.status === "ok") states = new Set([op.add]);
    else if (op.status === "unknown") states = new Set([...states, op.add]);
  }
  return { min: states.has(false) ? 0 : 1, max: states.has(true) ? 1 : 0 };
}

/**
 * Checks the final state of changed messages against the changes made to them.
 *   ops        every change attempted (see above)
 *   rows       HarperDB's rows of the scenario's rooms: { id, room, message (the full text),
 *              editedTime, deleted, reactions, reactors }
 *   originals  id -> the text the message was sent with (acknowledged messages)
 * Rows no change was attempted on must be unchanged (no edit time, not deleted, no reactions).
 */
export function checkChanges({ ops, rows, originals }) {
  const details = { changesLost: [], changesDuplicated: [], changesReordered: [], changesUnexpected: [] };
  const counts = {
    changes: ops.length,
    changesAcknowledged: 0,
    changesUnknown: 0,
    changesRejected: 0,
    changedMessages: 0,
    changesLost: 0,
    changesDuplicated: 0,
    changesReordered: 0,
    changesUnexpected: 0,
  };
  const byKind = {};
  const byId = new Map();
  for (const op of ops) {
    if (op.status === "ok") counts.changesAcknowledged++;
    else if (op.status === "unknown") counts.changesUnknown++;
    else if (op.status === "rejected") counts.changesRejected++;
    else throw new Error(`checkChanges: change ${op.n} has unknown status ${op.status}`);
    const k = (byKind[op.kind] ??= { attempted: 0, ok: 0, unknown: 0, rejected: 0 });
    k.attempted++;
    k[op.status]++;
    if (!byId.has(op.id)) byId.set(op.id, []);
    byId.get(op.id).push(op);
  }
  const fail = (what, detail) => {
    counts[what]++;
    pushLimited(details[what], detail);
  };

  const rowsById = new Map();
  for (const r of rows) if (!rowsById.has(r.id)) rowsById.set(r.id, r);

  for (const [id, opsOf] of byId) {
    if (opsOf.some((o) => o.status !== "rejected")) counts.changedMessages++;
    const row = rowsById.get(id);
    if (!row) {
      // the message itself is missing: checkHistory counts it (lost) if it was acknowledged
      continue;
    }
    checkRow(row, opsOf, originals.get(id), fail);
  }
  for (const [id, row] of rowsById) {
    if (byId.has(id)) continue;
    checkRow(row, [], originals.get(id), fail);
  }
  return { ...counts, byKind, details };
}

function checkRow(row, opsOf, original, fail) {
  const id = row.id;
  const byActorSeq = (a, b) => (a.actor < b.actor ? -1 : a.actor > b.actor ? 1 : a.seq - b.seq);
  const authorOps = opsOf.filter((o) => (o.kind === "edit" || o.kind === "delete") && o.status !== "rejected").sort(byActorSeq);
  const reactOps = opsOf.filter((o) => o.kind === "react" && o.status !== "rejected").sort(byActorSeq);
  const refused = opsOf.filter((o) => o.status === "rejected");
  const deleted = row.deleted === true;
  const text = row.message ?? "";
  const editedTime = row.editedTime ?? undefined;
  const reactions = normCounts(row.reactions);

  // Edits and deletions: the author's (one actor per message for them).
  const originalText = original ?? (authorOps.length || reactOps.length ? undefined : text);
  const states = possibleTextStates(originalText, authorOps);
  const canDelete = states.some((s) => s.deleted);
  const canStay = states.some((s) => !s.deleted);
  if (deleted) {
    if (!canDelete) {
      fail("changesUnexpected", { why: "deleted, but no deletion was acknowledged or attempted", id, refused: refused.map((o) => `${o.kind}:${o.code}`) });
    }
    const leftovers = {};
    if (text) leftovers.message = text;
    if (editedTime !== undefined && editedTime !== null) leftovers.editedTime = editedTime;
    if (Object.keys(reactions).length) leftovers.reactions = reactions;
    if (row.username) leftovers.username = row.username;
    if (Object.keys(leftovers).length) {
      fail("changesReordered", { why: "a deleted message carries what a later change applied after its deletion", id, ...leftovers });
    }
    return;
  }
  if (!canStay) {
    const del = authorOps.find((o) => o.kind === "delete" && o.status === "ok");
    fail("changesLost", { why: "an acknowledged deletion is not applied", id, deletion: del?.n, text });
    return;
  }
  const live = states.filter((s) => !s.deleted);
  const textMatch = live.filter((s) => s.text === text);
  if (!textMatch.length) {
    const older = authorOps.findIndex((o) => o.kind === "edit" && o.text === text);
    const expected = live.map((s) => s.text);
    if (older >= 0 || (original !== undefined && text === original)) {
      fail("changesLost", { why: "the text is older than the last acknowledged edit (it was lost, or an older one applied after it)", id, text, expected });
    } else {
      fail("changesUnexpected", { why: "a text no acknowledged or unknown edit explains", id, text, expected, refused: refused.filter((o) => o.text === text).map((o) => o.code) });
    }
  } else if (!textMatch.some((s) => s.editedTime === null || s.editedTime === editedTime)) {
    fail("changesReordered", { why: "the text of one edit with the edit time of another", id, text, editedTime, expected: textMatch.map((s) => s.editedTime) });
  }

  // Reactions: per emoji, the members whose last acknowledged reaction was an add.
  const perEmoji = new Map();
  for (const op of reactOps) {
    if (!perEmoji.has(op.emoji)) perEmoji.set(op.emoji, new Map());
    const actors = perEmoji.get(op.emoji);
    if (!actors.has(op.actor)) actors.set(op.actor, []);
    actors.get(op.actor).push(op);
  }
  const emojis = new Set([...perEmoji.keys(), ...Object.keys(reactions)]);
  for (const emoji of emojis) {
    let min = 0;
    let max = 0;
    for (const list of perEmoji.get(emoji)?.values() ?? []) {
      const p = possibleReaction(list);
      min += p.min;
      max += p.max;
    }
    const got = reactions[emoji] ?? 0;
    if (got < min) fail("changesLost", { why: "fewer reactions than acknowledged", id, emoji, got, min, max });
    else if (got > max) {
      const what = perEmoji.has(emoji) ? "changesDuplicated" : "changesUnexpected";
      fail(what, { why: perEmoji.has(emoji) ? "more reactions than members who reacted (one counted twice)" : "a reaction nobody made", id, emoji, got, min, max });
    }
  }
  // The counts must be the reactors' (who reacted), when the row keeps them.
  if (row.reactors && typeof row.reactors === "object") {
    const fromReactors = normCounts(Object.fromEntries(Object.entries(row.reactors).map(([e, who]) => [e, Array.isArray(who) ? who.length : 0])));
    if (JSON.stringify(fromReactors) !== JSON.stringify(reactions)) {
      fail("changesDuplicated", { why: "the reaction counts are not the number of reactors", id, reactions, reactors: fromReactors });
    }
  }
}

/** The change counts that must all be zero. */
export const CHANGE_FAILURE_COUNTS = ["changesLost", "changesDuplicated", "changesReordered", "changesUnexpected"];

/**
 * A history answer (get_history's `messages`, the HTTP route's, a join's history) must show each
 * message as HarperDB finally holds it. Returns the messages that differ: [{ id, field, got,
 * stored }] (messages HarperDB does not hold are reported with field "id").
 */
export function historyStateDiffs(messages, rowsById) {
  const diffs = [];
  for (const m of messages) {
    const r = rowsById.get(m.id);
    if (!r) {
      diffs.push({ id: m.id, field: "id", got: m.id, stored: undefined });
      continue;
    }
    const want = {
      deleted: r.deleted === true,
      message: r.deleted ? undefined : r.message,
      editedTime: r.deleted ? undefined : (r.editedTime ?? undefined),
      reactions: r.deleted ? {} : normCounts(r.reactions),
    };
    const got = {
      deleted: m.deleted === true,
      message: m.deleted ? undefined : m.message,
      editedTime: m.deleted ? undefined : (m.editedTime ?? undefined),
      reactions: normCounts(m.reactions),
    };
    for (const f of Object.keys(want)) {
      if (JSON.stringify(want[f]) !== JSON.stringify(got[f])) diffs.push({ id: m.id, field: f, got: got[f], stored: want[f] });
    }
  }
  return diffs;
}
