// deploy/docker-compose.yml cannot run here (no Docker engine): these checks keep it in
// agreement with what does run, deploy/local/up.sh and lib.sh, by parsing both — the
// components (compose runs up.sh's cluster set: CHATIFY_NATS_NODES=3 CHATIFY_PERSISTERS=2),
// ports, CHATIFY_* names, the shared HAProxy and NATS configuration files, the NATS cluster,
// and the chat page (web/serve.mjs) with the origins the gateways allow for it.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { cpSync, existsSync, mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { describe, test } from "node:test";
import {
  caseLabels,
  caseMatches,
  dockerfile,
  parseYamlDocuments,
  portOf,
  configTable,
  readRepo,
  repoPath,
  shellArray,
  shellAssignment,
  shellChatifyNames,
  shellDefaults,
  shellFunction,
  upComponents,
} from "./helpers.mjs";

const COMPOSE = "deploy/docker-compose.yml";
const composeText = readRepo(COMPOSE);
// Compose reads YAML 1.2 with merge keys (`<<: *anchor`).
const [compose] = parseYamlDocuments(composeText, COMPOSE, { version: "1.2", merge: true });
const services = compose.services;
const upSh = readRepo("deploy/local/up.sh");
const libSh = readRepo("deploy/local/lib.sh");
const haproxyCfg = readRepo("deploy/haproxy/haproxy.cfg");
const natsConf = readRepo("deploy/nats/nats.conf");
const serveMjs = readRepo("web/serve.mjs");
const WEB_DOCKERFILE = "deploy/docker/web.Dockerfile";
const config = configTable();

const components = shellArray(libSh, "CHATIFY_COMPONENTS");
// The set compose describes: up.sh with CHATIFY_NATS_NODES=3 CHATIFY_PERSISTERS=2.
const CLUSTER = { natsNodes: 3, persisters: 2 };
const clusterComponents = upComponents(CLUSTER.natsNodes, CLUSTER.persisters);
const natsServices = clusterComponents.filter((c) => /^nats\d*$/.test(c));
const persisterServices = clusterComponents.filter((c) => /^persister\d*$/.test(c));
const defaults = shellDefaults(libSh);
const shellNames = shellChatifyNames(upSh, libSh);
const defaultPort = (name) => {
  assert.ok(defaults.has(name), `lib.sh sets no default for ${name}`);
  return Number(defaults.get(name));
};

/** A compose service's `environment` as a Map (both the map and the list forms). */
function environment(service) {
  const env = service.environment ?? {};
  if (Array.isArray(env)) {
    return new Map(env.map((e) => [e.split("=")[0], e.includes("=") ? e.slice(e.indexOf("=") + 1) : undefined]));
  }
  return new Map(Object.entries(env).map(([k, v]) => [k, v === null ? undefined : String(v)]));
}

/** `$CHATIFY_REPO/x` (lib.sh) → an absolute path. */
const libPath = (name) => path.resolve(shellAssignment(libSh, name).replace("$CHATIFY_REPO", repoPath()));

/** The host side of a compose bind mount, resolved against the compose file's directory. */
function mounts(service) {
  return (service.volumes ?? []).map((v) => {
    const [source, target] = typeof v === "string" ? v.split(":") : [v.source, v.target];
    const bind = source.startsWith(".") || source.startsWith("/");
    return { source: bind ? path.resolve(repoPath("deploy"), source) : source, target, bind };
  });
}

/** The NAME=value settings one shell function passes on (printf lines or `env NAME=...` words). */
function shellSettings(body) {
  const settings = new Map();
  // "NAME=value", NAME="value" or NAME=value
  for (const m of body.matchAll(/"([A-Z][A-Z0-9_]*)=([^"]*)"|\b([A-Z][A-Z0-9_]*)=(?:"([^"]*)"|([^\s"]*))/g)) {
    settings.set(m[1] ?? m[3], m[2] ?? m[4] ?? m[5]);
  }
  return settings;
}

describe("docker-compose.yml", () => {
  test("parses as YAML, project chatify", () => {
    assert.equal(compose.name, "chatify");
    assert.equal(typeof services, "object");
  });

  test("has exactly the components up.sh's cluster set starts, and up.sh handles each", () => {
    assert.deepEqual(components, ["nats", "harperdb", "persister", "gateway1", "gateway2", "lb", "web"]);
    assert.deepEqual(clusterComponents, ["nats", "nats2", "nats3", "harperdb", "persister", "persister2", "gateway1", "gateway2", "lb", "web"]);
    assert.deepEqual(upComponents(), components, "the default set");
    for (const fn of ["start_component", "probe", "component_ports"]) {
      const labels = caseLabels(shellFunction(upSh, fn));
      for (const c of upComponents(3, 9)) assert.ok(labels.some((l) => caseMatches(l, c)), `up.sh ${fn}() has no arm for ${c}`);
      for (const l of labels) assert.ok(upComponents(3, 9).some((c) => caseMatches(l, c)), `up.sh ${fn}(): ${l} is no component`);
    }
    // persister-setup: up.sh's setup_harperdb, which it runs before every start of a persister.
    assert.deepEqual(Object.keys(services).sort(), [...clusterComponents, "persister-setup"].sort());
    assert.ok(/chatify-persister" setup/.test(shellFunction(upSh, "setup_harperdb")));
    assert.ok(/^\s*setup_harperdb "\$name"$/m.test(shellFunction(upSh, "start_persister")));
    assert.deepEqual(services["persister-setup"].command, ["setup"]);
  });

  test("publishes up.sh's default ports, on 127.0.0.1 only (web 3000, lb 4000, gateway1 4001, gateway2 4002)", () => {
    const ports = shellFunction(upSh, "component_ports");
    const published = {};
    for (const [name, service] of Object.entries(services)) {
      for (const p of service.ports ?? []) {
        const [ip, host, container] = String(p).split(":");
        assert.equal(ip, "127.0.0.1", `${name} publishes ${p} beyond loopback`);
        // up.sh's port variable for this component: `name) echo "$VAR" ;;`
        const variable = new RegExp(`^\\s*${name}\\) echo "\\$(\\w+)`, "m").exec(ports)?.[1];
        assert.ok(variable, `up.sh component_ports has no port for ${name}`);
        assert.equal(Number(host), defaultPort(variable), `${name}: ${p} vs ${variable}`);
        published[name] = Number(host);
        const env = environment(service);
        const listens =
          name === "lb"
            ? portOf(env.get("CHATIFY_LB_BIND"))
            : name === "web"
              ? Number(env.get("CHATIFY_WEB_PORT"))
              : Number(env.get("CHATIFY_GATEWAY__PORT"));
        assert.equal(Number(container), listens, `${name} publishes ${container} but listens on ${listens}`);
      }
    }
    assert.deepEqual(published, { lb: 4000, gateway1: 4001, gateway2: 4002, web: 3000 });
  });

  test("each binary gets the same CHATIFY_* settings from compose as from up.sh", () => {
    const names = (fn) => [...shellSettings(shellFunction(upSh, fn)).keys()].filter((n) => n.startsWith("CHATIFY_"));
    const common = names("binary_env");
    const persister = [...names("persister_settings"), ...names("start_persister")];
    const gatewaySettings = [...names("gateway_settings"), ...names("start_gateway")];
    assert.deepEqual(common, ["CHATIFY_NATS__URL", "CHATIFY_STREAM__REPLICAS"]);
    // Each its own credentials: the gateways none for HarperDB, nobody the HarperDB admin's but setup.
    assert.ok(persister.includes("CHATIFY_NATS__PASSWORD") && persister.includes("CHATIFY_HARPERDB__PASSWORD"));
    assert.ok(gatewaySettings.includes("CHATIFY_NATS__PASSWORD") && !gatewaySettings.includes("CHATIFY_HARPERDB__PASSWORD"));
    const setup = names("setup_harperdb");
    assert.deepEqual(setup.sort(), ["CHATIFY_HARPERDB__ADMIN_PASSWORD", "CHATIFY_HARPERDB__ADMIN_USERNAME"]);
    const expected = {
      persister: [...common, ...persister],
      persister2: [...common, ...persister],
      "persister-setup": [...common, ...persister.filter((n) => !n.startsWith("CHATIFY_PERSISTER__")), ...setup],
      gateway1: [...common, ...gatewaySettings],
      gateway2: [...common, ...gatewaySettings],
    };
    for (const [name, names] of Object.entries(expected)) {
      const got = [...environment(services[name]).keys()].filter((n) => n.startsWith("CHATIFY_"));
      assert.deepEqual(got.sort(), [...new Set(names)].sort(), name);
    }
    for (const name of ["gateway1", "gateway2"]) {
      const env = environment(services[name]);
      assert.equal(env.get("CHATIFY_GATEWAY__NAME"), name, "each gateway is named after its component, as in up.sh");
      assert.equal(env.get("CHATIFY_GATEWAY__HOST"), "0.0.0.0");
      // The other gateway reaches it by its service name, on its own port.
      assert.equal(env.get("CHATIFY_GATEWAY__ADVERTISE_ADDRESS"), `${name}:${env.get("CHATIFY_GATEWAY__PORT")}`);
      assert.equal(Number(env.get("CHATIFY_GATEWAY__PORT")), defaultPort(`CHATIFY_${name.toUpperCase()}_PORT`));
    }
    // Each persister in its own container, all on up.sh's first persister port.
    for (const name of persisterServices) {
      const p = environment(services[name]);
      assert.equal(p.get("CHATIFY_PERSISTER__HOST"), "0.0.0.0");
      assert.equal(Number(p.get("CHATIFY_PERSISTER__PORT")), defaultPort("CHATIFY_PERSISTER_PORT"));
    }
  });

  test("the binaries reach every NATS node and HarperDB by service name, on the ports up.sh and the configs use", () => {
    // up.sh gives every node's URL (nats_client_urls), and one stream replica per node.
    assert.match(shellFunction(upSh, "binary_env"), /"CHATIFY_NATS__URL=\$\(nats_client_urls\)"/);
    assert.match(shellFunction(upSh, "binary_env"), /"CHATIFY_STREAM__REPLICAS=\$\{CHATIFY_STREAM__REPLICAS:-\$CHATIFY_NATS_NODES\}"/);
    for (const name of [...persisterServices, "persister-setup", "gateway1", "gateway2"]) {
      const env = environment(services[name]);
      const urls = env.get("CHATIFY_NATS__URL").split(",").map((u) => new URL(u));
      assert.deepEqual(urls.map((u) => u.hostname), natsServices, `${name}: every NATS node's URL, in order`);
      for (const nats of urls) {
        assert.equal(Number(nats.port), defaultPort("CHATIFY_NATS_PORT"));
        assert.equal(Number(nats.port), Number(/^port:\s*(\d+)/m.exec(natsConf)?.[1]), "nats.conf port");
      }
      assert.equal(Number(env.get("CHATIFY_STREAM__REPLICAS")), natsServices.length, `${name}: a replica on every node`);
      if (name.startsWith("gateway")) {
        assert.ok(!env.has("CHATIFY_HARPERDB__URL"), `${name} gets no HarperDB settings`);
        continue;
      }
      const hdb = new URL(env.get("CHATIFY_HARPERDB__URL"));
      assert.equal(hdb.hostname, "harperdb");
      assert.equal(Number(hdb.port), defaultPort("CHATIFY_HDB_PORT"));
      assert.equal(Number(hdb.port), Number(environment(services.harperdb).get("OPERATIONSAPI_NETWORK_PORT")));
    }
    assert.equal(Number(/^http_port:\s*(\d+)/m.exec(natsConf)?.[1]), defaultPort("CHATIFY_NATS_MONITOR_PORT"));
    assert.equal(Number(environment(services.harperdb).get("HTTP_PORT")), defaultPort("CHATIFY_HDB_HTTP_PORT"));
  });

  test("every CHATIFY_* name compose uses is a documented config key or a variable of up.sh/lib.sh", () => {
    const names = new Set();
    for (const service of Object.values(services)) {
      for (const name of environment(service).keys()) if (name.startsWith("CHATIFY_")) names.add(name);
    }
    // ${NAME}, ${NAME:-default}, ${NAME:?message} interpolated from deploy/.env
    for (const m of composeText.matchAll(/\$\{(CHATIFY_[A-Z0-9_]+)/g)) names.add(m[1]);
    assert.ok(names.size >= 10, `only ${names.size} names found`);
    const unknown = [...names].filter((n) => !config.has(n) && !shellNames.has(n));
    assert.deepEqual(unknown, []);
    // The lists are real: a misspelt name is caught.
    assert.ok(!config.has("CHATIFY_GATEWAY_PORT") && !shellNames.has("CHATIFY_GATEWAY_PORT"));
  });

  test("HarperDB: the version, settings and admin user of up.sh's installer", () => {
    const version = shellAssignment(libSh, "CHATIFY_HDB_VERSION");
    assert.equal(services.harperdb.image, `harperdb/harperdb:${version}`);
    const installer = shellSettings(shellFunction(upSh, "install_harperdb_instance"));
    const env = environment(services.harperdb);
    for (const name of ["TC_AGREEMENT", "HDB_ADMIN_USERNAME", "HDB_ADMIN_PASSWORD", "OPERATIONSAPI_NETWORK_PORT", "HTTP_PORT", "THREADS_COUNT"]) {
      assert.ok(installer.has(name), `up.sh's installer does not set ${name}`);
      assert.ok(env.has(name), `compose's harperdb does not set ${name}`);
    }
    // Same literal values; where up.sh passes a variable, compose uses it too or its default.
    for (const [name, value] of installer) {
      const variable = /^\$\{?([A-Z0-9_]+)\}?$/.exec(value)?.[1];
      if (!variable) {
        assert.equal(env.get(name), value, `harperdb ${name}`);
      } else if (defaults.has(variable) && !env.get(name).includes(variable)) {
        assert.equal(env.get(name), defaults.get(variable), `harperdb ${name} vs ${variable}'s default`);
      } else {
        assert.ok(env.get(name).startsWith(`\${${variable}`), `harperdb ${name} should come from ${variable}`);
      }
    }
    // The admin user is the one setup logs in with (and only setup), defaulting like lib.sh; the
    // persister's own user defaults like lib.sh and docs/configuration.md.
    const setup = environment(services["persister-setup"]);
    const persister = environment(services.persister);
    assert.equal(env.get("HDB_ADMIN_USERNAME"), setup.get("CHATIFY_HARPERDB__ADMIN_USERNAME"));
    assert.equal(env.get("HDB_ADMIN_PASSWORD"), setup.get("CHATIFY_HARPERDB__ADMIN_PASSWORD"));
    assert.equal(env.get("HDB_ADMIN_USERNAME"), `\${CHATIFY_HDB_ADMIN_USERNAME:-${defaults.get("CHATIFY_HDB_ADMIN_USERNAME")}}`);
    assert.ok(!persister.has("CHATIFY_HARPERDB__ADMIN_PASSWORD"), "the persister never gets the admin's password");
    assert.equal(persister.get("CHATIFY_HARPERDB__USERNAME"), `\${CHATIFY_HARPERDB__USERNAME:-${defaults.get("CHATIFY_HARPERDB__USERNAME")}}`);
    assert.equal(config.get("CHATIFY_HARPERDB__USERNAME").default, defaults.get("CHATIFY_HARPERDB__USERNAME"));
    assert.ok(mounts(services.harperdb).some((m) => !m.bind && m.target === "/home/harperdb/hdb"), "HarperDB data volume");
  });

  test("lb and up.sh use the same haproxy.cfg, and both set every variable it expands", () => {
    const cfg = libPath("CHATIFY_HAPROXY_CFG");
    assert.equal(cfg, repoPath("deploy/haproxy/haproxy.cfg"));
    assert.ok(/haproxy\b.*-f "\$CHATIFY_HAPROXY_CFG"/.test(shellFunction(upSh, "start_lb")));
    const mount = mounts(services.lb).find((m) => m.source === cfg);
    assert.ok(mount, "compose's lb does not mount deploy/haproxy/haproxy.cfg");
    // The official haproxy image reads this path.
    assert.equal(mount.target, "/usr/local/etc/haproxy/haproxy.cfg");

    const expanded = [...new Set([...haproxyCfg.matchAll(/"\$\{([A-Z0-9_]+)\}"/g)].map((m) => m[1]))];
    assert.deepEqual(expanded.sort(), ["CHATIFY_GATEWAY1_ADDR", "CHATIFY_GATEWAY2_ADDR", "CHATIFY_LB_BIND"]);
    const composeEnv = environment(services.lb);
    const upEnv = shellSettings(shellFunction(upSh, "lb_env"));
    for (const name of expanded) {
      assert.ok(composeEnv.has(name), `compose's lb does not set ${name}`);
      assert.ok(upEnv.has(name), `up.sh's lb_env does not set ${name}`);
    }
    // Compose's addresses name the gateway services and the ports they listen on.
    for (const gw of ["gateway1", "gateway2"]) {
      const address = composeEnv.get(`CHATIFY_${gw.toUpperCase()}_ADDR`);
      assert.equal(address, `${gw}:${environment(services[gw]).get("CHATIFY_GATEWAY__PORT")}`);
    }
    // haproxy.cfg's own defaults (presetenv) are up.sh's default addresses.
    const preset = new Map([...haproxyCfg.matchAll(/^\s*presetenv\s+(\S+)\s+(\S+)/gm)].map((m) => [m[1], m[2]]));
    assert.equal(preset.get("CHATIFY_LB_BIND"), `127.0.0.1:${defaultPort("CHATIFY_LB_PORT")}`);
    assert.equal(preset.get("CHATIFY_GATEWAY1_ADDR"), `127.0.0.1:${defaultPort("CHATIFY_GATEWAY1_PORT")}`);
    assert.equal(preset.get("CHATIFY_GATEWAY2_ADDR"), `127.0.0.1:${defaultPort("CHATIFY_GATEWAY2_PORT")}`);
  });

  test("every nats node and up.sh start nats-server the same way: deploy/nats/start.sh, nats.conf, JetStream on", () => {
    const conf = libPath("CHATIFY_NATS_CONF");
    assert.equal(conf, repoPath("deploy/nats/nats.conf"));
    const script = libPath("CHATIFY_NATS_START");
    assert.equal(script, repoPath("deploy/nats/start.sh"));
    const start = shellFunction(upSh, "start_nats");
    assert.match(start, /CHATIFY_NATS_SYNC="\$CHATIFY_NATS_SYNC"/);
    assert.match(start, /"\$CHATIFY_NATS_START" "\$CHATIFY_NATS_CONF" "\$DATA_DIR\/\$node.conf" -js /);
    const volumes = new Set();
    for (const name of natsServices) {
      const nats = services[name];
      const confMount = mounts(nats).find((m) => m.source === conf);
      assert.ok(confMount, `compose's ${name} does not mount deploy/nats/nats.conf`);
      const scriptMount = mounts(nats).find((m) => m.source === script);
      assert.ok(scriptMount, `compose's ${name} does not mount deploy/nats/start.sh`);
      assert.deepEqual(nats.entrypoint, ["/bin/sh", scriptMount.target]);
      // start.sh BASE_CONF EFFECTIVE_CONF nats-server-arguments...
      const command = nats.command;
      assert.equal(command[0], confMount.target, "start.sh's base config is the mounted nats.conf");
      assert.ok(command.includes("-js"));
      assert.equal(environment(nats).get("CHATIFY_NATS_SYNC"), "${CHATIFY_NATS_SYNC:-default}");
      // Both give the store directory on the command line (nats.conf must not: see its comment).
      assert.ok(command.includes("-sd") && start.includes("-sd"));
      // Each node its own store, as up.sh's $DATA_DIR/NODE.
      const data = mounts(nats).find((m) => !m.bind && m.target === command[command.indexOf("-sd") + 1]);
      assert.ok(data, `${name} keeps its store on a volume`);
      volumes.add(data.source);
    }
    assert.equal(volumes.size, natsServices.length, "every node has a volume of its own");
    assert.match(start, /-sd "\$DATA_DIR\/\$node"/);
    assert.doesNotMatch(natsConf, /^\s*store_dir/m);
  });

  test("the NATS cluster: up.sh's and compose's nodes have the same names, cluster, routes and route user", () => {
    const start = shellFunction(upSh, "start_nats");
    const upCluster = shellSettings(start);
    // up.sh: the node's component name, lib.sh's cluster name, its route port on 127.0.0.1,
    // every node's route address, the generated route password.
    assert.equal(upCluster.get("CHATIFY_NATS_SERVER_NAME"), "$node");
    assert.equal(upCluster.get("CHATIFY_NATS_CLUSTER_NAME"), "$CHATIFY_NATS_CLUSTER_NAME");
    assert.equal(upCluster.get("CHATIFY_NATS_CLUSTER_LISTEN"), "127.0.0.1:${!cluster}", "routes on loopback only");
    assert.equal(upCluster.get("CHATIFY_NATS_ROUTES"), "$(nats_route_addresses)");
    assert.equal(upCluster.get("CHATIFY_NATS_CLUSTER_PASSWORD"), "$CHATIFY_NATS_CLUSTER_PASSWORD");
    assert.equal(shellArray(libSh, "CHATIFY_NATS_NODE_NAMES").join(" "), natsServices.join(" "));
    const clusterPort = defaultPort("CHATIFY_NATS_CLUSTER_PORT");
    for (const name of natsServices) {
      const env = environment(services[name]);
      assert.equal(env.get("CHATIFY_NATS_SERVER_NAME"), name, `${name} is named after its service, as up.sh names a node after its component`);
      assert.equal(env.get("CHATIFY_NATS_CLUSTER_NAME"), shellAssignment(libSh, "CHATIFY_NATS_CLUSTER_NAME"));
      assert.equal(env.get("CHATIFY_NATS_CLUSTER_LISTEN"), `0.0.0.0:${clusterPort}`);
      assert.deepEqual(env.get("CHATIFY_NATS_ROUTES").split(","), natsServices.map((n) => `${n}:${clusterPort}`), `${name}: a route to every node`);
      assert.equal(env.get("CHATIFY_NATS_CLUSTER_PASSWORD"), "${CHATIFY_NATS_CLUSTER_PASSWORD:?set CHATIFY_NATS_CLUSTER_PASSWORD in deploy/.env}");
      // Healthy as up.sh's probe of a cluster node: the full /healthz (meta leader, current).
      const health = services[name].healthcheck.test.join(" ");
      assert.ok(health.endsWith("http://127.0.0.1:8222/healthz"), health);
    }
    assert.match(shellFunction(upSh, "probe"), /if nats_clustered; then\s+http_ok "http:\/\/127\.0\.0\.1:\$\{!p\}\/healthz"\s+else/);
    // Only the NATS services get the route password.
    for (const [name, service] of Object.entries(services)) {
      if (natsServices.includes(name)) continue;
      assert.ok(!JSON.stringify(service.environment ?? {}).includes("CHATIFY_NATS_CLUSTER_PASSWORD"), name);
    }
  });

  test("every depends_on target has a health check and is waited for", () => {
    let edges = 0;
    for (const [name, service] of Object.entries(services)) {
      const deps = service.depends_on ?? {};
      assert.ok(!Array.isArray(deps), `${name}: depends_on as a list cannot wait for health`);
      for (const [target, { condition }] of Object.entries(deps)) {
        edges++;
        assert.ok(services[target], `${name} depends on unknown ${target}`);
        if (target === "persister-setup") {
          // A one-shot that must have succeeded, as up.sh's setup_harperdb before the persister.
          assert.equal(condition, "service_completed_successfully", `${name} → ${target}`);
          continue;
        }
        const test = services[target].healthcheck?.test;
        assert.ok(Array.isArray(test) && test.length > 1 && test[0] === "CMD", `${target} has no health check`);
        assert.equal(condition, "service_healthy", `${name} → ${target}`);
        // up.sh starts components in this order too.
        const order = (n) => clusterComponents.indexOf(n === "persister-setup" ? "persister" : n);
        assert.ok(order(target) < order(name), `${target} starts after ${name} in up.sh`);
      }
    }
    assert.ok(edges >= 6, `only ${edges} depends_on entries`);
  });

  test("built services name existing Dockerfile targets and the same build context", () => {
    const { stages } = dockerfile();
    const built = Object.entries(services).filter(([, s]) => s.build && s.build.dockerfile !== WEB_DOCKERFILE);
    assert.deepEqual(built.map(([n]) => n).sort(), ["gateway1", "gateway2", "persister", "persister-setup", "persister2"]);
    assert.deepEqual(
      Object.entries(services).filter(([, s]) => s.build).map(([n]) => n).sort(),
      ["gateway1", "gateway2", "persister", "persister-setup", "persister2", "web"],
    );
    for (const [name, service] of built) {
      const context = path.resolve(repoPath("deploy"), service.build.context);
      assert.equal(context, repoPath(), `${name}: build context`);
      assert.ok(existsSync(path.join(context, service.build.dockerfile)), `${name}: ${service.build.dockerfile}`);
      assert.ok(stages.has(service.build.target), `${name}: no Dockerfile stage ${service.build.target}`);
      assert.equal(service.build.target, name.replace(/\d+$/, "").replace(/-setup$/, ""));
      if (name !== "persister-setup") assert.ok(service.healthcheck.test.includes(`chatify-${service.build.target}`));
    }
  });

  test("each Rust build stage copies a workspace cargo can load (every member and path dependency)", () => {
    const text = readRepo("deploy/docker/Dockerfile");
    const copied = new Map(); // stage -> sources copied from the build context
    let stage = null;
    for (const line of text.split("\n")) {
      const from = /^FROM\s+\S+\s+AS\s+(\S+)/i.exec(line);
      if (from) stage = from[1];
      const copy = /^COPY\s+(?!--from)(.+)$/i.exec(line);
      if (copy && stage) {
        const parts = copy[1].trim().split(/\s+/);
        copied.set(stage, [...(copied.get(stage) ?? []), ...parts.slice(0, -1)]);
      }
    }
    assert.deepEqual([...copied.keys()].sort(), ["builder", "planner"]);
    for (const [name, sources] of copied) {
      const dir = mkdtempSync(path.join(os.tmpdir(), `chatify-docker-${name}-`));
      try {
        for (const source of sources) cpSync(repoPath(source), path.join(dir, source), { recursive: true });
        // What `cargo chef prepare` and `cargo build --locked` do first: load the whole workspace
        // and resolve it (path patches included). Offline: the test command's clippy step has
        // fetched every crate already.
        execFileSync("cargo", ["tree", "--locked", "--offline", "--edges", "normal,build"], {
          cwd: dir,
          stdio: ["ignore", "ignore", "pipe"],
        });
      } catch (e) {
        assert.fail(`${name} stage: cargo cannot load the copied workspace: ${e.stderr ?? e.message}`);
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    }
  });

  test("web serves the chat page as up.sh does: web/serve.mjs, port 3000, the load balancer's port", () => {
    const start = shellFunction(upSh, "start_web");
    assert.match(start, /node "\$CHATIFY_WEB_DIR\/serve\.mjs"/, "up.sh runs web/serve.mjs");
    assert.equal(path.resolve(shellAssignment(libSh, "CHATIFY_WEB_DIR").replace("$CHATIFY_REPO", repoPath())), repoPath("web"));
    const upEnv = shellSettings(start);
    const env = environment(services.web);
    assert.deepEqual([...upEnv.keys()].sort(), [...env.keys()].sort(), "the same settings");
    assert.equal(upEnv.get("CHATIFY_WEB_HOST"), "127.0.0.1", "up.sh: loopback only");
    assert.equal(env.get("CHATIFY_WEB_HOST"), "0.0.0.0", "compose: reachable through the published port");
    assert.equal(Number(env.get("CHATIFY_WEB_PORT")), defaultPort("CHATIFY_WEB_PORT"));
    assert.equal(upEnv.get("CHATIFY_WEB_PORT"), "$CHATIFY_WEB_PORT");
    assert.equal(upEnv.get("CHATIFY_LB_PORT"), "$CHATIFY_LB_PORT");
    // The browser reaches the load balancer on the host, so the page is given its published port.
    const lbPublished = Number(String(services.lb.ports[0]).split(":")[1]);
    assert.equal(Number(env.get("CHATIFY_LB_PORT")), lbPublished);
    // serve.mjs's own defaults are lib.sh's.
    assert.equal(Number(/parsePort\("CHATIFY_WEB_PORT", (\d+)\)/.exec(serveMjs)?.[1]), defaultPort("CHATIFY_WEB_PORT"));
    assert.equal(Number(/parsePort\("CHATIFY_LB_PORT", (\d+)\)/.exec(serveMjs)?.[1]), defaultPort("CHATIFY_LB_PORT"));
    // Ready means /healthz answers, in both.
    assert.match(shellFunction(upSh, "probe"), /web\) http_ok "http:\/\/127\.0\.0\.1:\$CHATIFY_WEB_PORT\/healthz"/);
    assert.ok(services.web.healthcheck.test.join(" ").includes(`http://127.0.0.1:${env.get("CHATIFY_WEB_PORT")}/healthz`));
    assert.match(serveMjs, /pathname === "\/healthz"/);
  });

  test("the web image installs socket.io-client from the lock and runs serve.mjs", () => {
    const build = services.web.build;
    assert.equal(path.resolve(repoPath("deploy"), build.context), repoPath());
    assert.equal(build.dockerfile, WEB_DOCKERFILE);
    const text = readRepo(WEB_DOCKERFILE);
    assert.match(text, /^COPY web\/package\.json web\/package-lock\.json \.\/$/m);
    assert.match(text, /^RUN npm ci --omit=dev\b/m, "npm ci: socket.io-client from npm, as pinned");
    assert.doesNotMatch(text, /^COPY web\/? /m, "never the whole web/ folder (its node_modules)");
    assert.match(text, /^COPY web\/serve\.mjs /m);
    assert.match(text, /^COPY web\/public /m);
    assert.match(text, /^CMD \["node", "serve\.mjs"\]$/m);
    assert.match(text, /^EXPOSE 3000$/m);
    assert.match(text, /^USER node$/m, "not root");
    const lock = JSON.parse(readRepo("web/package-lock.json"));
    assert.equal(lock.packages["node_modules/socket.io-client"]?.version, JSON.parse(readRepo("web/package.json")).dependencies["socket.io-client"]);
  });

  test("the gateways allow the chat page's origin, in compose as in up.sh", () => {
    const documentedDefault = config.get("CHATIFY_CORS__ALLOWED_ORIGINS").default;
    assert.equal(documentedDefault, "http://localhost:3000");
    const webPort = Number(String(services.web.ports[0]).split(":")[1]);
    for (const name of ["gateway1", "gateway2"]) {
      const value = environment(services[name]).get("CHATIFY_CORS__ALLOWED_ORIGINS");
      const m = /^\$\{CHATIFY_CORS__ALLOWED_ORIGINS:-(.+)\}$/.exec(value);
      assert.ok(m, `${name}: the caller's CHATIFY_CORS__ALLOWED_ORIGINS wins, else a default (${value})`);
      const origins = m[1].split(",");
      assert.ok(origins.includes(documentedDefault), `${name} keeps the original client's origin`);
      assert.ok(origins.includes(`http://localhost:${webPort}`), `${name} allows the page on localhost:${webPort}`);
    }
    // up.sh's allowed_origins(), run by bash: the caller's value, else http://localhost:3000 plus
    // the page's origins on its port; with the default port, exactly compose's default.
    const origins = (webPort, callers = "") =>
      execFileSync("bash", ["-c", `allowed_origins() {\n${shellFunction(upSh, "allowed_origins")}}\nallowed_origins`], {
        env: { PATH: process.env.PATH, CHATIFY_WEB_PORT: String(webPort), CHATIFY_CORS__ALLOWED_ORIGINS: callers },
        encoding: "utf8",
      }).trim();
    const composeDefault = /:-(.+)\}$/.exec(environment(services.gateway1).get("CHATIFY_CORS__ALLOWED_ORIGINS"))[1];
    assert.equal(origins(defaultPort("CHATIFY_WEB_PORT")), composeDefault);
    assert.deepEqual(origins(45123).split(","), ["http://localhost:3000", "http://localhost:45123", "http://127.0.0.1:45123"]);
    assert.equal(origins(45123, "https://chat.example.test"), "https://chat.example.test", "the caller's value wins");
    assert.match(shellFunction(upSh, "start_gateway"), /CHATIFY_CORS__ALLOWED_ORIGINS="\$\(allowed_origins\)"/);
  });
});
