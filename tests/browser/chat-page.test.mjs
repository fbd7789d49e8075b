// The chat page (web/) in a real browser: two headless Chromium pages (Debian's chromium, driven
// by playwright-core) on the page deploy/local/up.sh serves, talking to the load balancer. They
// join one room from different gateways, chat, see each other type, page back through history,
// and one of them loses its connection (its gateway stops) and recovers what it missed (and the
// edits and reactions made meanwhile). They reply to, edit, delete and react to messages, and a
// hidden page counts what arrived meanwhile and marks it "New".
//
// Reads the system's addresses from $CHATIFY_RUN_DIR/env (CHATIFY_WEB_URL, CHATIFY_LB_URL), like
// tests/e2e. Screenshots go to target/test-artifacts/browser/; with CHATIFY_UPDATE_DOCS_SCREENSHOT=1
// the desktop one is also copied to docs/chat-page.png (the README's picture).
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { after, before, describe, test } from "node:test";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { io } from "socket.io-client";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, "..", "..");
const ARTIFACTS = path.join(REPO, "target", "test-artifacts", "browser");
const WAIT_MS = Number(process.env.CHATIFY_BROWSER_WAIT_MS || 5000);
const LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"];

// 160 stored messages: the page shows the newest 100, then "load older" pages back 50 and 10.
const SEED_SOCKETS = 4;
const SEED_PER_SOCKET = 40; // the per-connection send burst
const SEEDED = SEED_SOCKETS * SEED_PER_SOCKET;
const HELLO = "Hello bob! <b>this is not bold</b> & neither is <script>this</script>";
const BOBS_HI = "Hi ann, bob here";

// ---------------------------------------------------------------------------------------------
// The system under test and the browser
// ---------------------------------------------------------------------------------------------

function parseEnvFile(text) {
  const vars = {};
  for (const line of text.split(/\r?\n/)) {
    const m = /^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$/.exec(line);
    if (!m) continue;
    let value = m[2].trim();
    if (value.startsWith("'") && value.endsWith("'") && value.length >= 2) value = value.slice(1, -1).replaceAll("'\\''", "'");
    else if (value.startsWith('"') && value.endsWith('"') && value.length >= 2) value = value.slice(1, -1);
    vars[m[1]] = value;
  }
  return vars;
}

const RUN_DIR = process.env.CHATIFY_RUN_DIR || path.join(REPO, "deploy", "local", "run");
const ENV = (() => {
  const file = path.join(RUN_DIR, "env");
  const vars = fs.existsSync(file) ? parseEnvFile(fs.readFileSync(file, "utf8")) : {};
  for (const name of ["CHATIFY_WEB_URL", "CHATIFY_LB_URL"]) if (process.env[name]) vars[name] = process.env[name];
  return vars;
})();

function need(name) {
  const value = ENV[name];
  if (!value) {
    throw new Error(`${name} is not set: start the system with deploy/local/up.sh (which serves the chat page) and set CHATIFY_RUN_DIR (now ${RUN_DIR})`);
  }
  return value;
}

function chromiumPath() {
  const candidates = process.env.CHATIFY_CHROMIUM ? [process.env.CHATIFY_CHROMIUM] : ["/usr/bin/chromium", "/usr/bin/chromium-browser"];
  const found = candidates.find((p) => fs.existsSync(p));
  if (!found) throw new Error(`no Chromium at ${candidates.join(" or ")}: run deploy/local/install.sh --browser (or set CHATIFY_CHROMIUM)`);
  return found;
}

/** Runs deploy/local/up.sh or down.sh on this run dir; rejects with its output on failure. */
function script(name, args) {
  return new Promise((resolve, reject) => {
    execFile(
      path.join(REPO, "deploy", "local", name),
      args,
      { env: { ...process.env, CHATIFY_RUN_DIR: RUN_DIR, CHATIFY_SKIP_BUILD: "1" }, timeout: 120_000 },
      (err, stdout, stderr) => (err ? reject(new Error(`${name} ${args.join(" ")} failed: ${err.message}\n${stdout}${stderr}`)) : resolve()),
    );
  });
}

// ---------------------------------------------------------------------------------------------
// Reading the page
// ---------------------------------------------------------------------------------------------

/** What the message list shows, top to bottom. */
const listOf = (page) =>
  page.$$eval("#messages > li", (items) =>
    items.map((li) => ({
      kind: li.classList.contains("notice")
        ? "notice"
        : li.classList.contains("divider")
          ? "divider"
          : li.classList.contains("pending")
            ? "pending"
            : "message",
      id: li.dataset.id,
      author: li.dataset.author,
      text: (li.querySelector(".text") ?? li.querySelector(".notice-text"))?.textContent,
      time: li.querySelector("time")?.textContent,
      dateTime: li.querySelector("time")?.dateTime,
    })),
  );

const usersOf = (page) => page.$$eval("#users .user-name", (names) => names.map((n) => n.textContent));

async function describePage(page) {
  try {
    const list = await listOf(page);
    return JSON.stringify({
      state: await page.$eval("#conn-state", (e) => e.dataset.state),
      banner: await page.$eval("#conn-banner", (e) => (e.hidden ? "" : e.textContent)),
      error: await page.$eval("#error-banner", (e) => (e.hidden ? "" : e.textContent)),
      users: await usersOf(page),
      typing: await page.textContent("#typing"),
      title: await page.title(),
      last: list.slice(-6),
      count: list.length,
    });
  } catch (e) {
    return `(page unreadable: ${e.message})`;
  }
}

/** Waits until fn(arg) is truthy in the page; fails saying what was awaited and what the page shows. */
async function waitUntil(page, what, fn, arg, timeout = WAIT_MS) {
  try {
    await page.waitForFunction(fn, arg, { timeout, polling: 50 });
  } catch (e) {
    throw new Error(`${page.name}: ${what} — not within ${timeout} ms (${e.message.split("\n")[0]}). The page: ${await describePage(page)}`);
  }
}

const hasMessage = (page, author, text, timeout) =>
  waitUntil(
    page,
    `message "${text}" from ${author}`,
    ([a, t]) => [...document.querySelectorAll("#messages > li.message:not(.pending)")].some((li) => li.dataset.author === a && li.querySelector(".text")?.textContent === t),
    [author, text],
    timeout,
  );

const hasNotice = (page, text, timeout) =>
  waitUntil(page, `notice "${text}"`, (t) => [...document.querySelectorAll("#messages > li.notice .notice-text")].some((p) => p.textContent.endsWith(t)), text, timeout);

const hasUsers = (page, names) =>
  waitUntil(
    page,
    `users ${JSON.stringify(names)}`,
    (want) => JSON.stringify([...document.querySelectorAll("#users .user-name")].map((n) => n.textContent).sort()) === JSON.stringify(want),
    [...names].sort(),
  );

const hasState = (page, state, timeout) =>
  waitUntil(page, `connection state "${state}"`, (s) => document.querySelector("#conn-state")?.dataset.state === s, state, timeout);

const typingIs = (page, text) => waitUntil(page, `typing line "${text}"`, (t) => document.querySelector("#typing")?.textContent === t, text);

/** The id of the (stored) message with this author and text, once the page shows it (it may
 * arrive on this page after another page, or before its own send's ack). */
const idOf = async (page, author, text) => {
  const deadline = Date.now() + WAIT_MS;
  for (;;) {
    const id = await page.$$eval(
      "#messages > li.message:not(.pending)",
      (items, [a, t]) => items.find((li) => li.dataset.author === a && li.querySelector(":scope > .bubble > .text")?.textContent === t)?.dataset.id,
      [author, text],
    );
    if (id || Date.now() > deadline) {
      assert.ok(id, `${page.name} shows "${text}" from ${author}`);
      return id;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
};

const itemOf = (page, id) => page.locator(`#messages > li[data-id="${id}"]`);

/** Presses one of a message's toolbar buttons: with the mouse (hover, click) or the keyboard (focus, Enter). */
async function act(page, id, testid, { emoji, keyboard = false } = {}) {
  const button = itemOf(page, id).locator(`:scope > .actions [data-testid="${testid}"]${emoji ? `[data-emoji="${emoji}"]` : ""}`);
  await button.waitFor({ state: "visible", timeout: WAIT_MS }); // Edit and Delete show once the send is acked
  if (keyboard) {
    await button.focus();
    await page.keyboard.press("Enter");
  } else {
    await itemOf(page, id).hover();
    await button.click();
  }
}

/** The count the page shows for one emoji under a message ("0" when none). */
const countIs = (page, id, emoji, count) =>
  waitUntil(
    page,
    `${emoji} ${count} under ${id}`,
    ([i, e, n]) => (document.querySelector(`#messages > li[data-id="${i}"] .reactions button[data-emoji="${e}"] .reaction-count`)?.textContent ?? "0") === n,
    [id, emoji, String(count)],
  );

const textIs = (page, id, text) =>
  waitUntil(page, `message ${id} says "${text}"`, ([i, t]) => document.querySelector(`#messages > li[data-id="${i}"] > .bubble > .text`)?.textContent === t, [id, text]);

const quoteOf = (page, id) => page.$eval(`#messages > li[data-id="${id}"] [data-testid="quote"]`, (q) => q.textContent);

/** Emulates the tab being hidden (or shown again): document.visibilityState and a visibilitychange. */
const setHidden = (page, hidden) =>
  page.evaluate((hide) => {
    if (hide) {
      Object.defineProperty(document, "visibilityState", { configurable: true, get: () => "hidden" });
      Object.defineProperty(document, "hidden", { configurable: true, get: () => true });
    } else {
      delete document.visibilityState;
      delete document.hidden;
    }
    document.dispatchEvent(new Event("visibilitychange"));
  }, hidden);

/** The unread badge's text ("" when hidden) and the title. */
const unreadOf = (page) =>
  page.evaluate(() => ({ badge: document.querySelector('[data-testid="unread-count"]').hidden ? "" : document.querySelector('[data-testid="unread-count"]').textContent, title: document.title }));

/**
 * Waits until the load balancer sends new clients to both gateways (it names the one it chose in
 * its SRV cookie): after a gateway restart, HAProxy's health checks take a few seconds to put it
 * back in the rotation.
 */
async function bothGatewaysInRotation(lbUrl, timeoutMs = 15_000) {
  const seen = new Set();
  const deadline = Date.now() + timeoutMs;
  while (seen.size < 2) {
    seen.add(await lbPick(lbUrl));
    if (seen.size < 2) {
      if (Date.now() > deadline) throw new Error(`the load balancer sent new clients only to ${[...seen].join(", ") || "nobody"} for ${timeoutMs} ms`);
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
  }
}

/** The gateway HAProxy picks for one new client (a request without cookie), from its SRV cookie. */
async function lbPick(lbUrl) {
  const res = await fetch(`${lbUrl}/`, { signal: AbortSignal.timeout(2000) }).catch(() => undefined);
  await res?.body?.cancel();
  for (const c of res?.headers.getSetCookie() ?? []) {
    const m = /^SRV=([^;]+)/.exec(c);
    if (m) return m[1];
  }
  return undefined;
}

const gatewayOf = async (context, lbUrl) => (await context.cookies(lbUrl.replace("127.0.0.1", "localhost"))).find((c) => c.name === "SRV")?.value;

// ---------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------

describe("the chat page in two headless Chromium pages", { concurrency: false }, () => {
  const room = `lobby ${crypto.randomBytes(3).toString("hex")}`;
  const seeded = []; // { id, text, createdTime, author } of the stored history
  const pageErrors = [];
  let browser;
  let ann; // desktop window
  let bob; // phone-sized window
  let stoppedGateway;

  /** The newest stored messages of the room, as the history API (get_history's JSON twin) answers. */
  const serverHistory = async (limit) => {
    const res = await fetch(`${need("CHATIFY_LB_URL")}/api/rooms/${encodeURIComponent(room)}/messages?limit=${limit}`);
    assert.equal(res.status, 200, `history API: ${res.status}`);
    return (await res.json()).messages;
  };

  const newPage = async (name, viewport) => {
    const context = await browser.newContext({ viewport, locale: "en-GB", timezoneId: "UTC" });
    const page = await context.newPage();
    page.name = name;
    page.on("pageerror", (e) => pageErrors.push(`${name}: ${e.message}`));
    await page.goto(need("CHATIFY_WEB_URL"));
    await waitUntil(page, "the page's script to start", () => document.body.dataset.ready === "true");
    return page;
  };

  before(async () => {
    need("CHATIFY_WEB_URL");
    const lbUrl = need("CHATIFY_LB_URL");
    const executablePath = chromiumPath();
    fs.mkdirSync(ARTIFACTS, { recursive: true });

    // The room's history, from other clients (WebSocket only: no Origin, no sticky cookie).
    const seeders = Array.from({ length: SEED_SOCKETS }, () => io(lbUrl, { transports: ["websocket"], reconnection: false, timeout: WAIT_MS }));
    try {
      const acks = await Promise.all(
        seeders.map(async (socket, k) => {
          if (!socket.connected) {
            await new Promise((resolve, reject) => {
              socket.once("connect", resolve);
              socket.once("connect_error", reject);
            });
          }
          const joined = await socket.timeout(WAIT_MS).emitWithAck("join_room", { username: `archivist${k + 1}`, room });
          assert.equal(joined.ok, true, `seed join: ${JSON.stringify(joined)}`);
          // A burst of sends without waiting: one connection's messages are stored in order.
          return Promise.all(
            Array.from({ length: SEED_PER_SOCKET }, async (_, i) => {
              const text = `Earlier message ${k * SEED_PER_SOCKET + i + 1}`;
              const res = await socket.timeout(WAIT_MS).emitWithAck("send_message", { room, message: text, clientId: crypto.randomUUID() });
              assert.equal(res.ok, true, `seed send: ${JSON.stringify(res)}`);
              return { id: res.id, text, createdTime: res.createdTime, author: `archivist${k + 1}` };
            }),
          );
        }),
      );
      seeded.push(...acks.flat());
    } finally {
      for (const socket of seeders) socket.disconnect();
    }

    await bothGatewaysInRotation(lbUrl);
    browser = await chromium.launch({ executablePath, headless: true, args: LAUNCH_ARGS });
    ann = await newPage("ann", { width: 1100, height: 720 });
    bob = await newPage("bob", { width: 390, height: 760 });
  });

  after(async () => {
    if (stoppedGateway) await script("up.sh", [stoppedGateway]).catch((e) => console.error(e.message));
    for (const page of [ann, bob]) {
      if (page && !page.isClosed()) {
        await page
          .screenshot({ path: path.join(ARTIFACTS, `chat-page-${page.name}.png`) })
          .catch((e) => console.error(`screenshot of ${page.name}: ${e.message}`));
      }
    }
    await browser?.close();
  });

  test("joining with the keyboard shows the room's users, the last 100 messages and the ChatBot welcome", async () => {
    // Keyboard only: the name field has focus, Tab to the room, Enter joins.
    assert.equal(await ann.evaluate(() => document.activeElement?.id), "join-username");
    await ann.keyboard.type("ann");
    await ann.keyboard.press("Tab");
    await ann.keyboard.press("ControlOrMeta+A");
    await ann.keyboard.type(room);
    await ann.keyboard.press("Enter");
    await hasState(ann, "connected");
    await hasUsers(ann, ["ann"]);
    await hasNotice(ann, "Welcome ann");
    assert.equal(await ann.textContent("#room-name"), room);
    assert.equal(await ann.evaluate(() => document.activeElement?.id), "message-input", "the message box has focus after joining");

    // Exactly the 100 newest stored messages (as the server's history answers them), in id order.
    const shown = (await listOf(ann)).filter((m) => m.kind === "message");
    const newest = await serverHistory(100);
    assert.equal(newest.length, 100);
    assert.deepEqual(
      shown.map((m) => m.id),
      newest.map((m) => m.id).sort(),
      "the 100 newest stored messages, in id order",
    );
    const byId = new Map(seeded.map((m) => [m.id, m]));
    for (const m of shown) {
      const sent = byId.get(m.id);
      assert.ok(sent, `${m.id} is one of the seeded messages`);
      assert.equal(m.text, sent.text);
      assert.match(m.author, /^archivist\d$/);
      assert.equal(m.dateTime, new Date(sent.createdTime).toISOString(), "each message carries its time");
      assert.match(m.time, /^\d{2}:\d{2}$/, "today's messages show hours and minutes");
    }
    assert.equal(await ann.isVisible("#older-button"), true, "a full page of history offers older messages");

    // Bob joins by mouse, in a phone-sized window. HAProxy takes turns between the gateways for
    // new clients; right after a gateway came back its order can repeat one, so line it up: the
    // last pick is ann's gateway, the next one (bob) should be the other.
    const lbUrl = need("CHATIFY_LB_URL");
    const gwAnn = await gatewayOf(ann.context(), lbUrl);
    for (let i = 0; i < 10 && (await lbPick(lbUrl)) !== gwAnn; i++);
    await bob.fill("#join-username", "bob");
    await bob.fill("#join-room", room);
    await bob.click("#join-button");
    await hasState(bob, "connected");
    await hasUsers(bob, ["ann", "bob"]);
    await hasUsers(ann, ["ann", "bob"]);
    await hasNotice(ann, "bob has joined the chat room");

    // Each window's connection went through the load balancer, which put them on different gateways.
    const gwBob = await gatewayOf(bob.context(), lbUrl);
    assert.ok(["gateway1", "gateway2"].includes(gwAnn) && ["gateway1", "gateway2"].includes(gwBob), `SRV cookies: ${gwAnn}, ${gwBob}`);
    assert.notEqual(gwAnn, gwBob, "the two windows are on different gateways");
  });

  test("messages typed in one window appear in the other, escaped, with their time", async () => {
    const hello = HELLO;
    await ann.keyboard.type(hello);
    await ann.keyboard.press("Enter");
    await hasMessage(bob, "ann", hello);
    await hasMessage(ann, "ann", hello);
    assert.equal(await bob.$$eval("#messages b, #messages script", (n) => n.length), 0, "user text is never HTML");
    const got = (await listOf(bob)).find((m) => m.text === hello);
    assert.ok(Math.abs(Date.parse(got.dateTime) - Date.now()) < 60_000, `time of the message: ${got.dateTime}`);
    assert.match(got.time, /^\d{2}:\d{2}$/);

    await bob.fill("#message-input", BOBS_HI);
    await bob.click("#send-button");
    await hasMessage(ann, "bob", BOBS_HI);
    await hasMessage(bob, "bob", BOBS_HI);
    for (const page of [ann, bob]) {
      const ids = (await listOf(page)).filter((m) => m.kind === "message").map((m) => m.id);
      assert.deepEqual(ids, [...ids].sort(), `${page.name}: messages in id order`);
      assert.equal(new Set(ids).size, ids.length, `${page.name}: each message once`);
      assert.equal((await listOf(page)).filter((m) => m.kind === "pending").length, 0, `${page.name}: nothing left pending`);
    }
  });

  test('"… is typing" appears while the other one types and goes away when they stop or send', async () => {
    await bob.focus("#message-input");
    await bob.keyboard.type("I am writ");
    await typingIs(ann, "bob is typing…");
    await bob.keyboard.press("ControlOrMeta+A");
    await bob.keyboard.press("Backspace");
    await typingIs(ann, "");

    await bob.keyboard.type("Done typing");
    await typingIs(ann, "bob is typing…");
    await bob.keyboard.press("Enter");
    await hasMessage(ann, "bob", "Done typing");
    await typingIs(ann, "");
    assert.equal(await bob.textContent("#typing"), "", "nobody is typing for bob");
  });

  test('"load older messages" pages back through get_history to the beginning of the room', async () => {
    const storedIds = async () => (await listOf(ann)).filter((m) => m.kind === "message" && m.author?.startsWith("archivist")).map((m) => m.id);
    const before = new Set(await storedIds());
    // First page: 50 more (100 were shown), and there are still older ones.
    await ann.focus("#older-button");
    await ann.keyboard.press("Enter");
    await waitUntil(ann, "150 stored messages", () => document.querySelectorAll("#messages > li.message[data-author^=archivist]").length === 150);
    const afterOne = await storedIds();
    assert.deepEqual(afterOne, [...afterOne].sort(), "in id order");
    assert.ok([...before].every((id) => afterOne.includes(id)), "the older ones came in addition");
    assert.equal(await ann.isVisible("#older-button"), true, "more pages remain");
    // Second page: the last 10, then the beginning of the room.
    await ann.click("#older-button");
    await waitUntil(ann, `all ${SEEDED} stored messages`, (n) => document.querySelectorAll("#messages > li.message[data-author^=archivist]").length === n, SEEDED);
    const all = await storedIds();
    assert.deepEqual(all, seeded.map((m) => m.id).sort(), "every stored message once, in id order");
    await waitUntil(ann, "the beginning of the room", () => document.querySelector("#older-button").hidden && !document.querySelector("#older-end").hidden);
    await ann.click("#message-input");
  });

  test("a dropped connection shows, reconnects through the load balancer and fills in what was missed (since)", async (t) => {
    const lbUrl = need("CHATIFY_LB_URL");
    stoppedGateway = await gatewayOf(ann.context(), lbUrl);
    // Ann's network goes: her gateway stops, and her reconnection attempts fail until it is back.
    const offline = /\/socket\.io\//;
    await ann.context().route(offline, (route) => route.abort("internetdisconnected"));
    try {
      await dropAndRecover(t, offline);
    } finally {
      await ann.context().unroute(offline);
    }
    await script("up.sh", [stoppedGateway]);
    stoppedGateway = undefined;
    await bothGatewaysInRotation(need("CHATIFY_LB_URL"));
  });

  /** The outage itself, while ann's Socket.IO requests fail (route), and the recovery. */
  async function dropAndRecover(t, offline) {
    const lbUrl = need("CHATIFY_LB_URL");
    await script("down.sh", [stoppedGateway]);
    await hasState(ann, "reconnecting");
    assert.match(await ann.textContent("#conn-banner"), /Reconnecting/);
    assert.equal(await ann.isVisible("#conn-banner"), true, "the outage is announced");
    assert.equal(await ann.isDisabled("#send-button"), true, "no sending while disconnected");

    // Bob, on the other gateway, sees her leave and writes to her meanwhile. A gateway that shuts
    // down announces its members' departures at once; should that announcement be lost, the other
    // gateway drops them after gateway.gateway_timeout_ms (7 s) without heartbeats: wait for that
    // too, and say so.
    const leftAt = Date.now();
    await hasNotice(bob, "ann has left the chat room", 12_000);
    const leftMs = Date.now() - leftAt;
    if (leftMs > 3000) t.diagnostic(`bob saw ann leave only after ${leftMs} ms: the stopped gateway's departure notice did not arrive, the heartbeat timeout removed her`);
    await hasUsers(bob, ["bob"]);
    const missed = "You missed this while you were away";
    await bob.fill("#message-input", missed);
    await bob.press("#message-input", "Enter");
    await hasMessage(bob, "bob", missed);
    assert.equal(await ann.$$eval("#messages .text", (t, m) => t.some((n) => n.textContent === m), missed), false, "ann cannot have it yet");

    // Meanwhile bob edits his earlier message (in place, keyboard) and reacts to ann's (mouse).
    const bobsHi = await idOf(bob, "bob", BOBS_HI);
    const annsHello = await idOf(bob, "ann", HELLO);
    const hiEdited = `${BOBS_HI} (edited while you were away)`;
    await act(bob, bobsHi, "edit-button", { keyboard: true });
    await waitUntil(bob, "the edit box, focused, with the text", (t) => document.activeElement?.dataset.testid === "edit-input" && document.activeElement.value === t, BOBS_HI);
    await bob.keyboard.press("ControlOrMeta+A");
    await bob.keyboard.type(hiEdited);
    await bob.keyboard.press("Enter");
    await textIs(bob, bobsHi, hiEdited);
    assert.equal(await itemOf(bob, bobsHi).locator('[data-testid="edited-mark"]').isVisible(), true, "bob's page says (edited)");
    await act(bob, annsHello, "react-button", { emoji: "🎉" });
    await countIs(bob, annsHello, "🎉", 1);
    await textIs(ann, bobsHi, BOBS_HI); // ann's page, offline, still has the old text
    await hasState(ann, "reconnecting");

    // The network is back: the page reconnects (to the gateway that is left) and rejoins with
    // `since`, which brings the missed message.
    await ann.context().unroute(offline);
    await hasState(ann, "connected", 15_000);
    await hasMessage(ann, "bob", missed);
    await hasNotice(ann, "Reconnected: 1 missed message.");
    // The join's `changes` bring bob's edit and reaction made while she was away.
    await textIs(ann, bobsHi, hiEdited);
    assert.equal(await itemOf(ann, bobsHi).locator('[data-testid="edited-mark"]').isVisible(), true, "ann's page says (edited)");
    await countIs(ann, annsHello, "🎉", 1);
    // What `since` filled in arrived while she was away: a "New" divider right above it; the
    // page is in view, so no unread count stays.
    const missedId = await idOf(ann, "bob", missed);
    assert.equal(
      await ann.$eval(`#messages > li[data-id="${missedId}"]`, (li) => li.previousElementSibling?.dataset.testid),
      "new-divider",
      "the New divider sits right above the missed message",
    );
    assert.equal(await ann.$$eval('[data-testid="new-divider"]', (d) => d.length), 1, "one divider");
    assert.deepEqual(await unreadOf(ann), { badge: "", title: `${room} · Chatify` }, "seen at once");
    await hasUsers(ann, ["ann", "bob"]);
    await hasNotice(bob, "ann has joined the chat room");
    assert.equal(await ann.isVisible("#conn-banner"), false, "the outage notice is gone");
    assert.notEqual(await gatewayOf(ann.context(), lbUrl), stoppedGateway, "reconnected to the other gateway");
    const texts = (await listOf(ann)).filter((m) => m.kind === "message").map((m) => m.text);
    assert.equal(texts.filter((t) => t === missed).length, 1, "the missed message once");
    assert.equal(texts.length, SEEDED + 4, "every message of the room, once");
    assert.equal((await listOf(ann)).filter((m) => m.kind === "notice" && m.text.endsWith("Welcome ann")).length, 1, "no second welcome");

    await ann.keyboard.type("Back again, thanks bob");
    await ann.keyboard.press("Enter");
    await hasMessage(bob, "ann", "Back again, thanks bob");
  }

  test("reply, edit in place, delete and react: each window sees the other's changes live", async (t) => {
    const back = "Back again, thanks bob";
    const backId = await idOf(ann, "ann", back);

    // Reply (bob, mouse): the composer says what he replies to; Escape cancels, Reply again, send.
    await act(bob, backId, "reply-button");
    await waitUntil(bob, "the reply bar", () => !document.querySelector('[data-testid="reply-bar"]').hidden);
    assert.equal(await bob.textContent('[data-testid="reply-bar"] #reply-text'), `Replying to ann: ${back}`);
    assert.equal(await bob.evaluate(() => document.activeElement?.id), "message-input", "the message box has focus");
    await bob.keyboard.press("Escape");
    assert.equal(await bob.isVisible('[data-testid="reply-bar"]'), false, "Escape cancels the reply");
    await act(bob, backId, "reply-button");
    await bob.keyboard.type("Welcome back!");
    await bob.keyboard.press("Enter");
    await hasMessage(ann, "bob", "Welcome back!");
    await hasMessage(bob, "bob", "Welcome back!");
    assert.equal(await bob.isVisible('[data-testid="reply-bar"]'), false, "the reply bar goes once sent");
    const welcomeId = await idOf(ann, "bob", "Welcome back!");
    for (const page of [ann, bob]) assert.equal(await quoteOf(page, welcomeId), `ann${back}`, `${page.name}: the reply quotes ann's message`);

    // A reply to a message older than bob's page holds (another client, on bob's gateway, answers
    // the newest stored message bob's page never loaded; ann's page paged back to it).
    const bobHolds = new Set((await listOf(bob)).map((m) => m.id));
    const older = [...seeded].sort((a, b) => (a.id < b.id ? -1 : 1)).filter((m) => !bobHolds.has(m.id)).at(-1);
    assert.ok(older, "bob's page holds only the newest 100 stored messages");
    const bobsGateway = await gatewayOf(bob.context(), need("CHATIFY_LB_URL"));
    const carolUrl = ENV[`CHATIFY_${bobsGateway.toUpperCase()}_URL`] ?? need("CHATIFY_LB_URL");
    const carol = io(carolUrl, { transports: ["websocket"], reconnection: false, timeout: WAIT_MS });
    try {
      assert.equal((await carol.timeout(WAIT_MS).emitWithAck("join_room", { username: "carol", room })).ok, true);
      const old = await carol.timeout(WAIT_MS).emitWithAck("send_message", { room, message: "About an older message…", replyTo: older.id });
      assert.equal(old.ok, true, JSON.stringify(old));
      await hasMessage(bob, "carol", "About an older message…");
      assert.equal(await quoteOf(bob, old.id), "Reply to an older message", "bob's page does not hold it");
      await hasMessage(ann, "carol", "About an older message…");
      assert.equal(await quoteOf(ann, old.id), `${older.author}${older.text}`, "ann's page paged back to it");

      // Edit (ann, keyboard): Escape cancels, then Enter saves; both pages show the text and "(edited)".
      await ann.focus("#message-input");
      await ann.keyboard.type("Tpyo here");
      await ann.keyboard.press("Enter");
      await hasMessage(bob, "ann", "Tpyo here");
      const typoId = await idOf(ann, "ann", "Tpyo here");
      assert.equal(await itemOf(bob, typoId).locator('[data-testid="edit-button"]').isHidden(), true, "bob cannot edit ann's message");
      assert.equal(await itemOf(bob, typoId).locator('[data-testid="delete-button"]').isHidden(), true, "nor delete it");
      await act(ann, typoId, "edit-button", { keyboard: true });
      await waitUntil(ann, "the edit box", () => document.activeElement?.dataset.testid === "edit-input");
      await ann.keyboard.type(" and more");
      await ann.keyboard.press("Escape");
      assert.equal(await itemOf(ann, typoId).locator('[data-testid="edit-input"]').count(), 0, "Escape closes the box");
      await textIs(ann, typoId, "Tpyo here");
      await act(ann, typoId, "edit-button", { keyboard: true });
      await waitUntil(ann, "the edit box", () => document.activeElement?.dataset.testid === "edit-input");
      await ann.keyboard.press("ControlOrMeta+A");
      await ann.keyboard.type("Typo fixed");
      await ann.keyboard.press("Enter");
      for (const page of [ann, bob]) {
        await textIs(page, typoId, "Typo fixed");
        assert.equal(await itemOf(page, typoId).locator('[data-testid="edited-mark"]').isVisible(), true, `${page.name}: (edited)`);
      }
      assert.equal(await itemOf(ann, typoId).locator('[data-testid="edit-input"]').count(), 0, "the box closes once saved");

      // React: bob 👍 (mouse) → ann sees 1; ann adds hers on the count (keyboard) → 2 on both;
      // bob's second click takes his back → 1 on both, his button no longer pressed.
      await act(bob, typoId, "react-button", { emoji: "👍" });
      await countIs(ann, typoId, "👍", 1);
      await countIs(bob, typoId, "👍", 1);
      await itemOf(ann, typoId).locator('.reactions button[data-emoji="👍"]').focus();
      await ann.keyboard.press("Enter");
      await countIs(bob, typoId, "👍", 2);
      await countIs(ann, typoId, "👍", 2);
      assert.equal(await itemOf(ann, typoId).locator('.reactions button[data-emoji="👍"]').getAttribute("aria-pressed"), "true");
      await act(bob, typoId, "react-button", { emoji: "👍" });
      await countIs(ann, typoId, "👍", 1);
      await countIs(bob, typoId, "👍", 1);
      assert.equal(await itemOf(bob, typoId).locator('.actions [data-emoji="👍"]').getAttribute("aria-pressed"), "false");
      assert.equal(await itemOf(ann, typoId).locator('.actions [data-emoji="👍"]').getAttribute("aria-pressed"), "true");
      await act(bob, typoId, "react-button", { emoji: "❤️" });
      await countIs(ann, typoId, "❤️", 1);

      // Delete (ann, mouse, with a confirmation): both pages say so; bob's reply quotes "a deleted message".
      await act(ann, backId, "delete-button");
      await ann.click(`#messages > li[data-id="${backId}"] [data-testid="delete-confirm"]`);
      for (const page of [ann, bob]) {
        await textIs(page, backId, "This message was deleted");
        await waitUntil(page, "the reply's quote of the deleted message", (i) => document.querySelector(`#messages > li[data-id="${i}"] [data-testid="quote"]`)?.textContent === "Reply to a deleted message", welcomeId);
        assert.equal(await itemOf(page, backId).locator(".actions").count(), 0, `${page.name}: no actions on a deleted message`);
      }

      // An error answer shows in the error banner: carol puts 20 distinct emoji on her message (the
      // most a message carries), so bob's 👍, a 21st, is refused.
      const many = ["🍎", "🍐", "🍊", "🍋", "🍌", "🍉", "🍇", "🍓", "🫐", "🍒", "🍑", "🥭", "🍍", "🥥", "🥝", "🍅", "🥑", "🥦", "🥕", "🌽"];
      const acks = await Promise.all(many.map((emoji) => carol.timeout(WAIT_MS).emitWithAck("react", { room, id: old.id, emoji, add: true })));
      assert.ok(acks.every((a) => a.ok), JSON.stringify(acks.find((a) => !a.ok)));
      await waitUntil(bob, "20 reactions under carol's message", (i) => document.querySelectorAll(`#messages > li[data-id="${i}"] .reactions button`).length === 20, old.id, 10_000);
      await act(bob, old.id, "react-button", { emoji: "👍" });
      await waitUntil(bob, "the refused reaction in the error banner", () => {
        const banner = document.querySelector("#error-banner");
        return !banner.hidden && /Reaction not added: .*invalid_payload/.test(banner.textContent);
      });
      await countIs(bob, old.id, "👍", 0);
      assert.equal(await itemOf(bob, old.id).locator('.actions [data-emoji="👍"]').getAttribute("aria-pressed"), "false");
      await bob.click("#error-dismiss");
    } finally {
      carol.disconnect();
    }
    await hasNotice(ann, "carol has left the chat room");
  });

  test("a hidden page counts what arrives in the title and the room header and marks it New", async () => {
    const titleOf = `${room} · Chatify`;
    assert.deepEqual(await unreadOf(bob), { badge: "", title: titleOf });
    await setHidden(bob, true);
    for (const text of ["Are you there?", "Hello?"]) {
      await ann.focus("#message-input");
      await ann.keyboard.type(text);
      await ann.keyboard.press("Enter");
      await hasMessage(bob, "ann", text);
    }
    await waitUntil(bob, "2 unread", (t) => document.title === `(2) ${t}`, titleOf);
    assert.deepEqual(await unreadOf(bob), { badge: "2 new", title: `(2) ${titleOf}` });
    assert.deepEqual(await unreadOf(ann), { badge: "", title: titleOf }, "ann's page is in view: nothing unread");
    const firstId = await idOf(bob, "ann", "Are you there?");
    const dividerAbove = () => bob.$eval(`#messages > li[data-id="${firstId}"]`, (li) => li.previousElementSibling?.dataset.testid);
    assert.equal(await dividerAbove(), "new-divider", "New above the first message that arrived while hidden");
    assert.equal(await bob.$$eval('[data-testid="new-divider"]', (d) => d.length), 1, "one divider");
    // Its own messages do not count.
    await bob.fill("#message-input", "(from my pocket)");
    await bob.press("#message-input", "Enter");
    await hasMessage(ann, "bob", "(from my pocket)");
    assert.equal((await unreadOf(bob)).badge, "2 new");

    await setHidden(bob, false);
    await waitUntil(bob, "the count cleared", (t) => document.title === t, titleOf);
    assert.deepEqual(await unreadOf(bob), { badge: "", title: titleOf });
    assert.equal(await dividerAbove(), "new-divider", "the divider stays once seen");
  });

  test("the phone-sized window fits its width; screenshots are saved", async () => {
    const fit = await bob.evaluate(() => ({
      scroll: document.documentElement.scrollWidth,
      width: window.innerWidth,
      messages: document.querySelector("#scroller").scrollWidth - document.querySelector("#scroller").clientWidth,
      send: document.querySelector("#send-button").getBoundingClientRect().right,
    }));
    assert.ok(fit.scroll <= fit.width && fit.messages <= 0, `no sideways scrolling: ${JSON.stringify(fit)}`);
    assert.ok(fit.send <= fit.width, `the send button is on screen: ${JSON.stringify(fit)}`);

    // The picture: bob starts typing an answer.
    await bob.focus("#message-input");
    await bob.keyboard.type("See you");
    await typingIs(ann, "bob is typing…");
    const desktop = path.join(ARTIFACTS, "chat-page.png");
    await ann.screenshot({ path: desktop });
    await bob.screenshot({ path: path.join(ARTIFACTS, "chat-page-phone.png") });
    assert.ok(fs.statSync(desktop).size > 10_000, "a real screenshot");
    if (process.env.CHATIFY_UPDATE_DOCS_SCREENSHOT === "1") {
      fs.mkdirSync(path.join(REPO, "docs"), { recursive: true });
      fs.copyFileSync(desktop, path.join(REPO, "docs", "chat-page.png"));
    }
    assert.deepEqual(pageErrors, [], "no uncaught errors in the pages");
  });

  test("an error answer is shown, and the failed message can be sent again", async () => {
    // Far more sends at once than the per-connection burst (40): the gateway answers rate_limited.
    await bob.fill("#message-input", "");
    const sent = await bob.evaluate((n) => {
      const input = document.querySelector("#message-input");
      for (let i = 1; i <= n; i++) {
        input.value = `burst ${i}`;
        input.dispatchEvent(new KeyboardEvent("keydown", { key: "Enter", bubbles: true, cancelable: true }));
      }
      return n;
    }, 60);
    await waitUntil(bob, "a visible rate_limited error", () => {
      const banner = document.querySelector("#error-banner");
      return !banner.hidden && /rate_limited/.test(banner.textContent);
    });
    await waitUntil(bob, "every send answered", () => document.querySelectorAll("#messages li.pending:not(.failed)").length === 0);
    const failed = await bob.$$eval("#messages li.failed", (items) => items.map((li) => li.querySelector(".text").textContent));
    assert.ok(failed.length >= 1 && failed.length < sent, `some sends were refused: ${failed.length}`);
    assert.match(await bob.textContent("#messages li.failed .status"), /not sent: .*rate_limited/);
    const overflow = await bob.$eval("#scroller", (s) => s.scrollWidth - s.clientWidth);
    assert.ok(overflow <= 0, `failed messages fit the phone-sized window (${overflow}px too wide)`);

    // Retry (keyboard: Tab-reachable button) once the rate allows it: the message goes through, once.
    await bob.click("#error-dismiss");
    assert.equal(await bob.isVisible("#error-banner"), false);
    await new Promise((resolve) => setTimeout(resolve, 1100)); // the send rate refills (20 a second)
    await bob.click(`#messages li.failed button`);
    await hasMessage(ann, "bob", failed[0]);
    await hasMessage(bob, "bob", failed[0]);
    assert.equal(await bob.isVisible("#error-banner"), false, "no new error");
  });
});

