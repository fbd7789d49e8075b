// CHATIFY_NATS_SYNC, the one switch for JetStream's fsync (docs/guarantees.md): deploy/nats/start.sh
// runs the real nats-server with it, and these tests read back from the server's own /varz what
// it took. They need Debian's nats-server and the newer one deploy/local/install.sh fetches when
// the variable is set (scripts/test.sh installs it).
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, describe, test } from "node:test";
import { readRepo, repoPath, shellAssignment } from "./helpers.mjs";

const START = repoPath("deploy/nats/start.sh");
const BASE_CONF = repoPath("deploy/nats/nats.conf");
const libSh = readRepo("deploy/local/lib.sh");
const SYNC_BIN = path.join(
  shellAssignment(libSh, "CHATIFY_NATS_SYNC_DIR").replace("$CHATIFY_LOCAL_DIR", repoPath("deploy/local")),
  "nats-server",
);
const SYNC_VERSION = shellAssignment(libSh, "CHATIFY_NATS_SYNC_VERSION");
const PATH = `${process.env.PATH}:/usr/local/sbin:/usr/sbin:/sbin`;
// The NATS users' passwords start.sh requires (deploy/nats/permissions.conf; nats-auth.test.mjs).
const PASSWORDS = { CHATIFY_NATS_GATEWAY_PASSWORD: "gateway-test", CHATIFY_NATS_PERSISTER_PASSWORD: "persister-test" };

const tmp = mkdtempSync(path.join(os.tmpdir(), "chatify-nats-sync-"));
const children = [];
after(() => {
  for (const child of children) child.kill("SIGKILL");
  rmSync(tmp, { recursive: true, force: true });
});

async function freePorts(n) {
  const out = spawnSync(process.execPath, [repoPath("scripts/free-ports.mjs"), String(n)], { encoding: "utf8" });
  assert.equal(out.status, 0, out.stderr);
  return out.stdout.trim().split("\n").map(Number);
}

/** Runs start.sh to completion (for the refusals); returns its status and stderr. */
function startSync(sync, server) {
  const effective = path.join(tmp, `refused-${Math.random()}.conf`);
  const out = spawnSync("sh", [START, BASE_CONF, effective, "--version"], {
    encoding: "utf8",
    env: { PATH, ...PASSWORDS, CHATIFY_NATS_SYNC: sync, ...(server ? { NATS_SERVER: server } : {}) },
  });
  return { status: out.status, stderr: out.stderr, effective };
}

/** Starts nats-server through start.sh and waits for its monitor; returns /varz's jetstream.config. */
async function startServer(name, sync, server) {
  const [port, monitor] = await freePorts(2);
  const dir = path.join(tmp, name);
  const effective = path.join(tmp, `${name}.conf`);
  const env = { PATH, ...PASSWORDS, CHATIFY_NATS_SYNC: sync, ...(server ? { NATS_SERVER: server } : {}) };
  const args = [START, BASE_CONF, effective, "-js", "-a", "127.0.0.1", "-p", port, "-m", monitor, "-sd", dir];
  const child = spawn("sh", args.map(String), { env, stdio: ["ignore", "ignore", "pipe"] });
  children.push(child);
  let stderr = "";
  child.stderr.on("data", (d) => (stderr += d));
  const deadline = Date.now() + 10_000;
  while (Date.now() < deadline) {
    assert.equal(child.exitCode, null, `nats-server exited: ${stderr}`);
    try {
      const health = await fetch(`http://127.0.0.1:${monitor}/healthz?js-enabled-only=true`);
      if (health.ok) {
        const varz = await (await fetch(`http://127.0.0.1:${monitor}/varz`)).json();
        return { child, config: varz.jetstream.config, version: varz.version, effective };
      }
    } catch {
      // not listening yet
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`nats-server did not become healthy: ${stderr}`);
}

describe("CHATIFY_NATS_SYNC (deploy/nats/start.sh)", () => {
  test("default: Debian's nats-server runs nats.conf unchanged, with JetStream's own sync interval", async () => {
    const { config, version, effective } = await startServer("default", "default");
    assert.match(version, /^2\./);
    // nats.conf unchanged, then the users (nats-auth.test.mjs).
    assert.ok(readFileSync(effective, "utf8").startsWith(readFileSync(BASE_CONF, "utf8")));
    assert.doesNotMatch(readFileSync(effective, "utf8"), /^\s*sync_interval:/m);
    assert.notEqual(config.sync_always, true);
  });

  test("always: the newer nats-server fsyncs before every acknowledgement", async () => {
    assert.ok(existsSync(SYNC_BIN), `${SYNC_BIN} is missing: CHATIFY_NATS_SYNC=always deploy/local/install.sh installs it`);
    const { config, version, effective } = await startServer("always", "always", SYNC_BIN);
    assert.equal(version, SYNC_VERSION);
    assert.equal(config.sync_always, true);
    assert.match(readFileSync(effective, "utf8"), /^jetstream \{\n {2}sync_interval: always\n/m);
    // The rest of nats.conf still applies.
    assert.equal(config.max_storage, 10 * 1024 ** 3);
  });

  test("an interval: fsync that often", async () => {
    const { config } = await startServer("interval", "5s", SYNC_BIN);
    assert.notEqual(config.sync_always, true);
    assert.equal(config.sync_interval, 5e9, "sync_interval in nanoseconds");
  });

  const debian = spawnSync("nats-server", ["--version"], { encoding: "utf8", env: { PATH } }).stdout ?? "";
  const debianOld = /v2\.[0-9]\./.test(debian);
  test("a nats-server older than 2.10 is refused with the reason, not started", { skip: !debianOld && `nats-server on PATH is ${debian.trim()}` }, () => {
    const { status, stderr, effective } = startSync("always", "nats-server");
    assert.equal(status, 2);
    assert.match(stderr, /needs nats-server 2\.10 or later .* is 2\.9/);
    assert.equal(existsSync(effective), false);
  });

  test("a value that is no setting is refused", () => {
    for (const bad of ["sometimes", "0s", "10", "1s; rm -rf /", "-5s"]) {
      const { status, stderr } = startSync(bad, SYNC_BIN);
      assert.equal(status, 2, bad);
      assert.match(stderr, /CHATIFY_NATS_SYNC must be default, always or an interval/, bad);
    }
  });
});
