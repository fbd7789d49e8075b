// Raw protocol clients and process measurements for the adversarial and hostile-client tests:
// Engine.IO v4 over WebSocket (the `ws` package, socket.io-client's own) and over HTTP
// long-polling, with packets written by hand; Prometheus counters; RSS and CPU from /proc.

import assert from "node:assert/strict";
import fs from "node:fs";
import http from "node:http";
import WebSocket from "ws";
import { WAIT_MS, httpGet, show } from "./helpers.mjs";

/** Every text the servers sent to raw clients: checked for secrets (adversarial "secrets"). */
export const SERVER_TEXTS = [];

// ---------------------------------------------------------------------------------------------
// Raw Engine.IO / Socket.IO clients
// ---------------------------------------------------------------------------------------------

export const wsBase = (url) => url.replace(/^http/, "ws");

/** A WebSocket speaking Engine.IO v4 by hand. Answers pings; records every message and the close. */
export class RawWs {
  static all = new Set();

  /** A new session, or with `sid` the upgrade of an existing (polling) one. */
  static open(url, { headers = {}, localAddress, sid } = {}) {
    return new Promise((resolve, reject) => {
      const session = sid === undefined ? "" : `&sid=${encodeURIComponent(sid)}`;
      const ws = new WebSocket(`${wsBase(url)}/socket.io/?EIO=4&transport=websocket${session}`, { headers, localAddress, perMessageDeflate: false });
      const raw = new RawWs(ws);
      const timer = setTimeout(() => {
        ws.terminate();
        reject(new Error(`raw websocket to ${url}: not open within ${WAIT_MS} ms`));
      }, WAIT_MS);
      ws.once("open", () => {
        clearTimeout(timer);
        raw.openedAt = Date.now();
        resolve(raw);
      });
      ws.once("unexpected-response", (_req, res) => {
        clearTimeout(timer);
        reject(new Error(`raw websocket to ${url}: HTTP ${res.statusCode} instead of an upgrade`));
      });
      ws.once("error", (e) => {
        clearTimeout(timer);
        reject(e);
      });
    });
  }

  constructor(ws) {
    this.ws = ws;
    this.msgs = [];
    this.closed = null;
    this.waiters = new Set();
    this.ackId = 0;
    RawWs.all.add(this);
    ws.on("message", (data, isBinary) => {
      const m = isBinary ? Buffer.from(data) : data.toString("utf8");
      if (!isBinary) SERVER_TEXTS.push(m);
      this.msgs.push(m);
      if (m === "2") this.send("3");
      for (const w of [...this.waiters]) w();
    });
    ws.on("close", (code) => {
      this.closed = { code, at: Date.now() };
      RawWs.all.delete(this);
      for (const w of [...this.waiters]) w();
    });
    ws.on("error", (e) => {
      this.error = e.message; // e.g. EPIPE while we were still writing a huge frame
    });
  }

  get isOpen() {
    return !this.closed && this.ws.readyState === WebSocket.OPEN;
  }

  send(data, opts = {}) {
    if (this.ws.readyState === WebSocket.OPEN) this.ws.send(data, opts);
  }

  terminate() {
    this.ws.terminate();
  }

  /** Waits for a text message matching `pred` (after index `since`). */
  waitMsg(pred, { since = 0, timeoutMs = WAIT_MS, what = "message" } = {}) {
    return new Promise((resolve, reject) => {
      const check = () => {
        const m = this.msgs.slice(since).find((x) => typeof x === "string" && pred(x));
        if (m !== undefined) {
          done();
          resolve(m);
        } else if (this.closed) {
          done();
          reject(new Error(`raw websocket closed (code ${this.closed.code}) while waiting for ${what}; got ${show(this.texts(since))}`));
        }
      };
      const done = () => {
        clearTimeout(timer);
        this.waiters.delete(check);
      };
      const timer = setTimeout(() => {
        done();
        reject(new Error(`raw websocket: no ${what} within ${timeoutMs} ms; got ${show(this.texts(since))}`));
      }, timeoutMs);
      this.waiters.add(check);
      check();
    });
  }

  texts(since = 0) {
    return this.msgs.slice(since).map((m) => (typeof m === "string" ? m.slice(0, 300) : `<binary ${m.length}>`));
  }

  /** Resolves the close { code, at }, or null when still open after `timeoutMs`. */
  waitClosed(timeoutMs = WAIT_MS) {
    if (this.closed) return Promise.resolve(this.closed);
    return new Promise((resolve) => {
      const check = () => {
        if (this.closed) {
          done();
          resolve(this.closed);
        }
      };
      const done = () => {
        clearTimeout(timer);
        this.waiters.delete(check);
      };
      const timer = setTimeout(() => {
        done();
        resolve(null);
      }, timeoutMs);
      this.waiters.add(check);
    });
  }

  /** Socket.IO CONNECT to `/`; resolves the answer packet (40{sid} or 44{message}). */
  async connectNs(auth) {
    const since = this.msgs.length;
    this.send(auth === undefined ? "40" : `40${JSON.stringify(auth)}`);
    return this.waitMsg((m) => m.startsWith("40{") || m.startsWith("44"), { since, what: "CONNECT answer" });
  }

  /** Sends `42<id>[<event>,<payloadText>]` and resolves the parsed ack argument. */
  async ack(event, payloadText, { binary = [] } = {}) {
    const id = ++this.ackId;
    const since = this.msgs.length;
    const prefix = binary.length ? `45${binary.length}-${id}` : `42${id}`;
    this.send(`${prefix}[${JSON.stringify(event)}${payloadText === undefined ? "" : `,${payloadText}`}]`);
    for (const b of binary) this.send(b, { binary: true });
    const m = await this.waitMsg((x) => x.startsWith(`43${id}[`), { since, what: `ack ${id} of ${event}` });
    return JSON.parse(m.slice(`43${id}`.length))[0];
  }

  async join(room, username) {
    const res = await this.ack("join_room", JSON.stringify({ username, room }));
    assert.equal(res?.ok, true, `raw join_room ${show(room)}: ${show(res)}`);
    return res;
  }
}

/** Plain HTTP request (no keep-alive); resolves { status, body } or { error } when the socket broke. */
export function httpRequest(method, url, body, headers = {}, timeoutMs = WAIT_MS) {
  return new Promise((resolve) => {
    const req = http.request(url, {
      method,
      agent: false,
      headers: { connection: "close", ...(body !== undefined ? { "content-type": "text/plain;charset=UTF-8" } : {}), ...headers },
    }, (res) => {
      const chunks = [];
      res.on("data", (c) => chunks.push(c));
      res.on("end", () => resolve({ status: res.statusCode, body: Buffer.concat(chunks).toString("utf8") }));
      res.on("error", (e) => resolve({ error: e.message }));
    });
    req.setTimeout(timeoutMs, () => req.destroy(new Error(`timeout after ${timeoutMs} ms`)));
    req.on("error", (e) => resolve({ error: e.message }));
    if (body !== undefined) req.write(body);
    req.end();
  });
}

/** An Engine.IO v4 long-polling session by hand. */
export class RawPoll {
  static async open(url) {
    const res = await httpRequest("GET", `${url}/socket.io/?EIO=4&transport=polling`);
    assert.equal(res.status, 200, `polling handshake: ${show(res)}`);
    assert.ok(res.body.startsWith("0{"), `polling OPEN packet: ${res.body}`);
    const p = new RawPoll(url, JSON.parse(res.body.slice(1)).sid);
    p.openedAt = Date.now();
    return p;
  }

  constructor(url, sid) {
    this.sid = sid;
    this.url = `${url}/socket.io/?EIO=4&transport=polling&sid=${encodeURIComponent(sid)}`;
    this.packets = [];
    this.ackId = 0;
  }

  post(body, timeoutMs = WAIT_MS) {
    return httpRequest("POST", this.url, body, {}, timeoutMs);
  }

  /** One GET: resolves { status, body, packets } (pings are answered). */
  async get(timeoutMs = WAIT_MS) {
    const res = await httpRequest("GET", this.url, undefined, {}, timeoutMs);
    if (res.status === 200) {
      res.packets = res.body.split("\x1e");
      for (const p of res.packets) SERVER_TEXTS.push(p);
      this.packets.push(...res.packets);
      if (res.packets.includes("2")) await this.post("3");
    }
    return res;
  }

  /** GETs until a packet matches `pred`. */
  async waitPacket(pred, what, timeoutMs = WAIT_MS) {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`polling: no ${what} within ${timeoutMs} ms; got ${show(this.packets)}`);
      const res = await this.get(left);
      if (res.status !== 200) throw new Error(`polling GET while waiting for ${what}: ${show(res)}`);
      const m = res.packets.find(pred);
      if (m !== undefined) return m;
    }
  }

  /**
   * Whether the session is closed: a GET is refused (400, unknown session) or carries the
   * Engine.IO CLOSE packet.
   */
  async isClosed() {
    for (let i = 0; i < 3; i++) {
      const res = await this.get(WAIT_MS);
      if (res.error) return { closed: false, why: res.error };
      if (res.status === 400) return { closed: true, why: res.body };
      if (res.status === 200 && res.packets.includes("1")) return { closed: true, why: "CLOSE packet" };
      if (res.status !== 200) return { closed: false, why: `HTTP ${res.status} ${res.body}` };
    }
    return { closed: false, why: "session answers" };
  }

  async connectNs() {
    const r = await this.post("40");
    assert.equal(r.status, 200, `polling CONNECT post: ${show(r)}`);
    return this.waitPacket((p) => p.startsWith("40{") || p.startsWith("44"), "CONNECT answer");
  }

  async ack(event, payloadText, { binaryBase64 = [] } = {}) {
    const id = ++this.ackId;
    const prefix = binaryBase64.length ? `45${binaryBase64.length}-${id}` : `42${id}`;
    const packets = [`${prefix}[${JSON.stringify(event)},${payloadText}]`, ...binaryBase64.map((b) => `b${b}`)];
    const r = await this.post(packets.join("\x1e"));
    assert.equal(r.status, 200, `polling post of ${event}: ${show(r)}`);
    const m = await this.waitPacket((p) => p.startsWith(`43${id}[`), `ack ${id} of ${event}`);
    return JSON.parse(m.slice(`43${id}`.length))[0];
  }
}


/** Sum of a Prometheus metric's samples (optionally only those whose labels contain `labelPart`). */
export async function metric(url, name, labelPart = "") {
  const res = await httpGet(`${url}/metrics`);
  assert.equal(res.status, 200, `${url}/metrics`);
  let sum = 0;
  for (const line of res.body.split("\n")) {
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$/.exec(line.trim());
    if (m && m[1] === name && (m[2] ?? "").includes(labelPart)) sum += Number(m[3]);
  }
  return sum;
}

export function rssKb(pid) {
  const status = fs.readFileSync(`/proc/${pid}/status`, "utf8");
  return Number(/^VmRSS:\s+(\d+)\s+kB/m.exec(status)?.[1]);
}

/** CPU seconds (user + system) a process has used, from /proc. */
export function cpuSeconds(pid) {
  const fields = fs.readFileSync(`/proc/${pid}/stat`, "utf8").split(") ").at(-1).split(" ");
  // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after "(comm) ".
  return (Number(fields[11]) + Number(fields[12])) / 100;
}
