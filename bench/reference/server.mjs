// Reference peer for the Chatify benchmark: the Chatify wire contract (docs/contract.md) as a
// plain Node socket.io 4.8 server, written the way a Node user would.
//
// Everything is in memory. With REDIS_URL set, several processes form one cluster through
// @socket.io/redis-adapter: broadcasts (notices, typing, chatroom_users) go through Redis,
// `chatroom_users` comes from `io.in(room).fetchSockets()` and `socket.data.username`, and every
// accepted message is handed to the other processes with `io.serverSideEmit()`, so each process
// keeps the whole history and delivers to its own sockets. That is one Redis publish per
// message, like a plain `io.to(room).emit()`.
//
// Environment: PORT (4101), HOST (127.0.0.1), REDIS_URL (unset: single process, in-memory
// adapter), CORS_ORIGINS (comma-separated, http://localhost:3000), TRANSPORTS
// (polling,websocket), HISTORY_MAX (messages kept per room, 10000).

import { createServer } from "node:http";
import { randomFillSync } from "node:crypto";
import { Server } from "socket.io";

const PORT = Number(process.env.PORT || 4101);
const HOST = process.env.HOST || "127.0.0.1";
const REDIS_URL = process.env.REDIS_URL || "";
const ORIGINS = (process.env.CORS_ORIGINS || "http://localhost:3000").split(",").map((s) => s.trim()).filter(Boolean);
const TRANSPORTS = (process.env.TRANSPORTS || "polling,websocket").split(",").map((s) => s.trim()).filter(Boolean);
const HISTORY_MAX = Number(process.env.HISTORY_MAX || 10_000);
if (!Number.isInteger(PORT) || PORT < 0 || PORT > 65535) throw new Error(`PORT must be a port number, not ${process.env.PORT}`);
if (!Number.isInteger(HISTORY_MAX) || HISTORY_MAX < 1) throw new Error(`HISTORY_MAX must be a positive integer, not ${process.env.HISTORY_MAX}`);

// Chatify's default limits.
const LIMITS = {
  messageMaxBytes: 4096,
  usernameMaxChars: 64,
  roomMaxChars: 128,
  clientIdMaxChars: 128,
  roomsPerSocket: 50,
  messagesPerSecond: 20,
  messageBurst: 40,
  joinsPerSecond: 10,
  joinBurst: 50,
  maxPayloadBytes: 64 * 1024,
};
const JOIN_HISTORY_LEN = 100;
const SINCE_HISTORY_MAX = 1000;
const PAGE_LIMIT_MAX = 100;
const PAGE_LIMIT_DEFAULT = 50;
const DEDUP_WINDOW_MS = 120_000;
const CHATBOT = "ChatBot";

// ---------------------------------------------------------------------------------------------
// Message ids: UUIDv7 (RFC 9562), 48-bit milliseconds, then a 12-bit counter so ids made by this
// process sort as text in the order they were made, then 62 random bits.
// ---------------------------------------------------------------------------------------------

const randomPool = Buffer.allocUnsafe(8 * 1024);
let randomPos = randomPool.length;
let lastMs = 0;
let seq = 0;

/** Returns [id, createdTime]; createdTime is the id's own timestamp. */
function uuidv7() {
  const now = Date.now();
  if (now > lastMs) {
    lastMs = now;
    seq = 0;
  } else if (++seq > 0xfff) {
    lastMs += 1;
    seq = 0;
  }
  if (randomPos >= randomPool.length) {
    randomFillSync(randomPool);
    randomPos = 0;
  }
  const r = randomPool.subarray(randomPos, randomPos + 8);
  randomPos += 8;
  r[0] = (r[0] & 0x3f) | 0x80; // variant 10
  const t = lastMs.toString(16).padStart(12, "0");
  const h = r.toString("hex");
  const id = `${t.slice(0, 8)}-${t.slice(8)}-7${seq.toString(16).padStart(3, "0")}-${h.slice(0, 4)}-${h.slice(4)}`;
  return [id, lastMs];
}

// ---------------------------------------------------------------------------------------------
// Errors and payload checks (same codes and rules as Chatify's gateway).
// ---------------------------------------------------------------------------------------------

class ChatError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}
const invalid = (message) => new ChatError("invalid_payload", message);
const notInRoom = (room) => new ChatError("not_in_room", `you have not joined the room ${JSON.stringify(room)}`);

const CONTROL = /\p{Cc}/u;
const UUID_RE = /^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$/i;

function object(v, event, shape) {
  if (v === null || typeof v !== "object" || Array.isArray(v)) throw invalid(`${event} needs an object ${shape}`);
  return v;
}

/** The first present field among `names`, which must be a string when present. */
function stringField(o, ...names) {
  for (const n of names) {
    const v = o[n];
    if (v === undefined || v === null) continue;
    if (typeof v !== "string") throw invalid(`${names[0]} must be a string`);
    return v;
  }
  return undefined;
}

function requiredString(o, ...names) {
  const v = stringField(o, ...names);
  if (v === undefined) throw invalid(`${names[0]} is required`);
  return v;
}

/** A name shown to people: 1..=max characters (code points), not blank, no control characters. */
function checkedName(what, value, max) {
  if (value.trim() === "") throw invalid(`${what} must not be empty`);
  if (value.length > max) {
    const chars = [...value].length;
    if (chars > max) throw invalid(`${what} is ${chars} characters long; the limit is ${max}`);
  }
  if (CONTROL.test(value)) throw invalid(`${what} must not contain control characters`);
  return value;
}

function messageId(o, name) {
  const v = stringField(o, name);
  if (v === undefined) return undefined;
  if (!UUID_RE.test(v)) throw invalid(`${name} must be a message id`);
  const hex = v.replaceAll("-", "").toLowerCase();
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

const room = (o, ...names) => checkedName("room", requiredString(o, ...names), LIMITS.roomMaxChars);

function pageLimit(v) {
  if (v === undefined || v === null) return PAGE_LIMIT_DEFAULT;
  if (!Number.isInteger(v) || v < 1 || v > PAGE_LIMIT_MAX) {
    throw invalid(`limit must be an integer from 1 to ${PAGE_LIMIT_MAX}`);
  }
  return v;
}

function parseJoin(v) {
  const o = object(v, "join_room", "{ username, room, since? }");
  const r = room(o, "room", "userRoom");
  const u = stringField(o, "username", "userName");
  if (u === undefined) throw invalid("username is required");
  return { room: r, username: checkedName("username", u, LIMITS.usernameMaxChars), since: messageId(o, "since") };
}

function parseSend(v) {
  const o = object(v, "send_message", "{ room, message, clientId? }");
  const r = room(o, "room");
  const message = requiredString(o, "message").trim();
  if (message === "") throw invalid("message must not be empty");
  // A JS string's UTF-8 size is at most 3 bytes per UTF-16 unit: count only when it may matter.
  if (message.length * 3 > LIMITS.messageMaxBytes) {
    const bytes = Buffer.byteLength(message, "utf8");
    if (bytes > LIMITS.messageMaxBytes) {
      throw new ChatError("too_large", `message is ${bytes} bytes; the limit is ${LIMITS.messageMaxBytes}`);
    }
  }
  const clientId = stringField(o, "clientId");
  if (clientId !== undefined && (clientId === "" || [...clientId].length > LIMITS.clientIdMaxChars)) {
    throw invalid(`clientId must be 1..=${LIMITS.clientIdMaxChars} characters`);
  }
  return { room: r, message, clientId };
}

function parseHistory(v) {
  const o = object(v, "get_history", "{ room, before?, limit? }");
  return { room: room(o, "room"), before: messageId(o, "before"), limit: pageLimit(o.limit) };
}

function parseTyping(v) {
  const o = object(v, "typing", "{ room, isTyping }");
  const r = room(o, "room");
  if (typeof o.isTyping !== "boolean") throw invalid("isTyping must be true or false");
  return { room: r, isTyping: o.isTyping };
}

// ---------------------------------------------------------------------------------------------
// State: per-room history (sorted by id), the clientId dedup window, per-socket rate limits.
// ---------------------------------------------------------------------------------------------

/** room -> messages, oldest first (ids ascending). */
const histories = new Map();

/** Index of the first message whose id is > `id` (strict: false) or >= `id` (strict: true). */
function searchId(list, id, strict) {
  let lo = 0;
  let hi = list.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    const m = list[mid].id;
    if (m < id || (!strict && m === id)) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

function store(message) {
  let list = histories.get(message.room);
  if (!list) histories.set(message.room, (list = []));
  // Almost always the newest: append. A message from another process may arrive a bit late.
  if (list.length === 0 || list[list.length - 1].id < message.id) list.push(message);
  else list.splice(searchId(list, message.id, true), 0, message);
  // Keep memory bounded; trim in chunks so the cost is amortized.
  if (list.length > HISTORY_MAX + (HISTORY_MAX >> 2)) list.splice(0, list.length - HISTORY_MAX);
}

/** The newest `limit` messages with `after < id < before`, oldest first, and whether more matched. */
function query(roomName, { before, after, limit }) {
  const list = histories.get(roomName);
  if (!list) return { messages: [], hasMore: false };
  const end = before === undefined ? list.length : searchId(list, before, true);
  const floor = after === undefined ? 0 : searchId(list, after, false);
  const start = Math.max(floor, end - limit);
  return { messages: start < end ? list.slice(start, end) : [], hasMore: start > floor };
}

/** clientId key -> { id, createdTime, at }, in insertion (= arrival) order. */
const dedup = new Map();
const dedupKey = (username, roomName, clientId) => `${username}\u0000${roomName}\u0000${clientId}`;

function remember(key, id, createdTime) {
  const now = Date.now();
  for (const [k, v] of dedup) {
    if (now - v.at < DEDUP_WINDOW_MS) break;
    dedup.delete(k);
  }
  dedup.set(key, { id, createdTime, at: now });
}

function seen(key) {
  const v = dedup.get(key);
  return v && Date.now() - v.at < DEDUP_WINDOW_MS ? v : undefined;
}

class TokenBucket {
  constructor(perSecond, burst) {
    this.perMs = perSecond / 1000;
    this.burst = burst;
    this.tokens = burst;
    this.last = Date.now();
  }
  take() {
    const now = Date.now();
    this.tokens = Math.min(this.burst, this.tokens + (now - this.last) * this.perMs);
    this.last = now;
    if (this.tokens < 1) return false;
    this.tokens -= 1;
    return true;
  }
}

// ---------------------------------------------------------------------------------------------
// HTTP and Socket.IO server.
// ---------------------------------------------------------------------------------------------

let redisClients = [];

function json(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(text) });
  res.end(text);
}

const httpServer = createServer((req, res) => {
  const url = new URL(req.url, "http://x");
  if (req.method !== "GET") return json(res, 405, { error: "method not allowed" });
  if (url.pathname === "/") return json(res, 200, { message: "Hello from chatify backend" });
  if (url.pathname === "/healthz") return json(res, 200, { status: "ok" });
  if (url.pathname === "/readyz") {
    const ready = redisClients.every((c) => c.isReady);
    return json(res, ready ? 200 : 503, { status: ready ? "ok" : "redis unavailable" });
  }
  const m = /^\/api\/rooms\/([^/]+)\/messages$/.exec(url.pathname);
  if (m) {
    try {
      const params = { room: decodeURIComponent(m[1]) };
      const before = url.searchParams.get("before");
      const limit = url.searchParams.get("limit");
      if (before) params.before = before;
      if (limit) {
        if (!/^\d+$/.test(limit)) throw invalid(`limit must be an integer from 1 to ${PAGE_LIMIT_MAX}`);
        params.limit = Number(limit);
      }
      return json(res, 200, historyPage(parseHistory(params)));
    } catch (e) {
      return json(res, 400, { ok: false, error: { code: e.code || "invalid_payload", message: e.message } });
    }
  }
  json(res, 404, { error: "not found" });
});

const io = new Server(httpServer, {
  transports: TRANSPORTS,
  maxHttpBufferSize: LIMITS.maxPayloadBytes,
  perMessageDeflate: false,
  connectTimeout: 5000,
  cors: { origin: ORIGINS, credentials: true },
  // CORS does not cover the WebSocket upgrade: check Origin on every request, as Chatify does.
  // Clients that send no Origin (native apps, servers) are allowed.
  allowRequest: (req, callback) => {
    const origin = req.headers.origin;
    callback(null, origin === undefined || ORIGINS.includes(origin));
  },
});

// socket.io docs, "Memory usage": drop the reference to the first HTTP request of each session.
io.engine.on("connection", (rawSocket) => {
  rawSocket.request = null;
});

const clustered = REDIS_URL !== "";
if (clustered) {
  // The redis-adapter README's setup with node-redis.
  const { createClient } = await import("redis");
  const { createAdapter } = await import("@socket.io/redis-adapter");
  const pubClient = createClient({ url: REDIS_URL });
  const subClient = pubClient.duplicate();
  for (const c of [pubClient, subClient]) c.on("error", (e) => console.error(`redis: ${e.message}`));
  await Promise.all([pubClient.connect(), subClient.connect()]);
  redisClients = [pubClient, subClient];
  io.adapter(createAdapter(pubClient, subClient));
}

const notice = (roomName, message) => ({ room: roomName, username: CHATBOT, message, createdTime: Date.now() });

/** Everyone in the room, on every process. */
async function roomUsers(roomName) {
  const sockets = await io.in(roomName).fetchSockets();
  return sockets.map((s) => ({ id: s.id, username: s.data.username }));
}

async function announce(roomName, text, exceptId) {
  const n = notice(roomName, text);
  (exceptId ? io.to(roomName).except(exceptId) : io.to(roomName)).emit("receive_message", n);
  io.to(roomName).emit("chatroom_users", await roomUsers(roomName));
}

/** Stores an accepted message and delivers it to this process's members of the room. */
function accept(message, key) {
  if (key !== undefined) remember(key, message.id, message.createdTime);
  store(message);
  io.local.to(message.room).emit("receive_message", message);
}

// The other processes' accepted messages.
io.on("chat_message", (message, key) => accept(message, key ?? undefined));

function historyPage(request) {
  const page = query(request.room, { before: request.before, limit: request.limit });
  return { messages: page.messages.reverse(), hasMore: page.hasMore };
}

/** Answers a failed event: an ack `{ ok: false, error }`, or an `error` event without a callback. */
function fail(socket, event, e, ack) {
  const error = e instanceof ChatError ? { code: e.code, message: e.message } : { code: "unavailable", message: String(e?.message ?? e) };
  if (!(e instanceof ChatError)) console.error(`${event}: ${e?.stack ?? e}`);
  if (ack) ack({ ok: false, error });
  else socket.emit("error", error);
}

/**
 * A listener with Chatify's reply rules around `work(socket, state, payload)`: ack `{ ok, ... }`
 * or an error. Listeners are made once and shared by every socket (socket.io calls them with
 * `this` = the socket), so an idle connection costs no closures.
 */
function listener(event, work) {
  return function (...args) {
    const ack = typeof args[args.length - 1] === "function" ? args.pop() : undefined;
    let result;
    try {
      result = work(this, this[STATE], args[0]);
    } catch (e) {
      return fail(this, event, e, ack);
    }
    // Synchronous handlers (send_message, get_history, typing) answer at once.
    if (result instanceof Promise) {
      result.then((fields) => ack?.({ ok: true, ...fields }), (e) => fail(this, event, e, ack));
    } else if (ack) {
      ack({ ok: true, ...result });
    }
  };
}

/** Per-socket state, kept off `socket.data` (which fetchSockets() sends between processes). */
const STATE = Symbol("chat");
class SocketState {
  constructor() {
    /** room -> the name this socket joined it with. */
    this.names = new Map();
    this.sends = new TokenBucket(LIMITS.messagesPerSecond, LIMITS.messageBurst);
    this.joins = new TokenBucket(LIMITS.joinsPerSecond, LIMITS.joinBurst);
  }
}

async function joinRoom(socket, state, payload) {
  const request = parseJoin(payload);
  const roomName = request.room;
  const alreadyIn = state.names.has(roomName);
  if (!alreadyIn) {
    if (state.names.size >= LIMITS.roomsPerSocket) {
      throw new ChatError("too_many_rooms", `a connection may be in at most ${LIMITS.roomsPerSocket} rooms`);
    }
    if (!state.joins.take()) {
      throw new ChatError("rate_limited", `too many joins: at most ${LIMITS.joinsPerSecond} a second, with bursts of ${LIMITS.joinBurst}`);
    }
    state.names.set(roomName, request.username);
    socket.data.username = request.username;
    socket.join(roomName);
    socket.emit("receive_message", notice(roomName, `Welcome ${request.username}`));
  }
  const history = request.since === undefined
    ? query(roomName, { limit: JOIN_HISTORY_LEN }).messages
    : query(roomName, { after: request.since, limit: SINCE_HISTORY_MAX }).messages;
  socket.emit("last_100_messages", history);
  let users;
  if (alreadyIn) {
    users = await roomUsers(roomName);
  } else {
    socket.to(roomName).emit("receive_message", notice(roomName, `${request.username} has joined the chat room`));
    users = await roomUsers(roomName);
    io.to(roomName).emit("chatroom_users", users);
  }
  return { room: roomName, users, history };
}

function sendMessage(socket, state, payload) {
  const request = parseSend(payload);
  const username = state.names.get(request.room);
  if (username === undefined) throw notInRoom(request.room);
  if (!state.sends.take()) {
    throw new ChatError("rate_limited", `too many messages: at most ${LIMITS.messagesPerSecond} a second, with bursts of ${LIMITS.messageBurst}`);
  }
  let key;
  if (request.clientId !== undefined) {
    key = dedupKey(username, request.room, request.clientId);
    const first = seen(key);
    if (first) return { id: first.id, createdTime: first.createdTime };
  }
  const [id, createdTime] = uuidv7();
  const message = { id, room: request.room, username, message: request.message, createdTime };
  accept(message, key);
  if (clustered) io.serverSideEmit("chat_message", message, key ?? null);
  return { id, createdTime };
}

async function leaveRoom(socket, state, payload) {
  const roomName = room(object(payload, "leave_room", "{ room }"), "room");
  const username = state.names.get(roomName);
  if (username === undefined) throw notInRoom(roomName);
  state.names.delete(roomName);
  socket.leave(roomName);
  await announce(roomName, `${username} has left the chat room`);
  return {};
}

function getHistory(socket, state, payload) {
  return historyPage(parseHistory(payload));
}

function typing(socket, state, payload) {
  const request = parseTyping(payload);
  const username = state.names.get(request.room);
  if (username === undefined) throw notInRoom(request.room);
  socket.to(request.room).emit("typing", { room: request.room, username, isTyping: request.isTyping });
  return {};
}

/** By "disconnect" the socket has left its rooms, so the lists sent here no longer include it. */
function onDisconnect() {
  const { names } = this[STATE];
  for (const [roomName, username] of names) {
    announce(roomName, `${username} has left the chat room`).catch((e) => console.error(`disconnect: ${e.message}`));
  }
  names.clear();
}

const LISTENERS = [
  ["join_room", listener("join_room", joinRoom)],
  ["send_message", listener("send_message", sendMessage)],
  ["leave_room", listener("leave_room", leaveRoom)],
  ["get_history", listener("get_history", getHistory)],
  ["typing", listener("typing", typing)],
  ["disconnect", onDisconnect],
];

io.on("connection", (socket) => {
  socket[STATE] = new SocketState();
  for (const [event, fn] of LISTENERS) socket.on(event, fn);
});

httpServer.listen(PORT, HOST, () => {
  const { port } = httpServer.address();
  console.log(`reference listening on http://${HOST}:${port} pid=${process.pid} adapter=${clustered ? "redis" : "memory"} transports=${TRANSPORTS.join(",")}`);
});

let stopping = false;
function shutdown(signal) {
  if (stopping) return;
  stopping = true;
  console.log(`${signal}: closing`);
  setTimeout(() => process.exit(0), 5000).unref();
  io.close(async () => {
    await Promise.allSettled(redisClients.map((c) => (c.close ? c.close() : c.quit())));
    process.exit(0);
  });
}
process.on("SIGTERM", () => shutdown("SIGTERM"));
process.on("SIGINT", () => shutdown("SIGINT"));
