// Runs fault scenarios against the system in $CHATIFY_RUN_DIR (started by scripts/faults.sh)
// and checks, after each, what HarperDB holds against what clients were told.
//
//   node tests/faults/run.mjs [--full] [--summary FILE] [SCENARIO...]
//   node tests/faults/run.mjs --groups [SCENARIO...]
//
// Each scenario needs a set of one shape (its `system`): "single" (one NATS server, one
// persister: deploy/local/up.sh's default) or "cluster" (CHATIFY_NATS_NODES=3
// CHATIFY_PERSISTERS=2). The scenarios given must all need the shape of the running set.
// --groups prints, for scripts/faults.sh, one line per shape the scenarios given (all by
// default) need, in run order: the shape, then its scenarios.
//
// Prints one line per scenario:
//   NAME: attempted=… acknowledged=… stored=… lost=0 duplicated=0 unexpected=0 reordered=0 (… s)
// (with messages that change in its load, also changes=… acked=… unknown=… changesLost=0
// changesDuplicated=0 changesReordered=0 changesUnexpected=0) followed by the scenario's own
// checks, writes a JSON summary and exits 1 when any count is not zero or any check failed.

import fs from "node:fs";
import path from "node:path";
import { REPO_DIR, closeAll, connect, sleep, uid } from "../e2e/helpers.mjs";
import { CHANGE_FAILURE_COUNTS, FAILURE_COUNTS, checkChanges, checkHistory, historyStateDiffs } from "./checker.mjs";
import { ChangeLedger, originalTexts, runChangers } from "./lib/changes.mjs";
import { loadSizes } from "./lib/config.mjs";
import { ChatClient, Ledger, rowKey } from "./lib/load.mjs";
import * as sys from "./lib/system.mjs";

import persisterCrash from "./scenarios/persister-crash.mjs";
import natsRestart from "./scenarios/nats-restart.mjs";
import harperdbOutage from "./scenarios/harperdb-outage.mjs";
import gatewayCrash from "./scenarios/gateway-crash.mjs";
import gracefulShutdown from "./scenarios/graceful-shutdown.mjs";
import slowClient from "./scenarios/slow-client.mjs";
import ordering from "./scenarios/ordering.mjs";
import natsNodeLoss from "./scenarios/nats-node-loss.mjs";
import natsRollingRestart from "./scenarios/nats-rolling-restart.mjs";
import persisterPair from "./scenarios/persister-pair.mjs";

export const SCENARIOS = [
  persisterCrash,
  natsRestart,
  harperdbOutage,
  gatewayCrash,
  gracefulShutdown,
  slowClient,
  ordering,
  natsNodeLoss,
  natsRollingRestart,
  persisterPair,
];

/** The shape of set each system name stands for (what deploy/local/up.sh is started with). */
export const SYSTEMS = {
  single: { natsNodes: 1, persisters: 1 },
  cluster: { natsNodes: 3, persisters: 2 },
};
const systemOf = (scenario) => scenario.system ?? "single";

function parseArgs(argv) {
  const opts = { full: false, groups: false, summary: path.join(REPO_DIR, "target", "faults", "summary.json"), names: [] };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--full") opts.full = true;
    else if (a === "--groups") opts.groups = true;
    else if (a === "--summary") opts.summary = argv[++i];
    else if (a.startsWith("-")) throw new Error(`unknown option ${a}`);
    else opts.names.push(a);
  }
  const known = SCENARIOS.map((s) => s.name);
  for (const n of opts.names) if (!known.includes(n)) throw new Error(`unknown scenario '${n}' (known: ${known.join(" ")})`);
  return opts;
}

const log = (msg) => console.log(`    ${new Date().toISOString().slice(11, 23)} ${msg}`);

/** Brings every component back (up.sh starts only what is not running) and waits until each is ready. */
async function restoreSystem() {
  const missing = sys.components().filter((c) => !sys.pidOf(c));
  if (missing.length) {
    log(`restarting ${missing.join(" ")}`);
    await sys.up(...missing);
  }
  for (const c of ["gateway1", "gateway2", ...sys.persisters()]) await sys.waitReady(c, 30_000);
}

class Checks {
  constructor() {
    this.list = [];
  }
  check(name, ok, detail = "") {
    this.list.push({ name, ok: !!ok, detail: typeof detail === "string" ? detail : JSON.stringify(detail) });
    log(`${ok ? "ok  " : "FAIL"} ${name}${detail ? `: ${typeof detail === "string" ? detail : JSON.stringify(detail)}` : ""}`);
    return !!ok;
  }
  /** An observation worth reporting that is not a pass/fail promise. */
  note(name, detail = "") {
    this.list.push({ name, note: true, detail });
    log(`note ${name}${detail ? `: ${detail}` : ""}`);
  }
  get failed() {
    return this.list.filter((c) => !c.note && !c.ok);
  }
}

/**
 * Every history path must show each message as HarperDB finally holds it: get_history (through
 * the load balancer) and the HTTP route of each gateway, the latest page of each room.
 */
async function checkHistoryPaths(rooms, rows, checks) {
  const rowsById = new Map(rows.map((r) => [r.id, r]));
  const socket = await connect(sys.urls.lb(), { transports: ["websocket"] });
  try {
    for (const room of rooms) {
      let res;
      try {
        res = await socket.timeout(15_000).emitWithAck("get_history", { room, limit: 100 });
      } catch (e) {
        res = { ok: false, error: { code: "timeout", message: e.message } };
      }
      const diffs = res?.ok ? historyStateDiffs(res.messages, rowsById) : undefined;
      checks.check(`get_history shows ${room}'s latest messages as stored`, diffs?.length === 0, diffs ? `${res.messages.length} messages, ${diffs.length} differ${diffs.length ? `: ${JSON.stringify(diffs.slice(0, 3))}` : ""}` : JSON.stringify(res?.error));
      for (const gw of ["gateway1", "gateway2"]) {
        const http = await sys.get(`${sys.urlOf(gw)}/api/rooms/${encodeURIComponent(room)}/messages?limit=100`, 15_000);
        let page;
        try {
          page = http.status === 200 ? JSON.parse(http.text) : undefined;
        } catch {
          page = undefined;
        }
        const d = Array.isArray(page?.messages) ? historyStateDiffs(page.messages, rowsById) : undefined;
        checks.check(`GET /api/rooms/…/messages on ${gw} shows ${room}'s latest messages as stored`, d?.length === 0, d ? `${page.messages.length} messages, ${d.length} differ${d.length ? `: ${JSON.stringify(d.slice(0, 3))}` : ""}` : `HTTP ${http.status} ${(http.text ?? http.error ?? "").slice(0, 200)}`);
      }
    }
  } finally {
    socket.disconnect();
  }
}

async function runScenario(scenario, sizes, runTag) {
  const started = Date.now();
  const checks = new Checks();
  const ledger = new Ledger();
  const changes = new ChangeLedger();
  // messages that change: on in the scenarios that mix them into their load, unless FAULTS_CHANGE_RATE=0
  const changesOn = !!scenario.changes && sizes.FAULTS_CHANGE_RATE > 0;
  const clients = [];
  const rooms = [];
  const tag = `${runTag}-${scenario.short}`;
  const ctx = {
    sizes,
    tag,
    checks,
    ledger,
    log,
    rooms,
    sys,
    /** A room of this scenario: its rows are checked afterwards. */
    room(i) {
      const r = `faults-${tag}-${i}`;
      if (!rooms.includes(r)) rooms.push(r);
      return r;
    },
    /** A load client recorded in this scenario's ledger (closed when it ends). */
    client(opts) {
      const c = new ChatClient({ ledger, runTag: tag, ...opts });
      clients.push(c);
      return c;
    },
    clients,
    /** The edits, deletions and reactions of the load (checked afterwards when any was made). */
    changes,
    changesOn,
    /**
     * Makes `clients` edit and delete their own acknowledged messages and toggle reactions to
     * the messages of all of them, FAULTS_CHANGE_RATE changes a second each, until stop().
     */
    runChangers(changers, stop) {
      if (!changesOn) return Promise.resolve({ changers: [], errors: [] });
      return runChangers(changers, { ledger, changes, tag, stop, ratePerSec: sizes.FAULTS_CHANGE_RATE });
    },
  };
  console.log(`\n--- ${scenario.name}: ${scenario.title}`);
  let error;
  try {
    await restoreSystem();
    await sys.waitConsumerDrained(sizes.FAULTS_SETTLE_MS);
    await scenario.run(ctx);
  } catch (e) {
    error = e;
    checks.check("scenario ran to completion", false, e.stack ?? e.message);
  }
  for (const c of clients) c.close();

  // Final state: everything back up, the persister caught up with the stream, then HarperDB read.
  let result;
  let changeResult;
  const checkingChanges = changesOn || changes.ops.length > 0;
  try {
    await restoreSystem();
    const drainMs = await sys.waitConsumerDrained(sizes.FAULTS_SETTLE_MS);
    log(`persister caught up ${drainMs} ms after the scenario`);
    const rows = await sys.storedRowsOf(rooms, { changes: checkingChanges });
    result = checkHistory({ attempts: ledger.list(), rows: rows.map(rowKey) });
    if (checkingChanges) {
      changeResult = checkChanges({ ops: changes.list(), rows, originals: originalTexts(ledger.list()) });
      log(`changes: ${JSON.stringify(changeResult.byKind)}; answers ${JSON.stringify(changes.codes)}; ${changeResult.changedMessages} messages changed`);
      for (const k of CHANGE_FAILURE_COUNTS) if (changeResult[k]) log(`${k}: ${JSON.stringify(changeResult.details[k].slice(0, 5))}`);
      checks.check("messages were changed under the faults (edits, deletions and reactions acknowledged)", ["edit", "delete", "react"].every((k) => changeResult.byKind[k]?.ok > 0), JSON.stringify(changeResult.byKind));
      await checkHistoryPaths(rooms, rows, checks);
    }
    const retried = ledger.list().filter((a) => a.emissions > 1).length;
    log(`outcomes of ${Object.values(ledger.codes).reduce((x, y) => x + y, 0)} emissions: ${JSON.stringify(ledger.codes)}; messages sent more than once: ${retried}`);
    for (const k of FAILURE_COUNTS) if (result[k]) log(`${k}: ${JSON.stringify(result.details[k].slice(0, 5))}`);
  } catch (e) {
    checks.check("final history could be read", false, e.stack ?? e.message);
  }
  const seconds = (Date.now() - started) / 1000;
  const counts = result
    ? Object.fromEntries(["attempted", "acknowledged", "unavailable", "indeterminate", "rejected", "stored", ...FAILURE_COUNTS].map((k) => [k, result[k]]))
    : undefined;
  const changeCounts = changeResult
    ? Object.fromEntries(["changes", "changesAcknowledged", "changesUnknown", "changesRejected", "changedMessages", ...CHANGE_FAILURE_COUNTS].map((k) => [k, changeResult[k]]))
    : undefined;
  const changesPassed = !checkingChanges || (!!changeResult && CHANGE_FAILURE_COUNTS.every((k) => changeResult[k] === 0));
  const passed = !!result && FAILURE_COUNTS.every((k) => result[k] === 0) && changesPassed && checks.failed.length === 0 && !error;
  const changeLine = changeCounts
    ? ` changes=${changeCounts.changes} acked=${changeCounts.changesAcknowledged} unknown=${changeCounts.changesUnknown} ${CHANGE_FAILURE_COUNTS.map((k) => `${k}=${changeCounts[k]}`).join(" ")}`
    : checkingChanges
      ? " changes not checked"
      : "";
  const line = `${scenario.name}: ${
    counts
      ? `attempted=${counts.attempted} acknowledged=${counts.acknowledged} stored=${counts.stored} lost=${counts.lost} duplicated=${counts.duplicated} unexpected=${counts.unexpected} reordered=${counts.reordered}`
      : "history not checked"
  }${changeLine} (${seconds.toFixed(1)} s) ${passed ? "PASS" : `FAIL${checks.failed.length ? ` (${checks.failed.length} check(s) failed)` : ""}`}`;
  console.log(line);
  return {
    name: scenario.name,
    passed,
    seconds,
    counts,
    changes: changeCounts && { ...changeCounts, byKind: changeResult.byKind, answers: changes.codes, examples: changeResult.details },
    perRoom: result?.perRoom,
    examples: result ? Object.fromEntries(FAILURE_COUNTS.map((k) => [k, result.details[k]])) : undefined,
    checks: checks.list,
    line,
  };
}

/**
 * The scenarios SIGKILL and restart the components of $CHATIFY_RUN_DIR: it must name a run dir
 * explicitly (scripts/faults.sh makes a private one), never fall back to a developer's.
 */
function checkRunDir() {
  const dir = process.env.CHATIFY_RUN_DIR;
  if (!dir || !fs.existsSync(path.join(dir, "env"))) {
    throw new Error("CHATIFY_RUN_DIR must name the run dir of a system started by deploy/local/up.sh (scripts/faults.sh starts one): the scenarios kill its processes");
  }
  if (path.resolve(dir) === path.join(REPO_DIR, "deploy", "local", "run") && process.env.FAULTS_ALLOW_DEFAULT_RUN_DIR !== "1") {
    throw new Error("refusing to inject faults into the default run dir deploy/local/run (set FAULTS_ALLOW_DEFAULT_RUN_DIR=1 if you mean it)");
  }
}

/** The scenarios must all need the shape of the running set (the run dir's env file says it). */
function checkSystem(chosen) {
  const running = sys.topology();
  for (const s of chosen) {
    const want = SYSTEMS[systemOf(s)];
    if (want.natsNodes !== running.natsNodes || want.persisters !== running.persisters) {
      throw new Error(
        `${s.name} needs a ${systemOf(s)} set (CHATIFY_NATS_NODES=${want.natsNodes} CHATIFY_PERSISTERS=${want.persisters}), and $CHATIFY_RUN_DIR runs CHATIFY_NATS_NODES=${running.natsNodes} CHATIFY_PERSISTERS=${running.persisters} (scripts/faults.sh starts the right one for each scenario)`,
      );
    }
  }
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const chosen = opts.names.length ? SCENARIOS.filter((s) => opts.names.includes(s.name)) : SCENARIOS;
  if (opts.groups) {
    for (const system of Object.keys(SYSTEMS)) {
      const names = chosen.filter((s) => systemOf(s) === system).map((s) => s.name);
      if (names.length) console.log(`${system} ${names.join(" ")}`);
    }
    return;
  }
  checkRunDir();
  checkSystem(chosen);
  const sizes = loadSizes(opts.full);
  const runTag = uid().slice(0, 6);
  const { natsNodes, persisters } = sys.topology();
  console.log(`fault scenarios (${opts.full ? "full" : "reduced"} sizes): ${chosen.map((s) => s.name).join(" ")}`);
  console.log(`system: ${natsNodes} NATS node(s), ${persisters} persister(s), NATS sync ${process.env.CHATIFY_NATS_SYNC || sys.syncMode()}`);
  console.log(`sizes: ${Object.entries(sizes).map(([k, v]) => `${k.replace(/^FAULTS_/, "")}=${v}`).join(" ")}`);
  const started = Date.now();
  const results = [];
  for (const s of chosen) {
    results.push(await runScenario(s, sizes, runTag));
    closeAll();
  }
  const seconds = (Date.now() - started) / 1000;
  console.log(`\n=== fault scenarios (${opts.full ? "full" : "reduced"}), ${seconds.toFixed(1)} s`);
  for (const r of results) console.log(r.line);
  const passed = results.every((r) => r.passed);
  console.log(passed ? "all scenarios passed" : `FAILED: ${results.filter((r) => !r.passed).map((r) => r.name).join(" ")}`);
  const summary = {
    mode: opts.full ? "full" : "reduced",
    system: { natsNodes, persisters, natsSync: process.env.CHATIFY_NATS_SYNC || sys.syncMode() },
    passed,
    seconds,
    sizes,
    startedAt: new Date(started).toISOString(),
    scenarios: results,
  };
  fs.mkdirSync(path.dirname(opts.summary), { recursive: true });
  fs.writeFileSync(opts.summary, `${JSON.stringify(summary, null, 2)}\n`);
  console.log(`summary: ${opts.summary}`);
  // socket.io clients and timers may linger: the verdict is in
  await sleep(10);
  process.exit(passed ? 0 : 1);
}

main().catch((e) => {
  console.error(e.stack ?? e.message);
  process.exit(2);
});
