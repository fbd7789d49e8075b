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
//   row       one record HarperDB holds: { pk, id, room, username, message }
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
  for (const a of attempts) {
    if (byKey.has(a.key)) throw new Error(`checkHistory: attempt key ${a.key} appears twice`);
    byKey.set(a.key, a);
  }
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
    const a = byKey.get(r.message);
    let why;
    if (!a) why = "no attempt sent this text";
    else if (a.status === "rejected") why = `attempt was rejected (${a.code})`;
    else if (a.room !== r.room) why = `attempt was for room ${a.room}`;
    else if (a.username !== undefined && a.username !== r.username) why = `attempt was sent as ${a.username}`;
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
    const a = byKey.get(r.message);
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
