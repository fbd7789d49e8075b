// web/serve.mjs on its own (no browser, no Chatify system): what it serves and what it refuses.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import net from "node:net";
import path from "node:path";
import { after, before, describe, test } from "node:test";
import { fileURLToPath } from "node:url";

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
const SERVE = path.join(REPO, "web", "serve.mjs");

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** Starts serve.mjs with extra environment; resolves { child, base, output() } once it listens. */
async function start(env) {
  const port = await freePort();
  const child = spawn(process.execPath, [SERVE], {
    env: { PATH: process.env.PATH, CHATIFY_WEB_PORT: String(port), ...env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let output = "";
  child.stdout.on("data", (d) => (output += d));
  child.stderr.on("data", (d) => (output += d));
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`serve.mjs did not start: ${output}`)), 5000);
    child.stdout.on("data", () => {
      if (output.includes("chat page on")) {
        clearTimeout(timer);
        resolve();
      }
    });
    child.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`serve.mjs exited (${code}): ${output}`));
    });
  });
  return { child, base: `http://127.0.0.1:${port}`, output: () => output };
}

function exited(child) {
  return new Promise((resolve) => child.once("exit", (code) => resolve(code)));
}

describe("web/serve.mjs", () => {
  let server;
  before(async () => {
    server = await start({ CHATIFY_LB_PORT: "4555" });
  });
  after(async () => {
    if (server && server.child.exitCode === null) {
      const gone = exited(server.child);
      server.child.kill("SIGTERM");
      assert.equal(await gone, 0, "exits 0 on SIGTERM");
    }
  });

  test("serves the page, its script and style, and socket.io-client's ESM build from node_modules", async () => {
    const page = await fetch(`${server.base}/`);
    assert.equal(page.status, 200);
    assert.match(page.headers.get("content-type"), /^text\/html/);
    assert.match(await page.text(), /<script type="module" src="app\.js"><\/script>/);
    for (const [file, type] of [
      ["/app.js", /^text\/javascript/],
      ["/style.css", /^text\/css/],
      ["/vendor/socket.io.esm.min.js", /^text\/javascript/],
    ]) {
      const res = await fetch(`${server.base}${file}`);
      assert.equal(res.status, 200, file);
      assert.match(res.headers.get("content-type"), type, file);
      assert.match(res.headers.get("content-security-policy"), /script-src 'self'/, file);
      assert.equal(res.headers.get("x-content-type-options"), "nosniff");
      const body = await res.text();
      if (file.startsWith("/vendor/")) assert.match(body, /export\s*\{/, "an ES module");
    }
    const head = await fetch(`${server.base}/app.js`, { method: "HEAD" });
    assert.equal(head.status, 200);
    assert.equal(await head.text(), "");
  });

  test("/config.json tells the page the load balancer's port; /healthz answers", async () => {
    const res = await fetch(`${server.base}/config.json`);
    assert.equal(res.status, 200);
    assert.deepEqual(await res.json(), { serverUrl: null, lbPort: 4555 });
    assert.equal((await fetch(`${server.base}/healthz`)).status, 200);
  });

  test("nothing outside public/ (nor other node_modules files), and only GET and HEAD", async () => {
    for (const p of ["/../serve.mjs", "/%2e%2e/serve.mjs", "/..%2fpackage.json", "/vendor/../../package.json", "/vendor/socket.io.js", "/nope.html", "/%00"]) {
      // fetch normalizes plain "..": send the raw path over a socket.
      const status = await rawStatus(server.base, p);
      assert.equal(status, 404, p);
    }
    const post = await fetch(`${server.base}/`, { method: "POST", body: "x" });
    assert.equal(post.status, 405);
    assert.equal(post.headers.get("allow"), "GET, HEAD");
  });

  test("CHATIFY_WEB_SERVER_URL names another Socket.IO server; a bad one or a bad port stops it at start", async () => {
    const other = await start({ CHATIFY_WEB_SERVER_URL: "https://chat.example.test" });
    try {
      assert.deepEqual(await (await fetch(`${other.base}/config.json`)).json(), { serverUrl: "https://chat.example.test", lbPort: 4000 });
    } finally {
      other.child.kill("SIGTERM");
      await exited(other.child);
    }
    for (const env of [{ CHATIFY_WEB_SERVER_URL: "ftp://x" }, { CHATIFY_WEB_PORT: "70000" }]) {
      const child = spawn(process.execPath, [SERVE], { env: { PATH: process.env.PATH, CHATIFY_WEB_PORT: "1", ...env }, stdio: "ignore" });
      assert.equal(await exited(child), 2, JSON.stringify(env));
    }
  });
});

function rawStatus(base, rawPath) {
  const { hostname, port } = new URL(base);
  return new Promise((resolve, reject) => {
    const socket = net.connect(Number(port), hostname, () => socket.write(`GET ${rawPath} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`));
    let data = "";
    socket.on("data", (d) => (data += d));
    socket.on("end", () => resolve(Number(/^HTTP\/1\.1 (\d{3})/.exec(data)?.[1])));
    socket.on("error", reject);
  });
}
