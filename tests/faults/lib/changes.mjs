// Messages that change, in the load of the fault scenarios: beside its sends, a load client edits
// and deletes its own acknowledged messages and toggles its reactions to messages of its rooms,
// and records every change and its answer in a ChangeLedger for the checker (checkChanges).
//
// The model is kept exact and simple (see checker.mjs): a client makes one change at a time and
// waits for its answer, so its changes are stored in the order it made them; only the author (the
// connection that sent a message) edits or deletes it; a member toggles its own reaction.
// An `unavailable` or unanswered change is sent again as it was (safe: a change applies once to a
// state), on the same connection only (another connection is another author and another member),
// until it is answered or `maxTries` emissions were made; then its outcome is unknown and the
// client makes no further change of that kind to that message (edit/delete) or that emoji of it.

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** The emoji the load reacts with (a message carries at most 20 distinct ones). */
export const EMOJI = ["👍", "🎉", "ok"];

/** Every change attempted in a scenario and what its actor was told (checker.mjs: the ops). */
export class ChangeLedger {
  constructor() {
    this.ops = [];
    this.codes = {};
    /** Ids whose deletion was acknowledged or may have been stored: nobody reacts to them. */
    this.deleted = new Set();
  }

  add(op) {
    op.n = this.ops.length;
    this.ops.push(op);
    return op;
  }

  list() {
    return this.ops;
  }

  count(status, kind) {
    let n = 0;
    for (const op of this.ops) if (op.status === status && (!kind || op.kind === kind)) n++;
    return n;
  }

  /** { edit: { ok, unknown, rejected }, ... } */
  summary() {
    const out = {};
    for (const op of this.ops) {
      const k = (out[op.kind] ??= { ok: 0, unknown: 0, rejected: 0 });
      k[op.status] = (k[op.status] ?? 0) + 1;
    }
    return out;
  }
}

const RESEND = new Set(["unavailable", "timeout"]);

/**
 * The changes one load client makes. `peers` are the load clients whose messages it may react
 * to (itself included), `tag` the scenario's message key prefix (keys are `tag.name.seq`).
 */
export class Changer {
  constructor({ client, ledger, changes, tag, peers, ratePerSec = 4, mix = { edit: 0.4, delete: 0.1, react: 0.5 }, recent = 40, maxTries = 8, retryPauseMs = 300, ackTimeoutMs = 10_000 }) {
    Object.assign(this, { client, ledger, changes, tag, peers, ratePerSec, mix, recent, maxTries, retryPauseMs, ackTimeoutMs });
    this.seq = 0;
    /** id -> { edits, deleted, frozen } of its own messages */
    this.authored = new Map();
    /** `${id} ${emoji}` -> { on, frozen } of its reactions (per connection: the key has the sender) */
    this.reactions = new Map();
    this.skipped = 0;
  }

  /** An acknowledged message among the `recent` last that `owner` sent, or undefined. */
  recentOf(owner) {
    if (owner.seq === 0) return undefined;
    const seq = Math.max(0, owner.seq - 1 - Math.floor(Math.random() * this.recent));
    const a = this.ledger.attempts.get(`${this.tag}.${owner.name}.${seq}`);
    if (!a || a.status !== "ok" || a.ids.length !== 1) return undefined;
    return a;
  }

  pickOwn() {
    for (let t = 0; t < 8; t++) {
      const a = this.recentOf(this.client);
      // the author is the connection that sent it: not one before a reconnect
      if (!a || a.sender !== this.client.sender) continue;
      const st = this.authored.get(a.ids[0]);
      if (st?.deleted || st?.frozen) continue;
      return a;
    }
    return undefined;
  }

  pickAny() {
    for (let t = 0; t < 8; t++) {
      const peer = this.peers[Math.floor(Math.random() * this.peers.length)];
      const a = this.recentOf(peer);
      if (!a || !this.client.rooms.includes(a.room) || this.changes.deleted.has(a.ids[0])) continue;
      const emoji = EMOJI[Math.floor(Math.random() * EMOJI.length)];
      const k = `${a.ids[0]} ${emoji} ${this.client.sender}`;
      if (this.reactions.get(k)?.frozen) continue;
      return { a, emoji, k };
    }
    return undefined;
  }

  /** Emits one change event; resolves { outcome, res }. */
  emit(event, payload) {
    const socket = this.client.socket;
    return new Promise((resolve) => {
      if (!socket?.connected) {
        resolve({ outcome: "not_connected" });
        return;
      }
      socket.timeout(this.ackTimeoutMs).emit(event, payload, (err, res) => {
        let outcome;
        if (err) outcome = socket.connected ? "timeout" : "disconnected";
        else if (res?.ok === true) outcome = "ok";
        else outcome = res?.error?.code ?? "bad_ack";
        resolve({ outcome, res });
      });
    });
  }

  /** Makes one change (resending it while its outcome is unknown) and records it. */
  async perform(op, event, payload) {
    op.actor = this.client.sender;
    op.seq = this.seq++;
    op.status = "rejected";
    op.emissions = 0;
    op.outcomes = [];
    let unknown = false;
    for (let t = 0; t < this.maxTries; t++) {
      if (!this.client.connected || this.client.sender !== op.actor) break;
      const at = Date.now();
      const { outcome, res } = await this.emit(event, payload);
      if (outcome === "not_connected") break;
      op.emissions++;
      op.outcomes.push(outcome);
      op.maxAckMs = Math.max(op.maxAckMs ?? 0, Date.now() - at);
      this.changes.codes[`${event}:${outcome}`] = (this.changes.codes[`${event}:${outcome}`] ?? 0) + 1;
      if (outcome === "ok") {
        op.status = "ok";
        if (op.kind === "edit") op.editedTime = res.editedTime;
        if (op.kind === "react") op.reactions = res.reactions;
        delete op.code;
        return op;
      }
      if (outcome === "disconnected") {
        unknown = true;
        break;
      }
      if (RESEND.has(outcome)) {
        unknown = true;
        await sleep(this.retryPauseMs);
        continue;
      }
      // a definite refusal; after an emission of unknown outcome, that one may have been stored
      op.code = outcome;
      break;
    }
    if (unknown) op.status = "unknown";
    else if (op.emissions === 0) op.code ??= "not_sent";
    return op;
  }

  async edit(a) {
    const id = a.ids[0];
    const st = this.authored.get(id) ?? { edits: 0 };
    this.authored.set(id, st);
    const text = `${a.key} edit.${st.edits++}`;
    const op = this.changes.add({ kind: "edit", id, room: a.room, key: a.key, text });
    await this.perform(op, "edit_message", { room: a.room, id, message: text });
    if (op.status === "unknown" || (op.status === "rejected" && op.code === "not_found")) st.frozen = true;
  }

  async delete(a) {
    const id = a.ids[0];
    const st = this.authored.get(id) ?? { edits: 0 };
    this.authored.set(id, st);
    const op = this.changes.add({ kind: "delete", id, room: a.room, key: a.key });
    await this.perform(op, "delete_message", { room: a.room, id });
    if (op.status === "ok") st.deleted = true;
    if (op.status === "unknown") st.frozen = true;
    if (op.status !== "rejected") this.changes.deleted.add(id);
  }

  async react({ a, emoji, k }) {
    const id = a.ids[0];
    const st = this.reactions.get(k) ?? { on: false };
    this.reactions.set(k, st);
    const op = this.changes.add({ kind: "react", id, room: a.room, key: a.key, emoji, add: !st.on });
    await this.perform(op, "react", { room: a.room, id, emoji, add: op.add });
    if (op.status === "ok") st.on = op.add;
    if (op.status === "unknown") st.frozen = true;
  }

  /**
   * Makes changes, one at a time, until stop() is true: at most `ratePerSec` (each starts at
   * least 1/ratePerSec after the one before, so a slow answer never leads to a burst).
   */
  async run(stop) {
    let due = Date.now();
    while (!stop()) {
      const now = Date.now();
      if (now < due) await sleep(Math.min(100, due - now));
      else await sleep(0);
      if (stop()) break;
      if (Date.now() < due) continue;
      due = Date.now() + 1000 / this.ratePerSec;
      if (!this.client.connected) continue;
      const r = Math.random();
      if (r < this.mix.edit + this.mix.delete) {
        const a = this.pickOwn();
        if (!a) this.skipped++;
        else if (r < this.mix.edit) await this.edit(a);
        else await this.delete(a);
      } else {
        const target = this.pickAny();
        if (!target) this.skipped++;
        else await this.react(target);
      }
    }
  }
}

/**
 * Runs a Changer for each of `clients` until stop() is true (all of them react to the messages
 * of all of them); resolves once every one made its last change.
 */
export function runChangers(clients, { ledger, changes, tag, stop, ...opts }) {
  const changers = clients.map((client) => new Changer({ client, ledger, changes, tag, peers: clients, ...opts }));
  return Promise.all(changers.map((c) => c.run(stop).catch((e) => e))).then((results) => ({ changers, errors: results.filter((r) => r instanceof Error) }));
}

/** id -> the text each acknowledged message was sent with (the checker's originals). */
export function originalTexts(attempts) {
  const out = new Map();
  for (const a of attempts) if (a.status === "ok") for (const id of a.ids) out.set(id, a.text ?? a.key);
  return out;
}
