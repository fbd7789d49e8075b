// Chatify's chat page: one room at a time, through the load balancer, with socket.io-client.
// All user text goes into the page with textContent, never as HTML. Messages change: replies,
// edits and deletions (of the messages this connection sent: without auth the server knows the
// author as the sending connection, until it disconnects) and reactions, live and after a
// reconnect (the join ack's `changes`). Messages that arrive while the page is away (hidden,
// unfocused or disconnected) are counted in the title and the room header and marked "New".
import { io } from "/vendor/socket.io.esm.min.js";

const HISTORY_PAGE = 50; // messages per "load older messages" (get_history limit, 1..=100)
const ACK_TIMEOUT_MS = 10_000;
const TYPING_IDLE_MS = 2_500; // stop saying "typing" after this long without a keystroke
const TYPING_EXPIRE_MS = 6_000; // forget someone's "typing" if no update arrives
const MESSAGE_MAX_BYTES = 4096;
const CHATBOT = "ChatBot";
const REACTIONS = ["👍", "❤️", "😂", "🎉"]; // the emoji the page offers (others' show too)
const QUOTE_CHARS = 120; // how much of a replied-to message a quote shows

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
  unreadBadge: $("unread-badge"),
  replyBar: $("reply-bar"),
  replyText: $("reply-text"),
  replyCancel: $("reply-cancel"),
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
  msgs: new Map(), // stored message id → { id, username, message, createdTime, editedTime, deleted, reactions, replyTo, li }
  owned: new Set(), // ids this connection sent: the ones it may edit and delete (without auth)
  myReactions: new Map(), // id → Set of emoji this connection added (a second click removes)
  reacting: new Set(), // "id emoji" with a react request in flight
  replyTo: null, // the id the composer replies to
  editing: null, // the id being edited in place
  unread: new Map(), // room → messages of others that arrived while the page was away
  awayOpen: false, // a "New" divider was placed in the current away period
  divider: null, // the "New" divider (a list item), or null
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

/**
 * A stored message ({ id, room, username, message, createdTime, replyTo?, editedTime?,
 * reactions? }, or a deleted one { id, room, createdTime, deleted: true }); returns its list item,
 * or null if it was already shown (then what it says now is merged in: a deletion, a later edit).
 */
function addMessage(m) {
  if (!m || typeof m.id !== "string" || m.room !== state.room) return null;
  const deleted = m.deleted === true;
  if (!deleted && (typeof m.username !== "string" || typeof m.message !== "string")) return null;
  if (state.seen.has(m.id)) {
    if (deleted) applyDelete(m.id);
    else if (Number.isFinite(m.editedTime)) applyEdit(m.id, m.message, m.editedTime);
    return null;
  }
  state.seen.add(m.id);
  if (!state.lastId || m.id > state.lastId) state.lastId = m.id;

  const data = {
    id: m.id,
    username: typeof m.username === "string" ? m.username : "",
    message: deleted ? "" : m.message,
    createdTime: m.createdTime,
    editedTime: Number.isFinite(m.editedTime) ? m.editedTime : null,
    deleted,
    reactions: m.reactions && typeof m.reactions === "object" ? { ...m.reactions } : {},
    replyTo: typeof m.replyTo === "string" ? m.replyTo : null,
    li: null,
  };
  const li = h("li", "message");
  li.dataset.key = m.id;
  li.dataset.id = m.id;
  if (data.username) li.dataset.author = data.username;
  if (data.username === state.username) li.classList.add("mine");
  li.append(avatar(data.username || "?"));
  data.li = li;
  state.msgs.set(m.id, data);
  renderMessage(data);
  insertByKey(li);
  updateQuotes(m.id); // replies to it shown before it (an older page) can quote it now
  return li;
}

/** (Re)builds a message's bubble and actions from its data. */
function renderMessage(d) {
  const li = d.li;
  li.querySelector(":scope > .bubble")?.remove();
  li.querySelector(":scope > .actions")?.remove();
  li.classList.toggle("deleted", d.deleted);
  const bubble = h("div", "bubble");
  const meta = h("div", "meta");
  if (d.username) meta.append(h("span", "author", d.username));
  meta.append(timeElement(d.createdTime));
  const edited = h("span", "edited muted", "(edited)");
  edited.dataset.testid = "edited-mark";
  meta.append(edited);
  bubble.append(meta);
  if (d.deleted) {
    const p = h("p", "text deleted-text", "This message was deleted");
    bubble.append(p);
    li.append(bubble);
    renderEdited(d);
    return;
  }
  if (d.replyTo) bubble.append(quoteElement(d.replyTo));
  bubble.append(h("p", "text", d.message));
  const reactions = h("ul", "reactions");
  reactions.dataset.testid = "reactions";
  reactions.setAttribute("aria-label", "Reactions");
  bubble.append(reactions);
  li.append(bubble, actionsElement(d));
  renderEdited(d);
  renderReactions(d);
}

function renderEdited(d) {
  const mark = d.li.querySelector(".edited");
  if (!mark) return;
  mark.hidden = !d.editedTime || d.deleted;
  if (d.editedTime) mark.title = `Edited ${new Date(d.editedTime).toLocaleString()}`;
}

/** The toolbar of a message: reply, the reactions the page offers, and edit/delete when it may. */
function actionsElement(d) {
  const bar = h("div", "actions");
  bar.setAttribute("role", "toolbar");
  bar.setAttribute("aria-label", `Actions on ${d.username}'s message`);
  const button = (text, testid, label, onClick) => {
    const b = h("button", "action", text);
    b.type = "button";
    b.dataset.testid = testid;
    if (label) b.setAttribute("aria-label", label);
    b.addEventListener("click", onClick);
    return b;
  };
  bar.append(button("Reply", "reply-button", `Reply to ${d.username}`, () => startReply(d.id)));
  for (const emoji of REACTIONS) {
    const b = button(emoji, "react-button", `React with ${emoji}`, () => toggleReaction(d.id, emoji));
    b.classList.add("emoji");
    b.dataset.emoji = emoji;
    b.setAttribute("aria-pressed", "false");
    bar.append(b);
  }
  const edit = button("Edit", "edit-button", "Edit your message", () => startEdit(d.id));
  const del = button("Delete", "delete-button", "Delete your message", () => confirmDelete(d.id));
  edit.classList.add("own-only");
  del.classList.add("own-only");
  bar.append(edit, del);
  updateOwnActions(d, bar);
  return bar;
}

/** Edit and Delete show on the messages this connection sent (the server's author, without auth). */
function updateOwnActions(d, bar = d.li.querySelector(":scope > .actions")) {
  if (!bar) return;
  const own = state.owned.has(d.id) && !d.deleted;
  d.li.classList.toggle("own", own);
  for (const b of bar.querySelectorAll(".own-only")) b.hidden = !own;
}

/** The counts under a message, each a button that toggles this page's reaction. */
function renderReactions(d) {
  const list = d.li.querySelector(".reactions");
  if (!list) return;
  const mine = state.myReactions.get(d.id) ?? new Set();
  const entries = Object.entries(d.reactions).filter(([, n]) => Number.isInteger(n) && n > 0);
  list.replaceChildren(
    ...entries.map(([emoji, n]) => {
      const li = h("li");
      const b = h("button", "reaction");
      b.type = "button";
      b.dataset.emoji = emoji;
      b.dataset.testid = "reaction";
      b.setAttribute("aria-pressed", String(mine.has(emoji)));
      b.setAttribute("aria-label", `${emoji} ${n}: ${mine.has(emoji) ? "remove your reaction" : "react too"}`);
      b.append(h("span", "reaction-emoji", emoji), h("span", "reaction-count", String(n)));
      b.addEventListener("click", () => toggleReaction(d.id, emoji));
      li.append(b);
      return li;
    }),
  );
  list.hidden = entries.length === 0;
  for (const b of d.li.querySelectorAll(".actions .emoji")) b.setAttribute("aria-pressed", String(mine.has(b.dataset.emoji)));
}

const snippet = (text) => ([...text].length > QUOTE_CHARS ? `${[...text].slice(0, QUOTE_CHARS).join("")}…` : text);

/** A quote of the message `id` replies to; filled from what the page knows of it. */
function quoteElement(id) {
  const q = h("div", "quote");
  q.dataset.quoteOf = id;
  q.dataset.testid = "quote";
  fillQuote(q);
  return q;
}

function fillQuote(q) {
  const target = state.msgs.get(q.dataset.quoteOf);
  q.classList.toggle("unknown", !target || target.deleted);
  if (!target) {
    q.replaceChildren(h("span", "quote-text", "Reply to an older message"));
  } else if (target.deleted) {
    q.replaceChildren(h("span", "quote-text", "Reply to a deleted message"));
  } else {
    q.replaceChildren(h("span", "quote-author", target.username), h("span", "quote-text", snippet(target.message)));
  }
}

/** The quotes of (and the composer's reply to) `id` follow what it says now. */
function updateQuotes(id) {
  for (const q of el.messages.querySelectorAll(`.quote[data-quote-of="${CSS.escape(id)}"]`)) fillQuote(q);
  if (state.replyTo === id) renderReplyBar();
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
    const li = addMessage(m);
    if (li && m.username !== state.username && isAway()) arrivedAway(li);
    // Whoever sent a message has stopped typing it.
    stopTyper(m.username);
  }
  if (stick) scrollToBottom();
}

// ---------------------------------------------------------------------------------------------
// Messages that change: replies, edits, deletions, reactions
// ---------------------------------------------------------------------------------------------

function applyEdit(id, message, editedTime) {
  const d = state.msgs.get(id);
  if (!d || d.deleted || typeof message !== "string") return;
  if (d.editedTime && Number.isFinite(editedTime) && editedTime < d.editedTime) return; // an older edit
  d.message = message;
  d.editedTime = Number.isFinite(editedTime) ? editedTime : Date.now();
  const text = d.li.querySelector(":scope > .bubble > .text");
  if (text) text.textContent = message;
  renderEdited(d);
  updateQuotes(id);
}

function applyDelete(id) {
  const d = state.msgs.get(id);
  if (!d || d.deleted) return;
  const hadFocus = d.li.contains(document.activeElement);
  if (state.editing === id) state.editing = null;
  d.deleted = true;
  d.message = "";
  d.reactions = {};
  d.replyTo = null;
  state.owned.delete(id);
  state.myReactions.delete(id);
  renderMessage(d);
  updateQuotes(id);
  if (hadFocus) el.input.focus();
}

function applyReactions(id, reactions) {
  const d = state.msgs.get(id);
  if (!d || d.deleted || !reactions || typeof reactions !== "object") return;
  d.reactions = { ...reactions };
  // An emoji nobody has any more is not this page's either.
  const mine = state.myReactions.get(id);
  if (mine) for (const e of mine) if (!(d.reactions[e] > 0)) mine.delete(e);
  const active = document.activeElement;
  const focused = active && d.li.contains(active) && active.closest(".reactions") ? active.dataset.emoji : null;
  renderReactions(d);
  if (focused) d.li.querySelector(`.reactions button[data-emoji="${CSS.escape(focused)}"]`)?.focus();
}

function onMessageEdited(e) {
  if (e?.room === state.room) applyEdit(e.id, e.message, e.editedTime);
}

function onMessageDeleted(e) {
  if (e?.room === state.room) applyDelete(e.id);
}

function onReaction(e) {
  if (e?.room === state.room) applyReactions(e.id, e.reactions);
}

/** The join ack's `changes` (with `since`): what happened to older messages while away. */
function applyChanges(changes, cut) {
  for (const c of Array.isArray(changes) ? changes : []) {
    if (c?.type === "edited") applyEdit(c.id, c.message, c.editedTime);
    else if (c?.type === "deleted") applyDelete(c.id);
    else if (c?.type === "reactions") applyReactions(c.id, c.reactions ?? {});
  }
  if (cut) addNotice("Some edits, deletions or reactions made while you were away are not shown: reload the page to see them.", Date.now(), "local");
}

function startReply(id) {
  if (!state.msgs.has(id)) return;
  state.replyTo = id;
  renderReplyBar();
  el.input.focus();
}

function cancelReply({ focus = true } = {}) {
  state.replyTo = null;
  renderReplyBar();
  if (focus) el.input.focus();
}

function renderReplyBar() {
  const d = state.replyTo ? state.msgs.get(state.replyTo) : null;
  el.replyBar.hidden = !state.replyTo;
  if (!state.replyTo) {
    el.replyText.replaceChildren();
    return;
  }
  if (!d || d.deleted) {
    el.replyText.replaceChildren("Replying to a deleted message");
  } else {
    el.replyText.replaceChildren("Replying to ", h("strong", "", d.username), `: ${snippet(d.message)}`);
  }
}

/** Edits a message in place: its text becomes a box; Enter saves, Escape cancels. */
function startEdit(id) {
  const d = state.msgs.get(id);
  if (!d || d.deleted || !state.owned.has(id)) return;
  if (state.editing && state.editing !== id) closeEdit(state.editing);
  if (state.editing === id) {
    d.li.querySelector(".edit-input")?.focus();
    return;
  }
  state.editing = id;
  const text = d.li.querySelector(":scope > .bubble > .text");
  const form = h("form", "edit-form");
  form.dataset.testid = "edit-form";
  const box = h("textarea", "edit-input");
  box.dataset.testid = "edit-input";
  box.rows = 2;
  box.maxLength = MESSAGE_MAX_BYTES;
  box.value = d.message;
  box.setAttribute("aria-label", "Edit your message (Enter saves, Escape cancels)");
  const save = h("button", "primary small", "Save");
  save.type = "submit";
  save.dataset.testid = "edit-save";
  const cancel = h("button", "ghost small", "Cancel");
  cancel.type = "button";
  cancel.dataset.testid = "edit-cancel";
  const buttons = h("div", "edit-buttons");
  buttons.append(save, cancel);
  form.append(box, buttons);
  text.hidden = true;
  text.after(form);
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    saveEdit(id, form);
  });
  box.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      saveEdit(id, form);
    } else if (e.key === "Escape") {
      e.preventDefault();
      e.stopPropagation();
      closeEdit(id, { focus: true });
    }
  });
  cancel.addEventListener("click", () => closeEdit(id, { focus: true }));
  box.focus();
  box.setSelectionRange(box.value.length, box.value.length);
}

function closeEdit(id, { focus = false } = {}) {
  const d = state.msgs.get(id);
  if (state.editing === id) state.editing = null;
  if (!d) return;
  d.li.querySelector(".edit-form")?.remove();
  const text = d.li.querySelector(":scope > .bubble > .text");
  if (text) text.hidden = false;
  if (focus) (d.li.querySelector('[data-testid="edit-button"]:not([hidden])') ?? el.input).focus();
}

async function saveEdit(id, form) {
  const d = state.msgs.get(id);
  const box = form.querySelector(".edit-input");
  const text = box.value.trim();
  if (!d || form.dataset.busy) return;
  if (!text) {
    showError("A message cannot be empty: delete it instead.");
    return;
  }
  if (new TextEncoder().encode(text).length > MESSAGE_MAX_BYTES) {
    showError(`That message is too long (at most ${MESSAGE_MAX_BYTES} bytes).`);
    return;
  }
  if (text === d.message) {
    closeEdit(id, { focus: true });
    return;
  }
  form.dataset.busy = "true";
  for (const b of form.querySelectorAll("button")) b.disabled = true;
  const res = await request("edit_message", { room: state.room, id, message: text });
  delete form.dataset.busy;
  for (const b of form.querySelectorAll("button")) b.disabled = false;
  if (!res?.ok) {
    showError(`Message not edited: ${describeError(res?.error)}`);
    if (form.isConnected) box.focus();
    return;
  }
  applyEdit(id, text, res.editedTime);
  closeEdit(id, { focus: true });
}

/** Delete asks first, in the message itself: "Delete this message?" Delete / Cancel. */
function confirmDelete(id) {
  const d = state.msgs.get(id);
  if (!d || d.deleted) return;
  const bubble = d.li.querySelector(":scope > .bubble");
  let box = bubble.querySelector(".confirm");
  if (!box) {
    box = h("div", "confirm");
    box.setAttribute("role", "group");
    box.setAttribute("aria-label", "Delete this message?");
    const yes = h("button", "danger small", "Delete");
    yes.type = "button";
    yes.dataset.testid = "delete-confirm";
    const no = h("button", "ghost small", "Cancel");
    no.type = "button";
    no.dataset.testid = "delete-cancel";
    box.append(h("span", "small", "Delete this message?"), yes, no);
    bubble.append(box);
    const close = () => {
      box.remove();
      d.li.querySelector('[data-testid="delete-button"]')?.focus();
    };
    no.addEventListener("click", close);
    box.addEventListener("keydown", (e) => {
      if (e.key === "Escape") {
        e.stopPropagation();
        close();
      }
    });
    yes.addEventListener("click", async () => {
      yes.disabled = true;
      const res = await request("delete_message", { room: state.room, id });
      yes.disabled = false;
      if (!res?.ok) {
        showError(`Message not deleted: ${describeError(res?.error)}`);
        return;
      }
      applyDelete(id);
    });
  }
  box.querySelector('[data-testid="delete-confirm"]').focus();
}

/** Adds this page's reaction, or removes it when the page added it. */
async function toggleReaction(id, emoji) {
  const d = state.msgs.get(id);
  const key = `${id} ${emoji}`;
  if (!d || d.deleted || !state.joined || state.reacting.has(key)) return;
  const mine = state.myReactions.get(id) ?? new Set();
  const add = !mine.has(emoji);
  state.reacting.add(key);
  const socket = state.socket;
  const res = await request("react", { room: state.room, id, emoji, add });
  state.reacting.delete(key);
  if (socket !== state.socket) return;
  if (!res?.ok) {
    showError(`Reaction not ${add ? "added" : "removed"}: ${describeError(res?.error)}`);
    return;
  }
  if (add) mine.add(emoji);
  else mine.delete(emoji);
  state.myReactions.set(id, mine);
  applyReactions(id, res.reactions ?? {});
}

/** The connection that sent them is gone: its messages cannot be edited or deleted now. */
function forgetConnection() {
  const owned = [...state.owned];
  state.owned.clear();
  state.myReactions.clear();
  if (state.editing) closeEdit(state.editing);
  for (const id of owned) {
    const d = state.msgs.get(id);
    if (d) {
      d.li.querySelector(".confirm")?.remove();
      updateOwnActions(d);
    }
  }
  for (const d of state.msgs.values()) if (!d.deleted) renderReactions(d);
}

// ---------------------------------------------------------------------------------------------
// Unread count and the "New" divider
// ---------------------------------------------------------------------------------------------

/** The page is away when hidden, unfocused or not in the room (disconnected). */
const isAway = () => document.visibilityState !== "visible" || !document.hasFocus() || !state.joined;

/** A message of someone else arrived while away: count it, and mark where the new ones start. */
function arrivedAway(li) {
  li.classList.add("arrived-away");
  if (!state.awayOpen || !state.divider?.isConnected) {
    state.divider?.remove();
    state.divider = h("li", "divider");
    state.divider.dataset.testid = "new-divider";
    state.divider.setAttribute("role", "separator");
    state.divider.append(h("span", "divider-text", "New"));
    state.awayOpen = true;
    el.messages.insertBefore(state.divider, li);
  } else if (li.compareDocumentPosition(state.divider) & Node.DOCUMENT_POSITION_FOLLOWING) {
    el.messages.insertBefore(state.divider, li); // an earlier one (filled in by since)
  }
  state.unread.set(state.room, (state.unread.get(state.room) ?? 0) + 1);
  renderUnread();
}

/** Back: the count goes, the divider stays until the next time away. */
function markSeen() {
  if (!state.room || isAway()) return;
  state.awayOpen = false;
  if (state.unread.get(state.room)) {
    state.unread.set(state.room, 0);
    renderUnread();
  }
}

function renderUnread() {
  const n = state.room ? (state.unread.get(state.room) ?? 0) : 0;
  document.title = state.room ? `${n ? `(${n}) ` : ""}${state.room} · Chatify` : "Chatify";
  el.unreadBadge.textContent = n ? `${n} new` : "";
  el.unreadBadge.hidden = !n;
  el.unreadBadge.setAttribute("aria-label", n === 1 ? "1 unread message" : `${n} unread messages`);
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
  state.msgs.clear();
  state.owned.clear();
  state.myReactions.clear();
  state.reacting.clear();
  state.replyTo = null;
  state.editing = null;
  state.unread.delete(state.room);
  state.awayOpen = false;
  state.divider = null;
  renderReplyBar();
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
  el.unreadBadge.hidden = true;
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
    forgetConnection();
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
  socket.on("message_edited", onMessageEdited);
  socket.on("message_deleted", onMessageDeleted);
  socket.on("reaction", onReaction);
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
    // What was filled in arrived while the page was away: count it and mark it "New".
    const filledIn = history
      .filter((m) => typeof m?.id === "string" && !seenBefore.has(m.id) && !m.deleted && m.username !== state.username)
      .map((m) => m.id)
      .sort();
    for (const id of filledIn) {
      const li = state.msgs.get(id)?.li;
      if (li) arrivedAway(li);
    }
    applyChanges(res.changes, res.changesCut === true);
    if (nearBottom()) scrollToBottom();
    setConnState("connected");
  }
  markSeen();
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
  renderUnread();
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
  state.room = "";
  renderUnread();
}

// ---------------------------------------------------------------------------------------------
// Sending and history
// ---------------------------------------------------------------------------------------------

function addPending(text, replyTo) {
  const li = h("li", "message mine pending");
  li.dataset.key = "~"; // after every id and notice: pending sends sit at the bottom
  li.append(avatar(state.username));
  const bubble = h("div", "bubble");
  const meta = h("div", "meta");
  meta.append(h("span", "author", state.username), h("span", "status small", "sending…"));
  bubble.append(meta);
  if (replyTo) bubble.append(quoteElement(replyTo));
  bubble.append(h("p", "text", text));
  li.append(bubble);
  el.messages.append(li);
  scrollToBottom();
  return li;
}

async function deliver(clientId, p) {
  p.inFlight = true;
  p.sentOn = p.sentOn ?? state.socket?.id;
  p.li.classList.remove("failed");
  p.li.querySelector(".status").textContent = "sending…";
  const socket = state.socket;
  const payload = { room: state.room, message: p.text, clientId };
  if (p.replyTo) payload.replyTo = p.replyTo;
  const res = await request("send_message", payload);
  p.inFlight = false;
  if (socket !== state.socket) return;
  if (res?.ok) {
    state.pending.delete(clientId);
    p.li.remove();
    // Sent by this connection (a retry's ack names the first send, maybe of an older connection).
    if (state.joined && socket.connected && p.sentOn === socket.id) state.owned.add(res.id);
    const message = { id: res.id, room: state.room, username: state.username, message: p.text.trim(), createdTime: res.createdTime };
    if (p.replyTo) message.replyTo = p.replyTo;
    addMessages([message], { stick: true });
    const d = state.msgs.get(res.id);
    if (d) updateOwnActions(d);
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
  const replyTo = state.replyTo;
  const p = { text, replyTo, li: addPending(text.trim(), replyTo), inFlight: false, failed: false };
  state.pending.set(clientId, p);
  if (replyTo) cancelReply({ focus: false });
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
  } else if (e.key === "Escape" && state.replyTo) {
    e.preventDefault();
    e.stopPropagation();
    cancelReply();
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
el.replyCancel.addEventListener("click", () => cancelReply());
document.addEventListener("visibilitychange", markSeen);
window.addEventListener("focus", markSeen);

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
