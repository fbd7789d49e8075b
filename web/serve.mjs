#!/usr/bin/env node
// Serves Chatify's chat page: the files of public/, socket.io-client's ESM build from
// node_modules (npm ci first) and a small generated /config.json telling the page where the load
// balancer is. No dependencies beyond Node's own modules.
//
//   node web/serve.mjs            http://localhost:3000 (deploy/local/up.sh starts it as "web")
//
// Environment (defaults in brackets):
//   CHATIFY_WEB_HOST [127.0.0.1]   address to listen on (0.0.0.0 in a container)
//   CHATIFY_WEB_PORT [3000]        port to listen on; the gateways must allow this origin
//   CHATIFY_LB_PORT  [4000]        the load balancer's port: the page connects to the host it was
//                                  loaded from, on this port (http://localhost:4000 for
//                                  http://localhost:3000), so HAProxy's sticky cookie is same-site
//   CHATIFY_WEB_SERVER_URL         a full Socket.IO server URL instead (e.g. https://chat.example.com)
import { createReadStream, promises as fs } from "node:fs";
import http from "node:http";
import path from "node:path";
import { fileURLToPath } from "node:url";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const PUBLIC_DIR = path.join(HERE, "public");
const CLIENT_DIST = path.join(HERE, "node_modules", "socket.io-client", "dist");

const host = process.env.CHATIFY_WEB_HOST || "127.0.0.1";
const port = parsePort("CHATIFY_WEB_PORT", 3000);
const lbPort = parsePort("CHATIFY_LB_PORT", 4000);
const serverUrl = process.env.CHATIFY_WEB_SERVER_URL || null;
if (serverUrl) {
  try {
    const u = new URL(serverUrl);
    if (!/^https?:$/.test(u.protocol)) throw new Error("not http(s)");
  } catch (e) {
    fail(`CHATIFY_WEB_SERVER_URL must be an http(s) URL, not '${serverUrl}' (${e.message})`);
  }
}

function fail(message) {
  console.error(`serve.mjs: ${message}`);
  process.exit(2);
}

function parsePort(name, fallback) {
  const raw = process.env[name];
  if (raw === undefined || raw === "") return fallback;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 1 || n > 65535) fail(`${name} must be a port number (1-65535), not '${raw}'`);
  return n;
}

const TYPES = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".json": "application/json; charset=utf-8",
  ".map": "application/json; charset=utf-8",
  ".svg": "image/svg+xml",
  ".png": "image/png",
  ".ico": "image/x-icon",
};

// The page only loads its own files and talks to the Socket.IO server (another port, so another
// origin: connect-src names the schemes rather than one host).
const SECURITY_HEADERS = {
  "X-Content-Type-Options": "nosniff",
  "Referrer-Policy": "no-referrer",
  "X-Frame-Options": "DENY",
  "Content-Security-Policy":
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; " +
    "connect-src 'self' http: https: ws: wss:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
};

/** URL path → file on disk, or undefined. Never leaves PUBLIC_DIR (or the client's dist). */
function resolveFile(pathname) {
  if (pathname === "/") return path.join(PUBLIC_DIR, "index.html");
  const vendor = /^\/vendor\/(socket\.io\.esm\.min\.js(?:\.map)?)$/.exec(pathname);
  if (vendor) return path.join(CLIENT_DIST, vendor[1]);
  let decoded;
  try {
    decoded = decodeURIComponent(pathname);
  } catch {
    return undefined;
  }
  if (decoded.includes("\0")) return undefined;
  const file = path.resolve(PUBLIC_DIR, `.${path.posix.normalize(decoded)}`);
  return file.startsWith(PUBLIC_DIR + path.sep) ? file : undefined;
}

function send(res, status, type, body, extra = {}) {
  res.writeHead(status, { "Content-Type": type, "Content-Length": Buffer.byteLength(body), "Cache-Control": "no-store", ...SECURITY_HEADERS, ...extra });
  res.end(res.req.method === "HEAD" ? undefined : body);
}

const server = http.createServer(async (req, res) => {
  const started = Date.now();
  res.on("finish", () => {
    if (res.statusCode >= 400) console.log(`${new Date().toISOString()} ${req.method} ${req.url} ${res.statusCode} ${Date.now() - started}ms`);
  });
  if (req.method !== "GET" && req.method !== "HEAD") {
    send(res, 405, "text/plain; charset=utf-8", "method not allowed\n", { Allow: "GET, HEAD" });
    return;
  }
  let pathname;
  try {
    pathname = new URL(req.url, "http://localhost").pathname;
  } catch {
    send(res, 400, "text/plain; charset=utf-8", "bad request\n");
    return;
  }
  if (pathname === "/healthz") {
    send(res, 200, "text/plain; charset=utf-8", "ok\n");
    return;
  }
  if (pathname === "/config.json") {
    send(res, 200, TYPES[".json"], `${JSON.stringify({ serverUrl, lbPort })}\n`);
    return;
  }
  const file = resolveFile(pathname);
  let stat;
  try {
    if (!file) throw new Error("outside");
    stat = await fs.stat(file);
    if (!stat.isFile()) throw new Error("not a file");
  } catch {
    send(res, 404, "text/plain; charset=utf-8", "not found\n");
    return;
  }
  res.writeHead(200, {
    "Content-Type": TYPES[path.extname(file)] ?? "application/octet-stream",
    "Content-Length": stat.size,
    "Cache-Control": "no-cache",
    "Last-Modified": stat.mtime.toUTCString(),
    ...SECURITY_HEADERS,
  });
  if (req.method === "HEAD") {
    res.end();
    return;
  }
  createReadStream(file)
    .on("error", () => res.destroy())
    .pipe(res);
});

// The page cannot work without the client library: say so at start, not on the first visit.
try {
  await fs.access(path.join(CLIENT_DIST, "socket.io.esm.min.js"));
} catch {
  fail(`${path.join(CLIENT_DIST, "socket.io.esm.min.js")} is missing: run npm ci in ${HERE}`);
}

server.on("error", (e) => fail(`cannot listen on ${host}:${port}: ${e.message}`));
server.listen(port, host, () => {
  const shown = host === "0.0.0.0" || host === "127.0.0.1" || host === "::" ? "localhost" : host;
  console.log(
    `chat page on http://${shown}:${port} (listening on ${host}:${port}); Socket.IO server: ` +
      (serverUrl ?? `the page's host, port ${lbPort}`),
  );
});

for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => {
    server.close();
    server.closeAllConnections();
    process.exit(0);
  });
}
