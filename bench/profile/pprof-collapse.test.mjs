// pprof-collapse.mjs against a profile built here field by field (profile.proto), so the
// expected stacks are known exactly: root first, inlined calls inside their caller, samples of
// the same stack summed, packed and unpacked repeated fields both read.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, writeFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";

const script = join(dirname(fileURLToPath(import.meta.url)), "pprof-collapse.mjs");

const varint = (n) => {
  const out = [];
  let v = BigInt(n);
  do {
    let byte = Number(v & 0x7fn);
    v >>= 7n;
    if (v > 0n) byte |= 0x80;
    out.push(byte);
  } while (v > 0n);
  return Buffer.from(out);
};
const int = (field, n) => Buffer.concat([varint((field << 3) | 0), varint(n)]);
const bytes = (field, b) => Buffer.concat([varint((field << 3) | 2), varint(b.length), b]);
const packed = (field, ns) => bytes(field, Buffer.concat(ns.map(varint)));
const message = (...parts) => Buffer.concat(parts);

function profile() {
  const strings = ["", "main", "handler", "inlined", "leaf with space", "samples", "count"];
  const fn = (id, name) => bytes(5, message(int(1, id), int(2, name), int(4, 0)));
  const line = (functionId) => bytes(4, message(int(1, functionId), int(2, 7)));
  const location = (id, ...functionIds) => bytes(4, message(int(1, id), int(3, 0x1000 + id), ...functionIds.map(line)));
  return message(
    bytes(1, message(int(1, 5), int(2, 6))), // sample_type, before anything it describes
    // Leaf first; the second sample repeats the first stack, the third lists its locations unpacked.
    bytes(2, message(packed(1, [3, 2, 1]), packed(2, [5, 50_000_000]))),
    bytes(2, message(packed(1, [3, 2, 1]), packed(2, [1, 10_000_000]))),
    bytes(2, message(int(1, 2), int(1, 1), int(2, 2), int(2, 20_000_000))),
    bytes(2, message(packed(1, [1]), packed(2, [0, 0]))), // no samples: left out
    location(1, 1),
    location(2, 3, 2), // "inlined" inlined into "handler": innermost first
    location(3, 4),
    fn(1, 1), fn(2, 2), fn(3, 3), fn(4, 4),
    ...strings.map((s) => bytes(6, Buffer.from(s))),
    int(12, 10_000_000), // period
  );
}

function collapse(buf) {
  const dir = mkdtempSync(join(tmpdir(), "pprof-collapse-"));
  try {
    const file = join(dir, "profile.pb.gz");
    writeFileSync(file, buf);
    const stdout = execFileSync(process.execPath, [script, file], { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
    return { stdout };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

test("stacks come out root first, inlined calls inside their caller, equal stacks summed", () => {
  const { stdout } = collapse(gzipSync(profile()));
  const lines = stdout.trim().split("\n").sort();
  assert.deepEqual(lines, ["main;handler;inlined 2", "main;handler;inlined;leaf_with_space 6"]);
});

test("an uncompressed profile is read as well", () => {
  const { stdout } = collapse(profile());
  assert.match(stdout, /^main;handler;inlined;leaf_with_space 6$/m);
});

test("the top functions by own samples go to stderr", () => {
  const dir = mkdtempSync(join(tmpdir(), "pprof-collapse-"));
  try {
    const file = join(dir, "profile.pb.gz");
    writeFileSync(file, gzipSync(profile()));
    const out = execFileSync("sh", ["-c", `"${process.execPath}" "${script}" "${file}" 2>&1 >/dev/null`], { encoding: "utf8" });
    assert.match(out, /^8 samples/);
    assert.match(out, /75\.0 %  leaf with space/);
    assert.match(out, /25\.0 %  inlined/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
