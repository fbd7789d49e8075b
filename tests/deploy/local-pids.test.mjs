// deploy/local/lib.sh tells its own processes from others by the marker variable in their
// environment. Under `set -o pipefail` that check once piped /proc/PID/environ into `grep -q`,
// whose early exit could kill the reader with SIGPIPE when the environment was large, so up.sh
// reported a running component as "exited while starting". This runs the real function against a
// live process whose environment is large, many times over.
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { after, test } from "node:test";
import { repoPath } from "./helpers.mjs";

const LIB = repoPath("deploy/local/lib.sh");
const RUN_DIR = "/tmp/chatify-pid-check-run-dir";
const children = [];
after(() => {
  for (const child of children) child.kill("SIGKILL");
});

/** A process whose command line names the persister, with the marker and a large environment. */
function fakePersister(marker) {
  // The marker near the start, where an early match made the old check fail; then 160 KB of
  // padding in several variables (one string may not exceed 128 KiB, MAX_ARG_STRLEN).
  const env = { PATH: process.env.PATH, _CHATIFY_LOCAL_RUN_DIR: marker };
  for (let i = 0; i < 8; i++) env[`PADDING_${i}`] = "x".repeat(20_000);
  const child = spawn("sleep", ["60"], { argv0: "chatify-persister", env, stdio: "ignore" });
  children.push(child);
  return child;
}

/** Runs pid_is_component TIMES times in a shell with the scripts' own options; returns the failures. */
function check(pid, times) {
  const script = `set -euo pipefail
source "$1"
failed=0
for ((i = 0; i < $3; i++)); do pid_is_component persister "$2" || failed=$((failed + 1)); done
echo "$failed"`;
  const out = spawnSync("bash", ["-c", script, "check", LIB, String(pid), String(times)], {
    encoding: "utf8",
    env: { ...process.env, CHATIFY_RUN_DIR: RUN_DIR },
  });
  assert.equal(out.status, 0, out.stderr);
  return Number(out.stdout.trim());
}

async function settled(child) {
  // Until the exec: the command line names the persister only once sleep runs.
  for (let i = 0; i < 100; i++) {
    const cmd = spawnSync("cat", [`/proc/${child.pid}/cmdline`], { encoding: "utf8" }).stdout;
    if (cmd.startsWith("chatify-persister")) return;
    await new Promise((r) => setTimeout(r, 20));
  }
  assert.fail("the stand-in process did not start");
}

test("a running component with a large environment is recognised every time", async () => {
  const child = fakePersister(RUN_DIR);
  await settled(child);
  assert.equal(check(child.pid, 300), 0);
});

test("a process of another run dir is not taken for this one's", async () => {
  const child = fakePersister("/tmp/some-other-run-dir");
  await settled(child);
  assert.equal(check(child.pid, 5), 5);
});
