// The client under Node's test runner: the rules with a scripted socket, then against a real
// gateway (started by tests/client/test_js_node.py, which passes its URL in the environment).
import assert from "node:assert/strict";
import { createServer } from "node:net";
import { after, describe, test } from "node:test";

import { IgratechWsClient } from "../igratech-ws-client.js";
import {
  balance,
  incident,
  loadWs,
  publish,
  record,
  skipReason,
  token,
  unique,
  waitFor,
  env,
} from "./support.mjs";

// --- a scripted socket: the test plays the server ---------------------------------------------

class ScriptedSocket {
  static last = null;
  static opened = [];
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    ScriptedSocket.last = this;
    ScriptedSocket.opened.push(this);
  }
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  close(code = 1000, reason = "") {
    this.readyState = 3;
    queueMicrotask(() => this.onclose?.({ code, reason }));
  }
  // the server's side
  open() {
    this.readyState = 1;
    this.onopen?.({});
  }
  push(frame) {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }
  refuse() {
    this.readyState = 3;
    this.onerror?.({});
    this.onclose?.({ code: 1006, reason: "" });
  }
}

const connected = (channels, userId = "u-1") => ({
  event: "connected",
  data: { status: "connected", serverTime: "2026-11-23T19:45:00Z", userId, pingInterval: 25,
          idleTimeout: 60, channels },
});
const bal = (offset, amount, extra = {}) => ({
  event: "balance", channel: "user:u-1", offset, epoch: "e1", ...extra,
  data: { balance: amount, currency: "EUR", updatedAt: "2026-11-23T19:45:00Z" },
});

function scripted(options = {}) {
  ScriptedSocket.opened = [];
  const client = new IgratechWsClient("ws://gateway.test/wspublic", {
    WebSocket: ScriptedSocket,
    token: "t",
    backoff: { initial: 1, maximum: 2 },
    ...options,
  });
  const events = record(client);
  client.connect();
  return { client, events, socket: ScriptedSocket.last };
}

const gaps = (events) => events.filter(([name]) => name === "gap").map(([, gap]) => gap);
const pushes = (events) => events.filter(([name]) => name === "push").map(([, f]) => f.offset);

describe("the client's rules (scripted socket)", () => {
  test("positions come from `connected` (D5), so the user channel resumes without a push", async () => {
    const { client, socket } = scripted();
    socket.open();
    socket.push(connected([{ channel: "user:u-1", offset: 4, epoch: "e1" }]));
    assert.deepEqual(client.positions.get("user:u-1"), { offset: 4, epoch: "e1" });
    socket.close(1012);
    await waitFor(() => ScriptedSocket.opened.length === 2, "the reconnect");
    const settings = JSON.parse(new URL(ScriptedSocket.last.url).searchParams.get("settings"));
    assert.deepEqual(settings.recover, { "user:u-1": { offset: 4, epoch: "e1" } });
    client.close();
  });

  test("follow with {history} asks for the last stream events; a bad value is refused", () => {
    const { client, socket } = scripted({});
    socket.open();
    socket.push(connected([]));
    assert.equal(client.follow("g-3", { history: 20 }), true);
    assert.deepEqual(socket.sent.at(-1), { event: "settings", data: { follow: ["g-3"], history: 20 } });
    for (const history of [101, -1, "x", true, 2.5]) {
      assert.throws(() => client.follow("g-4", { history }), RangeError);
    }
    assert.deepEqual(client.games, ["g-3"]);
    client.close();
  });

  test("a follow made while the handshake is in flight is sent once connected", () => {
    const { client, socket } = scripted({ games: ["g-1"] });
    assert.equal(client.follow("g-2"), false); // not connected yet: kept
    socket.open();
    socket.push(connected([]));
    assert.deepEqual(socket.sent, [{ event: "settings", data: { games: ["g-1", "g-2"], stats: false } }]);
    client.close();
  });

  test("duplicates are dropped, skipped offsets and new epochs are gaps", () => {
    const { client, events, socket } = scripted();
    socket.open();
    socket.push(connected([{ channel: "user:u-1", offset: 0, epoch: "e1" }]));
    socket.push(bal(1, "1"));
    socket.push(bal(1, "1")); // a replay
    socket.push(bal(3, "3")); // 2 never came
    socket.push({ ...bal(1, "9"), epoch: "e2" }); // a new stream
    assert.deepEqual(pushes(events), [1, 3, 1]);
    assert.deepEqual(gaps(events).map((g) => g.reason), ["skipped", "epoch"]);
    client.close();
  });

  test("snapshots and conflated state frames are neither gaps nor duplicates; state follows", () => {
    const { client, events, socket } = scripted();
    socket.open();
    socket.push(connected([{ channel: "user:u-1", offset: 5, epoch: "e1" }]));
    socket.push(bal(3, "3.00", { snapshot: true })); // the state at offset 3, below position 5
    assert.equal(client.channelState("user:u-1").balance.balance, "3.00");
    assert.deepEqual(client.positions.get("user:u-1"), { offset: 5, epoch: "e1" });
    socket.push(bal(8, "8.00", { conflated: true })); // 6 and 7 were superseded
    socket.push(bal(2, "2.00", { snapshot: true })); // older: does not replace newer state
    assert.equal(client.channelState("user:u-1").balance.balance, "8.00");
    assert.deepEqual(gaps(events), []);
    assert.deepEqual(pushes(events), [3, 8, 2]);
    client.close();
  });

  test("a channel joined elsewhere than held, or not recovered, is a gap", () => {
    const { client, events, socket } = scripted({ games: ["g-1", "g-2"] });
    client.positions.set("game:g-1", { offset: 2, epoch: "e1" });
    client.positions.set("game:g-2", { offset: 2, epoch: "e1" });
    socket.open();
    socket.push(connected([
      { channel: "game:g-1", offset: 9, epoch: "e1" },
      { channel: "game:g-2", offset: 9, epoch: "e2", recovered: false },
    ]));
    assert.deepEqual(gaps(events).map((g) => [g.channel, g.reason]), [
      ["game:g-1", "not-resumed"],
      ["game:g-2", "not-recovered"],
    ]);
    // listed again by the settings answer: already joined, no second gap
    socket.push({ event: "settings", data: { games: ["g-1", "g-2"], stats: false, channels: [
      { channel: "game:g-1", offset: 9, epoch: "e1" },
      { channel: "game:g-2", offset: 9, epoch: "e2", recovered: false },
    ] } });
    assert.equal(gaps(events).length, 2);
    client.close();
  });

  test("a handshake that fails is followed by a probe; refused twice after a probe, the client falls back and says what it lost", async () => {
    const { client, events, socket } = scripted({ games: ["g-1"] });
    socket.open();
    socket.push(connected([{ channel: "user:u-1", offset: 1, epoch: "e1" },
                           { channel: "game:g-1", offset: 7, epoch: "e1" }]));
    client.positions.set("user:u-9", { offset: 1, epoch: "e1" }); // the server will refuse it
    socket.close(1012);
    // the node is down: full handshake fails, then probes fail, and nothing is given up
    await waitFor(() => ScriptedSocket.opened.length === 2, "the reconnect");
    ScriptedSocket.last.refuse();
    await waitFor(() => ScriptedSocket.opened.length === 3, "a probe");
    assert.equal(new URL(ScriptedSocket.last.url).searchParams.get("settings"), null);
    ScriptedSocket.last.refuse();
    await waitFor(() => ScriptedSocket.opened.length === 4, "another probe");
    assert.equal(new URL(ScriptedSocket.last.url).searchParams.get("settings"), null);
    // the node is up but refuses the resume: probe opens, full handshake refused, twice
    for (let round = 0; round < 2; round += 1) {
      const probe = ScriptedSocket.last;
      probe.open();
      await waitFor(() => ScriptedSocket.opened.at(-1) !== probe, "the full handshake");
      assert.ok(new URL(ScriptedSocket.last.url).searchParams.get("settings"));
      ScriptedSocket.last.refuse();
      await waitFor(() => ScriptedSocket.opened.length > 5 + 2 * round, "the next attempt");
    }
    const fallback = ScriptedSocket.last;
    assert.equal(new URL(fallback.url).searchParams.get("settings"), null);
    assert.deepEqual(gaps(events), []); // nothing lost so far
    fallback.open();
    fallback.push(connected([{ channel: "user:u-1", offset: 1, epoch: "e1" }]));
    assert.deepEqual(gaps(events).map((g) => [g.channel, g.reason]), [["user:u-9", "refused"]]);
    assert.deepEqual(fallback.sent.at(-1), {
      event: "settings",
      data: { games: ["g-1"], stats: false, recover: { "game:g-1": { offset: 7, epoch: "e1" } } },
    });
    // that recovery refused too: follow without it, and say so
    fallback.push({ event: "error", data: { code: "invalid_settings", message: "no", event: "settings" } });
    assert.deepEqual(gaps(events).map((g) => g.channel), ["user:u-9", "game:g-1"]);
    assert.deepEqual(fallback.sent.at(-1), { event: "settings", data: { games: ["g-1"], stats: false } });
    client.close();
  });

  test("without `connected` in time the attempt is given up (a socket that never closes)", async () => {
    const { client, events } = scripted({ connectTimeout: 30 });
    await waitFor(() => events.filter(([n]) => n === "close").length >= 2, "two timed out attempts");
    assert.notEqual(client.state, "closed");
    client.close();
    assert.equal(client.state, "closed");
  });
});

// --- against the real gateway -----------------------------------------------------------------

describe("against a real gateway", { skip: skipReason ?? false }, () => {
  const WebSocket = skipReason ? null : loadWs();
  const clients = [];
  const make = (options) => {
    const client = new IgratechWsClient(env.wsUrl, {
      WebSocket, backoff: { initial: 50, maximum: 300 }, connectTimeout: 3000, ...options,
    });
    clients.push(client);
    return client;
  };
  after(() => clients.forEach((c) => c.close()));

  test("typed pushes, follow, positions from the start, state", async () => {
    const user = unique("u");
    const [g1, g2] = [unique("g"), unique("g")];
    const client = make({ token: token(user), games: [g1] });
    const events = record(client);
    client.connect();
    await waitFor(() => client.positions.has(`game:${g1}`), "the handshake's answer");
    assert.equal(client.connectedData.userId, user);
    assert.ok(client.positions.has(`user:${user}`), "the user channel is known before any push");
    assert.equal((await publish(incident(g1, 1))).status, 200);
    assert.equal((await publish(balance(user, "4.20"))).status, 200);
    assert.ok(client.follow(g2));
    await waitFor(() => client.positions.has(`game:${g2}`), "the follow's answer");
    await publish(incident(g2, 1));
    await waitFor(() => events.filter(([n]) => n === "push").length === 3, "three pushes");
    const frames = events.filter(([n]) => n === "push").map(([, f]) => [f.event, f.channel, f.offset]);
    assert.deepEqual(frames.sort(), [
      ["balance", `user:${user}`, 1],
      ["incident", `game:${g1}`, 1],
      ["incident", `game:${g2}`, 1],
    ].sort());
    assert.equal(client.channelState(`user:${user}`).balance.balance, "4.20");
    assert.deepEqual(gaps(events), []);
  });

  test("a client-side drop resumes every channel exactly once", async () => {
    const user = unique("u");
    const game = unique("g");
    const client = make({ token: token(user), games: [game] });
    const events = record(client);
    client.connect();
    await waitFor(() => client.state === "open" && client.positions.has(`game:${game}`), "open");
    await publish(incident(game, 1));
    await waitFor(() => pushes(events).length === 1, "the first push");
    client.ws.close(3000, "test drop");
    for (let n = 2; n <= 5; n += 1) await publish(incident(game, n));
    await publish(balance(user, "1.00"));
    await waitFor(() => pushes(events).length === 6, "every push");
    const onGame = events.filter(([n, f]) => n === "push" && f.channel === `game:${game}`);
    assert.deepEqual(onGame.map(([, f]) => f.offset), [1, 2, 3, 4, 5]);
    assert.deepEqual(gaps(events), []);
  });

  test("Node's own WebSocket, or a server that never answers, never leaves the client hanging", async () => {
    // A listener that accepts TCP connections and never answers the upgrade.
    const silent = createServer(() => {});
    await new Promise((resolve) => silent.listen(0, "127.0.0.1", resolve));
    const url = `ws://127.0.0.1:${silent.address().port}/wspublic`;
    const impls = [["ws", WebSocket]];
    if (globalThis.WebSocket) impls.push(["built-in", globalThis.WebSocket]);
    try {
      for (const [, Impl] of impls) {
        const client = new IgratechWsClient(url, { WebSocket: Impl, connectTimeout: 200,
                                                   backoff: { initial: 10, maximum: 20 } });
        clients.push(client);
        const events = record(client);
        client.connect();
        await waitFor(() => events.filter(([n]) => n === "close").length >= 3, "three attempts");
        assert.notEqual(client.state, "closed");
        client.close();
      }
    } finally {
      silent.close();
      silent.unref();
    }
  });
});
