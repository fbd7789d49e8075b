// Load clients for the fault scenarios: socket.io-client connections (through the helpers of
// tests/e2e) that join rooms, send with acks, record every answer in a Ledger, and reconnect and
// recover (join_room + since) when their connection is lost.

import { connect, sleep } from "../../e2e/helpers.mjs";
import { compareIds } from "../checker.mjs";

/** What every client attempted and what the server answered, per logical message (key). */
export class Ledger {
  constructor() {
    this.attempts = new Map();
    /** Every emission's outcome, when `trace` is on: { key, at, ms, outcome }. */
    this.emissions = [];
    this.trace = false;
    this.codes = {};
  }

  attempt({ key, room, sender, seq, username }) {
    if (this.attempts.has(key)) throw new Error(`duplicate attempt key ${key}`);
    const a = { key, room, sender, seq, username, status: "indeterminate", ids: [], emissions: 0, maxAckMs: 0 };
    this.attempts.set(key, a);
    return a;
  }

  /** Records one emission's outcome: "ok" (with res), an error code, or "timeout"/"disconnected". */
  record(a, outcome, ms, res, at) {
    if (outcome === "not_connected") {
      // never emitted: nothing to learn about the message
      this.codes[outcome] = (this.codes[outcome] ?? 0) + 1;
      return;
    }
    a.emissions++;
    a.maxAckMs = Math.max(a.maxAckMs, ms);
    this.codes[outcome] = (this.codes[outcome] ?? 0) + 1;
    if (this.trace) this.emissions.push({ key: a.key, at, ms, outcome });
    if (outcome === "ok") {
      if (!a.ids.includes(res.id)) a.ids.push(res.id);
      a.status = "ok";
      a.createdTime ??= res.createdTime;
    } else if (a.status === "ok") {
      // an earlier emission was acknowledged: that stays the message's state
    } else if (outcome === "unavailable") {
      a.status = "unavailable";
    } else if (outcome === "timeout" || outcome === "disconnected") {
      if (a.status !== "unavailable") a.status = "indeterminate";
    } else {
      // a definite refusal of the only emission(s) so far
      if (a.status === "indeterminate" && a.emissions === 1) {
        a.status = "rejected";
        a.code = outcome;
      }
    }
  }

  list() {
    return [...this.attempts.values()];
  }

  ackedIds() {
    const out = [];
    for (const a of this.attempts.values()) if (a.status === "ok") out.push(...a.ids);
    return out;
  }

  count(status) {
    let n = 0;
    for (const a of this.attempts.values()) if (a.status === status) n++;
    return n;
  }
}

let clientCounter = 0;

/**
 * One chat client: a socket.io connection (WebSocket only unless told otherwise) in some rooms.
 * `url` is where it connects first, `reconnectUrl` where it goes after losing the connection
 * (the load balancer, by default the same url). It keeps, per room, every message id it has
 * seen (live or recovered through history), and the highest one for `since`.
 */
export class ChatClient {
  constructor({ name, url, reconnectUrl, username, rooms, transports = ["websocket"], ledger, runTag, ackTimeoutMs = 10_000, joinTimeoutMs = 60_000, autoReconnect = false, reconnectDelayMs = 0 }) {
    this.autoReconnect = autoReconnect;
    this.reconnectDelayMs = reconnectDelayMs;
    /** Messages first seen in a join's history (recovered with since), per room. */
    this.recovered = new Map(rooms.map((r) => [r, 0]));
    this.name = name ?? `c${++clientCounter}`;
    this.url = url;
    this.reconnectUrl = reconnectUrl ?? url;
    this.username = username ?? `${this.name}-${runTag ?? "x"}`;
    this.rooms = rooms;
    this.transports = transports;
    this.ledger = ledger;
    this.runTag = runTag ?? "x";
    this.ackTimeoutMs = ackTimeoutMs;
    this.joinTimeoutMs = joinTimeoutMs;
    this.epoch = 0;
    this.seq = 0;
    this.socket = undefined;
    /** room -> Map(id -> message) of every stored message seen (live or recovered). */
    this.seen = new Map(rooms.map((r) => [r, new Map()]));
    /** room -> highest id seen live or through history. */
    this.lastId = new Map();
    /** room -> [payload] in arrival order (live receive_message with an id). */
    this.live = new Map(rooms.map((r) => [r, []]));
    /** Every ChatBot notice and chatroom_users list: [{ at, event, payload, epoch }]. */
    this.notices = [];
    this.disconnects = [];
    this.recoveries = [];
    this.closed = false;
    this.reconnecting = undefined;
    this.keepLive = true;
  }

  get sender() {
    return `${this.name}#${this.epoch}`;
  }

  get connected() {
    return !!this.socket?.connected;
  }

  /** Connects and joins every room (history of each join recorded). */
  async open(url = this.url) {
    const socket = await connect(url, { transports: this.transports });
    this.socket = socket;
    // The recorder of helpers.connect keeps every event; a load client tracks what it needs
    // itself, so the recorder is emptied now and then to bound memory on long runs.
    this.trim = setInterval(() => {
      socket.rec.events.length = 0;
    }, 5000);
    this.trim.unref();
    socket.on("receive_message", (m) => this.onMessage(m));
    socket.on("chatroom_users", (users) => this.notices.push({ at: Date.now(), event: "chatroom_users", payload: users, epoch: this.epoch }));
    socket.on("disconnect", (reason) => {
      this.disconnects.push({ at: Date.now(), reason, epoch: this.epoch });
      clearInterval(this.trim);
      if (this.autoReconnect && !this.closed && reason !== "io client disconnect" && this.socket === socket) {
        sleep(this.reconnectDelayMs)
          .then(() => this.reconnect())
          .catch((e) => {
            this.reconnectError = e;
          });
      }
    });
    for (const room of this.rooms) await this.join(room);
    return this;
  }

  onMessage(m) {
    if (!m || !this.seen.has(m.room)) return;
    if (typeof m.id !== "string") {
      this.notices.push({ at: Date.now(), event: "receive_message", payload: m, epoch: this.epoch });
      return;
    }
    if (this.keepLive) this.live.get(m.room).push({ ...m, at: Date.now(), epoch: this.epoch });
    this.see(m);
  }

  see(m) {
    const seen = this.seen.get(m.room);
    if (!seen) return;
    seen.set(m.id, m);
    const last = this.lastId.get(m.room);
    if (!last || compareIds(m.id, last) > 0) this.lastId.set(m.room, m.id);
  }

  /** join_room (with since = the last id seen, when there is one), retried while unavailable. */
  async join(room, { since = this.lastId.get(room), deadlineMs = this.joinTimeoutMs } = {}) {
    const deadline = Date.now() + deadlineMs;
    let last;
    for (;;) {
      const payload = { username: this.username, room, ...(since ? { since } : {}) };
      try {
        last = await this.socket.timeout(this.ackTimeoutMs).emitWithAck("join_room", payload);
      } catch (e) {
        last = { ok: false, error: { code: "timeout", message: e.message } };
      }
      if (last?.ok) {
        for (const m of last.history ?? []) {
          if (this.seen.get(room) && !this.seen.get(room).has(m.id)) this.recovered.set(room, this.recovered.get(room) + 1);
          this.see(m);
        }
        return last;
      }
      if (!this.socket.connected) throw new Error(`${this.name}: disconnected while joining ${room}`);
      if (Date.now() > deadline) throw new Error(`${this.name}: join_room ${room} failed for ${deadlineMs} ms: ${JSON.stringify(last)}`);
      await sleep(250);
    }
  }

  /**
   * After the connection was lost: connects again (to reconnectUrl), rejoins every room with
   * `since` and records what the history brought back. Concurrent callers share one attempt.
   */
  async reconnect({ deadlineMs = 60_000 } = {}) {
    if (this.reconnecting) return this.reconnecting;
    this.reconnecting = (async () => {
      const started = Date.now();
      const deadline = started + deadlineMs;
      let lastErr;
      for (;;) {
        if (this.closed) throw new Error(`${this.name}: closed`);
        try {
          this.socket?.disconnect();
          const before = new Map(this.rooms.map((r) => [r, this.lastId.get(r)]));
          this.epoch++;
          const joined = {};
          await this.open(this.reconnectUrl);
          for (const r of this.rooms) joined[r] = before.get(r);
          this.recoveries.push({ at: Date.now(), ms: Date.now() - started, since: joined, epoch: this.epoch });
          return;
        } catch (e) {
          lastErr = e;
          if (Date.now() > deadline) throw new Error(`${this.name}: could not reconnect within ${deadlineMs} ms: ${lastErr.message}`);
          await sleep(300);
        }
      }
    })();
    try {
      return await this.reconnecting;
    } finally {
      this.reconnecting = undefined;
    }
  }

  /** Emits one send_message for attempt `a` and records the outcome; resolves the outcome. */
  emitSend(a, text) {
    const at = Date.now();
    const socket = this.socket;
    return new Promise((resolve) => {
      if (!socket?.connected) {
        this.ledger.record(a, "not_connected", 0, undefined, at);
        resolve("not_connected");
        return;
      }
      socket.timeout(this.ackTimeoutMs).emit("send_message", { room: a.room, message: text, clientId: a.key }, (err, res) => {
        const ms = Date.now() - at;
        let outcome;
        if (err) outcome = socket.connected ? "timeout" : "disconnected";
        else if (res?.ok === true && typeof res.id === "string") outcome = "ok";
        else outcome = res?.error?.code ?? "bad_ack";
        this.ledger.record(a, outcome, ms, res, at);
        resolve(outcome);
      });
    });
  }

  /** A new logical message of this connection: its key is also its clientId and its text. */
  newAttempt(room, tag) {
    const seq = this.seq++;
    const key = `${tag}.${this.name}.${seq}`;
    return this.ledger.attempt({ key, room, sender: this.sender, seq, username: this.username });
  }

  close() {
    this.closed = true;
    clearInterval(this.trim);
    this.socket?.disconnect();
  }
}

/**
 * Sends `count` messages from `client` to `room` (or until stop() is true):
 *   window         messages in flight at once (1 = wait for each ack)
 *   retry          resend an unavailable or unanswered message with the same clientId until
 *                  it is acknowledged (only with window 1, so that send order stays defined)
 *   ratePerSec     pace the emissions (0 = as fast as the window allows)
 *   burst          with ratePerSec: emit this many back to back, then wait for the next slot
 *   room           a room, or a function of the message number giving the room
 *   reconnect      after a lost connection: reconnect (rejoin with since) and go on
 *   filler         text appended to the key (message size)
 */
export async function runSender(client, room, { count, tag, window = 20, retry = false, ratePerSec = 0, burst = 1, reconnect = true, stop = () => false, filler = "", retryPauseMs = 200, giveUpAt = Infinity }) {
  if (retry && window !== 1) throw new Error("runSender: retry needs window 1");
  const inflight = new Set();
  const started = Date.now();
  for (let i = 0; i < count && !stop(); i++) {
    while (inflight.size >= window) await Promise.race(inflight);
    if (ratePerSec > 0) {
      const due = started + (Math.floor(i / burst) * burst * 1000) / ratePerSec;
      if (due > Date.now()) await sleep(due - Date.now());
    }
    if (!client.connected) {
      if (!reconnect) break;
      await Promise.allSettled([...inflight]);
      await client.reconnect();
    }
    const a = client.newAttempt(typeof room === "function" ? room(i) : room, tag);
    const text = filler ? `${a.key} ${filler}` : a.key;
    if (filler) a.text = text;
    if (!retry) {
      const p = client.emitSend(a, text).then(() => inflight.delete(p));
      inflight.add(p);
      continue;
    }
    for (;;) {
      const outcome = await client.emitSend(a, text);
      if (outcome === "ok") break;
      if (!["unavailable", "timeout", "disconnected", "not_connected"].includes(outcome)) break;
      if (Date.now() > giveUpAt) break;
      if (!client.connected) {
        if (!reconnect) break;
        await client.reconnect();
      } else {
        await sleep(retryPauseMs);
      }
    }
  }
  await Promise.allSettled([...inflight]);
}

/** Waits until `pred()` is true, polling; throws `what` after timeoutMs. */
export async function until(pred, timeoutMs, what, pollMs = 100) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await pred()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms: ${typeof what === "function" ? what() : what}`);
    await sleep(pollMs);
  }
}

/** Acked ids of `room` that `client` has not seen (live or recovered). */
export function unseen(client, ledger, room) {
  const seen = client.seen.get(room);
  const out = [];
  for (const a of ledger.attempts.values()) {
    if (a.room !== room || a.status !== "ok") continue;
    for (const id of a.ids) if (!seen.has(id)) out.push(id);
  }
  return out;
}

/** (sender, seq) of a payload sent by these load clients, from its text `tag.client.seq`. */
export function originOf(ledger) {
  return (m) => {
    const key = String(m.message ?? "").split(" ")[0];
    const a = ledger.attempts.get(key);
    return a ? { sender: a.sender, seq: a.seq } : undefined;
  };
}

/**
 * Gives the Ledger's attempts the row keys the checker expects (rows' text is `key[ filler]`, or
 * after an edit `key edit.N`); `text` keeps the whole text.
 */
export const rowKey = (r) => ({ ...r, text: r.message, message: String(r.message ?? "").split(" ")[0] });
