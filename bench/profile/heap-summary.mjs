// Reads a DHAT profile (valgrind --tool=dhat) of a gateway holding CONNS connections and prints
// the allocation sites alive at the heap's peak, in bytes per connection, each named by its
// first frame outside the allocator, the standard library and hashbrown.
//
//   node bench/profile/heap-summary.mjs dhat.json CONNS [MIN_BYTES_PER_CONNECTION]
import { readFileSync } from "node:fs";

const [file, connsArg, minArg = "50"] = process.argv.slice(2);
const conns = Number(connsArg);
if (!file || !(conns > 0)) {
  console.error("usage: heap-summary.mjs dhat.json CONNS [MIN_BYTES_PER_CONNECTION]");
  process.exit(2);
}
const profile = JSON.parse(readFileSync(file, "utf8"));
const frames = profile.ftbl;
const plumbing =
  /library\/(alloc|core|std)|alloc\.rs|raw_vec|boxed\.rs|unix\.rs|posix_memalign|malloc|valgrind|hashbrown|src\/raw\/|task\/(core|raw|mod|list)\.rs|scheduler\/|spawn\.rs|context|\[root\]/;
const site = (pp) => {
  const named = pp.fs.map((i) => frames[i].replace(/^0x[0-9A-F]+: /, "")).filter((f) => !plumbing.test(f));
  return named.slice(0, 2).join("  <-  ") || "(unknown)";
};
const peak = profile.pps.reduce((sum, pp) => sum + (pp.gb ?? 0), 0);
const rows = profile.pps
  .filter((pp) => (pp.gb ?? 0) / conns >= Number(minArg))
  .sort((a, b) => b.gb - a.gb);
console.log(`heap at peak: ${peak} bytes, ${(peak / conns).toFixed(0)} per connection (${conns} connections)`);
console.log("bytes/conn  blocks/conn  site");
for (const pp of rows) {
  const line = `${(pp.gb / conns).toFixed(0).padStart(10)}  ${(pp.gbk / conns).toFixed(2).padStart(11)}  ${site(pp)}`;
  console.log(line.length > 260 ? `${line.slice(0, 257)}...` : line);
}
