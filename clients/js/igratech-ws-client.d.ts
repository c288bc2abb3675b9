// Type declarations of igratech-ws-client.js.
//
// The payload and frame types mirror the AsyncAPI document (asyncapi/igratech-ws.yaml): each
// component schema `foo-bar` is the type `FooBar` here. A test of the repository
// (tests/client/test_js_types.py) checks them against the schemas with `tsc`: same fields, same
// required fields, same enums, every example accepted.

// --- payloads (components/schemas) ----------------------------------------------------------

/** `status`: the data of `connected` (status `connected`) and of `logout` (status `logout`). */
export interface Status {
  status: "connected" | "logout";
  /** RFC 3339, UTC. */
  serverTime: string;
  sessionId?: string | null;
  /** `connected`: the token's `sub`; null for an anonymous connection. */
  userId?: string | null;
  pingInterval?: number | null;
  idleTimeout?: number | null;
  protocolVersion?: string | null;
  node?: string | null;
  /** `logout` only. */
  reason?: LogoutReason | null;
  /** `logout` only: the close code that follows (4001, 4002, 4003). */
  code?: number | null;
  message?: string | null;
  /**
   * `connected` only: every channel in force at connect (the user channel, the handshake's
   * games) with its position, and `recovered` for those the handshake asked to recover.
   */
  channels?: ChannelState[] | null;
}

export type LogoutReason = "logged_in_elsewhere" | "forced" | "token_expired";

/** The data of `connected`. */
export type ConnectedData = Status & { status: "connected" };
/** The data of `logout`. */
export type LogoutData = Status & { status: "logout" };

export interface Score {
  home: number;
  away: number;
}

export interface IncidentData {
  gameId: string;
  incidentId: string;
  /** snake_case: `goal`, `yellow_card`, `corner`, `kick_off`, `full_time`, ... */
  type: string;
  occurredAt: string;
  minute?: number | null;
  side?: "home" | "away" | "none" | null;
  score?: Score | null;
  description?: string | null;
}

export interface BetDataItem {
  betId: string;
  market: string;
  selection: string;
  /** Decimal odds as a string (`"2.10"`). */
  odds: string;
  /** A decimal string (`"50.00"`). */
  stake: string;
  currency: string;
  placedAt: string;
  player?: string | null;
}

export interface BetData {
  gameId: string;
  bets: BetDataItem[];
}

export type BetStatus = "pending" | "won" | "lost" | "void" | "cashout" | "half_won" | "half_lost";

export interface BetResultItem {
  betId: string;
  gameId: string;
  status: BetStatus;
  stake: string;
  payout: string;
  currency: string;
  settledAt: string;
  odds?: string | null;
}

export interface BetsResultData {
  results: BetResultItem[];
}

export type BalanceReason =
  | "bet_placed"
  | "bet_settled"
  | "cashout"
  | "deposit"
  | "withdrawal"
  | "bonus"
  | "adjustment";

export interface BalanceData {
  /** A decimal string. */
  balance: string;
  currency: string;
  updatedAt: string;
  available?: string | null;
  bonus?: string | null;
  reason?: BalanceReason | null;
}

export interface StatsData {
  scope: "game" | "global";
  updatedAt: string;
  /** Figures by snake_case name: counts, ratios, or decimal strings. */
  values: Record<string, number | string>;
  gameId?: string | null;
}

/** A position in a channel's stream. */
export interface StreamPosition {
  offset: number;
  epoch: string;
}

/** One channel in force with its position when joined; `recovered` when recovery was asked. */
export interface ChannelState {
  channel: string;
  offset: number;
  epoch: string;
  recovered?: boolean | null;
}

/** The client's `settings` request; every field optional, `{}` asks for the settings in force. */
export interface SettingsRequest {
  games?: string[] | null;
  follow?: string[] | null;
  unfollow?: string[] | null;
  stats?: boolean | null;
  recover?: Record<string, StreamPosition> | null;
  /** 0-100: also send the last N stream events of each channel this request adds (as snapshots). */
  history?: number | null;
}

/** The settings in force (the server's `settings` answer). */
export interface SettingsData {
  games: string[];
  stats: boolean;
  channels: ChannelState[];
}

export interface PingData {
  ts?: number | string | null;
}

export interface PongData {
  serverTime: string;
  ts?: number | string | null;
}

export type ErrorCode =
  | "bad_json"
  | "bad_message"
  | "unknown_event"
  | "invalid_settings"
  | "forbidden_channel"
  | "too_many_games"
  | "rate_limited"
  | "recover_too_late";

export interface ErrorData {
  code: ErrorCode;
  message: string;
  event?: string | null;
  field?: string | null;
}

// --- frames -----------------------------------------------------------------------------

export interface ConnectedFrame {
  event: "connected";
  data: Status;
}

export interface LogoutFrame {
  event: "logout";
  data: Status;
}

export interface PingFrame {
  event: "ping";
  data?: PingData;
}

export interface PongFrame {
  event: "pong";
  data: PongData;
}

export interface SettingsRequestFrame {
  event: "settings";
  data?: SettingsRequest;
}

export interface SettingsFrame {
  event: "settings";
  data: SettingsData;
}

export interface ErrorFrame {
  event: "error";
  data: ErrorData;
}

/** A push on a channel: its stream position travels with it. */
export interface PushFrameOf<E extends string, D> {
  event: E;
  channel: string;
  offset: number;
  epoch: string;
  data: D;
  /** The channel's current state, sent on follow or connect; may be at or below the position. */
  snapshot?: boolean;
  /** This state frame replaced older ones of its channel and event (a slow connection). */
  conflated?: boolean;
}

export interface IncidentFrame extends PushFrameOf<"incident", IncidentData> {}
export interface BetFrame extends PushFrameOf<"bet", BetData> {}
export interface BetsResultFrame extends PushFrameOf<"bets-result", BetsResultData> {}
export interface BalanceFrame extends PushFrameOf<"balance", BalanceData> {}
export interface StatsFrame extends PushFrameOf<"stats", StatsData> {}

export type PushFrame = IncidentFrame | BetFrame | BetsResultFrame | BalanceFrame | StatsFrame;
export type ServerFrame =
  | ConnectedFrame
  | LogoutFrame
  | PongFrame
  | SettingsFrame
  | ErrorFrame
  | PushFrame;
export type ClientFrame = PingFrame | SettingsRequestFrame;
export type PushEvent = PushFrame["event"];

// --- the client ---------------------------------------------------------------------------

export type ConnectionState = "connecting" | "open" | "reconnecting" | "closed";

/**
 * Why a channel's continuity could not be proven:
 * - `not-recovered`: the server answered `recovered: false` (history no longer covers the gap,
 *   or the stream was recreated);
 * - `not-resumed`: the channel was joined without recovery at another position than the one held;
 * - `skipped`: a push skipped offsets; `epoch`: a push came from a new stream;
 * - `refused`: the server refused to resume the channel (the position held was dropped).
 */
export type GapReason = "not-recovered" | "not-resumed" | "skipped" | "epoch" | "refused";

export interface GapDetail {
  channel: string;
  /** The position live pushes continue from (for `refused`: the position that was dropped). */
  offset: number;
  epoch: string;
  reason: GapReason;
}

export interface CloseDetail {
  code: number;
  reason: string;
  /** Whether a new attempt comes, after `delay` ms. */
  reconnect: boolean;
  delay: number | null;
  /** Whether this connection had received `connected`. */
  wasConnected?: boolean;
}

export interface PongDetail {
  /** Round trip in ms (null when the pong carried no timestamp of ours). */
  rtt: number | null;
  serverTime: string;
}

/** The argument of each event's handlers. */
export interface ClientEvents {
  state: { state: ConnectionState };
  connected: Status;
  settings: SettingsData;
  gap: GapDetail;
  push: PushFrame;
  incident: IncidentFrame;
  bet: BetFrame;
  "bets-result": BetsResultFrame;
  balance: BalanceFrame;
  stats: StatsFrame;
  pong: PongDetail;
  error: ErrorData;
  logout: Status;
  close: CloseDetail;
  frame: ServerFrame;
}

/** The latest payload of each state event of a channel (`client.channelState(channel)`). */
export interface CurrentState {
  stats?: StatsData;
  balance?: BalanceData;
}

export interface BackoffOptions {
  /** ms; default 500. */
  initial?: number;
  /** ms; default 30000. */
  maximum?: number;
  /** default 2. */
  multiplier?: number;
  /** default Infinity. */
  maxAttempts?: number;
}

/** What the client needs of a WebSocket: the WHATWG interface (browsers, the `ws` package). */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: any) => void) | null;
  onmessage: ((event: { data: any }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: any) => void) | null;
}

export type WebSocketConstructor = new (url: string) => WebSocketLike;

export interface ClientOptions {
  /** A JWT; its `sub` is the user id. Without it the connection is anonymous. */
  token?: string | null;
  /** Games to follow from the first connection on. */
  games?: string[];
  /** Follow the `global` stats channel. */
  stats?: boolean;
  backoff?: BackoffOptions;
  /** ms a connection must last before the backoff resets; default 10000. */
  healthyAfter?: number;
  /** ms from opening a socket to `connected` before the attempt is given up; default 10000. */
  connectTimeout?: number;
  /** The WebSocket constructor; default `globalThis.WebSocket`. */
  WebSocket?: WebSocketConstructor | (new (url: string) => any);
}

export declare const FINAL_CLOSE_CODES: Set<number>;
export declare const CLOSE_CODES: Record<number, string>;
export declare const PUSH_EVENTS: Set<PushEvent>;
export declare const STATE_EVENTS: Set<"stats" | "balance">;
export declare function shouldReconnect(code: number): boolean;

export declare class Backoff {
  constructor(options?: BackoffOptions);
  initial: number;
  maximum: number;
  multiplier: number;
  maxAttempts: number;
  attempt: number;
  /** The next delay in ms, or null when the attempts are used up. */
  next(): number | null;
  reset(): void;
}

export declare class IgratechWsClient {
  constructor(url: string, options?: ClientOptions);
  readonly url: string;
  readonly token: string | null;
  /** The games followed (as wanted, then as last confirmed by the server). */
  games: string[];
  stats: boolean;
  /** channel -> the last position received there (or the one it was joined at). */
  readonly positions: Map<string, StreamPosition>;
  /** The last `connected` data. */
  readonly connectedData: Status | null;
  readonly state: ConnectionState;
  /** The current socket (null while disconnected). */
  readonly ws: WebSocketLike | null;
  readonly backoff: Backoff;

  /** Call `fn(detail)` on event `name`; returns a function that removes the handler. */
  on<K extends keyof ClientEvents>(name: K, fn: (detail: ClientEvents[K]) => void): () => void;
  connect(): void;
  close(): void;
  /** Use `token` from the next connection on (`reconnect()` switches now). */
  setToken(token: string | null): void;
  /** Drop the connection and reconnect at once, resuming every channel. */
  reconnect(): void;
  handshakeUrl(): string;
  /** The latest payload of each state event (`stats`, `balance`) received on `channel`. */
  channelState(channel: string): CurrentState;
  send(event: string, data?: unknown): boolean;
  settings(request?: SettingsRequest): boolean;
  follow(...games: string[]): boolean;
  /** Follow games and receive their last `history` stream events with their state (snapshots). */
  follow(...args: [...games: string[], options: { history: number }]): boolean;
  unfollow(...games: string[]): boolean;
  setStats(on: boolean): boolean;
  query(): boolean;
}
