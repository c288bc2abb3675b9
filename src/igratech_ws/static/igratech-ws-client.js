// igratech-ws-client.js: a small browser client for the Igratech WebSocket API (plain ES module).
//
// What it does for you (see docs/browser-client.md):
// - connects to /wspublic with an optional token (query `token`; browsers cannot set headers);
// - sends `ping` every `pingInterval` seconds (from `connected`) and reconnects if the server
//   goes silent;
// - keeps the games you follow and the stats flag, and the last position (offset, epoch) it
//   received on every channel;
// - reconnects with exponential backoff and full jitter when the close code allows it, and resumes
//   through the handshake `settings` query parameter: the same games and stats, plus `recover`
//   with the last position of every channel, so that the server replays what was missed;
// - never reconnects after `logout` (4001, 4002, 4003) or a normal close.
//
// Events (listen with `client.on(name, fn)`; each handler gets one argument):
//   "state"      {state}: "connecting" | "open" | "reconnecting" | "closed"
//   "connected"  the `connected` data
//   "settings"   the `settings` answer data (channels with their starting positions)
//   "gap"        {channel, offset, epoch}: `recovered: false`, missed pushes are gone: reload
//   "push"       the whole frame of every channel push (incident, bet, bets-result, balance,
//                stats); also dispatched under its own event name ("incident", ...)
//   "pong"       {rtt, serverTime}
//   "error"      the `error` data (the connection stays open)
//   "logout"     the `logout` data (the close follows)
//   "close"      {code, reason, reconnect, delay, wasConnected}
//   "frame"      every frame received, parsed

/** Close codes after which the client does not reconnect (AsyncAPI `x-close-codes`). */
export const FINAL_CLOSE_CODES = new Set([1000, 1008, 1009, 4001, 4002, 4003]);

/** Human-readable meaning of the gateway's close codes. */
export const CLOSE_CODES = {
  1000: "normal closure",
  1001: "going away",
  1006: "connection lost (no close frame; also a refused handshake: bad token or settings)",
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

const PUSH_EVENTS = new Set(["incident", "bet", "bets-result", "balance", "stats"]);

/**
 * One logical connection to the gateway, kept alive across reconnects.
 *
 * Options: `token` (JWT or null), `games` (array of game ids), `stats` (bool), `backoff`
 * (Backoff options, in ms), `healthyAfter` (ms a connection must last before the backoff resets,
 * default 10000), `WebSocket` (the constructor to use; default the browser's).
 */
export class IgratechWsClient {
  constructor(url, options = {}) {
    this.url = url;
    this.token = options.token || null;
    this.games = [...new Set(options.games || [])];
    this.stats = Boolean(options.stats);
    this.healthyAfter = options.healthyAfter ?? 10000;
    this.backoff = new Backoff(options.backoff);
    this.WebSocketImpl = options.WebSocket || globalThis.WebSocket;
    /** channel -> {offset, epoch}: the last position received (or the starting one). */
    this.positions = new Map();
    this.connectedData = null;
    this.state = "closed";
    this.ws = null;
    this._handlers = new Map();
    this._stopped = true;
    this._retryTimer = null;
    this._pingTimer = null;
    this._lastFrameAt = 0;
    this._openedAt = 0;
    this._resumeRefused = false;
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
    this._stopped = false;
    clearTimeout(this._retryTimer);
    this._open();
  }

  /** Close for good (code 1000); no reconnect. */
  close() {
    this._stopped = true;
    clearTimeout(this._retryTimer);
    this._stopPing();
    if (this.ws) this.ws.close(1000, "client closed");
    this._setState("closed");
  }

  /** Use another token from the next connection on; positions of user channels are dropped. */
  setToken(token) {
    if ((token || null) === this.token) return;
    this.token = token || null;
    for (const channel of [...this.positions.keys()]) {
      if (channel.startsWith("user:")) this.positions.delete(channel);
    }
  }

  /** The handshake URL: token and the resume `settings` (games, stats, recover). */
  handshakeUrl() {
    const url = new URL(this.url, globalThis.location?.href);
    if (this.token) url.searchParams.set("token", this.token);
    const settings = {};
    if (this.games.length) settings.games = this.games;
    if (this.stats) settings.stats = true;
    const recover = {};
    if (!this._resumeRefused) {
      for (const [channel, position] of this.positions) {
        if (this._follows(channel)) recover[channel] = position;
      }
    }
    if (Object.keys(recover).length) settings.recover = recover;
    if (Object.keys(settings).length) url.searchParams.set("settings", JSON.stringify(settings));
    return url.toString();
  }

  _follows(channel) {
    if (channel.startsWith("user:")) return Boolean(this.token);
    if (channel === "global") return this.stats;
    return channel.startsWith("game:") && this.games.includes(channel.slice(5));
  }

  _open() {
    this._setState(this.positions.size ? "reconnecting" : "connecting");
    const usedRecover = !this._resumeRefused && this.positions.size > 0;
    let ws;
    try {
      ws = new this.WebSocketImpl(this.handshakeUrl());
    } catch (error) {
      this._emit("close", { code: 0, reason: String(error), reconnect: false, delay: null });
      this._setState("closed");
      return;
    }
    this.ws = ws;
    let greeted = false;
    ws.onopen = () => {
      this._openedAt = Date.now();
      this._lastFrameAt = Date.now();
    };
    ws.onmessage = (message) => {
      if (ws !== this.ws) return;
      this._lastFrameAt = Date.now();
      let frame;
      try {
        frame = JSON.parse(message.data);
      } catch {
        return;
      }
      if (frame.event === "connected") {
        greeted = true;
        this._resumeRefused = false;
      }
      this._onFrame(frame);
    };
    ws.onclose = (event) => {
      if (ws !== this.ws) return;
      this.ws = null;
      this._stopPing();
      // A handshake refused before `connected` (HTTP 400/403 for a resume the server will not
      // take, e.g. a user channel of another token) must not loop: retry without `recover`.
      if (!greeted && usedRecover) this._resumeRefused = true;
      if (greeted && Date.now() - this._openedAt >= this.healthyAfter) this.backoff.reset();
      const reconnect = !this._stopped && shouldReconnect(event.code);
      const delay = reconnect ? this.backoff.next() : null;
      this._emit("close", {
        code: event.code,
        reason: event.reason || CLOSE_CODES[event.code] || "",
        reconnect: reconnect && delay !== null,
        delay,
        wasConnected: greeted,
      });
      if (reconnect && delay !== null) {
        this._setState("reconnecting");
        this._retryTimer = setTimeout(() => this._open(), delay);
      } else {
        this._stopped = true;
        this._setState("closed");
      }
    };
  }

  _onFrame(frame) {
    const data = frame.data || {};
    this._emit("frame", frame);
    switch (frame.event) {
      case "connected":
        this.connectedData = data;
        this._setState("open");
        this._startPing(data.pingInterval || 25, data.idleTimeout || 60);
        this._emit("connected", data);
        break;
      case "settings":
        this.games = [...(data.games || [])];
        this.stats = Boolean(data.stats);
        for (const state of data.channels || []) {
          this.positions.set(state.channel, { offset: state.offset, epoch: state.epoch });
          if (state.recovered === false) {
            this._emit("gap", { channel: state.channel, offset: state.offset, epoch: state.epoch });
          }
        }
        for (const channel of [...this.positions.keys()]) {
          if (!(data.channels || []).some((s) => s.channel === channel)) {
            this.positions.delete(channel);
          }
        }
        this._emit("settings", data);
        break;
      case "pong":
        this._emit("pong", {
          rtt: typeof data.ts === "number" ? Date.now() - data.ts : null,
          serverTime: data.serverTime,
        });
        break;
      case "error":
        this._emit("error", data);
        break;
      case "logout":
        // The server closes with data.code next; never reconnect after a logout.
        this._stopped = true;
        this._emit("logout", data);
        break;
      default:
        if (PUSH_EVENTS.has(frame.event) && frame.channel) {
          this.positions.set(frame.channel, { offset: frame.offset, epoch: frame.epoch });
          this._emit("push", frame);
          this._emit(frame.event, frame);
        }
    }
  }

  // --- keep-alive -------------------------------------------------------------------------

  _startPing(pingInterval, idleTimeout) {
    this._stopPing();
    const everyMs = Math.max(1, pingInterval) * 1000;
    this._pingTimer = setInterval(() => {
      // No frame (not even a pong) for the whole idle timeout: the link is dead; drop it and
      // let the close handler reconnect (3000: a client-side close, reconnectable).
      if (Date.now() - this._lastFrameAt > idleTimeout * 1000 && this.ws) {
        this.ws.close(3000, "no answer from the server");
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
    if (!this.ws || this.ws.readyState !== 1) return false;
    this.ws.send(JSON.stringify(data === undefined ? { event } : { event, data }));
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

  follow(...games) {
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
