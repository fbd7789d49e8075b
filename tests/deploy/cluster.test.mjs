// The NATS cluster set (issue 21): deploy/local/up.sh with CHATIFY_NATS_NODES=3
// CHATIFY_PERSISTERS=2, docker compose and Kubernetes describe the same set (three NATS nodes,
// streams replicated three ways, two persisters, every node's URL, the same users), and the fault
// harness runs that set; then up.sh's NATS cluster for real, on free loopback ports in a
// temporary run dir (the three nodes only: no HarperDB, no binaries).
import assert from "node:assert/strict";
import { execFileSync, spawn, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, describe, test } from "node:test";
import { parseYamlDocuments, parseYamlFile, readRepo, repoPath, shellArray, upComponents } from "./helpers.mjs";

const [compose] = parseYamlDocuments(readRepo("deploy/docker-compose.yml"), "compose", { version: "1.2", merge: true });
const [natsValues] = parseYamlFile("deploy/kubernetes/nats-values.yaml");
const k8s = (name) => parseYamlFile(`deploy/kubernetes/${name}`);
const libSh = readRepo("deploy/local/lib.sh");
const PATH = `${process.env.PATH}:/usr/local/sbin:/usr/sbin:/sbin`;

/** The literals of kustomization.yaml's chatify-config, as a Map. */
function kustomizeConfig() {
  const [kustomization] = k8s("kustomization.yaml");
  const generator = kustomization.configMapGenerator.find((g) => g.name === "chatify-config");
  return new Map(generator.literals.map((l) => [l.slice(0, l.indexOf("=")), l.slice(l.indexOf("=") + 1)]));
}

describe("the cluster set is the same everywhere", () => {
  const natsNodes = upComponents(3, 2).filter((c) => /^nats\d*$/.test(c));
  const persisters = upComponents(3, 2).filter((c) => /^persister\d*$/.test(c));

  test("three NATS nodes: up.sh's cluster, compose's services, the chart's replicas", () => {
    assert.deepEqual(natsNodes, shellArray(libSh, "CHATIFY_NATS_NODE_NAMES"));
    assert.equal(natsNodes.length, 3);
    assert.deepEqual(Object.keys(compose.services).filter((n) => /^nats\d*$/.test(n)), natsNodes);
    assert.equal(natsValues.config.cluster.enabled, true);
    assert.equal(natsValues.config.cluster.replicas, natsNodes.length);
    assert.equal(natsValues.config.jetstream.enabled, true);
  });

  test("two persisters: up.sh's CHATIFY_PERSISTERS=2, compose's services, the Deployment's replicas", () => {
    assert.deepEqual(persisters, ["persister", "persister2"]);
    assert.deepEqual(Object.keys(compose.services).filter((n) => /^persister\d*$/.test(n)), persisters);
    const [deployment] = k8s("persister-deployment.yaml");
    assert.equal(deployment.spec.replicas, persisters.length);
  });

  test("streams replicated on every node, and every node's URL, in compose and Kubernetes", () => {
    const config = kustomizeConfig();
    assert.equal(Number(config.get("CHATIFY_STREAM__REPLICAS")), natsNodes.length);
    assert.equal(config.get("CHATIFY_NATS__URL").split(",").length, natsNodes.length);
    for (const name of [...persisters, "persister-setup", "gateway1", "gateway2"]) {
      const env = compose.services[name].environment;
      assert.equal(Number(env.CHATIFY_STREAM__REPLICAS), natsNodes.length, name);
      assert.equal(env.CHATIFY_NATS__URL.split(",").length, natsNodes.length, name);
    }
  });

  test("the users and permissions of every NATS node are deploy/nats/permissions.conf's", () => {
    for (const name of natsNodes) {
      const volumes = compose.services[name].volumes.map((v) => v.split(":")[0]);
      for (const file of ["./nats/nats.conf", "./nats/permissions.conf", "./nats/start.sh"]) assert.ok(volumes.includes(file), `${name} ${file}`);
    }
    // Kubernetes: one set of values for all three servers (nats-auth.test.mjs compares the lists).
    assert.deepEqual(natsValues.config.merge.authorization.users.map((u) => u.user).sort(), ["chatify-gateway", "chatify-persister"]);
  });

  test("the fault harness runs this set for the cluster scenarios", () => {
    const run = readRepo("tests/faults/run.mjs");
    assert.match(run, /cluster: \{ natsNodes: 3, persisters: 2 \}/);
    assert.match(readRepo("scripts/faults.sh"), /export CHATIFY_NATS_NODES=3 CHATIFY_PERSISTERS=2/);
    for (const scenario of ["nats-node-loss", "nats-rolling-restart", "persister-pair"]) {
      assert.match(readRepo(`tests/faults/scenarios/${scenario}.mjs`), /system: "cluster"/, scenario);
    }
  });
});

describe("up.sh's NATS cluster (CHATIFY_NATS_NODES=3), for real", () => {
  const runDir = mkdtempSync(path.join(os.tmpdir(), "chatify-cluster-test-"));
  const ports = execFileSync(process.execPath, [repoPath("scripts/free-ports.mjs"), "9"], { encoding: "utf8" }).trim().split("\n");
  const names = [
    "CHATIFY_NATS_PORT", "CHATIFY_NATS_MONITOR_PORT", "CHATIFY_NATS_CLUSTER_PORT",
    "CHATIFY_NATS2_PORT", "CHATIFY_NATS2_MONITOR_PORT", "CHATIFY_NATS2_CLUSTER_PORT",
    "CHATIFY_NATS3_PORT", "CHATIFY_NATS3_MONITOR_PORT", "CHATIFY_NATS3_CLUSTER_PORT",
  ];
  const portEnv = Object.fromEntries(names.map((n, i) => [n, ports[i]]));
  const env = { PATH, HOME: process.env.HOME ?? "/root", CHATIFY_RUN_DIR: runDir, CHATIFY_NATS_NODES: "3", ...portEnv };
  const script = (name, args = [], extra = {}) =>
    spawnSync(repoPath(`deploy/local/${name}`), args, { encoding: "utf8", env: { ...env, ...extra }, stdio: ["ignore", "pipe", "pipe"], timeout: 180_000 });
  const pid = (node) => readFileSync(path.join(runDir, "pids", `${node}.pid`), "utf8").trim();
  const get = async (port, what) => (await fetch(`http://127.0.0.1:${port}${what}`, { signal: AbortSignal.timeout(3000) })).json();
  after(() => {
    script("down.sh");
    rmSync(runDir, { recursive: true, force: true });
  });

  test("starts three nodes that form one JetStream cluster, routes on loopback with the route user", async () => {
    const up = script("up.sh", ["nats", "nats2", "nats3"]);
    assert.equal(up.status, 0, `${up.stdout}\n${up.stderr}`);
    for (const node of ["nats", "nats2", "nats3"]) assert.match(up.stdout, new RegExp(`${node}: ready`));
    const jsz = await get(portEnv.CHATIFY_NATS_MONITOR_PORT, "/jsz");
    assert.equal(jsz.meta_cluster.name, "chatify");
    assert.equal(jsz.meta_cluster.cluster_size, 3);
    assert.ok(jsz.meta_cluster.leader, "a meta leader");
    const routez = await get(portEnv.CHATIFY_NATS2_MONITOR_PORT, "/routez");
    assert.equal(routez.num_routes, 2, JSON.stringify(routez));
    const varz = await get(portEnv.CHATIFY_NATS3_MONITOR_PORT, "/varz");
    assert.equal(varz.server_name, "nats3");
    assert.equal(varz.cluster.addr, "127.0.0.1", "routes listen on loopback only");
    assert.equal(varz.cluster.cluster_port, Number(portEnv.CHATIFY_NATS3_CLUSTER_PORT));
    // The effective config requires the route user; its password was generated into secrets/.
    const conf = readFileSync(path.join(runDir, "data", "nats3.conf"), "utf8");
    const password = readFileSync(path.join(runDir, "secrets", "nats-cluster-password"), "utf8").trim();
    assert.ok(conf.includes(`authorization {user: "chatify-route", password: "${password}"}`));
    // Each node its own store.
    for (const node of ["nats", "nats2", "nats3"]) assert.ok(existsSync(path.join(runDir, "data", node, "jetstream")), node);
  });

  test("a server without the route password does not join", async () => {
    const [client, route] = execFileSync(process.execPath, [repoPath("scripts/free-ports.mjs"), "2"], { encoding: "utf8" }).trim().split("\n");
    const rogue = spawn("nats-server", ["-a", "127.0.0.1", "-p", client, "--cluster_name", "chatify", "--cluster", `nats://127.0.0.1:${route}`,
      "--routes", `nats://127.0.0.1:${portEnv.CHATIFY_NATS_CLUSTER_PORT}`], { env: { PATH }, stdio: ["ignore", "ignore", "pipe"] });
    let log = "";
    rogue.stderr.on("data", (d) => (log += d));
    try {
      const deadline = Date.now() + 10_000;
      while (!/authorization violation/i.test(log) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
      assert.match(log, /authorization violation/i, "the cluster refuses the route");
      const routez = await get(portEnv.CHATIFY_NATS_MONITOR_PORT, "/routez");
      assert.equal(routez.num_routes, 2, "only the two other nodes are routed to nats");
    } finally {
      rogue.kill("SIGKILL");
    }
  });

  test("records the set and every node's addresses in the env file", () => {
    const text = readFileSync(path.join(runDir, "env"), "utf8");
    const urls = ["CHATIFY_NATS_PORT", "CHATIFY_NATS2_PORT", "CHATIFY_NATS3_PORT"].map((p) => `nats://127.0.0.1:${portEnv[p]}`).join(",");
    assert.ok(text.includes(`export CHATIFY_NATS_NODES='3'`));
    assert.ok(text.includes(`export CHATIFY_PERSISTERS='1'`));
    assert.ok(text.includes(`export CHATIFY_NATS_URLS='${urls}'`));
    assert.ok(text.includes(`export CHATIFY_NATS2_MONITOR_URL='http://127.0.0.1:${portEnv.CHATIFY_NATS2_MONITOR_PORT}'`));
    assert.ok(text.includes(`export CHATIFY_NATS3_CLUSTER_PORT='${portEnv.CHATIFY_NATS3_CLUSTER_PORT}'`));
    assert.ok(!text.includes("nats-route://") && !text.includes("CLUSTER_PASSWORD"), "the route password stays in secrets/");
  });

  test("a second up.sh starts nothing twice; up.sh nats2 restarts that node alone; another shape is refused", () => {
    const before = ["nats", "nats2", "nats3"].map(pid);
    const again = script("up.sh", ["nats", "nats2", "nats3"]);
    assert.equal(again.status, 0, again.stderr);
    assert.equal((again.stdout.match(/already running/g) ?? []).length, 3);
    assert.deepEqual(["nats", "nats2", "nats3"].map(pid), before);
    const down = script("down.sh", ["nats2"]);
    assert.equal(down.status, 0, down.stderr);
    assert.ok(!existsSync(path.join(runDir, "pids", "nats2.pid")));
    const up = script("up.sh", ["nats2"]);
    assert.equal(up.status, 0, `${up.stdout}\n${up.stderr}`);
    assert.match(up.stdout, /nats2: ready/);
    assert.notEqual(pid("nats2"), before[1]);
    assert.equal(pid("nats"), before[0]);
    // The run dir remembers CHATIFY_NATS_NODES=3: without it, up.sh still knows nats2.
    const { CHATIFY_NATS_NODES: _, ...withoutNodes } = env;
    const remembered = spawnSync(repoPath("deploy/local/up.sh"), ["nats2"], { encoding: "utf8", env: withoutNodes, stdio: ["ignore", "pipe", "pipe"] });
    assert.equal(remembered.status, 0, remembered.stderr);
    const single = script("up.sh", ["nats"], { CHATIFY_NATS_NODES: "1" });
    assert.notEqual(single.status, 0);
    assert.match(single.stderr, /runs NATS with CHATIFY_NATS_NODES=3, not 1/);
  });

  test("down.sh stops exactly the three nodes", () => {
    const pids = ["nats", "nats2", "nats3"].map(pid);
    const down = spawnSync(repoPath("deploy/local/down.sh"), [], { encoding: "utf8", env: { PATH, CHATIFY_RUN_DIR: runDir }, stdio: ["ignore", "pipe", "pipe"] });
    assert.equal(down.status, 0, down.stderr);
    for (const [i, node] of ["nats", "nats2", "nats3"].entries()) {
      assert.match(down.stdout, new RegExp(`${node}: stopped \\(PID ${pids[i]}\\)`));
      assert.ok(!existsSync(`/proc/${pids[i]}`) || readFileSync(`/proc/${pids[i]}/stat`, "utf8").includes(") Z"), node);
    }
  });
});
