// The live console: a page on the gateway's internal API listener that connects to the public
// /wspublic endpoint with igratech-ws-client.js and shows what a front end would receive.
// Everything from the network is put on the page with textContent, never as HTML.

import { CLOSE_CODES, IgratechWsClient } from "./igratech-ws-client.js";

/** Bounds, so that a console left open on a busy node does not grow without end. */
const MAX_EVENTS_PER_CHANNEL = 100;
const MAX_CHANNELS_SHOWN = 200;
const MAX_LOG_LINES = 300;

const $ = (id) => document.getElementById(id);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

const pretty = (value) => JSON.stringify(value, null, 2);
const clock = () => new Date().toISOString().slice(11, 23);

let config = null;
let client = null;
const channelViews = new Map(); // channel -> {details, list, count, total}

// --- log ---------------------------------------------------------------------------------

function log(text, level = "") {
  const list = $("log");
  const item = el("li", { class: level }, el("time", { text: clock() }), text);
  list.prepend(item);
  while (list.children.length > MAX_LOG_LINES) list.lastElementChild.remove();
}

// --- state views -------------------------------------------------------------------------

function showState(state) {
  const pill = $("state");
  pill.textContent = state;
  pill.className = `pill ${state}`;
  pill.dataset.state = state;
  const active = state !== "closed";
  $("connect").disabled = active;
  $("disconnect").disabled = !active;
}

function showConnected(data) {
  const list = $("connected");
  list.replaceChildren();
  for (const [key, value] of Object.entries(data)) {
    list.append(el("dt", { text: key }), el("dd", { text: value === null ? "null" : String(value) }));
  }
}

function showGames() {
  const list = $("games");
  list.replaceChildren();
  for (const game of client ? client.games : []) {
    const remove = el("button", { type: "button", title: `unfollow ${game}`, text: "×" });
    remove.addEventListener("click", () => unfollow(game));
    list.append(el("li", { "data-game": game }, game, remove));
  }
  $("stats").checked = Boolean(client && client.stats);
}

function showPositions() {
  const body = $("positions").tBodies[0];
  body.replaceChildren();
  for (const [channel, position] of client ? client.positions : []) {
    body.append(
      el(
        "tr",
        { "data-channel": channel },
        el("td", { text: channel }),
        el("td", { text: String(position.offset) }),
        el("td", { text: position.epoch }),
      ),
    );
  }
}

function channelView(channel) {
  let view = channelViews.get(channel);
  if (view) return view;
  if (channelViews.size >= MAX_CHANNELS_SHOWN) {
    const [oldest, oldView] = channelViews.entries().next().value;
    oldView.details.remove();
    channelViews.delete(oldest);
  }
  $("channels").querySelector(".empty")?.remove();
  const count = el("span", { class: "count", text: "0 events" });
  const list = el("ol", { class: "events", reversed: "" });
  const details = el(
    "details",
    { class: "channel", open: "", "data-channel": channel },
    el("summary", {}, el("code", { text: channel }), count),
    list,
  );
  $("channels").append(details);
  view = { details, list, count, total: 0 };
  channelViews.set(channel, view);
  return view;
}

function showPush(frame) {
  const view = channelView(frame.channel);
  view.total += 1;
  view.count.textContent = `${view.total} event${view.total === 1 ? "" : "s"}`;
  const item = el(
    "li",
    { class: "fresh", "data-event": frame.event, "data-offset": String(frame.offset) },
    el(
      "div",
      { class: "event-head" },
      el("span", { class: "event-name", text: frame.event }),
      el("span", { class: "muted", text: `offset ${frame.offset} · epoch ${frame.epoch}` }),
      el("span", { class: "muted", text: clock() }),
    ),
    el("pre", { text: pretty(frame.data) }),
  );
  view.list.prepend(item);
  while (view.list.children.length > MAX_EVENTS_PER_CHANNEL) view.list.lastElementChild.remove();
}

// --- actions -----------------------------------------------------------------------------

function connect() {
  if (client) client.close();
  const token = $("token").value.trim() || null;
  const previous = client;
  client = new IgratechWsClient(config.wsUrl, {
    token,
    games: previous ? previous.games : [],
    stats: $("stats").checked,
  });
  client.on("state", ({ state }) => showState(state));
  client.on("connected", (data) => {
    showConnected(data);
    log(`connected: session ${data.sessionId}, user ${data.userId ?? "anonymous"}`);
    // An empty settings request asks for the settings in force, so that the channels table
    // shows every channel (the user's own is subscribed at connect, unannounced) with its
    // position.
    client.query();
  });
  client.on("settings", (data) => {
    showGames();
    showPositions();
    const channels = (data.channels || [])
      .map((s) => `${s.channel}@${s.offset}${s.recovered === undefined ? "" : s.recovered ? " recovered" : " NOT recovered"}`)
      .join(", ");
    log(`settings: ${channels || "no channels"}`);
  });
  client.on("gap", ({ channel }) => log(`${channel}: history no longer covers the gap: reload its state`, "warn"));
  client.on("push", (frame) => {
    showPush(frame);
    showPositions();
  });
  client.on("error", (data) => log(`error ${data.code}: ${data.message}`, "bad"));
  client.on("logout", (data) => log(`logout (${data.reason}), close code ${data.code}`, "bad"));
  client.on("pong", ({ rtt }) => log(`pong, round trip ${rtt} ms`));
  client.on("close", ({ code, reason, reconnect, delay }) => {
    const meaning = CLOSE_CODES[code] || reason || "";
    const next = reconnect ? `; reconnecting in ${(delay / 1000).toFixed(1)} s` : "; not reconnecting";
    const level = reconnect ? "warn" : code === 1000 ? "" : "bad";
    log(`closed with ${code} (${meaning})${next}`, level);
  });
  log(`connecting to ${config.wsUrl}${token ? " with a token" : " anonymously"}`);
  client.connect();
}

function disconnect() {
  if (client) client.close();
}

function follow(game) {
  if (!client) return;
  client.follow(game);
  showGames();
}

function unfollow(game) {
  if (!client) return;
  client.unfollow(game);
  showGames();
}

async function publish() {
  const result = $("publish-result");
  result.className = "result";
  let body;
  try {
    body = JSON.parse($("publish-body").value);
  } catch (error) {
    result.textContent = `Not JSON: ${error.message}`;
    result.classList.add("bad");
    return;
  }
  const answer = await fetch("/console/publish", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  const text = await answer.text();
  let shown = text;
  try {
    shown = pretty(JSON.parse(text));
  } catch {
    // not JSON: show as it came
  }
  result.textContent = `${answer.status} ${shown}`;
  if (!answer.ok) result.classList.add("bad");
}

// --- start -------------------------------------------------------------------------------

function setUpPublish() {
  $("publish-panel").hidden = false;
  const select = $("publish-example");
  for (const name of Object.keys(config.examples || {})) {
    select.append(el("option", { value: name, text: name }));
  }
  const fill = () => {
    const example = config.examples[select.value];
    if (example) $("publish-body").value = pretty(example);
  };
  select.addEventListener("change", fill);
  fill();
  $("publish").addEventListener("click", () => publish().catch((e) => log(`publish failed: ${e}`, "bad")));
}

async function main() {
  const answer = await fetch("/console/config.json");
  config = await answer.json();
  $("node").textContent = config.node;
  $("ws-url").textContent = config.wsUrl;
  if (config.demo) {
    $("demo-badge").hidden = false;
    setUpPublish();
    if (config.demoToken) {
      const button = $("demo-token");
      button.hidden = false;
      button.title = `a token for ${config.demoUser}`;
      button.addEventListener("click", () => {
        $("token").value = config.demoToken;
        connect();
      });
    }
  }
  $("connect").addEventListener("click", connect);
  $("disconnect").addEventListener("click", disconnect);
  $("follow-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const game = $("game").value.trim();
    if (game) follow(game);
    $("game").value = "";
  });
  $("stats").addEventListener("change", () => {
    if (client) client.setStats($("stats").checked);
  });
  $("clear").addEventListener("click", () => {
    channelViews.clear();
    $("channels").replaceChildren();
  });
  // For the developer tools (and tests): the console's client, e.g. `igratechConsole.client`.
  window.igratechConsole = {
    get client() {
      return client;
    },
  };
  document.body.dataset.ready = "true";
  connect();
}

main().catch((error) => log(`console failed to start: ${error}`, "bad"));
