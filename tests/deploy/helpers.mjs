// Shared helpers of the deploy checks: reading the repository's files, parsing YAML the way
// Kubernetes does, the configuration table of docs/configuration.md, and the few shell constructs of
// deploy/local/*.sh that the checks compare against.
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import YAML from "yaml";

// DEPLOY_TESTS_REPO points the checks at another copy of the repository (to see them fail on a
// deliberately broken copy); by default they read this one.
export const REPO = process.env.DEPLOY_TESTS_REPO
  ? path.resolve(process.env.DEPLOY_TESTS_REPO)
  : path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");

export const repoPath = (...parts) => path.join(REPO, ...parts);

export const readRepo = (rel) => readFileSync(repoPath(rel), "utf8");

/**
 * Parses every document of a YAML text; throws on any syntax error, duplicate key or warning.
 * Kubernetes (sigs.k8s.io/yaml) reads YAML 1.1, where an unquoted `yes`, `on` or `0755` is not
 * a string: parsing the same way makes such a value show up as the wrong type in validation.
 */
export function parseYamlDocuments(text, name, { version = "1.1", merge = false } = {}) {
  const docs = YAML.parseAllDocuments(text, { version, merge, uniqueKeys: true, prettyErrors: true });
  const values = [];
  for (const doc of Array.isArray(docs) ? docs : [docs]) {
    const problems = [...doc.errors, ...doc.warnings];
    if (problems.length > 0) {
      throw new Error(`${name}: ${problems.map((p) => p.message).join("; ")}`);
    }
    const value = doc.toJS({ maxAliasCount: 100 });
    if (value !== null && value !== undefined) values.push(value);
  }
  return values;
}

export function parseYamlFile(rel, options) {
  return parseYamlDocuments(readRepo(rel), rel, options);
}

/** `nested.key` → `CHATIFY_NESTED__KEY`, as docs/configuration.md says. */
export const envNameOfKey = (key) => `CHATIFY_${key.split(".").join("__").toUpperCase()}`;

/** Where every configuration key is documented, with its default. */
export const CONFIG_DOC = "docs/configuration.md";

/**
 * The configuration reference table of docs/configuration.md ("## Configuration"): a Map from env name
 * (derived from the key: `gateway.port` → `CHATIFY_GATEWAY__PORT`) to
 * { key, default, written } — `default` as written without backticks, `written` the name in the
 * table's "environment variable" column when it has one. A row naming two keys (`a` / `b`)
 * gives two entries, with the other columns split the same way. Columns are found by their
 * headers ("key", "default", and optionally "environment variable").
 */
export function configTable(text = readRepo(CONFIG_DOC)) {
  const start = text.search(/^## Configuration\s*$/m);
  if (start < 0) throw new Error(`${CONFIG_DOC} has no "## Configuration" section`);
  const rest = text.slice(start + 1);
  const end = rest.search(/^## /m);
  const section = end < 0 ? rest : rest.slice(0, end);
  const rows = section
    .split("\n")
    .filter((line) => line.trim().startsWith("|"))
    .map((line) => line.trim().replace(/^\||\|$/g, "").split("|").map((c) => c.trim()));
  const header = rows.find((cells) => cells.some((c) => c.toLowerCase() === "key"));
  if (!header) throw new Error(`${CONFIG_DOC} "## Configuration" has no table with a "key" column`);
  const column = (name) => header.findIndex((c) => c.toLowerCase() === name);
  const keyCol = column("key");
  const defaultCol = column("default");
  const envCol = header.findIndex((c) => /environment/i.test(c));
  if (defaultCol < 0) throw new Error(`${CONFIG_DOC}'s configuration table has no "default" column`);
  const split = (cell, n) => {
    const parts = (cell ?? "").split(" / ").map((p) => p.replaceAll("`", "").trim());
    return parts.length === n ? parts : Array(n).fill((cell ?? "").replaceAll("`", "").trim());
  };
  const table = new Map();
  for (const cells of rows) {
    if (cells === header || !cells[keyCol]?.startsWith("`")) continue;
    const keys = [...cells[keyCol].matchAll(/`([a-z0-9_.]+)`/g)].map((m) => m[1]);
    const defaults = split(cells[defaultCol], keys.length);
    const written = envCol >= 0 ? split(cells[envCol], keys.length) : [];
    keys.forEach((key, i) => {
      table.set(envNameOfKey(key), { key, default: defaults[i], written: written[i] });
    });
  }
  return table;
}

/** The body of a shell function `name() { ... }` (up to the first `}` at the start of a line). */
export function shellFunction(text, name) {
  const match = new RegExp(`^${name}\\(\\)\\s*\\{\\n([\\s\\S]*?)^\\}`, "m").exec(text);
  if (!match) throw new Error(`no shell function ${name}() found`);
  return match[1];
}

/** The labels of the arms of the `case` statements in a piece of shell: `a | b[2-9]) ...` → a, b[2-9]. */
export function caseLabels(body) {
  const labels = [];
  for (const m of body.matchAll(/^\s*([a-z0-9_*[][a-z0-9_ |*[\]-]*)\)/gm)) {
    for (const label of m[1].split("|")) labels.push(label.trim());
  }
  return labels;
}

/** Whether a shell `case` pattern (`*`, `?` and `[...]` classes) matches a word. */
export function caseMatches(pattern, word) {
  const re = pattern.replace(/[.+^${}()|\\]/g, "\\$&").replace(/\*/g, ".*").replace(/\?/g, ".");
  return new RegExp(`^${re}$`).test(word);
}

/**
 * The components deploy/local/up.sh runs for a set of `natsNodes` NATS nodes and `persisters`
 * persisters, in start order: lib.sh's own resolve_topology, run by bash.
 */
export function upComponents(natsNodes = 1, persisters = 1) {
  const out = execFileSync(
    "bash",
    ["-c", `. "$0"; RUN_ENV_FILE=/nonexistent; resolve_topology; printf '%s\\n' "\${CHATIFY_ALL_COMPONENTS[@]}"`, repoPath("deploy/local/lib.sh")],
    { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"], env: { PATH: process.env.PATH, CHATIFY_NATS_NODES: String(natsNodes), CHATIFY_PERSISTERS: String(persisters) } },
  );
  return out.trim().split("\n");
}

/** A bash array assignment `NAME=(a b c)` (may span lines). */
export function shellArray(text, name) {
  const match = new RegExp(`^${name}=\\(([^)]*)\\)`, "m").exec(text);
  if (!match) throw new Error(`no array ${name}=( ... ) found`);
  return match[1]
    .split("\n")
    .map((l) => l.replace(/#.*$/, ""))
    .join(" ")
    .split(/\s+/)
    .filter(Boolean);
}

/** A plain assignment `NAME=value` at the start of a line. */
export function shellAssignment(text, name) {
  const match = new RegExp(`^${name}=(\\S+)`, "m").exec(text);
  if (!match) throw new Error(`no assignment ${name}= found`);
  return match[1].replace(/^["']|["']$/g, "");
}

/** The defaults `: "${NAME:=value}"` of a shell text, as a Map. */
export function shellDefaults(text) {
  const defaults = new Map();
  for (const m of text.matchAll(/"\$\{([A-Z0-9_]+):=([^}]*)\}"/g)) {
    if (!defaults.has(m[1])) defaults.set(m[1], m[2]);
  }
  return defaults;
}

/** Every CHATIFY_* name that appears in the code (not the comments) of shell texts. */
export function shellChatifyNames(...texts) {
  const names = new Set();
  for (const text of texts) {
    for (const line of text.split("\n")) {
      if (/^\s*#/.test(line)) continue;
      for (const m of line.matchAll(/\bCHATIFY_[A-Z0-9_]*[A-Z0-9]\b/g)) names.add(m[0]);
    }
  }
  return names;
}

/** The Dockerfile's stages (`FROM ... AS name`) with their EXPOSEd ports, and the user id. */
export function dockerfile(text = readRepo("deploy/docker/Dockerfile")) {
  const stages = new Map();
  let current = null;
  for (const line of text.split("\n")) {
    const from = /^FROM\s+\S+\s+AS\s+(\S+)/i.exec(line);
    if (from) {
      current = { name: from[1], expose: [] };
      stages.set(current.name, current);
      continue;
    }
    const expose = /^EXPOSE\s+(.+)$/i.exec(line);
    if (expose && current) current.expose.push(...expose[1].split(/\s+/).map((p) => Number.parseInt(p, 10)));
  }
  const uid = /--uid\s+(\d+)/.exec(text);
  return { stages, uid: uid ? Number(uid[1]) : undefined };
}

/** The port of "host:port", "[v6]:port" or ":port". */
export function portOf(address) {
  const m = /:(\d+)$/.exec(String(address));
  if (!m) throw new Error(`no port in ${address}`);
  return Number(m[1]);
}
