// HTTP routes on each gateway and through the load balancer.

import { after, describe, test } from "node:test";
import assert from "node:assert/strict";
import {
  assertErrorShape, closeAll, connect, getHistory, gw1Url, gw2Url, httpGet, ids, join, lbUrl, roomName, sendPaced,
  show, uid, userName, waitForStored,
} from "./helpers.mjs";

after(closeAll);

const TARGETS = [["gateway1", gw1Url], ["gateway2", gw2Url], ["load balancer", lbUrl]];
const historyUrl = (base, room, query = "") => `${base}/api/rooms/${encodeURIComponent(room)}/messages${query}`;

describe("service routes", () => {
  for (const [label, url] of TARGETS) {
    test(`${label}: GET / greets, /healthz and /readyz are 200, /metrics is Prometheus text`, async () => {
      const root = await httpGet(`${url()}/`);
      assert.equal(root.status, 200);
      assert.match(String(root.headers["content-type"]), /application\/json/);
      assert.deepEqual(root.json, { message: "Hello from chatify backend" }, `GET / body: ${root.body}`);
      assert.equal((await httpGet(`${url()}/healthz`)).status, 200, "healthz");
      const ready = await httpGet(`${url()}/readyz`);
      assert.equal(ready.status, 200, `readyz while NATS is up: ${ready.body}`);
      const metrics = await httpGet(`${url()}/metrics`);
      assert.equal(metrics.status, 200);
      assert.match(String(metrics.headers["content-type"]), /^text\/plain/, "Prometheus content type");
      assert.match(metrics.body, /^# TYPE [a-zA-Z_:][a-zA-Z0-9_:]* (counter|gauge|histogram|summary|untyped)$/m, "has # TYPE lines");
    });
  }
});

describe("GET /api/rooms/{room}/messages", () => {
  for (const [kind, makeRoom] of [
    ["plain room", () => roomName("http")],
    ["room with spaces, dots, wildcards and Unicode", () => `e2e http ${uid()} a.b.* > 日本語 😀`],
    ["room with / ? # % & + =", () => `e2e/${uid()}?x=1&y=2#frag%20+`],
  ]) {
    test(`${kind}: the same page as get_history, on every gateway and via the LB`, async (t) => {
      const room = makeRoom();
      const s = await connect(gw1Url(), {}, t);
      await join(s, room, userName("http"));
      const acks = await sendPaced(s, room, Array.from({ length: 7 }, (_, i) => `http ${i}`));
      await waitForStored(s, room, ids(acks));
      const queries = [
        [{}, ""],
        [{ limit: 3 }, "?limit=3"],
        [{ limit: 3, before: acks[4].id }, `?before=${encodeURIComponent(acks[4].id)}&limit=3`],
        [{ limit: 100, before: acks[1].id }, `?limit=100&before=${encodeURIComponent(acks[1].id)}`],
      ];
      for (const [opts, query] of queries) {
        const viaSocket = await getHistory(s, room, opts);
        for (const [label, url] of TARGETS) {
          const res = await httpGet(historyUrl(url(), room, query));
          assert.equal(res.status, 200, `${label} ${query}: ${res.body.slice(0, 300)}`);
          assert.match(String(res.headers["content-type"]), /application\/json/);
          assert.deepEqual(res.json, viaSocket, `${label} ${query}: HTTP page differs from get_history`);
        }
      }
      const first = await httpGet(historyUrl(gw2Url(), room, "?limit=3"));
      assert.deepEqual(ids(first.json.messages), ids(acks.slice(4)).reverse(), "newest first");
      assert.equal(first.json.hasMore, true);
      assert.equal(first.json.ok, true);
      assert.deepEqual(first.json.messages.map((m) => m.room), [room, room, room], `room name round-trips: ${show(first.json.messages.map((m) => m.room))}`);
    });
  }

  test("unknown room: 200 with an empty page", async () => {
    const res = await httpGet(historyUrl(gw1Url(), roomName("never-used")));
    assert.equal(res.status, 200);
    assert.deepEqual(res.json, { ok: true, messages: [], hasMore: false });
  });

  for (const bad of ["0", "101", "2.5", "abc", "-1", "1e2"]) {
    test(`bad limit ${bad}: 400 invalid_payload`, async () => {
      for (const [label, url] of TARGETS) {
        const res = await httpGet(historyUrl(url(), roomName("badlimit"), `?limit=${bad}`));
        assert.equal(res.status, 400, `${label}: ${res.status} ${res.body.slice(0, 300)}`);
        assert.equal(res.json?.ok, false, `${label}: body ${res.body.slice(0, 300)}`);
        assertErrorShape(res.json.error, "invalid_payload", `${label} limit=${bad}`);
      }
    });
  }
});
