// The chat page (web/) in a real browser: two headless Chromium pages (Debian's chromium, driven
// by playwright-core) on the page deploy/local/up.sh serves, talking to the load balancer. They
// join one room from different gateways, chat, see each other type, page back through history,
// and one of them loses its connection (its gateway stops) and recovers what it missed.
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
      kind: li.classList.contains("notice") ? "notice" : li.classList.contains("pending") ? "pending" : "message",
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
  const seeded = []; // { id, text, createdTime } of the stored history
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
              return { id: res.id, text, createdTime: res.createdTime };
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
    const hello = "Hello bob! <b>this is not bold</b> & neither is <script>this</script>";
    await ann.keyboard.type(hello);
    await ann.keyboard.press("Enter");
    await hasMessage(bob, "ann", hello);
    await hasMessage(ann, "ann", hello);
    assert.equal(await bob.$$eval("#messages b, #messages script", (n) => n.length), 0, "user text is never HTML");
    const got = (await listOf(bob)).find((m) => m.text === hello);
    assert.ok(Math.abs(Date.parse(got.dateTime) - Date.now()) < 60_000, `time of the message: ${got.dateTime}`);
    assert.match(got.time, /^\d{2}:\d{2}$/);

    await bob.fill("#message-input", "Hi ann, bob here");
    await bob.click("#send-button");
    await hasMessage(ann, "bob", "Hi ann, bob here");
    await hasMessage(bob, "bob", "Hi ann, bob here");
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
    const storedIds = async () => (await listOf(ann)).filter((m) => m.kind === "message" && m.author.startsWith("archivist")).map((m) => m.id);
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
    await hasState(ann, "reconnecting");

    // The network is back: the page reconnects (to the gateway that is left) and rejoins with
    // `since`, which brings the missed message.
    await ann.context().unroute(offline);
    await hasState(ann, "connected", 15_000);
    await hasMessage(ann, "bob", missed);
    await hasNotice(ann, "Reconnected: 1 missed message.");
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

