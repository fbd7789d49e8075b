// Control of the system under test, started by deploy/local/up.sh in $CHATIFY_RUN_DIR:
// component PIDs, SIGKILL/SIGTERM, restarts through up.sh/down.sh, /readyz, /metrics, the
// JetStream consumer's state and the streams' leaders (NATS monitoring) and the rows HarperDB
// holds. The set may be the default one (one NATS server, one persister) or a cluster set
// (CHATIFY_NATS_NODES=3: nats nats2 nats3; CHATIFY_PERSISTERS=N: persister persister2 ...).

import fs from "node:fs";
import path from "node:path";
import { ENV, need, runScript, sleep } from "../../e2e/helpers.mjs";

export const runDir = () => {
  if (!ENV.runDir) throw new Error("CHATIFY_RUN_DIR is not set: scripts/faults.sh starts a system and sets it");
  return ENV.runDir;
};

export const urls = {
  lb: () => need("CHATIFY_LB_URL"),
  gateway1: () => need("CHATIFY_GATEWAY1_URL"),
  gateway2: () => need("CHATIFY_GATEWAY2_URL"),
  persister: () => need("CHATIFY_PERSISTER_URL"),
  natsMonitor: () => need("CHATIFY_NATS_MONITOR_URL"),
  harperdb: () => need("CHATIFY_HARPERDB_URL"),
};

// ---------------------------------------------------------------------------------------------
// The set's shape
// ---------------------------------------------------------------------------------------------

const count = (name) => Number(ENV.vars[name] || 1);

/** { natsNodes, persisters } of the set (the run dir's env file; 1 and 1 by default). */
export const topology = () => ({ natsNodes: count("CHATIFY_NATS_NODES"), persisters: count("CHATIFY_PERSISTERS") });

/** The run dir's CHATIFY_NATS_SYNC (default when unset). */
export const syncMode = () => ENV.vars.CHATIFY_NATS_SYNC || "default";

/** The NATS servers' component names (also their server names on a cluster): nats, nats2, nats3. */
export const natsNodes = () => ["nats", "nats2", "nats3"].slice(0, topology().natsNodes);

/** The persisters' component names: persister, persister2 ... */
export const persisters = () => Array.from({ length: topology().persisters }, (_, i) => (i ? `persister${i + 1}` : "persister"));

/** Every component the scenarios restart, in start order (not the chat page). */
export const components = () => [...natsNodes(), "harperdb", ...persisters(), "gateway1", "gateway2", "lb"];

/** The HTTP URL of a gateway, persister (persister2 ...) or the load balancer. */
export function urlOf(name) {
  if (urls[name]) return urls[name]();
  return need(`CHATIFY_${name.toUpperCase()}_URL`);
}

/** The monitoring URL of a NATS node. */
export const monitorOf = (node) => need(`CHATIFY_${node.toUpperCase()}_MONITOR_URL`);

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/** State letter of a process (R, S, Z...) or undefined when it does not exist. */
function procState(pid) {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2).split(" ")[0];
  } catch {
    return undefined;
  }
}

export const alive = (pid) => {
  const s = procState(pid);
  return s !== undefined && s !== "Z" && s !== "X";
};

/** PID of a component per its pid file (the first line), or undefined when it is not running. */
export function pidOf(name) {
  let text;
  try {
    text = fs.readFileSync(path.join(runDir(), "pids", `${name}.pid`), "utf8");
  } catch {
    return undefined;
  }
  const pid = Number(text.split("\n")[0].replace(/\D/g, ""));
  return pid && alive(pid) ? pid : undefined;
}

/** Waits until a process is gone; resolves true, or false after timeoutMs. */
export async function waitGone(pid, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  while (alive(pid)) {
    if (Date.now() > deadline) return false;
    await sleep(20);
  }
  return true;
}

/** SIGKILLs a component (its whole process group when it leads one) and waits until it is gone. */
export async function sigkill(name) {
  const pid = pidOf(name);
  if (!pid) throw new Error(`cannot SIGKILL ${name}: it is not running`);
  try {
    process.kill(-pid, "SIGKILL");
  } catch {
    process.kill(pid, "SIGKILL");
  }
  if (!(await waitGone(pid, 5000))) throw new Error(`${name} (PID ${pid}) still alive 5 s after SIGKILL`);
  return pid;
}

/**
 * SIGTERMs a component and measures how long it takes to exit. Does not escalate: returns
 * { pid, exited, ms } after at most timeoutMs (the caller stops a process that overstays with
 * down.sh).
 */
export async function sigterm(name, timeoutMs) {
  const pid = pidOf(name);
  if (!pid) throw new Error(`cannot SIGTERM ${name}: it is not running`);
  const started = Date.now();
  process.kill(pid, "SIGTERM");
  const exited = await waitGone(pid, timeoutMs);
  return { pid, exited, ms: Date.now() - started };
}

/** deploy/local/up.sh NAME... (waits until each is ready); throws with its output on failure. */
export async function up(...names) {
  const started = Date.now();
  const { code, output } = await runScript("deploy/local/up.sh", names, 180_000);
  if (code !== 0) throw new Error(`deploy/local/up.sh ${names.join(" ")} failed (exit ${code}):\n${output.slice(-3000)}`);
  return Date.now() - started;
}

/** deploy/local/down.sh NAME... */
export async function down(...names) {
  const { code, output } = await runScript("deploy/local/down.sh", names, 60_000);
  if (code !== 0) throw new Error(`deploy/local/down.sh ${names.join(" ")} failed (exit ${code}):\n${output.slice(-3000)}`);
}

/** Resident set size of a process in KiB (VmRSS), or undefined. */
export function rssKiB(pid) {
  try {
    const m = /VmRSS:\s+(\d+)\s+kB/.exec(fs.readFileSync(`/proc/${pid}/status`, "utf8"));
    return m ? Number(m[1]) : undefined;
  } catch {
    return undefined;
  }
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/** GET with a timeout; resolves { status, text } or { status: 0, error } (never throws). */
export async function get(url, timeoutMs = 2000) {
  try {
    const res = await fetch(url, { signal: AbortSignal.timeout(timeoutMs) });
    return { status: res.status, text: await res.text() };
  } catch (e) {
    return { status: 0, error: e.message };
  }
}

export const readyStatus = async (name) => (await get(`${urlOf(name)}/readyz`, 1500)).status;

/** Waits until GET url/readyz answers 200; returns the ms waited. */
export async function waitReady(name, timeoutMs = 30_000) {
  const started = Date.now();
  for (;;) {
    if ((await readyStatus(name)) === 200) return Date.now() - started;
    if (Date.now() - started > timeoutMs) throw new Error(`${name} /readyz not 200 within ${timeoutMs} ms`);
    await sleep(100);
  }
}

/** Parses Prometheus text: { "name{labels}": value } (labels as written by the exporter). */
export function parseMetrics(text) {
  const out = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?)\s+(\S+)/.exec(line);
    if (m) out[m[1]] = Number(m[2]);
  }
  return out;
}

/** One metric of a component, summed over the series whose labels include every `labels` pair (0 when absent). */
export async function metric(name, metricName, labels = {}) {
  const res = await get(`${urlOf(name)}/metrics`, 3000);
  if (res.status !== 200) throw new Error(`${name} /metrics: ${res.status || res.error}`);
  let sum = 0;
  for (const [series, value] of Object.entries(parseMetrics(res.text))) {
    const base = series.split("{")[0];
    if (base !== metricName) continue;
    const wanted = Object.entries(labels).every(([k, v]) => series.includes(`${k}="${v}"`));
    if (wanted) sum += value;
  }
  return sum;
}

// ---------------------------------------------------------------------------------------------
// NATS monitoring: the persisters' durable consumer
// ---------------------------------------------------------------------------------------------

/** A NATS node's /jsz with the streams and consumers it holds (parsed), or throws. */
export async function jsz(node = "nats", timeoutMs = 3000) {
  const res = await get(`${monitorOf(node)}/jsz?consumers=true`, timeoutMs);
  if (res.status !== 200) throw new Error(`NATS ${node} monitoring /jsz: ${res.status || res.error}`);
  return JSON.parse(res.text);
}

/** A stream's details in a /jsz answer, or undefined. */
export function streamIn(jszAnswer, name = "CHATIFY_MESSAGES") {
  for (const account of jszAnswer.account_details ?? []) {
    for (const stream of account.stream_detail ?? []) if (stream.name === name) return stream;
  }
  return undefined;
}

/**
 * A stream's state as its leader sees it: { leader, node, stream } where `stream` is the
 * leader's /jsz detail (its `cluster.replicas` say whether each follower is current), or
 * { leader: undefined } while no node answers as the leader (an election). `nodes` are the
 * nodes asked (all of them by default; one that does not answer is skipped).
 */
export async function streamLeader(name = "CHATIFY_MESSAGES", nodes = natsNodes()) {
  const answers = await Promise.all(nodes.map((n) => jsz(n, 1500).then((j) => [n, j], () => [n, undefined])));
  for (const [node, j] of answers) {
    const stream = j && streamIn(j, name);
    if (stream?.cluster?.leader === node) return { leader: node, node, stream };
  }
  return { leader: undefined };
}

/** Waits until a stream has a leader (other than `not`, when given); resolves { leader, stream, ms }. */
export async function waitStreamLeader({ name = "CHATIFY_MESSAGES", not, timeoutMs = 30_000, nodes } = {}) {
  const started = Date.now();
  for (;;) {
    const found = await streamLeader(name, nodes ?? natsNodes().filter((n) => n !== not));
    if (found.leader && found.leader !== not) return { ...found, ms: Date.now() - started };
    if (Date.now() - started > timeoutMs) throw new Error(`no leader of ${name}${not ? ` other than ${not}` : ""} within ${timeoutMs} ms`);
    await sleep(100);
  }
}

/**
 * Waits until `node` is a current replica of the stream in its leader's view (it has caught up
 * after a restart); resolves the ms waited.
 */
export async function waitReplicaCurrent(node, { name = "CHATIFY_MESSAGES", timeoutMs = 30_000 } = {}) {
  const started = Date.now();
  let last;
  for (;;) {
    last = await streamLeader(name);
    if (last.leader === node) return Date.now() - started;
    const replica = last.stream?.cluster?.replicas?.find((r) => r.name === node);
    if (replica?.current) return Date.now() - started;
    if (Date.now() - started > timeoutMs) {
      throw new Error(`${node} not a current replica of ${name} within ${timeoutMs} ms: ${JSON.stringify(last.stream?.cluster ?? last)}`);
    }
    await sleep(200);
  }
}

/** The names of the clients connected to a NATS node (its /connz), e.g. chatify-gateway-gateway1. */
export async function clientsOf(node) {
  const res = await get(`${monitorOf(node)}/connz?limit=1000`, 2000);
  if (res.status !== 200) return [];
  return (JSON.parse(res.text).connections ?? []).map((c) => c.name ?? "?").sort();
}

/**
 * { messages, pending, ackPending, redelivered } of the CHATIFY_MESSAGES stream and its
 * consumer: on a single server from its /jsz, on a cluster from the consumer's leader's (a
 * follower's view may lag), and an error while it has none.
 */
export async function consumerState() {
  if (topology().natsNodes > 1) return clusterConsumerState();
  const stream = streamIn(await jsz("nats"));
  return stream ? consumerStateOf(stream) : { messages: 0, pending: undefined };
}

async function clusterConsumerState() {
  const answers = await Promise.all(natsNodes().map((n) => jsz(n, 2000).then((j) => [n, j], () => [n, undefined])));
  let consumerLeader;
  let streamLeaderDetail;
  for (const [node, j] of answers) {
    const stream = j && streamIn(j);
    if (!stream) continue;
    if (stream.cluster?.leader === node) streamLeaderDetail = stream;
    const c = (stream.consumer_detail ?? []).find((x) => x.name === "chatify-persister");
    if (c?.cluster?.leader === node) consumerLeader = stream;
  }
  if (!consumerLeader || !streamLeaderDetail) {
    throw new Error(
      `no node answers as the leader of the ${consumerLeader ? "stream CHATIFY_MESSAGES" : "consumer chatify-persister"} (${answers.filter(([, j]) => j).map(([n]) => n).join(", ") || "no node"} answered)`,
    );
  }
  // The consumer's counts from its leader, the stream's from its own (a follower may lag).
  return { ...consumerStateOf(consumerLeader), messages: streamLeaderDetail.state.messages, lastSeq: streamLeaderDetail.state.last_seq };
}

function consumerStateOf(stream) {
  const c = (stream.consumer_detail ?? []).find((x) => x.name === "chatify-persister");
  if (!c) return { messages: stream.state.messages, lastSeq: stream.state.last_seq, pending: undefined };
  return {
    messages: stream.state.messages,
    lastSeq: stream.state.last_seq,
    pending: c.num_pending,
    ackPending: c.num_ack_pending,
    redelivered: c.num_redelivered,
    ackFloor: c.ack_floor?.stream_seq,
  };
}

/**
 * Waits until the persisters' consumer has written and acked everything in the stream (nothing
 * pending, nothing awaiting an ack). Messages in doubt (unavailable or unanswered sends that
 * JetStream did store) are in the stream too, so after this HarperDB holds its final state.
 * Returns the ms waited.
 */
export async function waitConsumerDrained(timeoutMs) {
  const started = Date.now();
  let last;
  for (;;) {
    try {
      last = await consumerState();
      if (last.pending === 0 && last.ackPending === 0 && last.ackFloor === last.lastSeq) return Date.now() - started;
    } catch (e) {
      last = { error: e.message };
    }
    if (Date.now() - started > timeoutMs) {
      throw new Error(`the persister did not catch up within ${timeoutMs} ms: consumer ${JSON.stringify(last)}`);
    }
    await sleep(250);
  }
}

// ---------------------------------------------------------------------------------------------
// HarperDB
// ---------------------------------------------------------------------------------------------

/** The storage key's room part: base64url (no padding) of the room's UTF-8 bytes. */
export const roomToken = (room) => Buffer.from(room, "utf8").toString("base64url");

async function hdbOperation(body, timeoutMs = 30_000) {
  const user = need("CHATIFY_HARPERDB__USERNAME");
  const pass = need("CHATIFY_HARPERDB__PASSWORD");
  const res = await fetch(urls.harperdb(), {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Basic ${Buffer.from(`${user}:${pass}`).toString("base64")}` },
    body: JSON.stringify(body),
    signal: AbortSignal.timeout(timeoutMs),
  });
  const text = await res.text();
  if (res.status !== 200) throw new Error(`HarperDB ${body.operation}: HTTP ${res.status} ${text.slice(0, 300)}`);
  return JSON.parse(text);
}

const PAGE = 5000;
const ROW_ATTRIBUTES = ["pk", "id", "room", "username", "message"];
/** What changes make of a row (messages that change): read only where a scenario changes messages. */
const CHANGE_ATTRIBUTES = ["createdTime", "editedTime", "deleted", "reactions", "reactors", "version"];

/**
 * Every row HarperDB holds for `room`, in primary key order (= stream order, history order): { pk, id, room,
 * username, message }, with `changes` also what changes made of it (createdTime, editedTime,
 * deleted, reactions, reactors, version). One `between` on the primary key, paged by the last key
 * (the schema's one index; conditions on other attributes are avoided, see persister/src/harperdb.rs).
 */
export async function storedRows(room, { changes = false } = {}) {
  const database = ENV.vars.CHATIFY_HARPERDB__DATABASE || "chatify";
  const table = ENV.vars.CHATIFY_HARPERDB__TABLE || "messages";
  const token = roomToken(room);
  const rows = [];
  let from = `${token}|`;
  for (;;) {
    const page = await hdbOperation({
      operation: "search_by_conditions",
      database,
      table,
      operator: "and",
      get_attributes: changes ? [...ROW_ATTRIBUTES, ...CHANGE_ATTRIBUTES] : ROW_ATTRIBUTES,
      sort: { attribute: "pk" },
      limit: PAGE,
      conditions: [{ search_attribute: "pk", search_type: "between", search_value: [from, `${token}|~`] }],
    });
    if (!Array.isArray(page)) throw new Error(`HarperDB search: expected an array, got ${JSON.stringify(page).slice(0, 200)}`);
    const fresh = page.filter((r) => r.pk !== from);
    rows.push(...fresh);
    if (page.length < PAGE || fresh.length === 0) return rows;
    from = page.at(-1).pk;
  }
}

/** Rows of several rooms (with `changes`, also what changes made of them). */
export async function storedRowsOf(rooms, opts) {
  const all = [];
  for (const r of rooms) all.push(...(await storedRows(r, opts)));
  return all;
}
