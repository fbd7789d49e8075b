// Shared helpers for the Chatify end-to-end tests.
//
// Everything here talks to a running system (deploy/local/up.sh) with the real socket.io-client.
// Waits are short and fail with a message that says what was expected and what arrived.

import { io } from "socket.io-client";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import http from "node:http";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const E2E_DIR = path.dirname(fileURLToPath(import.meta.url));
export const REPO_DIR = path.resolve(E2E_DIR, "..", "..");

/** Default wait for one expected event or ack. */
export const WAIT_MS = Number(process.env.CHATIFY_E2E_WAIT_MS || 3000);
/** Quiet period used to assert that something did NOT arrive. */
export const QUIET_MS = Number(process.env.CHATIFY_E2E_QUIET_MS || 300);
/** Deadline for asynchronous persistence (persister batching) to show up in history. */
export const PERSIST_MS = Number(process.env.CHATIFY_E2E_PERSIST_MS || 8000);

export const ALLOWED_ORIGIN = "http://localhost:3000";
export const EVIL_ORIGIN = "http://evil.example.com";
export const CHATBOT = "ChatBot";
export const UUIDV7_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;

// ---------------------------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------------------------

/** Parses a file of `export NAME=value` lines (values may be single or double quoted). */
export function parseEnvFile(text) {
  const vars = {};
  for (const raw of text.split(/\r?\n/)) {
    const line = raw.trim();
    if (!line || line.startsWith("#")) continue;
    const m = /^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$/.exec(line);
    if (!m) continue;
    let value = m[2].trim();
    if (value.length >= 2 && ((value[0] === '"' && value.at(-1) === '"') || (value[0] === "'" && value.at(-1) === "'"))) {
      const quote = value[0];
      value = value.slice(1, -1);
      if (quote === '"') value = value.replace(/\\(["\\$`])/g, "$1");
    }
    vars[m[1]] = value;
  }
  return vars;
}

function loadEnv() {
  let runDir = process.env.CHATIFY_RUN_DIR;
  if (!runDir) {
    const guess = path.join(REPO_DIR, "deploy", "local", "run");
    if (fs.existsSync(path.join(guess, "env"))) runDir = guess;
  }
  let fileVars = {};
  if (runDir && fs.existsSync(path.join(runDir, "env"))) {
    fileVars = parseEnvFile(fs.readFileSync(path.join(runDir, "env"), "utf8"));
  }
  const vars = { ...fileVars };
  for (const [k, v] of Object.entries(process.env)) {
    if (k.startsWith("CHATIFY_") && v !== "") vars[k] = v;
  }
  if (runDir) vars.CHATIFY_RUN_DIR = runDir;
  return { runDir, fileVars, vars };
}

export const ENV = loadEnv();

/** Returns an environment variable of the system under test, or throws a clear error. */
export function need(name) {
  const v = ENV.vars[name];
  if (!v) {
    throw new Error(
      `${name} is not set: start the system with deploy/local/up.sh and set CHATIFY_RUN_DIR ` +
        `(tests read $CHATIFY_RUN_DIR/env), or export ${name} yourself`,
    );
  }
  return v.replace(/\/+$/, "");
}

export const lbUrl = () => need("CHATIFY_LB_URL");
export const gw1Url = () => need("CHATIFY_GATEWAY1_URL");
export const gw2Url = () => need("CHATIFY_GATEWAY2_URL");
export const natsUrl = () => need("CHATIFY_NATS_URL");
export const binPath = (name) => path.join(ENV.vars.CHATIFY_BIN_DIR || path.join(REPO_DIR, "target", "release"), name);
export const gatewayBin = () => binPath("chatify-gateway");

// ---------------------------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------------------------

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
export const uid = () => crypto.randomBytes(5).toString("hex");
export const roomName = (tag = "room") => `e2e-${tag}-${uid()}`;
export const userName = (tag = "user") => `u-${tag}-${uid()}`;
export const show = (v, max = 1500) => {
  let s;
  try {
    s = JSON.stringify(v);
  } catch {
    s = String(v);
  }
  if (s === undefined) s = String(v);
  return s.length > max ? `${s.slice(0, max)}...(${s.length} chars)` : s;
};

/**
 * Users as comparable sorted usernames. Member ids are not the clients' to know (they are the
 * token's `sub` with auth, random per connection without): tests name each member uniquely and
 * check the ids apart ({@link assertMemberIds}).
 */
export const userKeys = (list) => (Array.isArray(list) ? list.map((u) => u?.username).sort() : list);
/** The entry a socket that joined as `username` has in member lists. */
export const me = (_socket, username) => ({ username });

/** Every Socket.IO and Engine.IO session id of the sockets this run opened. */
export function sessionIds() {
  const found = new Set();
  for (const s of allSockets) {
    if (s.id) found.add(s.id);
    const engineId = s.io?.engine?.id;
    if (engineId) found.add(engineId);
  }
  for (const id of knownSessionIds) found.add(id);
  return found;
}

/** Asserts member ids are ids that grant nothing: strings, one per member, no session id. */
export function assertMemberIds(list, what = "users") {
  assert.ok(Array.isArray(list), `${what}: expected an array, got ${show(list)}`);
  const sessions = sessionIds();
  const seen = new Set();
  for (const u of list) {
    assert.equal(typeof u?.id, "string", `${what}: a member without a string id: ${show(u)}`);
    assert.ok(u.id.length > 0, `${what}: an empty member id: ${show(u)}`);
    assert.ok(!sessions.has(u.id), `${what}: member ${show(u)} is listed by a session id`);
    assert.ok(!seen.has(u.id), `${what}: member id ${u.id} is listed twice: ${show(list)}`);
    seen.add(u.id);
  }
}

/** Asserts a users list equals exactly the expected set (order ignored), with member ids. */
export function assertUsers(actual, expected, what = "users") {
  assert.ok(Array.isArray(actual), `${what}: expected an array, got ${show(actual)}`);
  assert.deepEqual(userKeys(actual), userKeys(expected), `${what}: expected ${show(expected)}, got ${show(actual)}`);
  assertMemberIds(actual, what);
}

const pickMsg = (m) => ({ id: m?.id, room: m?.room, username: m?.username, message: m?.message, createdTime: m?.createdTime });
/** The five contract fields of a stored/delivered message (extra fields are ignored). */
export const msgFields = (m) => pickMsg(m);
export const msgList = (list) => (Array.isArray(list) ? list.map(pickMsg) : list);
export const ids = (list) => (Array.isArray(list) ? list.map((m) => m?.id) : list);

/** Milliseconds encoded in the first 48 bits of a UUIDv7. */
export const uuidv7Ms = (id) => parseInt(id.replace(/-/g, "").slice(0, 12), 16);

// ---------------------------------------------------------------------------------------------
// Sockets
// ---------------------------------------------------------------------------------------------

const allSockets = new Set();
/** Session ids seen once (kept after their sockets are gone). */
const knownSessionIds = new Set();

function attachRecorder(socket) {
  const rec = { events: [], waiters: new Set() };
  socket.onAny((event, ...args) => {
    rec.events.push({ event, args, at: Date.now() });
    for (const w of [...rec.waiters]) w();
  });
  socket.rec = rec;
}

/**
 * Connects a new socket (never shared with another: forceNew) and waits for `connect`.
 * Every incoming event is recorded from the first moment (socket.rec), so nothing is missed by
 * attaching a listener too late. With `t`, the socket is disconnected when the test ends.
 */
export async function connect(url, opts = {}, t = undefined, timeoutMs = WAIT_MS) {
  const socket = io(url, { forceNew: true, reconnection: false, timeout: timeoutMs, ...opts });
  attachRecorder(socket);
  allSockets.add(socket);
  if (t) t.after(() => socket.disconnect());
  await new Promise((resolve, reject) => {
    const cleanup = () => {
      clearTimeout(timer);
      socket.off("connect", onConnect);
      socket.off("connect_error", onError);
    };
    const onConnect = () => {
      cleanup();
      knownSessionIds.add(socket.id);
      if (socket.io?.engine?.id) knownSessionIds.add(socket.io.engine.id);
      resolve();
    };
    const onError = (err) => {
      cleanup();
      socket.disconnect();
      reject(new Error(`connect_error from ${url} (${show(opts.transports ?? "default transports")}): ${err?.message}`, { cause: err }));
    };
    const timer = setTimeout(() => {
      cleanup();
      socket.disconnect();
      reject(new Error(`no connect from ${url} within ${timeoutMs} ms`));
    }, timeoutMs);
    socket.on("connect", onConnect);
    socket.on("connect_error", onError);
  });
  return socket;
}

/** Tries to connect and expects the server to refuse: resolves with the connect_error Error. */
export async function connectRefused(url, opts = {}, timeoutMs = WAIT_MS) {
  const socket = io(url, { forceNew: true, reconnection: false, timeout: timeoutMs, ...opts });
  allSockets.add(socket);
  try {
    return await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`expected connect_error from ${url}, got nothing within ${timeoutMs} ms`)), timeoutMs);
      socket.on("connect", () => {
        clearTimeout(timer);
        reject(new Error(`expected the connection to ${url} to be refused, but it connected (socket id ${socket.id})`));
      });
      socket.on("connect_error", (err) => {
        clearTimeout(timer);
        resolve(err);
      });
    });
  } finally {
    socket.disconnect();
  }
}

export function closeAll() {
  for (const s of allSockets) s.disconnect();
  allSockets.clear();
}

/** Disconnects a socket and waits until the client has seen the disconnect. */
export async function disconnect(socket) {
  if (!socket.connected) return;
  const done = new Promise((r) => socket.once("disconnect", r));
  socket.disconnect();
  await Promise.race([done, sleep(WAIT_MS)]);
}

/** Waits until the socket's Engine.IO transport is websocket (after the `upgrade` event). */
export async function waitForWebSocket(socket, timeoutMs = WAIT_MS) {
  const engine = socket.io.engine;
  if (engine.transport?.name === "websocket") return;
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      cleanup();
      reject(new Error(`no upgrade to websocket within ${timeoutMs} ms (transport still ${engine.transport?.name})`));
    }, timeoutMs);
    const onUpgrade = () => {
      cleanup();
      resolve();
    };
    const onUpgradeError = (err) => {
      cleanup();
      reject(new Error(`upgradeError: ${err?.message ?? err}`));
    };
    const cleanup = () => {
      clearTimeout(timer);
      engine.off("upgrade", onUpgrade);
      engine.off("upgradeError", onUpgradeError);
    };
    engine.on("upgrade", onUpgrade);
    engine.on("upgradeError", onUpgradeError);
  });
}

export const NO_PAYLOAD = Symbol("no payload");

/** Emits with an acknowledgement and returns the ack; fails clearly when no ack comes in time. */
export async function emitAck(socket, event, payload, timeoutMs = WAIT_MS) {
  try {
    if (payload === NO_PAYLOAD) return await socket.timeout(timeoutMs).emitWithAck(event);
    return await socket.timeout(timeoutMs).emitWithAck(event, payload);
  } catch (err) {
    throw new Error(`no ack for ${event} ${payload === NO_PAYLOAD ? "(no payload)" : show(payload, 200)} within ${timeoutMs} ms: ${err?.message}`);
  }
}

export function assertOk(res, what = "ack") {
  assert.ok(res && typeof res === "object" && res.ok === true, `${what}: expected { ok: true, ... }, got ${show(res)}`);
  return res;
}

export function assertErrorShape(err, code, what) {
  assert.ok(err && typeof err === "object", `${what}: expected an error object, got ${show(err)}`);
  assert.equal(err.code, code, `${what}: expected error code ${code}, got ${show(err)}`);
  assert.ok(typeof err.message === "string" && err.message.trim().length > 0, `${what}: error message must be a non-empty string, got ${show(err)}`);
}

export function assertFail(res, code, what = "ack") {
  assert.ok(res && typeof res === "object" && res.ok === false, `${what}: expected { ok: false, error }, got ${show(res)}`);
  assertErrorShape(res.error, code, what);
  return res;
}

/** Emits and expects an ok ack. */
export async function okAck(socket, event, payload, what = event, timeoutMs) {
  return assertOk(await emitAck(socket, event, payload, timeoutMs), `${what} ${show(payload, 200)}`);
}

/** Emits and expects a failure ack with `code`, then checks that the socket is still connected. */
export async function failAck(socket, event, payload, code, what = event) {
  const res = await emitAck(socket, event, payload);
  assertFail(res, code, `${what} ${payload === NO_PAYLOAD ? "(no payload)" : show(payload, 200)}`);
  assert.equal(socket.connected, true, `${what}: the socket must stay connected after a failed event`);
  return res;
}

export const join = (socket, room, username, extra = {}) =>
  okAck(socket, "join_room", { username, room, ...extra }, `join_room ${show(room)}`);

/** Sends a message and expects an ok ack with an id and createdTime. */
export async function send(socket, room, message, extra = {}) {
  const res = await okAck(socket, "send_message", { room, message, ...extra }, "send_message");
  assert.equal(typeof res.id, "string", `send_message ack: id must be a string, got ${show(res)}`);
  assert.ok(Number.isInteger(res.createdTime), `send_message ack: createdTime must be integer ms, got ${show(res)}`);
  return res;
}

/**
 * Sends messages one after the other, awaiting each ack; a `rate_limited` reply is retried after a
 * short pause (so any number of messages can be sent within the 20/s, burst 40 limit).
 */
export async function sendPaced(socket, room, texts) {
  const acks = [];
  for (const text of texts) {
    for (let attempt = 0; ; attempt++) {
      const res = await emitAck(socket, "send_message", { room, message: text });
      if (res?.ok === false && res.error?.code === "rate_limited" && attempt < 100) {
        await sleep(60);
        continue;
      }
      assertOk(res, `send_message ${show(text, 100)}`);
      acks.push(res);
      break;
    }
  }
  return acks;
}

// ---------------------------------------------------------------------------------------------
// Recorded events
// ---------------------------------------------------------------------------------------------

/** Position in the socket's recorded events; pass as `since` to look only at later events. */
export const mark = (socket) => socket.rec.events.length;

/** Payloads (first argument) of recorded `event`s matching `pred`. */
export function received(socket, event, pred = () => true, since = 0) {
  return socket.rec.events
    .slice(since)
    .filter((e) => e.event === event && pred(e.args[0]))
    .map((e) => e.args[0]);
}

/** Waits until at least `count` recorded `event`s match `pred`; returns the matching payloads. */
export function waitForCount(socket, event, pred, count, { timeoutMs = WAIT_MS, since = 0, what = "" } = {}) {
  return new Promise((resolve, reject) => {
    const check = () => {
      const got = received(socket, event, pred, since);
      if (got.length >= count) {
        done();
        resolve(got);
        return true;
      }
      return false;
    };
    const done = () => {
      clearTimeout(timer);
      socket.rec.waiters.delete(check);
    };
    const timer = setTimeout(() => {
      done();
      const all = received(socket, event, () => true, since);
      reject(
        new Error(
          `${what || event}: expected ${count} matching '${event}' event(s) within ${timeoutMs} ms on socket ${socket.id}, ` +
            `got ${received(socket, event, pred, since).length} matching; all '${event}' received: ${show(all)}`,
        ),
      );
    }, timeoutMs);
    if (!check()) socket.rec.waiters.add(check);
  });
}

/** Waits for one recorded `event` matching `pred` and returns its payload. */
export async function waitFor(socket, event, pred = () => true, opts = {}) {
  const got = await waitForCount(socket, event, pred, 1, opts);
  return got[0];
}

/** Waits a fixed quiet period and asserts that no `event` matching `pred` arrived. */
export async function expectNone(socket, event, pred = () => true, { since = 0, quietMs = QUIET_MS, what = "" } = {}) {
  await sleep(quietMs);
  const got = received(socket, event, pred, since);
  assert.equal(got.length, 0, `${what || event}: expected no such '${event}' on socket ${socket.id}, got ${show(got)}`);
}

export const isChatBot = (room, text) => (m) => m?.room === room && m?.username === CHATBOT && m?.message === text;
export const isMsgId = (id) => (m) => m?.id === id;
export const sameUsers = (expected) => (list) => Array.isArray(list) && show(userKeys(list)) === show(userKeys(expected));

/** Asserts a ChatBot notice: exact text, room, no id, createdTime in ms. */
export function assertChatBot(m, room, text) {
  assert.equal(m.username, CHATBOT, `ChatBot notice: ${show(m)}`);
  assert.equal(m.room, room, `ChatBot notice room: ${show(m)}`);
  assert.equal(m.message, text, `ChatBot notice text: ${show(m)}`);
  assert.equal(m.id, undefined, `ChatBot notices carry no id: ${show(m)}`);
  assert.ok(Number.isInteger(m.createdTime) && Math.abs(m.createdTime - Date.now()) < 60_000, `ChatBot createdTime must be ms since the epoch: ${show(m)}`);
}

// ---------------------------------------------------------------------------------------------
// History
// ---------------------------------------------------------------------------------------------

export async function getHistory(socket, room, opts = {}) {
  const res = await okAck(socket, "get_history", { room, ...opts }, `get_history ${show(room)}`);
  assert.ok(Array.isArray(res.messages), `get_history: messages must be an array, got ${show(res)}`);
  assert.equal(typeof res.hasMore, "boolean", `get_history: hasMore must be a boolean, got ${show(res)}`);
  return res;
}

/** All stored messages of a room, newest first, by paging with limit 100. */
export async function fullHistory(socket, room) {
  const all = [];
  let before;
  for (let i = 0; i < 100; i++) {
    const page = await getHistory(socket, room, before ? { limit: 100, before } : { limit: 100 });
    all.push(...page.messages);
    if (!page.hasMore || page.messages.length === 0) return all;
    before = page.messages.at(-1).id;
  }
  throw new Error("fullHistory: too many pages");
}

/**
 * Polls the room's history (newest first, all pages) until every id in `expectedIds` is stored;
 * returns the full history. Fails after PERSIST_MS with what was stored.
 */
export async function waitForStored(socket, room, expectedIds, timeoutMs = PERSIST_MS) {
  const deadline = Date.now() + timeoutMs;
  let last = [];
  let lastError = "";
  for (;;) {
    try {
      last = await fullHistory(socket, room);
      lastError = "";
      const have = new Set(ids(last));
      if (expectedIds.every((id) => have.has(id))) return last;
    } catch (e) {
      // e.g. `unavailable` while a persister (re)starts: keep polling until the deadline
      lastError = e.message;
    }
    if (Date.now() > deadline) {
      const have = new Set(ids(last));
      const missing = expectedIds.filter((id) => !have.has(id));
      throw new Error(
        `history of ${show(room)}: ${missing.length} of ${expectedIds.length} message(s) not stored within ${timeoutMs} ms ` +
          `(missing ${show(missing, 400)}); stored ids: ${show(ids(last), 600)}${lastError ? `; last get_history failure: ${lastError}` : ""}`,
      );
    }
    await sleep(150);
  }
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/** Plain HTTP GET without keep-alive. Resolves { status, headers, body, json }. */
export function httpGet(url, headers = {}, timeoutMs = WAIT_MS) {
  return new Promise((resolve, reject) => {
    const req = http.request(url, { method: "GET", headers: { connection: "close", ...headers }, agent: false }, (res) => {
      const chunks = [];
      res.on("data", (c) => chunks.push(c));
      res.on("end", () => {
        const body = Buffer.concat(chunks).toString("utf8");
        let json;
        try {
          json = JSON.parse(body);
        } catch {
          json = undefined;
        }
        resolve({ status: res.statusCode, headers: res.headers, body, json });
      });
      res.on("error", reject);
    });
    req.setTimeout(timeoutMs, () => req.destroy(new Error(`GET ${url}: no answer within ${timeoutMs} ms`)));
    req.on("error", reject);
    req.end();
  });
}

/**
 * Raw WebSocket upgrade request (no client library): resolves { status } where 101 means the
 * upgrade was accepted (the socket is closed right away).
 */
export function wsUpgrade(url, headers = {}, timeoutMs = WAIT_MS) {
  return new Promise((resolve, reject) => {
    const req = http.request(url, {
      method: "GET",
      agent: false,
      headers: {
        connection: "Upgrade",
        upgrade: "websocket",
        "sec-websocket-version": "13",
        "sec-websocket-key": crypto.randomBytes(16).toString("base64"),
        ...headers,
      },
    });
    req.setTimeout(timeoutMs, () => req.destroy(new Error(`upgrade ${url}: no answer within ${timeoutMs} ms`)));
    req.on("upgrade", (res, sock) => {
      sock.destroy();
      resolve({ status: res.statusCode, headers: res.headers });
    });
    req.on("response", (res) => {
      res.resume();
      res.on("end", () => resolve({ status: res.statusCode, headers: res.headers }));
    });
    req.on("error", reject);
    req.end();
  });
}

/** Engine.IO v4 polling handshake; returns { status, headers, open } where open is the parsed OPEN packet. */
export async function pollingHandshake(baseUrl, headers = {}) {
  const res = await httpGet(`${baseUrl}/socket.io/?EIO=4&transport=polling`, headers);
  let open;
  if (res.status === 200 && res.body.startsWith("0")) {
    try {
      open = JSON.parse(res.body.slice(1));
    } catch {
      open = undefined;
    }
  }
  return { ...res, open };
}

export async function waitHttp200(url, timeoutMs, isAlive = () => true) {
  const deadline = Date.now() + timeoutMs;
  let last = "no answer";
  while (Date.now() < deadline) {
    if (!isAlive()) throw new Error(`process exited while waiting for ${url} (last: ${last})`);
    try {
      const r = await httpGet(url, {}, 1000);
      if (r.status === 200) return r;
      last = `HTTP ${r.status} ${r.body.slice(0, 200)}`;
    } catch (e) {
      last = e.message;
    }
    await sleep(100);
  }
  throw new Error(`${url} not 200 within ${timeoutMs} ms (last: ${last})`);
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

const children = new Set();
process.on("exit", () => {
  for (const c of children) {
    try {
      c.kill("SIGKILL");
    } catch {}
  }
});

/** Variables of the scripts and the run dir (ports, URLs), not settings of the binaries. */
const SCRIPT_VARS = new Set([
  ...Object.keys(ENV.fileVars).filter((k) => !k.includes("__")),
  "CHATIFY_RUN_DIR", "CHATIFY_BIN_DIR", "CHATIFY_SKIP_BUILD",
]);

/**
 * The environment for a Chatify binary: `env` without the scripts' and the run dir's variables,
 * which the binaries would warn about as unknown settings, and without unset (undefined) entries.
 */
export function binaryEnv(env) {
  return Object.fromEntries(Object.entries(env).filter(([k, v]) => v !== undefined && !SCRIPT_VARS.has(k)));
}

/** Spawns a long-running process with output in a log file. Returns a handle with stop(). */
export function startProcess(cmd, args, { env, name }) {
  // one log per process name, overwritten by the next run (names are unique within a run)
  const logDir = path.join(os.tmpdir(), "chatify-e2e-logs");
  fs.mkdirSync(logDir, { recursive: true });
  const logPath = path.join(logDir, `${name}.log`);
  const log = fs.openSync(logPath, "w");
  const child = spawn(cmd, args, { env, stdio: ["ignore", log, log] });
  fs.closeSync(log);
  children.add(child);
  const handle = {
    child,
    logPath,
    exited: false,
    exitCode: null,
    logTail: (n = 3000) => {
      try {
        const s = fs.readFileSync(logPath, "utf8");
        return s.slice(-n);
      } catch {
        return "";
      }
    },
    async stop(signal = "SIGTERM", timeoutMs = 5000) {
      if (handle.exited) return handle.exitCode;
      const gone = new Promise((r) => child.once("exit", r));
      child.kill(signal);
      const t = setTimeout(() => child.kill("SIGKILL"), timeoutMs);
      await gone;
      clearTimeout(t);
      return handle.exitCode;
    },
  };
  child.on("exit", (code, sig) => {
    handle.exited = true;
    handle.exitCode = code ?? sig;
    children.delete(child);
  });
  child.on("error", (err) => {
    handle.exited = true;
    handle.exitCode = err.message;
    children.delete(child);
  });
  return handle;
}

/**
 * The NATS settings logging in as the gateways ("GATEWAY") or the persisters ("PERSISTER") do,
 * from the run dir's env file (up.sh writes CHATIFY_NATS_GATEWAY_USER/_PASSWORD and
 * CHATIFY_NATS_PERSISTER_USER/_PASSWORD; NATS refuses connections without credentials).
 */
export function natsCredentials(who) {
  const password = ENV.vars[`CHATIFY_NATS_${who}_PASSWORD`];
  if (!password) return {};
  return {
    CHATIFY_NATS__USER: ENV.vars[`CHATIFY_NATS_${who}_USER`] || `chatify-${who.toLowerCase()}`,
    CHATIFY_NATS__PASSWORD: password,
  };
}

/**
 * Starts an extra gateway (the built binary) on a free port with the run dir's environment plus
 * `extraEnv`, and waits for GET /readyz 200. Returns { url, port, proc }.
 */
export async function startGateway(name, extraEnv = {}, { waitReady = true, timeoutMs = 20000 } = {}) {
  const bin = gatewayBin();
  if (!fs.existsSync(bin)) throw new Error(`gateway binary not found at ${bin} (build it, or set CHATIFY_BIN_DIR)`);
  const port = await freePort();
  const env = {
    ...process.env,
    ...ENV.fileVars,
    // As up.sh starts a gateway: its NATS user, and no HarperDB credentials.
    ...natsCredentials("GATEWAY"),
    CHATIFY_HARPERDB__USERNAME: undefined,
    CHATIFY_HARPERDB__PASSWORD: undefined,
    CHATIFY_NATS__URL: ENV.vars.CHATIFY_NATS_URL,
    CHATIFY_GATEWAY__HOST: "127.0.0.1",
    CHATIFY_GATEWAY__PORT: String(port),
    CHATIFY_GATEWAY__NAME: name,
    ...extraEnv,
  };
  const proc = startProcess(bin, [], { env: binaryEnv(env), name });
  const url = `http://127.0.0.1:${port}`;
  if (waitReady) {
    try {
      await waitHttp200(`${url}/readyz`, timeoutMs, () => !proc.exited);
    } catch (e) {
      await proc.stop("SIGKILL");
      throw new Error(`extra gateway ${name} did not become ready: ${e.message}\n--- log tail ---\n${proc.logTail()}`);
    }
  }
  return { url, port, proc };
}

/**
 * Starts an extra persister (the built binary) on a free port with the run dir's environment
 * (HarperDB address and credentials) plus `extraEnv`, and waits for GET /readyz 200.
 */
export async function startPersister(name, extraEnv = {}, { timeoutMs = 30000 } = {}) {
  const bin = binPath("chatify-persister");
  if (!fs.existsSync(bin)) throw new Error(`persister binary not found at ${bin} (build it, or set CHATIFY_BIN_DIR)`);
  const hdb = ENV.vars.CHATIFY_HARPERDB__URL || ENV.vars.CHATIFY_HARPERDB_URL;
  if (!hdb) throw new Error("CHATIFY_HARPERDB_URL is not set in the run dir's env: cannot start a persister");
  const port = await freePort();
  const env = {
    ...process.env,
    ...ENV.fileVars,
    ...natsCredentials("PERSISTER"),
    CHATIFY_NATS__URL: ENV.vars.CHATIFY_NATS_URL,
    CHATIFY_HARPERDB__URL: hdb,
    CHATIFY_PERSISTER__HOST: "127.0.0.1",
    CHATIFY_PERSISTER__PORT: String(port),
    ...extraEnv,
  };
  const proc = startProcess(bin, [], { env: binaryEnv(env), name });
  const url = `http://127.0.0.1:${port}`;
  try {
    await waitHttp200(`${url}/readyz`, timeoutMs, () => !proc.exited);
  } catch (e) {
    await proc.stop("SIGKILL");
    throw new Error(`extra persister ${name} did not become ready: ${e.message}\n--- log tail ---\n${proc.logTail()}`);
  }
  return { url, port, proc };
}

/** Runs one of the repo's scripts (e.g. deploy/local/up.sh persister) and resolves { code, output }. */
export function runScript(rel, args = [], timeoutMs = 120_000) {
  return new Promise((resolve, reject) => {
    const env = { ...process.env, CHATIFY_RUN_DIR: ENV.runDir, CHATIFY_SKIP_BUILD: "1" };
    const child = spawn("bash", [path.join(REPO_DIR, rel), ...args], { cwd: REPO_DIR, env, stdio: ["ignore", "pipe", "pipe"] });
    let output = "";
    child.stdout.on("data", (d) => (output += d));
    child.stderr.on("data", (d) => (output += d));
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`${rel} ${args.join(" ")} did not finish within ${timeoutMs} ms\n${output.slice(-2000)}`));
    }, timeoutMs);
    child.on("error", (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.on("exit", (code) => {
      clearTimeout(timer);
      resolve({ code, output });
    });
  });
}
