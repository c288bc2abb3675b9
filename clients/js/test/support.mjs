// Helpers of the Node tests: the gateway under test comes from the environment (set by
// tests/client/test_js_node.py, which starts a real gateway), `ws` from the test packages.
import { createHmac } from "node:crypto";
import { createRequire } from "node:module";

export const env = {
  wsUrl: process.env.IGRATECH_WS_URL,
  apiUrl: process.env.IGRATECH_WS_API_URL,
  apiKey: process.env.IGRATECH_WS_API_KEY,
  secret: process.env.IGRATECH_WS_JWT_SECRET,
};

/** Why the gateway tests cannot run here (no gateway in the environment), or null. */
export const skipReason = env.wsUrl ? null : "IGRATECH_WS_URL is not set (run through pytest)";

/** The `ws` package, from the directory the test setup installed it into. */
export function loadWs() {
  const modules = process.env.IGRATECH_WS_NODE_MODULES;
  if (!modules) throw new Error("IGRATECH_WS_NODE_MODULES is not set (run through pytest)");
  return createRequire(`${modules}/`)("ws");
}

function b64url(value) {
  return Buffer.from(value).toString("base64url");
}

/** An HS256 JWT for `user`, valid `ttl` seconds (the gateway's secret comes from the env). */
export function token(user, ttl = 3600) {
  const now = Math.floor(Date.now() / 1000);
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64url(JSON.stringify({ sub: user, iat: now, exp: now + ttl }));
  const signature = createHmac("sha256", env.secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${signature}`;
}

/** POST a publication to the gateway's API; returns {status, body}. */
export async function publish(body) {
  const answer = await fetch(`${env.apiUrl}/api/v1/publish`, {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: `Bearer ${env.apiKey}` },
    body: JSON.stringify(body),
  });
  return { status: answer.status, body: await answer.json() };
}

export async function logoutUser(user) {
  const answer = await fetch(`${env.apiUrl}/api/v1/users/${user}/logout`, {
    method: "POST",
    headers: { Authorization: `Bearer ${env.apiKey}` },
  });
  return answer.status;
}

export const NOW = "2026-11-23T19:45:00Z";

export function incident(game, n) {
  return {
    event: "incident",
    gameId: game,
    data: { gameId: game, incidentId: `inc-${n}`, type: "corner", occurredAt: NOW, side: "home" },
  };
}

export function balance(user, amount) {
  return {
    event: "balance",
    userId: user,
    data: { balance: amount, currency: "EUR", updatedAt: NOW, reason: "bet_settled" },
  };
}

/** Resolve once `predicate()` holds (polled every 10 ms); reject after `timeout` ms. */
export async function waitFor(predicate, what, timeout = 10000) {
  const deadline = Date.now() + timeout;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** Record every event of `client` as [name, detail] in an array. */
export function record(client) {
  const events = [];
  const names = ["state", "connected", "settings", "gap", "push", "error", "logout", "close"];
  for (const name of names) client.on(name, (detail) => events.push([name, detail]));
  return events;
}

let sequence = 0;
/** A name no other test uses (games, users). */
export function unique(prefix) {
  sequence += 1;
  return `${prefix}-${process.pid}-${sequence}`;
}
