// igratech-ws-client.js: the JavaScript client of the Igratech WebSocket API (one ES module, no
// dependencies, no build step). It runs on any WHATWG WebSocket: browsers, and Node with the `ws`
// package (`new IgratechWsClient(url, {WebSocket})`).
//
// This file is the one source: the npm package `@igratech/ws-client` is `clients/js/`, and every
// gateway node serves this same file at /console/static/igratech-ws-client.js.
//
// What it does for you (see docs/browser-client.md):
// - connects to /wspublic with an optional token (query `token`; browsers cannot set headers);
// - sends `ping` every `pingInterval` seconds (from `connected`) and drops a silent link;
// - keeps the games you follow, the stats flag, the last position (offset, epoch) of every
//   channel, and the current state (`stats`, `balance`) of every channel;
// - reconnects with exponential backoff and full jitter when the close code allows it, and resumes
//   through the handshake `settings` query parameter (games, stats, and `recover` with the last
//   position of every channel), so that the server replays what was missed;
// - emits `gap` whenever it cannot prove that nothing was missed on a channel;
// - never reconnects after `logout` (4001, 4002, 4003) or a normal close.

/** Close codes after which the client does not reconnect (AsyncAPI `x-close-codes`). */
export const FINAL_CLOSE_CODES = new Set([1000, 1008, 1009, 4001, 4002, 4003]);

/** Human-readable meaning of the gateway's close codes. */
export const CLOSE_CODES = {
  1000: "normal closure",
  1001: "going away",
  1006: "connection lost (no close frame; also a refused handshake)",
  1008: "policy violation",
  1009: "message too big",
  1011: "internal error",
  1012: "server restarting, reconnect",
  1013: "slow consumer or overload, reconnect later",
  4001: "logged in from another client",
  4002: "logged out by the platform",
  4003: "token expired",
  4004: "idle timeout",
};

/** Pushes that belong to a channel (they carry `channel`, `offset`, `epoch`). */
export const PUSH_EVENTS = new Set(["incident", "bet", "bets-result", "balance", "stats"]);

/** State events: a newer one replaces the older, per channel and event (protocol decision D3). */
export const STATE_EVENTS = new Set(["stats", "balance"]);

/** Whether a client should reconnect after close code `code` (unknown codes: yes). */
export function shouldReconnect(code) {
  return !FINAL_CLOSE_CODES.has(code);
}

/** Exponential backoff with full jitter: attempt n waits uniform(0, min(max, initial * 2^n)). */
export class Backoff {
  constructor({ initial = 500, maximum = 30000, multiplier = 2, maxAttempts = Infinity } = {}) {
    Object.assign(this, { initial, maximum, multiplier, maxAttempts });
    this.attempt = 0;
  }

  /** The next delay in milliseconds, or null when the attempts are used up. */
  next() {
    if (this.attempt >= this.maxAttempts) return null;
    const cap = Math.min(this.maximum, this.initial * this.multiplier ** this.attempt);
    this.attempt += 1;
    return Math.random() * cap;
  }

  reset() {
    this.attempt = 0;
  }
}

/** After this many handshakes refused right after a successful probe, the resume is refused. */
const REFUSALS_BEFORE_FALLBACK = 2;

const ignore = () => {};

/** Stop listening to a socket we abandon. Handlers become no-ops rather than null: the `ws`
 * package emits `error` when a connecting socket is closed, and an EventEmitter with no `error`
 * listener throws. */
function detach(ws) {
  ws.onopen = ws.onmessage = ws.onclose = ws.onerror = ignore;
}

function samePosition(a, b) {
  // Offset 0 means "nothing seen yet": its epoch does not matter (protocol decision D1).
  return a.offset === b.offset && (a.epoch === b.epoch || a.offset === 0);
}

/**
 * One logical connection to the gateway, kept alive across reconnects.
 *
 * Options: `token` (JWT or null), `games` (array of game ids), `stats` (bool), `backoff`
 * (Backoff options, in ms), `healthyAfter` (ms a connection must last before the backoff resets,
 * default 10000), `connectTimeout` (ms from opening a socket to `connected`, default 10000),
 * `WebSocket` (the constructor to use; default `globalThis.WebSocket`).
 */
export class IgratechWsClient {
  constructor(url, options = {}) {
    this.url = url;
    this.token = options.token || null;
    this.games = [...new Set(options.games || [])];
    this.stats = Boolean(options.stats);
    this.healthyAfter = options.healthyAfter ?? 10000;
    this.connectTimeout = options.connectTimeout ?? 10000;
    this.backoff = new Backoff(options.backoff);
    this.WebSocketImpl = options.WebSocket || globalThis.WebSocket;
    /** channel -> {offset, epoch}: the last position received (or the starting one). */
    this.positions = new Map();
    this.connectedData = null;
    this.state = "closed";
    this.ws = null;
    this._handlers = new Map();
    this._states = new Map(); // channel -> Map(event -> {data, offset, epoch})
    this._conn = null; // the current attempt: {ws, greeted, plain, carriedSettings, timer}
    this._probeSocket = null;
    this._stopped = true;
    this._retryTimer = null;
    this._pingTimer = null;
    this._lastFrameAt = 0;
    this._openedAt = 0;
    // Telling a refused resume from a node that is down (see "Refused resumes" in the docs):
    this._suspect = false; // the last handshake carried `settings` and failed: probe next
    this._confirming = false; // a probe just succeeded: this attempt tells whether we are refused
    this._refusals = 0; // full handshakes that failed right after a successful probe
    this._fallback = false; // the next connection omits `settings` (the resume was refused)
    this._fallbackRecover = null; // channels whose recovery the fallback's `settings` asked for
    this._reconnectNow = false;
  }

  // --- events -----------------------------------------------------------------------------

  /** Call `fn(detail)` on event `name`; returns a function that removes the handler. */
  on(name, fn) {
    if (!this._handlers.has(name)) this._handlers.set(name, new Set());
    this._handlers.get(name).add(fn);
    return () => this._handlers.get(name)?.delete(fn);
  }

  _emit(name, detail) {
    for (const fn of this._handlers.get(name) || []) {
      try {
        fn(detail);
      } catch (error) {
        console.error(`igratech-ws-client: "${name}" handler failed`, error);
      }
    }
  }

  _setState(state) {
    if (this.state !== state) {
      this.state = state;
      this._emit("state", { state });
    }
  }

  // --- connection -------------------------------------------------------------------------

  /** Open the connection (and keep it open until `close()` or a final close code). */
  connect() {
    if (!this._stopped && (this._conn || this._retryTimer || this._probeSocket)) return;
    this._stopped = false;
    this._suspect = this._confirming = false;
    this._refusals = 0;
    this._open();
  }

  /** Close for good (code 1000); no reconnect. */
  close() {
    this._stopped = true;
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    this._stopPing();
    this._endProbe();
    const conn = this._conn;
    if (conn) {
      this._finish(conn, 1000, "client closed");
      try {
        conn.ws.close(1000, "client closed");
      } catch {
        // a socket still connecting may refuse a code; it is abandoned either way
      }
    }
    this._setState("closed");
  }

  /** Drop the connection and reconnect at once, resuming every channel (e.g. after setToken). */
  reconnect() {
    const conn = this._conn;
    if (!conn || this._stopped) return;
    this._reconnectNow = true;
    this._finish(conn, 3000, "reconnect asked");
    try {
      conn.ws.close(3000, "reconnect asked");
    } catch {
      // still connecting: abandoned
    }
  }

  /** Use another token from the next connection on; positions of user channels are dropped. */
  setToken(token) {
    if ((token || null) === this.token) return;
    this.token = token || null;
    for (const channel of [...this.positions.keys()]) {
      if (channel.startsWith("user:")) this._forget(channel);
    }
  }

  /** The handshake URL: token and the resume `settings` (games, stats, recover). */
  handshakeUrl() {
    const url = this._plainUrl();
    const settings = {};
    if (this.games.length) settings.games = this.games;
    if (this.stats) settings.stats = true;
    const recover = {};
    for (const [channel, position] of this.positions) {
      if (this._follows(channel)) recover[channel] = position;
    }
    if (Object.keys(recover).length) settings.recover = recover;
    if (Object.keys(settings).length) url.searchParams.set("settings", JSON.stringify(settings));
    return url.toString();
  }

  /** The URL with the token only (a probe, or the fallback after a refused resume). */
  _plainUrl() {
    const url = new URL(this.url, globalThis.location?.href);
    url.searchParams.delete("settings");
    if (this.token) url.searchParams.set("token", this.token);
    return url;
  }

  _follows(channel) {
    if (channel.startsWith("user:")) return Boolean(this.token);
    if (channel === "global") return this.stats;
    return channel.startsWith("game:") && this.games.includes(channel.slice(5));
  }

  _open() {
    this._retryTimer = null;
    if (this._stopped) return;
    this._setState(this.positions.size || this.connectedData ? "reconnecting" : "connecting");
    const plain = this._fallback;
    const url = plain ? this._plainUrl().toString() : this.handshakeUrl();
    let ws;
    try {
      ws = new this.WebSocketImpl(url);
    } catch (error) {
      this._stopped = true;
      this._emit("close", { code: 0, reason: String(error), reconnect: false, delay: null });
      this._setState("closed");
      return;
    }
    const conn = {
      ws,
      plain,
      carriedSettings: url.includes("settings="),
      confirming: this._confirming,
      greeted: false,
      done: false,
      inForce: new Set(), // channels joined on this connection (their answer position is old)
      wanted: JSON.stringify([this.games, this.stats]), // what the handshake asked to follow
      timer: null,
    };
    this._confirming = false;
    this._conn = conn;
    this.ws = ws;
    // Node 20's built-in WebSocket never fires `close` after a refused connection, and a
    // silently dropped handshake may never end: without `connected` in time, give up on it.
    conn.timer = setTimeout(() => {
      this._finish(conn, 1006, "no `connected` within the connect timeout");
      try {
        ws.close();
      } catch {
        // nothing to do: the socket is abandoned
      }
    }, this.connectTimeout);
    ws.onopen = () => {
      this._openedAt = Date.now();
      this._lastFrameAt = Date.now();
    };
    ws.onmessage = (message) => {
      if (conn.done) return;
      this._lastFrameAt = Date.now();
      let frame;
      try {
        frame = JSON.parse(message.data);
      } catch {
        return;
      }
      if (frame && typeof frame === "object") this._onFrame(conn, frame);
    };
    ws.onclose = (event) => this._finish(conn, event.code, event.reason);
    ws.onerror = ignore; // `close` (or the connect timeout) follows
  }

  /** The attempt `conn` ended (close, or connect timeout): reconnect, probe, or stop. */
  _finish(conn, code, reason) {
    if (conn.done) return;
    conn.done = true;
    clearTimeout(conn.timer);
    const { ws } = conn;
    detach(ws);
    if (this._conn !== conn) return;
    this._conn = null;
    this.ws = null;
    this._stopPing();
    if (conn.greeted) {
      if (Date.now() - this._openedAt >= this.healthyAfter) this.backoff.reset();
    } else if (conn.confirming) {
      // The server took a probe a moment ago but not this handshake: count a refusal.
      this._refusals += 1;
      if (this._refusals >= REFUSALS_BEFORE_FALLBACK) this._fallback = true;
      else this._suspect = true;
    } else if (conn.carriedSettings && !conn.plain) {
      // Refused (HTTP 400/403: a browser cannot tell) or the node is down: a probe will tell.
      this._suspect = true;
    }
    // After close() or a logout the client is stopped: the close is reported, nothing more.
    const reconnect = !this._stopped && shouldReconnect(code);
    let delay = reconnect ? this.backoff.next() : null;
    if (delay !== null && (this._reconnectNow || (this._fallback && !conn.greeted))) delay = 0;
    this._reconnectNow = false;
    this._emit("close", {
      code,
      reason: reason || CLOSE_CODES[code] || "",
      reconnect: reconnect && delay !== null,
      delay,
      wasConnected: conn.greeted,
    });
    if (reconnect && delay !== null && !this._stopped) {
      this._setState("reconnecting");
      this._retryTimer = setTimeout(() => (this._suspect ? this._probe() : this._open()), delay);
    } else {
      this._stopped = true;
      this._setState("closed");
    }
  }

  /**
   * Is the server up and taking our token, with no `settings`? A socket that opens answers yes:
   * then the handshake that failed was refused (or the node came back in between), and a full
   * handshake is tried at once. A probe that fails means the node is down: probe again later.
   */
  _probe() {
    this._retryTimer = null;
    if (this._stopped) return;
    this._suspect = false;
    let ws;
    try {
      ws = new this.WebSocketImpl(this._plainUrl().toString());
    } catch {
      this._open();
      return;
    }
    this._probeSocket = ws;
    const timer = setTimeout(() => end(false, 1006), this.connectTimeout);
    const end = (opened, code) => {
      if (this._probeSocket !== ws) return;
      this._endProbe();
      clearTimeout(timer);
      if (this._stopped) return;
      if (opened) {
        this._confirming = true;
        this._open();
        return;
      }
      this._suspect = true;
      const delay = this.backoff.next();
      this._emit("close", {
        code,
        reason: "probe failed: the server is unreachable or refuses this token",
        reconnect: delay !== null,
        delay,
        wasConnected: false,
      });
      if (delay === null) {
        this._stopped = true;
        this._setState("closed");
      } else {
        this._retryTimer = setTimeout(() => this._probe(), delay);
      }
    };
    ws.onopen = () => end(true);
    ws.onclose = (event) => end(false, event.code);
    ws.onerror = ignore;
    ws.onmessage = ignore;
  }

  _endProbe() {
    const ws = this._probeSocket;
    if (!ws) return;
    this._probeSocket = null;
    detach(ws);
    try {
      ws.close(1000, "probe");
    } catch {
      // still connecting: abandoned
    }
  }

  // --- frames -----------------------------------------------------------------------------

  _onFrame(conn, frame) {
    const data = frame.data || {};
    this._emit("frame", frame);
    switch (frame.event) {
      case "connected":
        this._onConnected(conn, data);
        break;
      case "settings": {
        this.games = [...(data.games || [])];
        this.stats = Boolean(data.stats);
        const listed = new Set((data.channels || []).map((s) => s.channel));
        const gaps = this._join(conn, data.channels || []);
        for (const channel of [...this.positions.keys()]) {
          if (!listed.has(channel) && !channel.startsWith("user:")) this._forget(channel);
        }
        for (const channel of [...conn.inForce]) {
          if (!listed.has(channel)) conn.inForce.delete(channel);
        }
        this._fallbackRecover = null;
        this._emit("settings", data);
        for (const gap of gaps) this._emit("gap", gap);
        break;
      }
      case "pong":
        this._emit("pong", {
          rtt: typeof data.ts === "number" ? Date.now() - data.ts : null,
          serverTime: data.serverTime,
        });
        break;
      case "error":
        if (data.event === "settings" && this._fallbackRecover) {
          // The fallback's recovery was refused too: follow without it and say what was lost.
          const lost = this._fallbackRecover;
          this._fallbackRecover = null;
          this._emit("error", data);
          for (const channel of lost) this._lose(channel, "refused");
          this.send("settings", { games: this.games, stats: this.stats });
          break;
        }
        this._emit("error", data);
        break;
      case "logout":
        // The server closes with data.code next; never reconnect after a logout.
        this._stopped = true;
        clearTimeout(this._retryTimer);
        this._emit("logout", data);
        break;
      default:
        if (PUSH_EVENTS.has(frame.event) && typeof frame.channel === "string") {
          this._onPush(frame);
        }
    }
  }

  _onConnected(conn, data) {
    conn.greeted = true;
    clearTimeout(conn.timer);
    this._suspect = false;
    this._refusals = 0;
    this.connectedData = data;
    this._setState("open");
    this._startPing(data.pingInterval || 25, data.idleTimeout || 60);
    // D5: the positions of the connection's own channels travel in `connected`; recording them
    // at once lets a later reconnect resume the user channel even if no push arrived.
    const gaps = this._join(conn, data.channels || []);
    if (conn.plain && this._fallback) {
      this._fallback = false;
      // The handshake with `settings` was refused: channels only the handshake could recover
      // (the user channel; any other user's) are judged by the join rule or lost; the others are
      // asked for again with `recover` in a `settings` message, whose refusal is readable.
      const own = data.userId ? `user:${data.userId}` : null;
      const recover = {};
      for (const [channel, position] of this.positions) {
        if (channel.startsWith("user:")) {
          if (channel !== own) gaps.push(this._lose(channel, "refused", false));
        } else if (this._follows(channel)) {
          recover[channel] = position;
        }
      }
      const request = { games: this.games, stats: this.stats };
      if (Object.keys(recover).length) {
        request.recover = recover;
        this._fallbackRecover = Object.keys(recover);
      }
      this.send("settings", request);
    } else if (JSON.stringify([this.games, this.stats]) !== conn.wanted) {
      // follow()/unfollow()/setStats() while the handshake was in flight could not be sent:
      // send what is wanted now (frames before `connected` are not ours to send).
      this.send("settings", { games: this.games, stats: this.stats });
    }
    this._emit("connected", data);
    for (const gap of gaps) if (gap) this._emit("gap", gap);
  }

  /**
   * Channels joined by `connected` or a `settings` answer. A channel already joined on this
   * connection is skipped (its listed position is the one it was joined at). For a newly joined
   * channel the client keeps its held position when the server recovers it (the missed pushes
   * follow), and otherwise proves continuity only if the server's position is the one it holds;
   * anything else is a gap. Returns the gaps, to emit after the answer.
   */
  _join(conn, states) {
    const gaps = [];
    for (const state of states) {
      if (!state || typeof state.channel !== "string" || conn.inForce.has(state.channel)) continue;
      conn.inForce.add(state.channel);
      const position = { offset: state.offset, epoch: state.epoch };
      const held = this.positions.get(state.channel);
      if (state.recovered === true && held) continue;
      if (held && (state.recovered === false || !samePosition(held, position))) {
        gaps.push({
          channel: state.channel,
          offset: state.offset,
          epoch: state.epoch,
          reason: state.recovered === false ? "not-recovered" : "not-resumed",
        });
      }
      this.positions.set(state.channel, position);
    }
    return gaps;
  }

  _onPush(frame) {
    const { channel } = frame;
    const position = { offset: frame.offset, epoch: frame.epoch };
    if (frame.snapshot === true) {
      // A snapshot (D9) is the channel's current state, at its real offset, which may be at or
      // below our position: it updates the state, never the position, and is no gap.
      this._keepState(frame);
      this._emit("push", frame);
      this._emit(frame.event, frame);
      return;
    }
    const held = this.positions.get(channel);
    if (held) {
      const sameEpoch = held.epoch === frame.epoch;
      if (sameEpoch && frame.offset <= held.offset) return; // a replay we already delivered
      const next = held.offset === 0 ? frame.offset === 1 : sameEpoch && frame.offset === held.offset + 1;
      // A conflated state frame (D9) replaced older ones of its event: skipped offsets are fine.
      const skippedOk = frame.conflated === true && sameEpoch && STATE_EVENTS.has(frame.event);
      if (!next && !skippedOk) {
        this._emit("gap", {
          channel,
          offset: frame.offset - 1,
          epoch: frame.epoch,
          reason: sameEpoch ? "skipped" : "epoch",
        });
      }
    }
    this.positions.set(channel, position);
    this._keepState(frame);
    this._emit("push", frame);
    this._emit(frame.event, frame);
  }

  _keepState(frame) {
    if (!STATE_EVENTS.has(frame.event)) return;
    let states = this._states.get(frame.channel);
    if (!states) this._states.set(frame.channel, (states = new Map()));
    const known = states.get(frame.event);
    // An older publication of the same stream never replaces a newer one.
    if (known && known.epoch === frame.epoch && frame.offset < known.offset) return;
    states.set(frame.event, { data: frame.data, offset: frame.offset, epoch: frame.epoch });
  }

  /** Forget a channel (unfollowed, or another token's): its position and state. */
  _forget(channel) {
    this.positions.delete(channel);
    this._states.delete(channel);
  }

  /** Drop the position of a channel whose continuity is lost; returns (or emits) the gap. */
  _lose(channel, reason, emit = true) {
    const held = this.positions.get(channel);
    this._forget(channel);
    const gap = { channel, offset: held ? held.offset : 0, epoch: held ? held.epoch : "", reason };
    if (emit) this._emit("gap", gap);
    return gap;
  }

  /**
   * The current state of `channel`: `{stats: data, balance: data}` with the latest payload of
   * each state event received there (by a push or a snapshot); `{}` when none.
   */
  channelState(channel) {
    const result = {};
    for (const [event, known] of this._states.get(channel) || []) result[event] = known.data;
    return result;
  }

  // --- keep-alive -------------------------------------------------------------------------

  _startPing(pingInterval, idleTimeout) {
    this._stopPing();
    const everyMs = Math.max(0.05, pingInterval) * 1000;
    this._pingTimer = setInterval(() => {
      // No frame (not even a pong) for the whole idle timeout: the link is dead; drop it and
      // reconnect (3000: a client-side close, reconnectable).
      const conn = this._conn;
      if (conn && Date.now() - this._lastFrameAt > idleTimeout * 1000) {
        this._finish(conn, 3000, "no answer from the server");
        try {
          conn.ws.close(3000, "no answer from the server");
        } catch {
          // already closing
        }
        return;
      }
      this.send("ping", { ts: Date.now() });
    }, everyMs);
  }

  _stopPing() {
    clearInterval(this._pingTimer);
    this._pingTimer = null;
  }

  // --- requests ---------------------------------------------------------------------------

  /** Send one frame; returns false when not connected (settings are kept and applied later). */
  send(event, data) {
    const conn = this._conn;
    if (!conn || !conn.greeted || conn.ws.readyState !== 1) return false;
    conn.ws.send(JSON.stringify(data === undefined ? { event } : { event, data }));
    return true;
  }

  /** Send a `settings` request (`games`, `follow`, `unfollow`, `stats`, `recover`). */
  settings(request = {}) {
    // Keep the wanted state locally, so that a reconnect resumes it even if this request is
    // never answered; the server's answer then replaces it.
    if (Array.isArray(request.games)) this.games = [...new Set(request.games)];
    for (const game of request.follow || []) {
      if (!this.games.includes(game)) this.games.push(game);
    }
    if (request.unfollow) this.games = this.games.filter((g) => !request.unfollow.includes(g));
    if (typeof request.stats === "boolean") this.stats = request.stats;
    return this.send("settings", request);
  }

  /**
   * Follow more games. A last argument `{history: N}` (0-100) also asks for each game's last N
   * stream events, sent with its current state right after the answer (marked `snapshot`); it
   * applies to this request only, so it is sent only on an open connection.
   */
  follow(...games) {
    const last = games[games.length - 1];
    if (last !== null && typeof last === "object") {
      games.pop();
      const { history } = last;
      if (!Number.isInteger(history) || history < 0 || history > 100) {
        throw new RangeError(`history is an integer from 0 to 100, not ${history}`);
      }
      return this.settings({ follow: games, history });
    }
    return this.settings({ follow: games });
  }

  unfollow(...games) {
    return this.settings({ unfollow: games });
  }

  setStats(on) {
    return this.settings({ stats: Boolean(on) });
  }

  /** Ask for the settings in force (an empty request). */
  query() {
    return this.send("settings", {});
  }
}
