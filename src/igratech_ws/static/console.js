// The live console: a page on the gateway's internal API listener that connects to the public
// /wspublic endpoint with igratech-ws-client.js, like any front end would, and shows what it
// receives twice: rendered (scoreboards, bet ticker, wallet) and raw (the side panel).
//
// In demo mode it signs in as the demo user and follows the demo's games on first load. A game's
// scoreboard and the wallet are rendered from the client's per-channel state
// (`client.channelState(channel)`), which both live pushes and the server's snapshot frames
// (`"snapshot": true`, the state sent right after a follow) update: the state is there as soon
// as the server sends it. Incidents, bets and bet results are streams, rendered as they come.
//
// Everything from the network is put on the page with textContent, never as HTML.

import { CLOSE_CODES, IgratechWsClient } from "./igratech-ws-client.js";

/** Bounds, so that a console left open on a busy node does not grow without end. */
const MAX_EVENTS_PER_CHANNEL = 100;
const MAX_CHANNELS_SHOWN = 200;
const MAX_LOG_LINES = 300;
const MAX_INCIDENTS = 4;
const MAX_TICKER_ROWS = 10;
const MAX_RESULTS = 6;
const MAX_SCOREBOARDS = 12;
/** The raw-frame group of frames that belong to no channel (connected, settings, logout...). */
const SESSION = "session";

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
const clock = () => new Date().toLocaleTimeString("en-GB", { hour12: false });
const label = (text) => String(text).replace(/_/g, " ").replace(/^./, (c) => c.toUpperCase());

/** "12:34:56" of an RFC 3339 timestamp, or of now when missing or invalid. */
function timeOf(stamp) {
  const date = new Date(stamp);
  return Number.isNaN(date.getTime()) ? clock() : date.toLocaleTimeString("en-GB", { hour12: false });
}

function money(amount, currency) {
  const value = Number(amount);
  if (!Number.isFinite(value)) return String(amount);
  try {
    return new Intl.NumberFormat("en-GB", { style: "currency", currency: currency || "EUR" }).format(value);
  } catch {
    return `${value.toFixed(2)} ${currency || ""}`.trim();
  }
}

let config = null;
let client = null;
let walletUser; // the user whose wallet is on the page (undefined: none yet)
const channelViews = new Map(); // channel -> {details, list, count, total}
const games = new Map(); // gameId -> {card, incidents: [data], parts}

// --- log ---------------------------------------------------------------------------------

function log(text, level = "") {
  const list = $("log");
  const item = el("li", { class: level }, el("time", { text: clock() }), text);
  list.prepend(item);
  while (list.children.length > MAX_LOG_LINES) list.lastElementChild.remove();
}

// --- connection views --------------------------------------------------------------------

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
    let shown = value === null ? "null" : typeof value === "object" ? JSON.stringify(value) : String(value);
    if (key === "channels" && Array.isArray(value)) {
      shown = value.map((c) => (c && typeof c === "object" ? `${c.channel}@${c.offset}` : String(c))).join(", ");
    }
    list.append(el("dt", { text: key }), el("dd", { text: shown }));
  }
  const pill = $("user-pill");
  pill.hidden = false;
  pill.textContent = data.userId ? `signed in as ${data.userId}` : "anonymous";
  $("wallet-user").textContent = data.userId ? data.userId : "";
  if (data.userId !== walletUser) {
    // Another user (or anonymous): the previous user's wallet is not this one's.
    walletUser = data.userId;
    $("balance").textContent = "–";
    $("balance").dataset.filled = "false";
    $("results").replaceChildren();
    $("results-empty").hidden = false;
  }
  if (!data.userId) $("balance-meta").textContent = "Anonymous: no wallet. Use the demo token to sign in.";
  else if ($("balance").dataset.filled !== "true") $("balance-meta").textContent = "Waiting for the balance…";
}

function showNotice(text) {
  $("notice-text").textContent = text;
  $("notice").hidden = false;
}

function hideNotice() {
  $("notice").hidden = true;
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
  syncScoreboards();
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

// --- raw frames (the side panel) -----------------------------------------------------------

function channelView(channel) {
  let view = channelViews.get(channel);
  if (view) return view;
  if (channelViews.size >= MAX_CHANNELS_SHOWN) {
    const [oldest, oldView] = channelViews.entries().next().value;
    oldView.details.remove();
    channelViews.delete(oldest);
  }
  $("channels").querySelector(".empty")?.remove();
  const count = el("span", { class: "count", text: "0 frames" });
  const list = el("ol", { class: "events", reversed: "" });
  // The session's own frames start folded: the channels' pushes are what the panel is for.
  const details = el(
    "details",
    channel === SESSION ? { class: "channel", "data-channel": channel } : { class: "channel", open: "", "data-channel": channel },
    el("summary", {}, el("code", { text: channel }), count),
    list,
  );
  $("channels").append(details);
  view = { details, list, count, total: 0 };
  channelViews.set(channel, view);
  return view;
}

function showFrame(frame) {
  const channel = typeof frame.channel === "string" ? frame.channel : SESSION;
  const view = channelView(channel);
  view.total += 1;
  view.count.textContent = `${view.total} frame${view.total === 1 ? "" : "s"}`;
  const head = el("div", { class: "event-head" }, el("span", { class: "event-name", text: String(frame.event) }));
  if (frame.snapshot === true) head.append(el("span", { class: "tag snapshot", text: "snapshot" }));
  if (frame.conflated === true) head.append(el("span", { class: "tag", text: "conflated" }));
  if (frame.offset !== undefined) head.append(el("span", { class: "hint", text: `#${frame.offset} · ${frame.epoch}` }));
  head.append(el("span", { class: "hint time", text: clock() }));
  const item = el("li", { class: "fresh", "data-event": String(frame.event) }, head, el("pre", { text: pretty(frame.data) }));
  if (frame.offset !== undefined) item.dataset.offset = String(frame.offset);
  if (frame.snapshot === true) item.dataset.snapshot = "true";
  view.list.prepend(item);
  while (view.list.children.length > MAX_EVENTS_PER_CHANNEL) view.list.lastElementChild.remove();
}

// --- scoreboards -------------------------------------------------------------------------

const PERIODS = {
  pre_match: "Not started",
  first_half: "1st half",
  half_time: "Half-time",
  second_half: "2nd half",
  full_time: "Full-time",
};

const INCIDENT_TAGS = {
  goal: "GOAL",
  corner: "CORNER",
  yellow_card: "CARD",
  red_card: "CARD",
  kick_off: "KO",
  half_time: "HT",
  second_half: "2H",
  full_time: "FT",
};

function gameView(gameId) {
  let view = games.get(gameId);
  if (view) return view;
  $("scoreboards").querySelector(".empty")?.remove();
  const parts = {
    period: el("span", { class: "period", text: "waiting" }),
    homeName: el("span", { class: "name", text: "…" }),
    awayName: el("span", { class: "name", text: "…" }),
    homeScore: el("span", { class: "score", "data-side": "home", text: "–" }),
    awayScore: el("span", { class: "score", "data-side": "away", text: "–" }),
    possession: el("div", { class: "bar-fill" }),
    possessionText: el("div", { class: "bar-text" }),
    figures: el("dl", { class: "figures" }),
    incidents: el("ol", { class: "incidents" }),
    waiting: el("p", { class: "waiting", text: "Waiting for the game's state…" }),
  };
  const card = el(
    "article",
    { class: "game", "data-game": gameId, "data-filled": "false" },
    el("div", { class: "game-head" }, el("code", { class: "game-id", text: gameId }), parts.period),
    el(
      "div",
      { class: "teams" },
      el("div", { class: "team" }, parts.homeName, parts.homeScore),
      el("div", { class: "team" }, parts.awayName, parts.awayScore),
    ),
    parts.waiting,
    el("div", { class: "possession" }, el("div", { class: "bar" }, parts.possession), parts.possessionText),
    parts.figures,
    parts.incidents,
  );
  $("scoreboards").append(card);
  view = { card, parts, incidents: [] };
  games.set(gameId, view);
  return view;
}

/** Scoreboards for exactly the followed games (in follow order), within MAX_SCOREBOARDS. */
function syncScoreboards() {
  const wanted = (client ? client.games : []).slice(0, MAX_SCOREBOARDS);
  for (const [gameId, view] of games) {
    if (!wanted.includes(gameId)) {
      view.card.remove();
      games.delete(gameId);
    }
  }
  for (const gameId of wanted) {
    const view = gameView(gameId);
    $("scoreboards").append(view.card); // keeps the follow order
    renderGame(gameId);
  }
  if (!wanted.length && !$("scoreboards").querySelector(".empty")) {
    $("scoreboards").append(el("p", { class: "empty", text: "No game followed. Follow one below." }));
  }
}

function renderGame(gameId) {
  const view = games.get(gameId);
  if (!view || !client) return;
  const stats = client.channelState(`game:${gameId}`).stats;
  const values = stats && stats.values ? stats.values : null;
  const { parts, card } = view;
  if (values && values.team_home !== undefined) {
    card.dataset.filled = "true";
    parts.waiting.hidden = true;
    parts.homeName.textContent = String(values.team_home);
    parts.awayName.textContent = String(values.team_away);
    parts.homeScore.textContent = String(values.score_home ?? 0);
    parts.awayScore.textContent = String(values.score_away ?? 0);
    const period = String(values.period || "");
    const live = period === "first_half" || period === "second_half";
    parts.period.textContent = live ? `LIVE ${values.minute}'` : PERIODS[period] || label(period);
    parts.period.className = `period ${live ? "live" : "paused"}`;
    card.dataset.period = period;
    card.dataset.minute = String(values.minute ?? "");
    const share = Number(values.possession_home);
    if (Number.isFinite(share)) {
      parts.possession.style.width = `${Math.max(0, Math.min(100, share))}%`;
      parts.possessionText.replaceChildren(
        el("span", { text: `${share}%` }),
        el("span", { class: "hint", text: "possession" }),
        el("span", { text: `${100 - share}%` }),
      );
    }
    parts.figures.replaceChildren();
    for (const [name, title] of [["shots", "Shots"], ["on_target", "On target"], ["corners", "Corners"], ["yellow", "Yellow"], ["red", "Red"]]) {
      const home = values[`${name}_home`];
      const away = values[`${name}_away`];
      if (home === undefined || away === undefined) continue;
      parts.figures.append(el("div", {}, el("dt", { text: title }), el("dd", { text: `${home} – ${away}` })));
    }
  }
  parts.incidents.replaceChildren();
  for (const incident of view.incidents) {
    const kind = String(incident.type);
    const side = incident.side === "home" || incident.side === "away" ? incident.side : "none";
    const tag = el("span", { class: `tag incident-${kind}`, text: INCIDENT_TAGS[kind] || label(kind).toUpperCase() });
    const score = incident.score ? ` (${incident.score.home}–${incident.score.away})` : "";
    parts.incidents.append(
      el(
        "li",
        { "data-type": kind, "data-side": side },
        el("span", { class: "minute", text: `${incident.minute ?? 0}'` }),
        tag,
        el("span", { class: "text", text: `${incident.description || label(kind)}${kind === "goal" ? score : ""}` }),
      ),
    );
  }
}

function onIncident(frame) {
  const gameId = frame.channel.slice("game:".length);
  const view = games.get(gameId);
  if (!view) return;
  if (frame.data.type === "kick_off") view.incidents = []; // a new match on this game id
  view.incidents.unshift(frame.data);
  view.incidents.length = Math.min(view.incidents.length, MAX_INCIDENTS);
  renderGame(gameId);
}

// --- bet ticker, wallet, platform figures -----------------------------------------------

function gameName(gameId) {
  const stats = client ? client.channelState(`game:${gameId}`).stats : null;
  const values = stats && stats.values;
  return values && values.team_home !== undefined ? `${values.team_home} v ${values.team_away}` : gameId;
}

function onBet(frame) {
  const body = $("ticker").tBodies[0];
  const gameId = String(frame.data.gameId || frame.channel.slice("game:".length));
  for (const bet of frame.data.bets || []) {
    const mine = Boolean(config && config.demoPlayer && bet.player === config.demoPlayer);
    const player = el("td", { text: String(bet.player || "–") });
    if (mine) player.append(el("span", { class: "tag you", text: "you" }));
    const row = el(
      "tr",
      { class: mine ? "fresh mine" : "fresh", "data-bet": String(bet.betId) },
      el("td", { class: "hint", text: timeOf(bet.placedAt) }),
      el("td", { class: "game-cell", text: gameName(gameId) }),
      player,
      el("td", {}, el("span", { class: "hint", text: `${label(bet.market || "")} · ` }), String(bet.selection || "")),
      el("td", { class: "num", text: String(bet.odds) }),
      el("td", { class: "num strong", text: money(bet.stake, bet.currency) }),
    );
    body.prepend(row);
  }
  while (body.rows.length > MAX_TICKER_ROWS) body.lastElementChild.remove();
  $("ticker-empty").hidden = body.rows.length > 0;
}

function renderBalance() {
  if (!client || !client.connectedData || !client.connectedData.userId) return;
  const balance = client.channelState(`user:${client.connectedData.userId}`).balance;
  if (!balance) return;
  const shown = $("balance");
  shown.textContent = money(balance.balance, balance.currency);
  shown.dataset.filled = "true";
  shown.dataset.amount = String(balance.balance);
  const reason = balance.reason ? label(balance.reason) : "Balance";
  $("balance-meta").textContent = `${reason} · ${timeOf(balance.updatedAt)}`;
}

function onBetsResult(frame) {
  const list = $("results");
  for (const result of frame.data.results || []) {
    const status = String(result.status);
    list.prepend(
      el(
        "li",
        { class: `fresh result-${status}`, "data-status": status },
        el("span", { class: `tag status-${status}`, text: status }),
        el("span", { class: "result-game", text: gameName(String(result.gameId || "")) }),
        el("span", { class: "num", text: `${money(result.stake, result.currency)} → ${money(result.payout, result.currency)}` }),
      ),
    );
  }
  while (list.children.length > MAX_RESULTS) list.lastElementChild.remove();
  $("results-empty").hidden = list.children.length > 0;
}

function renderKpis() {
  if (!client) return;
  const stats = client.channelState("global").stats;
  const values = (stats && stats.values) || {};
  for (const node of document.querySelectorAll("[data-kpi]")) {
    const value = values[node.dataset.kpi];
    if (value === undefined) continue;
    node.dataset.filled = "true";
    node.textContent = node.dataset.kpi === "stake_last_minute" ? money(value, values.currency) : Number(value).toLocaleString("en-GB");
  }
}

function onPush(frame) {
  const { channel, event } = frame;
  if (channel.startsWith("game:")) {
    if (event === "stats") renderGame(channel.slice("game:".length));
    else if (event === "incident") onIncident(frame);
    else if (event === "bet") onBet(frame);
  } else if (channel.startsWith("user:")) {
    if (event === "balance") renderBalance();
    else if (event === "bets-result") onBetsResult(frame);
  } else if (event === "stats") {
    renderKpis();
  }
}

// --- actions -----------------------------------------------------------------------------

function connect() {
  if (client) client.close();
  hideNotice();
  const token = $("token").value.trim() || null;
  const previous = client;
  const games = previous ? previous.games : config.demo && config.demoGames ? config.demoGames : [];
  const stats = previous ? $("stats").checked : Boolean(config.demo) || $("stats").checked;
  const mine = new IgratechWsClient(config.wsUrl, { token, games, stats });
  client = mine;
  // A replaced client may still report its end: only the current one speaks for the page.
  const on = (name, fn) => mine.on(name, (detail) => mine === client && fn(detail));
  on("state", ({ state }) => showState(state));
  // Raw frames: a channel's pushes as the client delivers them (a replayed duplicate is
  // dropped by the client), and the session's own frames (connected, settings, logout, error).
  on("frame", (frame) => {
    if (frame.event !== "pong" && typeof frame.channel !== "string") showFrame(frame);
  });
  on("connected", (data) => {
    showConnected(data);
    log(`connected: session ${data.sessionId}, user ${data.userId ?? "anonymous"}`);
    // An empty settings request asks for the settings in force, so that the channels table
    // shows every channel (the user's own is subscribed at connect, unannounced) with its
    // position.
    mine.query();
    renderBalance();
  });
  on("settings", (data) => {
    showGames();
    showPositions();
    const channels = (data.channels || [])
      .map((s) => `${s.channel}@${s.offset}${s.recovered === undefined ? "" : s.recovered ? " recovered" : " NOT recovered"}`)
      .join(", ");
    log(`settings: ${channels || "no channels"}`);
  });
  on("gap", ({ channel }) => log(`${channel}: history no longer covers the gap: reload its state`, "warn"));
  on("push", (frame) => {
    showFrame(frame);
    onPush(frame);
    showPositions();
  });
  on("error", (data) => log(`error ${data.code}: ${data.message}`, "bad"));
  on("logout", (data) => {
    log(`logout (${data.reason}), close code ${data.code}`, "bad");
    const meaning = CLOSE_CODES[data.code] || data.reason;
    const who = mine.connectedData && mine.connectedData.userId ? mine.connectedData.userId : "this user";
    showNotice(`Logged out: ${who} ${meaning} (close code ${data.code}). This page receives nothing more until it connects again.`);
  });
  on("pong", ({ rtt }) => log(`pong, round trip ${rtt} ms`));
  on("close", ({ code, reason, reconnect, delay }) => {
    const meaning = CLOSE_CODES[code] || reason || "";
    const next = reconnect ? `; reconnecting in ${(delay / 1000).toFixed(1)} s` : "; not reconnecting";
    const level = reconnect ? "" : code === 1000 ? "" : "bad";
    log(`closed with ${code} (${meaning})${next}`, level);
    if (!reconnect && code !== 1000 && $("notice").hidden) {
      showNotice(`Disconnected: ${meaning || "the connection ended"} (close code ${code}).`);
    }
  });
  log(`connecting to ${config.wsUrl}${token ? " with a token" : " anonymously"}`);
  mine.connect();
  showGames();
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

function setUpFramesPanel() {
  const toggle = $("frames-toggle");
  const apply = (open) => {
    toggle.setAttribute("aria-expanded", String(open));
    document.body.classList.toggle("frames-closed", !open);
    $("frames-panel").hidden = !open;
  };
  toggle.addEventListener("click", () => apply(toggle.getAttribute("aria-expanded") !== "true"));
  apply(true);
}

async function main() {
  const answer = await fetch("/console/config.json");
  config = await answer.json();
  $("node").textContent = config.node;
  $("ws-url").textContent = config.wsUrl;
  setUpFramesPanel();
  if (config.demo) {
    $("demo-badge").hidden = false;
    setUpPublish();
    if (config.demoToken) {
      // First load in demo mode: sign in as the demo user, so that the wallet has a user.
      $("token").value = config.demoToken;
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
  $("notice-reconnect").addEventListener("click", connect);
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
