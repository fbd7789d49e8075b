// Chatify's chat page: one room at a time, through the load balancer, with socket.io-client.
// All user text goes into the page with textContent, never as HTML.
import { io } from "/vendor/socket.io.esm.min.js";

const HISTORY_PAGE = 50; // messages per "load older messages" (get_history limit, 1..=100)
const ACK_TIMEOUT_MS = 10_000;
const TYPING_IDLE_MS = 2_500; // stop saying "typing" after this long without a keystroke
const TYPING_EXPIRE_MS = 6_000; // forget someone's "typing" if no update arrives
const MESSAGE_MAX_BYTES = 4096;
const CHATBOT = "ChatBot";

const $ = (id) => document.getElementById(id);
const el = {
  joinView: $("join-view"),
  joinForm: $("join-form"),
  joinUsername: $("join-username"),
  joinRoom: $("join-room"),
  joinError: $("join-error"),
  joinButton: $("join-button"),
  serverNote: $("server-note"),
  chatView: $("chat-view"),
  roomName: $("room-name"),
  meName: $("me-name"),
  connState: $("conn-state"),
  leaveButton: $("leave-button"),
  connBanner: $("conn-banner"),
  errorBanner: $("error-banner"),
  errorText: $("error-text"),
  errorDismiss: $("error-dismiss"),
  scroller: $("scroller"),
  olderButton: $("older-button"),
  olderEnd: $("older-end"),
  messages: $("messages"),
  users: $("users"),
  usersCount: $("users-count"),
  typing: $("typing"),
  composer: $("composer"),
  input: $("message-input"),
  sendButton: $("send-button"),
};

// ---------------------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------------------

const state = {
  socket: null,
  serverUrl: null,
  username: "",
  room: "",
  joined: false, // the current connection has joined the room
  everJoined: false, // the first join succeeded (later joins are recoveries)
  lastId: null, // newest stored message id seen: the `since` of the next rejoin
  olderCursor: null, // the `before` of the next "load older": the oldest message the server gave
  seen: new Set(), // stored message ids shown
  pending: new Map(), // clientId → { text, li }
  typers: new Map(), // username → expiry timer
  typingSent: false,
  typingTimer: null,
  noticeSeq: 0,
  loadingOlder: false,
  suppressWelcome: false, // a rejoin's "Welcome <me>" is not shown again
};

const newClientId = () =>
  globalThis.crypto?.randomUUID?.() ?? `c-${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

/** Creates an element with a class and text (always textContent: user text is never HTML). */
function h(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function describeError(err) {
  if (!err) return "unknown error";
  if (err.code && err.message) return `${err.message} (${err.code})`;
  return err.message || err.code || String(err);
}

function showError(text) {
  el.errorText.textContent = text;
  el.errorBanner.hidden = false;
}

function clearError() {
  el.errorBanner.hidden = true;
  el.errorText.textContent = "";
}

/** emitWithAck with a deadline; resolves the ack, or { ok: false, error } on timeout. */
async function request(event, payload) {
  try {
    return await state.socket.timeout(ACK_TIMEOUT_MS).emitWithAck(event, payload);
  } catch {
    return { ok: false, error: { code: "timeout", message: `no answer to ${event} within ${ACK_TIMEOUT_MS / 1000} s` } };
  }
}

const sameDay = (a, b) => a.getFullYear() === b.getFullYear() && a.getMonth() === b.getMonth() && a.getDate() === b.getDate();

function formatTime(ms) {
  const d = new Date(ms);
  const time = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  if (sameDay(d, new Date())) return time;
  return `${d.toLocaleDateString([], { day: "numeric", month: "short" })} ${time}`;
}

function hue(name) {
  let x = 0;
  for (const ch of name) x = (x * 31 + ch.codePointAt(0)) >>> 0;
  return x % 360;
}

function avatar(name) {
  const a = h("span", "avatar", [...name.trim()][0]?.toUpperCase() ?? "?");
  a.style.setProperty("--hue", String(hue(name)));
  a.setAttribute("aria-hidden", "true");
  return a;
}

function nearBottom() {
  const s = el.scroller;
  return s.scrollHeight - s.scrollTop - s.clientHeight < 80;
}

function scrollToBottom() {
  el.scroller.scrollTop = el.scroller.scrollHeight;
}

// ---------------------------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------------------------

/**
 * Inserts a list item in order of its key. Stored messages are keyed by their id: UUIDv7 ids
 * start with their creation time (milliseconds, hex), so they sort as text by when they were
 * sent (the room's history order can differ for messages sent within moments of each other on
 * different gateways; the page shows sending time). Notices are keyed by their own time in the same form, so they sit after the messages of
 * their millisecond and before later ones. Scans from the end: usually it is appended.
 */
function insertByKey(li) {
  const key = li.dataset.key;
  let before = null;
  for (let node = el.messages.lastElementChild; node; node = node.previousElementSibling) {
    if (node.dataset.key <= key) break;
    before = node;
  }
  el.messages.insertBefore(li, before);
}

function noticeKey(ms) {
  state.noticeSeq += 1;
  const hex = Math.max(0, Math.floor(ms)).toString(16).padStart(12, "0").slice(-12);
  return `${hex.slice(0, 8)}-${hex.slice(8)}-~${String(state.noticeSeq).padStart(8, "0")}`;
}

function timeElement(ms) {
  if (!Number.isFinite(ms)) ms = Date.now();
  const t = h("time", "time", formatTime(ms));
  const d = new Date(ms);
  t.dateTime = d.toISOString();
  t.title = d.toLocaleString();
  return t;
}

/** A stored message ({ id, room, username, message, createdTime }); returns false if already shown. */
function addMessage(m) {
  if (!m || typeof m.id !== "string" || m.room !== state.room) return false;
  if (typeof m.username !== "string" || typeof m.message !== "string") return false;
  if (state.seen.has(m.id)) return false;
  state.seen.add(m.id);
  if (!state.lastId || m.id > state.lastId) state.lastId = m.id;

  const li = h("li", "message");
  li.dataset.key = m.id;
  li.dataset.id = m.id;
  li.dataset.author = m.username;
  if (m.username === state.username) li.classList.add("mine");
  li.append(avatar(m.username));
  const bubble = h("div", "bubble");
  const meta = h("div", "meta");
  meta.append(h("span", "author", m.username), timeElement(m.createdTime));
  bubble.append(meta, h("p", "text", m.message));
  li.append(bubble);
  insertByKey(li);
  return true;
}

/** A ChatBot notice, or a note of the page itself (kind "local"). */
function addNotice(text, createdTime = Date.now(), kind = "bot") {
  const li = h("li", `notice ${kind}`);
  li.dataset.key = noticeKey(createdTime);
  const p = h("p", "notice-text");
  if (kind === "bot") p.append(h("span", "bot-name", `${CHATBOT}: `));
  p.append(document.createTextNode(text));
  li.append(p, timeElement(createdTime));
  insertByKey(li);
}

/** Adds messages (any order), keeping the view at the bottom if it was there. */
function addMessages(list, { stick = nearBottom() } = {}) {
  let added = 0;
  for (const m of list ?? []) if (addMessage(m)) added += 1;
  if (stick) scrollToBottom();
  return added;
}

function onReceive(m) {
  if (!m || m.room !== state.room) return;
  const stick = nearBottom() || m.username === state.username;
  if (m.username === CHATBOT && !m.id) {
    // A rejoin after a reconnect greets us again: the page says "reconnected" instead.
    if (state.suppressWelcome && m.message === `Welcome ${state.username}`) {
      state.suppressWelcome = false;
      return;
    }
    addNotice(String(m.message ?? ""), Number.isFinite(m.createdTime) ? m.createdTime : Date.now());
  } else {
    addMessage(m);
    // Whoever sent a message has stopped typing it.
    stopTyper(m.username);
  }
  if (stick) scrollToBottom();
}

// ---------------------------------------------------------------------------------------------
// Users and typing
// ---------------------------------------------------------------------------------------------

/**
 * The member list, and the count: the list's length, or the room's count when the server lists
 * only some members (a large room: a join ack lists some, `room_presence` only counts).
 */
function renderUsers(users, count = users?.length) {
  if (!Array.isArray(users)) return;
  const names = users.map((u) => String(u?.username ?? "")).filter(Boolean);
  names.sort((a, b) => a.localeCompare(b));
  el.users.replaceChildren(
    ...names.map((name) => {
      const li = h("li", "user");
      li.append(avatar(name), h("span", "user-name", name));
      if (name === state.username) li.append(h("span", "you muted small", "(you)"));
      return li;
    }),
  );
  el.usersCount.textContent = String(Number.isInteger(count) ? count : names.length);
}

/** `room_presence`: a room too large to list; only its count changes. */
function onRoomPresence(p) {
  if (p?.room !== state.room || !Number.isInteger(p.count)) return;
  el.usersCount.textContent = String(p.count);
}

function renderTyping() {
  const names = [...state.typers.keys()];
  let text = "";
  if (names.length === 1) text = `${names[0]} is typing…`;
  else if (names.length === 2) text = `${names[0]} and ${names[1]} are typing…`;
  else if (names.length > 2) text = `${names.length} people are typing…`;
  el.typing.textContent = text;
}

function stopTyper(name) {
  const timer = state.typers.get(name);
  if (timer === undefined) return;
  clearTimeout(timer);
  state.typers.delete(name);
  renderTyping();
}

function onTyping(t) {
  if (!t || t.room !== state.room || !t.username || t.username === state.username) return;
  stopTyper(t.username);
  if (t.isTyping) {
    state.typers.set(
      t.username,
      setTimeout(() => stopTyper(t.username), TYPING_EXPIRE_MS),
    );
    renderTyping();
  }
}

function sendTyping(isTyping) {
  clearTimeout(state.typingTimer);
  if (isTyping) state.typingTimer = setTimeout(() => sendTyping(false), TYPING_IDLE_MS);
  if (state.typingSent === isTyping || !state.joined) return;
  state.typingSent = isTyping;
  state.socket.emit("typing", { room: state.room, isTyping }, (res) => {
    if (res && res.ok === false) showError(`Typing notice not sent: ${describeError(res.error)}`);
  });
}

// ---------------------------------------------------------------------------------------------
// Connection state
// ---------------------------------------------------------------------------------------------

const STATE_TEXT = {
  connecting: "Connecting…",
  connected: "Connected",
  reconnecting: "Reconnecting…",
  disconnected: "Disconnected",
};

function setConnState(name, banner = "") {
  el.connState.dataset.state = name;
  el.connState.textContent = STATE_TEXT[name];
  el.chatView.dataset.conn = name;
  el.connBanner.textContent = banner;
  el.connBanner.hidden = !banner;
  updateSendButton();
}

function updateSendButton() {
  el.sendButton.disabled = !state.joined || el.input.value.trim() === "";
}

// ---------------------------------------------------------------------------------------------
// Joining, leaving, recovering
// ---------------------------------------------------------------------------------------------

async function loadConfig() {
  let config = {};
  try {
    const res = await fetch("config.json", { cache: "no-store" });
    if (res.ok) config = await res.json();
  } catch {
    // Served without serve.mjs: fall back to the defaults below.
  }
  if (config.serverUrl) return config.serverUrl;
  const port = config.lbPort || 4000;
  // Same host name as the page (localhost → localhost): HAProxy's SRV cookie stays same-site.
  return `${location.protocol}//${location.hostname}:${port}`;
}

function showJoinView(message = "") {
  el.chatView.hidden = true;
  el.joinView.hidden = false;
  el.joinError.textContent = message;
  el.joinError.hidden = !message;
  el.joinButton.disabled = false;
  el.joinUsername.focus();
}

function resetRoom() {
  state.joined = false;
  state.everJoined = false;
  state.lastId = null;
  state.olderCursor = null;
  state.seen.clear();
  state.pending.clear();
  for (const timer of state.typers.values()) clearTimeout(timer);
  state.typers.clear();
  state.typingSent = false;
  clearTimeout(state.typingTimer);
  el.messages.replaceChildren();
  el.users.replaceChildren();
  el.usersCount.textContent = "0";
  el.typing.textContent = "";
  el.olderButton.hidden = true;
  el.olderEnd.hidden = true;
  clearError();
}

function makeSocket() {
  const socket = io(state.serverUrl, {
    // Long-polling requests must carry HAProxy's SRV cookie to stay on one gateway.
    withCredentials: true,
    reconnectionDelay: 500,
    reconnectionDelayMax: 3000,
    autoConnect: false,
  });
  socket.on("connect", () => {
    setConnState("connecting", state.everJoined ? "Reconnected. Catching up on what you missed…" : "");
    joinRoom();
  });
  socket.on("disconnect", (reason) => {
    state.joined = false;
    state.typingSent = false;
    if (reason === "io client disconnect") return;
    // A gateway that shuts down closes its sockets ("io server disconnect"), which socket.io-client
    // does not retry by itself: the load balancer has another gateway, so come back after a pause.
    if (!socket.active) setTimeout(() => socket === state.socket && !socket.connected && socket.connect(), 1000);
    setConnState("reconnecting", "Connection lost. Reconnecting… Messages sent meanwhile will show up when you are back.");
  });
  socket.on("connect_error", (err) => {
    state.joined = false;
    const why = err?.message || "connection failed";
    if (socket.active && state.everJoined) {
      setConnState("reconnecting", `Connection lost. Reconnecting… (the chat server cannot be reached: ${why})`);
    } else if (socket.active) {
      setConnState("connecting", `Connecting… (the chat server cannot be reached: ${why})`);
    } else {
      setConnState("disconnected", `The chat server refused the connection: ${why}`);
    }
  });
  socket.on("receive_message", onReceive);
  socket.on("last_100_messages", (list) => addMessages(list)); // same list as the join ack's history
  socket.on("chatroom_users", (users) => renderUsers(users));
  socket.on("room_presence", onRoomPresence);
  socket.on("typing", onTyping);
  socket.on("error", (err) => showError(`The server refused a request: ${describeError(err)}`));
  return socket;
}

async function joinRoom() {
  const socket = state.socket;
  const rejoin = state.everJoined;
  const payload = { username: state.username, room: state.room };
  if (rejoin && state.lastId) payload.since = state.lastId;
  const seenBefore = new Set(state.seen);
  state.suppressWelcome = rejoin;
  const res = await request("join_room", payload);
  if (socket !== state.socket || !socket.connected) return; // left, or the connection dropped meanwhile
  if (!res?.ok) {
    const why = describeError(res?.error);
    if (!rejoin) {
      leave({ quiet: true });
      showJoinView(`Could not join: ${why}`);
    } else {
      setConnState("reconnecting", `Could not rejoin the room: ${why}. Retrying…`);
      setTimeout(() => socket === state.socket && socket.connected && !state.joined && joinRoom(), 2000);
    }
    return;
  }
  state.joined = true;
  renderUsers(res.users, res.count);
  const history = Array.isArray(res.history) ? res.history : [];
  addMessages(history, { stick: !rejoin || nearBottom() });
  if (!rejoin) {
    state.everJoined = true;
    // Oldest first: the first one is where "load older" starts.
    state.olderCursor = typeof history[0]?.id === "string" ? history[0].id : null;
    // 100 newest stored messages came back: there may be older ones.
    el.olderButton.hidden = history.length < 100;
    el.olderEnd.hidden = history.length >= 100 || history.length === 0;
    scrollToBottom();
    setConnState("connected");
  } else {
    // (last_100_messages may have brought them a moment before this answer: count the answer.)
    const count = history.filter((m) => typeof m?.id === "string" && !seenBefore.has(m.id)).length;
    const missed = count === 1 ? "1 missed message" : `${count} missed messages`;
    addNotice(
      history.length >= 1000 ? `Reconnected: ${missed} (only the newest 1000 are shown).` : `Reconnected: ${missed}.`,
      Date.now(),
      "local",
    );
    if (nearBottom()) scrollToBottom();
    setConnState("connected");
  }
  // Sends that were waiting for the connection go now, with their first clientId (stored once).
  for (const [clientId, p] of state.pending) if (!p.inFlight && !p.failed) deliver(clientId, p);
  updateSendButton();
}

async function enter(username, room) {
  resetRoom();
  state.username = username;
  state.room = room;
  el.roomName.textContent = room;
  el.meName.textContent = username;
  document.title = `${room} · Chatify`;
  el.joinView.hidden = true;
  el.chatView.hidden = false;
  setConnState("connecting");
  if (!state.socket) state.socket = makeSocket();
  if (state.socket.connected) joinRoom();
  else state.socket.connect();
  el.input.focus();
}

function leave({ quiet = false } = {}) {
  const socket = state.socket;
  state.socket = null;
  if (socket) {
    if (socket.connected && state.joined && !quiet) socket.emit("leave_room", { room: state.room });
    socket.removeAllListeners();
    socket.disconnect();
  }
  resetRoom();
  document.title = "Chatify";
}

// ---------------------------------------------------------------------------------------------
// Sending and history
// ---------------------------------------------------------------------------------------------

function addPending(text) {
  const li = h("li", "message mine pending");
  li.dataset.key = "~"; // after every id and notice: pending sends sit at the bottom
  li.append(avatar(state.username));
  const bubble = h("div", "bubble");
  const meta = h("div", "meta");
  meta.append(h("span", "author", state.username), h("span", "status small", "sending…"));
  bubble.append(meta, h("p", "text", text));
  li.append(bubble);
  el.messages.append(li);
  scrollToBottom();
  return li;
}

async function deliver(clientId, p) {
  p.inFlight = true;
  p.li.classList.remove("failed");
  p.li.querySelector(".status").textContent = "sending…";
  const socket = state.socket;
  const res = await request("send_message", { room: state.room, message: p.text, clientId });
  p.inFlight = false;
  if (socket !== state.socket) return;
  if (res?.ok) {
    state.pending.delete(clientId);
    p.li.remove();
    addMessages([{ id: res.id, room: state.room, username: state.username, message: p.text.trim(), createdTime: res.createdTime }], {
      stick: true,
    });
    return;
  }
  const code = res?.error?.code;
  if ((code === "timeout" || code === "not_in_room") && !state.joined) {
    // The connection dropped under it: it goes again (same clientId) once the room is rejoined.
    p.li.querySelector(".status").textContent = "waiting for the connection…";
    return;
  }
  p.failed = true;
  p.li.classList.add("failed");
  const status = p.li.querySelector(".status");
  status.textContent = `not sent: ${describeError(res?.error)} `;
  const retry = h("button", "link small", "Retry");
  retry.type = "button";
  retry.addEventListener("click", () => {
    p.failed = false;
    if (state.joined) deliver(clientId, p);
    else status.textContent = "waiting for the connection…";
  });
  status.append(retry);
  showError(`Message not sent: ${describeError(res?.error)}`);
}

function sendCurrent() {
  const text = el.input.value;
  if (!text.trim() || !state.joined) return;
  if (new TextEncoder().encode(text.trim()).length > MESSAGE_MAX_BYTES) {
    showError(`That message is too long (at most ${MESSAGE_MAX_BYTES} bytes).`);
    return;
  }
  const clientId = newClientId();
  const p = { text, li: addPending(text.trim()), inFlight: false, failed: false };
  state.pending.set(clientId, p);
  el.input.value = "";
  autosize();
  sendTyping(false);
  updateSendButton();
  deliver(clientId, p);
}

async function loadOlder() {
  if (state.loadingOlder || !state.olderCursor || !state.socket) return;
  state.loadingOlder = true;
  el.olderButton.disabled = true;
  el.olderButton.textContent = "Loading…";
  const res = await request("get_history", { room: state.room, before: state.olderCursor, limit: HISTORY_PAGE });
  state.loadingOlder = false;
  el.olderButton.disabled = false;
  el.olderButton.textContent = "Load older messages";
  if (!res?.ok) {
    showError(`Could not load older messages: ${describeError(res?.error)}`);
    return;
  }
  // Keep what the reader looks at in place while messages are added above it.
  const fromBottom = el.scroller.scrollHeight - el.scroller.scrollTop;
  const page = Array.isArray(res.messages) ? res.messages : [];
  addMessages(page, { stick: false });
  el.scroller.scrollTop = el.scroller.scrollHeight - fromBottom;
  // Newest first: the last one is where the next page starts.
  const last = page.at(-1);
  if (typeof last?.id === "string") state.olderCursor = last.id;
  if (!res.hasMore || page.length === 0) {
    el.olderButton.hidden = true;
    el.olderEnd.hidden = false;
  }
}

// ---------------------------------------------------------------------------------------------
// Wiring
// ---------------------------------------------------------------------------------------------

function autosize() {
  el.input.style.height = "auto";
  el.input.style.height = `${Math.min(el.input.scrollHeight, 160)}px`;
}

el.joinForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const username = el.joinUsername.value.trim();
  const room = el.joinRoom.value.trim();
  if (!username || !room) {
    el.joinError.textContent = !username ? "Please enter your name." : "Please enter a room.";
    el.joinError.hidden = false;
    (!username ? el.joinUsername : el.joinRoom).focus();
    return;
  }
  try {
    localStorage.setItem("chatify.username", username);
    localStorage.setItem("chatify.room", room);
  } catch {
    // Storage may be disabled: the page works without it.
  }
  el.joinButton.disabled = true;
  enter(username, room);
});

el.leaveButton.addEventListener("click", () => {
  leave();
  showJoinView();
});

el.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  sendCurrent();
});

el.input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    sendCurrent();
  }
});

el.input.addEventListener("input", () => {
  autosize();
  updateSendButton();
  sendTyping(el.input.value.trim() !== "");
});

el.input.addEventListener("blur", () => sendTyping(false));
el.olderButton.addEventListener("click", loadOlder);
el.errorDismiss.addEventListener("click", clearError);

document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && !el.errorBanner.hidden) clearError();
});

try {
  el.joinUsername.value = localStorage.getItem("chatify.username") ?? "";
  el.joinRoom.value = localStorage.getItem("chatify.room") ?? "general";
} catch {
  el.joinRoom.value = "general";
}

state.serverUrl = await loadConfig();
el.serverNote.textContent = `Server: ${state.serverUrl}`;
document.body.dataset.ready = "true";
