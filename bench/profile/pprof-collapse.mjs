// Turns a Go CPU profile (nats-server's /debug/pprof/profile: gzipped protobuf, profile.proto)
// into collapsed stacks, "root;caller;callee samples" a line, which inferno-flamegraph draws.
// Debian's nats-server is stripped, so perf cannot name its functions; Go's own profile carries
// their names. Prints the top functions by own samples to stderr.
//
//   node bench/profile/pprof-collapse.mjs profile.pb.gz > stacks.folded
import { readFileSync } from "node:fs";
import { gunzipSync } from "node:zlib";

const file = process.argv[2];
if (!file) {
  console.error("usage: pprof-collapse.mjs profile.pb.gz");
  process.exit(2);
}
const raw = readFileSync(file);
const buf = raw[0] === 0x1f && raw[1] === 0x8b ? gunzipSync(raw) : raw;

// Protocol buffers: each field is a varint key (number << 3 | wire type) and a value.
// varint(b, i): the varint at b[i] and the index after it.
const varint = (b, i) => {
  let v = 0n, shift = 0n;
  for (;;) {
    const byte = b[i++];
    v |= BigInt(byte & 0x7f) << shift;
    if (byte < 0x80) return [v, i];
    shift += 7n;
  }
};
function* fields(b, start = 0, end = b.length) {
  let i = start, key, value, len;
  while (i < end) {
    [key, i] = varint(b, i);
    const field = Number(key >> 3n), wire = Number(key & 7n);
    if (wire === 0) {
      [value, i] = varint(b, i);
      yield { field, value };
    } else if (wire === 2) {
      [len, i] = varint(b, i);
      yield { field, start: i, end: i + Number(len) };
      i += Number(len);
    } else if (wire === 1) { yield { field, value: b.readBigUInt64LE(i) }; i += 8; }
    else if (wire === 5) { yield { field, value: BigInt(b.readUInt32LE(i)) }; i += 4; }
    else throw new Error(`unsupported wire type ${wire} at ${i}`);
  }
}
// A repeated integer field, packed (one length-delimited run) or not.
const ints = (f, b) => {
  if (f.value !== undefined) return [f.value];
  const out = [];
  for (let i = f.start, v; i < f.end;) {
    [v, i] = varint(b, i);
    out.push(v);
  }
  return out;
};

const strings = [], functions = new Map(), locations = new Map(), samples = [];
for (const f of fields(buf)) {
  if (f.field === 6) strings.push(buf.toString("utf8", f.start, f.end));
  else if (f.field === 5) {
    const fn = {};
    for (const g of fields(buf, f.start, f.end)) {
      if (g.field === 1) fn.id = g.value;
      else if (g.field === 2) fn.name = Number(g.value);
    }
    functions.set(fn.id, fn.name);
  } else if (f.field === 4) {
    const loc = { lines: [] };
    for (const g of fields(buf, f.start, f.end)) {
      if (g.field === 1) loc.id = g.value;
      else if (g.field === 4) {
        for (const h of fields(buf, g.start, g.end)) if (h.field === 1) loc.lines.push(h.value);
      }
    }
    locations.set(loc.id, loc.lines);
  } else if (f.field === 2) {
    const s = { locs: [], values: [] };
    for (const g of fields(buf, f.start, f.end)) {
      if (g.field === 1) s.locs.push(...ints(g, buf));
      else if (g.field === 2) s.values.push(...ints(g, buf));
    }
    samples.push(s);
  }
}

// A sample's first location is the leaf, and a location's first line the innermost inlined call.
const folded = new Map(), own = new Map();
let total = 0;
for (const s of samples) {
  const count = Number(s.values[0] ?? 0n);
  if (!count) continue;
  const names = [];
  for (const id of s.locs) {
    for (const fid of locations.get(id) ?? []) names.push(strings[functions.get(fid)] ?? "?");
  }
  if (!names.length) names.push("?");
  const stack = names.slice().reverse().join(";");
  folded.set(stack, (folded.get(stack) ?? 0) + count);
  own.set(names[0], (own.get(names[0]) ?? 0) + count);
  total += count;
}
for (const [stack, count] of folded) console.log(`${stack.replaceAll(" ", "_")} ${count}`);
console.error(`${total} samples; top functions by own samples:`);
for (const [name, count] of [...own].sort((a, b) => b[1] - a[1]).slice(0, 25)) {
  console.error(`${((100 * count) / total).toFixed(1).padStart(6)} %  ${name}`);
}
