// NATS users and permissions: deploy/nats/permissions.conf is the one source; deploy/nats/start.sh
// (deploy/local/up.sh and docker compose) adds it with the two users to the effective config,
// and deploy/kubernetes/nats-values.yaml carries the same lists for the Helm chart. These checks
// keep the three in agreement, with each binary logging in as its own user everywhere, and with
// the names of shared/src/subjects.rs. (What the permissions allow and refuse is tested against a
// real nats-server in gateway/tests/nats_permissions.rs.)
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, statSync, existsSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, describe, test } from "node:test";
import { parseYamlDocuments, parseYamlFile, readRepo, repoPath, shellFunction } from "./helpers.mjs";

const PERMISSIONS = "deploy/nats/permissions.conf";
const USERS = { "chatify-gateway": "CHATIFY_GATEWAY_PERMISSIONS", "chatify-persister": "CHATIFY_PERSISTER_PERMISSIONS" };
const PASSWORD_VARS = { "chatify-gateway": "CHATIFY_NATS_GATEWAY_PASSWORD", "chatify-persister": "CHATIFY_NATS_PERSISTER_PASSWORD" };
const PATH = `${process.env.PATH}:/usr/local/sbin:/usr/sbin:/sbin`;

/** The `NAME = { ... }` blocks of permissions.conf (written as JSON), by name. */
function permissionBlocks(text = readRepo(PERMISSIONS)) {
  const code = text
    .split("\n")
    .filter((l) => !l.trimStart().startsWith("#"))
    .join("\n");
  const blocks = new Map();
  for (const m of code.matchAll(/^([A-Z_]+) = (\{[\s\S]*?^\})/gm)) blocks.set(m[1], JSON.parse(m[2]));
  return blocks;
}

const blocks = permissionBlocks();
const tmp = mkdtempSync(path.join(os.tmpdir(), "chatify-nats-auth-"));
after(() => rmSync(tmp, { recursive: true, force: true }));

describe("deploy/nats/permissions.conf", () => {
  test("holds one block per user, JSON that NATS reads", () => {
    assert.deepEqual([...blocks.keys()].sort(), Object.values(USERS).sort());
    for (const [name, block] of blocks) {
      assert.ok(block.publish.allow.length > 0 && block.subscribe.allow.length > 0, name);
      assert.deepEqual(Object.keys(block.publish), ["allow"], `${name}: only allow lists (everything else is denied)`);
    }
  });

  test("names the streams, consumer, subjects and inbox prefixes of shared/src/subjects.rs", () => {
    const rs = readRepo("shared/src/subjects.rs");
    const constant = (name) => new RegExp(`pub const ${name}: &str = "([^"]+)"`).exec(rs)?.[1];
    const text = readRepo(PERMISSIONS);
    for (const name of ["MESSAGES_STREAM", "DEAD_LETTER_STREAM", "PRESENCE_STREAM", "PERSISTER_CONSUMER", "HISTORY_SUBJECT",
      "GATEWAY_HEARTBEAT_SUBJECT", "GATEWAY_DEAD_SUBJECT", "HISTORY_SERVICE", "PRESENCE_STREAM_SUBJECTS"]) {
      const value = constant(name);
      assert.ok(value, `subjects.rs has no ${name}`);
      assert.ok(text.includes(value), `permissions.conf does not name ${name} (${value})`);
    }
    for (const prefix of rs.matchAll(/=> "(_INBOX_[a-z_]+)"/g)) {
      assert.ok(text.includes(`"${prefix[1]}.>"`), `permissions.conf does not name the inbox ${prefix[1]}`);
    }
    const gateway = blocks.get("CHATIFY_GATEWAY_PERMISSIONS");
    const persister = blocks.get("CHATIFY_PERSISTER_PERMISSIONS");
    // What the issue asks, in the lists themselves (the real server test proves the effect).
    assert.ok(!gateway.subscribe.allow.includes(constant("HISTORY_SUBJECT")), "a gateway may not answer history");
    assert.ok(!gateway.publish.allow.some((s) => /DELETE\.CHATIFY_(MESSAGES|DEAD)|PURGE\.CHATIFY_MESSAGES|STREAM\.(CREATE|UPDATE)\.CHATIFY_MESSAGES|chatify\.deadletter|\$JS\.ACK|chatify\.room\.\*\.msg/.test(s)), "gateway publish list");
    assert.ok(!persister.publish.allow.some((s) => /^chatify\.(store|room|presence|gateways)/.test(s)), "persister publish list");
    for (const block of [gateway, persister]) {
      assert.ok(!block.publish.allow.some((s) => /STREAM\.DELETE|\$JS\.API\.>|^>$/.test(s)), "nobody deletes streams");
    }
  });
});

describe("deploy/nats/start.sh with the users", () => {
  const start = (env, name) => {
    const effective = path.join(tmp, `${name}.conf`);
    const out = spawnSync("sh", [repoPath("deploy/nats/start.sh"), repoPath("deploy/nats/nats.conf"), effective, "-t"], {
      encoding: "utf8",
      env: { PATH, CHATIFY_NATS_SYNC: "default", ...env },
    });
    return { ...out, effective };
  };
  const passwords = { CHATIFY_NATS_GATEWAY_PASSWORD: "g-secret_1", CHATIFY_NATS_PERSISTER_PASSWORD: "p-secret_2" };

  test("writes nats.conf, permissions.conf and the two users, readable by its owner only, and nats-server takes it", () => {
    const { status, stderr, stdout, effective } = start(passwords, "valid");
    assert.equal(status, 0, `${stdout}${stderr}`);
    assert.match(stdout + stderr, /is valid/);
    const text = readFileSync(effective, "utf8");
    assert.ok(text.startsWith(readRepo("deploy/nats/nats.conf")));
    assert.ok(text.includes(readRepo(PERMISSIONS)));
    for (const [user, block] of Object.entries(USERS)) {
      const password = passwords[PASSWORD_VARS[user]];
      assert.ok(text.includes(`{user: "${user}", password: "${password}", permissions: $${block}}`), user);
    }
    assert.doesNotMatch(text, /no_auth_user/, "no anonymous user");
    assert.equal(statSync(effective).mode & 0o777, 0o600);
  });

  test("a cluster node: its name, the cluster, routes to every node that log in as chatify-route, and nats-server takes it", () => {
    const cluster = {
      ...passwords,
      CHATIFY_NATS_SERVER_NAME: "nats2",
      CHATIFY_NATS_CLUSTER_LISTEN: "127.0.0.1:16223",
      CHATIFY_NATS_ROUTES: "127.0.0.1:16222,127.0.0.1:16223,127.0.0.1:16224",
      CHATIFY_NATS_CLUSTER_PASSWORD: "r-secret_3",
    };
    const { status, stderr, stdout, effective } = start(cluster, "cluster");
    assert.equal(status, 0, `${stdout}${stderr}`);
    assert.match(stdout + stderr, /is valid/);
    const text = readFileSync(effective, "utf8");
    assert.match(text, /^server_name: "nats2"$/m);
    assert.match(text, /^  name: "chatify"$/m, "the default cluster name");
    assert.match(text, /^  listen: "127\.0\.0\.1:16223"$/m);
    assert.match(text, /^  authorization \{user: "chatify-route", password: "r-secret_3"\}$/m, "routes must log in");
    for (const port of [16222, 16223, 16224]) {
      assert.ok(text.includes(`"nats-route://chatify-route:r-secret_3@127.0.0.1:${port}"`), `route to ${port}`);
    }
    // Without the route password, or with one that breaks the route URLs, or routes alone: refused.
    for (const [name, env, message] of [
      ["no-password", { ...cluster, CHATIFY_NATS_CLUSTER_PASSWORD: "" }, /CHATIFY_NATS_CLUSTER_PASSWORD is not set/],
      ["at", { ...cluster, CHATIFY_NATS_CLUSTER_PASSWORD: "a@b" }, /may not contain '@'/],
      ["no-name", { ...cluster, CHATIFY_NATS_SERVER_NAME: "" }, /CHATIFY_NATS_SERVER_NAME/],
      ["no-routes", { ...cluster, CHATIFY_NATS_ROUTES: "" }, /CHATIFY_NATS_ROUTES is not set/],
      ["bad-route", { ...cluster, CHATIFY_NATS_ROUTES: "nats://x:1" }, /HOST:PORT/],
      ["routes-alone", { ...passwords, CHATIFY_NATS_ROUTES: "127.0.0.1:1" }, /without CHATIFY_NATS_CLUSTER_LISTEN/],
    ]) {
      const out = start(env, `cluster-${name}`);
      assert.equal(out.status, 2, name);
      assert.match(out.stderr, message, name);
    }
    // Without the cluster settings, no cluster block (a single server, as before).
    assert.doesNotMatch(readFileSync(start(passwords, "single").effective, "utf8"), /cluster \{|server_name/);
  });

  test("refuses to start without both passwords, or with one NATS would misread", () => {
    for (const missing of Object.keys(passwords)) {
      const { status, stderr, effective } = start({ ...passwords, [missing]: "" }, `missing-${missing}`);
      assert.equal(status, 2, missing);
      assert.match(stderr, new RegExp(`${missing} is not set`));
      assert.equal(existsSync(effective), false);
    }
    for (const bad of ['a"b', "a\\b", "a\nb"]) {
      const { status, stderr } = start({ ...passwords, CHATIFY_NATS_GATEWAY_PASSWORD: bad }, "bad");
      assert.equal(status, 2, JSON.stringify(bad));
      assert.match(stderr, /may not contain/);
    }
  });
});

describe("the same users everywhere", () => {
  test("Kubernetes: nats-values.yaml has the users of start.sh with the lists of permissions.conf", () => {
    const [values] = parseYamlFile("deploy/kubernetes/nats-values.yaml");
    const users = values.config.merge.authorization.users;
    assert.deepEqual(users.map((u) => u.user).sort(), Object.keys(USERS).sort());
    for (const u of users) {
      assert.deepEqual(u.permissions, blocks.get(USERS[u.user]), `${u.user}'s permissions differ from ${PERMISSIONS}`);
      const variable = /^<< \$([A-Z_]+) >>$/.exec(u.password)?.[1];
      assert.equal(variable, PASSWORD_VARS[u.user], `${u.user}'s password`);
      const ref = values.container.env[variable]?.valueFrom?.secretKeyRef;
      assert.equal(ref?.name, "chatify-secrets", variable);
      // The binary logging in as this user reads the same key of the same Secret.
      const workload = u.user === "chatify-gateway" ? "gateway-deployment.yaml" : "persister-deployment.yaml";
      const [deployment] = parseYamlFile(`deploy/kubernetes/${workload}`);
      const env = new Map(deployment.spec.template.spec.containers[0].env.map((e) => [e.name, e]));
      assert.equal(env.get("CHATIFY_NATS__USER").value, u.user, workload);
      assert.deepEqual(env.get("CHATIFY_NATS__PASSWORD").valueFrom.secretKeyRef, { name: ref.name, key: ref.key }, workload);
    }
  });

  test("compose: every nats node gets both passwords and permissions.conf beside nats.conf; each binary logs in as its user", () => {
    const [compose] = parseYamlDocuments(readRepo("deploy/docker-compose.yml"), "compose", { version: "1.2", merge: true });
    const natsNodes = Object.keys(compose.services).filter((n) => /^nats\d*$/.test(n));
    assert.deepEqual(natsNodes, ["nats", "nats2", "nats3"]);
    for (const name of natsNodes) {
      const nats = compose.services[name];
      const targets = nats.volumes.map((v) => v.split(":").slice(0, 2));
      assert.ok(targets.some(([src, dst]) => src === "./nats/permissions.conf" && dst === "/etc/nats/permissions.conf"), name);
      assert.ok(targets.some(([, dst]) => dst === "/etc/nats/nats.conf"), name);
      for (const variable of Object.values(PASSWORD_VARS)) assert.equal(nats.environment[variable], compose.services.nats.environment[variable], name);
    }
    const nats = compose.services.nats;
    const logins = { "chatify-gateway": ["gateway1", "gateway2"], "chatify-persister": ["persister", "persister2", "persister-setup"] };
    for (const [user, services] of Object.entries(logins)) {
      const variable = PASSWORD_VARS[user];
      assert.match(nats.environment[variable], new RegExp(`^\\$\\{${variable}:\\?`));
      for (const name of services) {
        const env = compose.services[name].environment;
        assert.equal(env.CHATIFY_NATS__USER, user, name);
        assert.equal(env.CHATIFY_NATS__PASSWORD, nats.environment[variable], name);
      }
    }
    // Only the nats service gets the other user's password.
    const gwEnv = JSON.stringify(compose.services.gateway1.environment);
    assert.ok(!gwEnv.includes("CHATIFY_NATS_PERSISTER_PASSWORD") && !gwEnv.includes("CHATIFY_HDB_ADMIN_PASSWORD"));
  });

  test("up.sh: start.sh gets both passwords, each binary its own user", () => {
    const upSh = readRepo("deploy/local/up.sh");
    const startNats = shellFunction(upSh, "start_nats");
    for (const variable of Object.values(PASSWORD_VARS)) assert.ok(startNats.includes(`${variable}="$${variable}"`), variable);
    assert.ok(shellFunction(upSh, "gateway_settings").includes('"CHATIFY_NATS__USER=chatify-gateway" "CHATIFY_NATS__PASSWORD=$CHATIFY_NATS_GATEWAY_PASSWORD"'));
    assert.ok(shellFunction(upSh, "persister_settings").includes('"CHATIFY_NATS__USER=chatify-persister" "CHATIFY_NATS__PASSWORD=$CHATIFY_NATS_PERSISTER_PASSWORD"'));
  });
});
