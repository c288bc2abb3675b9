// The JavaScript client under Node (with the `ws` package), driven by the conformance tests:
// commands arrive on stdin, one JSON object a line; the client's events leave on stdout, one JSON
// object a line, in the shape tests/support/conformance_drivers.py normalizes the Python SDK's events to.
import { createRequire } from "node:module";
import { createInterface } from "node:readline";
import { pathToFileURL } from "node:url";

const { IgratechWsClient } = await import(pathToFileURL(process.env.IGRATECH_WS_CLIENT_MODULE).href);
const WebSocket = createRequire(`${process.env.IGRATECH_WS_NODE_MODULES}/`)("ws");

const out = (record) => process.stdout.write(`${JSON.stringify(record)}\n`);
let client = null;

function start({ url, token, games, stats }) {
  client = new IgratechWsClient(url, {
    WebSocket,
    token,
    games,
    stats,
    backoff: { initial: 100, maximum: 500 },
    connectTimeout: 3000,
  });
  client.on("connected", (data) => out({ kind: "connected", userId: data.userId ?? null }));
  client.on("push", (frame) =>
    out({
      kind: "push",
      event: frame.event,
      channel: frame.channel,
      offset: frame.offset,
      epoch: frame.epoch,
      snapshot: frame.snapshot === true,
    }),
  );
  client.on("settings", (data) =>
    out({ kind: "settings", channels: data.channels.map((state) => state.channel) }),
  );
  client.on("gap", (gap) => out({ kind: "gap", channel: gap.channel, reason: gap.reason }));
  client.on("logout", (data) => out({ kind: "logout", reason: data.reason, code: data.code }));
  client.on("error", (data) => out({ kind: "error", code: data.code }));
  client.on("close", (close) =>
    out({ kind: "disconnected", code: close.code, reconnect: close.reconnect }),
  );
  client.on("state", ({ state }) => {
    if (state === "closed") out({ kind: "ended" });
  });
  client.connect();
}

const commands = {
  start,
  follow: ({ games }) => client.follow(...games),
  set_token: ({ token }) => client.setToken(token),
  reconnect: () => client.reconnect(),
  inject: ({ channel, offset, epoch }) => client.positions.set(channel, { offset, epoch }),
  state: ({ channel }) => ({ state: client.channelState(channel) }),
  positions: () => ({ positions: Object.fromEntries(client.positions) }),
  close: () => {
    client?.close();
    setTimeout(() => process.exit(0), 50);
  },
};

for await (const line of createInterface({ input: process.stdin })) {
  if (!line.trim()) continue;
  const command = JSON.parse(line);
  try {
    const answer = commands[command.cmd](command);
    out({ kind: "ack", cmd: command.cmd, ...(answer && typeof answer === "object" ? answer : {}) });
  } catch (error) {
    out({ kind: "failure", cmd: command.cmd, error: String(error?.stack || error) });
  }
}
client?.close();
process.exit(0);
