"""The node: connections, users and their sessions, wired to the hub and the broker.

Everything above (the WebSocket listener, the HTTP API, the demo feed) talks to a `Node`; it knows
no socket. It enforces the single-session rule (newest login wins, on every node), the idle timeout
and token expiry, carries out settings in the order the client sent them, and publishes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from igratech_ws.brokers.base import (
    Broker,
    BrokerError,
    BrokerState,
    ControlKinds,
    NodePresence,
    PublishResult,
    UserLogin,
    UserLogout,
)
from igratech_ws.config import Config
from igratech_ws.core import channels
from igratech_ws.core.close_codes import CloseCode, close_reason, counted_as
from igratech_ws.core.codec import ProtocolError, event_frame
from igratech_ws.core.messages import ChannelState, LogoutReason, Status
from igratech_ws.core.publishing import ValidatedPublication
from igratech_ws.core.session import Session, SessionState, SettingsPlan
from igratech_ws.hub import Hub, JoinResult, Subscriber

log = logging.getLogger("igratech_ws.node")

#: Settings requests a connection may have waiting while one is carried out.
MAX_QUEUED_SETTINGS = 8
#: Client frames held while the connection's own channels are joined, before `connected` (more,
#: or more bytes than one frame may have, close it with 1008).
MAX_EARLY_FRAMES = 16
#: Seconds between presence reports to the other nodes.
PRESENCE_INTERVAL = 5.0
#: Presence reports kept from other nodes (a bound on a map filled from the bus).
MAX_PEERS = 1000

_LOGOUT_CODES: dict[LogoutReason, CloseCode] = {
    "logged_in_elsewhere": CloseCode.LOGGED_IN_ELSEWHERE,
    "forced": CloseCode.FORCED_LOGOUT,
    "token_expired": CloseCode.TOKEN_EXPIRED,
}


_clock_second = -1
_clock_prefix = ""


def utc_now() -> str:
    """The current time as RFC 3339 UTC with milliseconds, the contract's `Timestamp`.

    The date and time of day are formatted once per second (every handshake asks twice)."""
    global _clock_second, _clock_prefix
    now = time.time()
    second = int(now)
    micros = round((now - second) * 1e6)  # as datetime rounds a timestamp
    if micros >= 1_000_000:
        second += 1
        micros -= 1_000_000
    if second != _clock_second:
        _clock_prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        _clock_second = second
    return f"{_clock_prefix}{micros // 1000:03d}Z"


class Connection(Subscriber, Protocol):
    """What the node needs of a client connection, beyond what the hub needs.

    `settings_queue` is owned by the node.
    `last_seen` is `time.monotonic()` of the last frame received, kept up to date by the
    transport. `address` is the client's IP address (the per-address limit's key), or None when
    a trusted proxy did not name the client: that connection is not counted by the limit.
    """

    session: Session
    address: str | None
    expires_at: float | None
    connected_at: float
    last_seen: float
    settings_queue: deque[tuple[SettingsPlan, bool]] | None


class Node:
    """One gateway process. Call `start` before use and `close` at the end."""

    def __init__(self, config: Config, broker: Broker) -> None:
        self.config = config
        self.broker = broker
        self.node_id = broker.node_id
        self.hub = Hub(
            broker,
            recovery_limit=config.recovery_limit,
            max_buffer_bytes=config.max_write_buffer_bytes,
            max_flush_delay=config.max_flush_delay,
            # The memory broker hands a burst to the hub in one pass: lingering would only delay it.
            flush_linger=config.flush_linger if broker.shared else 0.0,
        )
        self._connections: set[Connection] = set()
        self._users: dict[str, set[Connection]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._reporter: asyncio.Task[None] | None = None
        self._peers: dict[str, tuple[float, NodePresence]] = {}
        self._was_disconnected = False
        self.draining = False
        self.started_at = time.time()
        #: Closes by code, for metrics and logs.
        self.closes: dict[int, int] = {}
        self.connections_total = 0
        self.rate_limited = 0
        #: Client messages accepted past the rate limit, by what they were.
        self.messages_in: dict[str, int] = {"ping": 0, "settings": 0, "invalid": 0}
        self.refused: dict[str, int] = {}
        #: Open connections per client address (bounded: by the node's connection limit).
        self._by_address: dict[str, int] = {}
        #: Connections not greeted yet (their own channels are being joined), with the frames
        #: they sent meanwhile and those frames' bytes (bounded: MAX_EARLY_FRAMES, a frame).
        self._greeting: dict[Connection, tuple[list[bytes], int]] = {}

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self.broker.start(self.hub.on_publication, self.on_control, self.on_broker_state)
        self._sweeper = asyncio.ensure_future(self._sweep_forever())
        self._reporter = asyncio.ensure_future(self._report_presence_forever())

    async def close(self) -> None:
        for timer in (self._sweeper, self._reporter):
            if timer is not None:
                timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        await self.hub.close()
        await self.broker.close()

    def drain(self) -> None:
        """Ask every client to reconnect elsewhere (1012) and refuse new ones."""
        self.draining = True
        for connection in list(self._connections):
            connection.close_with(CloseCode.SERVICE_RESTART)

    @property
    def ready(self) -> bool:
        return self.broker.state is BrokerState.CONNECTED and not self.draining

    def info(self) -> dict[str, Any]:
        return {
            "node": self.node_id,
            "connections": len(self._connections),
            "users": len(self._users),
            "channels": self.hub.channel_count,
            "broker": self.broker.state.value,
            "draining": self.draining,
            "uptimeSeconds": round(time.time() - self.started_at, 1),
            "cluster": self.cluster_presence(),
        }

    # --- presence ----------------------------------------------------------------------------

    def local_presence(self) -> NodePresence:
        """This node's connections, users and followers per game, as reported to the others."""
        games = {}
        for channel in self.hub.channels():
            if channel.startswith(channels.GAME_PREFIX):
                games[channel[len(channels.GAME_PREFIX) :]] = self.hub.subscriber_count(channel)
        return NodePresence(
            origin=self.node_id,
            connections=len(self._connections),
            users=len(self._users),
            games=games,
            interval=PRESENCE_INTERVAL,
        )

    def cluster_presence(self, now: float | None = None) -> dict[str, Any]:
        """Totals over this node and every peer whose last report is fresh.

        `users` is a sum over nodes: with one session per user it counts each user once, except
        for the moments while a second login is logging the first one out.
        """
        now = time.monotonic() if now is None else now
        reports = [self.local_presence()]
        for node, (received, report) in list(self._peers.items()):
            if now - received > 3 * report.interval:
                del self._peers[node]
            else:
                reports.append(report)
        games: dict[str, int] = {}
        for report in reports:
            for game, count in report.games.items():
                games[game] = games.get(game, 0) + count
        return {
            "nodes": sorted(r.origin for r in reports),
            "connections": sum(r.connections for r in reports),
            "users": sum(r.users for r in reports),
            "games": games,
        }

    async def _report_presence_forever(self) -> None:
        while True:
            await self._tell_others(self.local_presence())
            await asyncio.sleep(PRESENCE_INTERVAL)

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def user_connection_count(self, user_id: str) -> int:
        return len(self._users.get(user_id, ()))

    # --- connections -------------------------------------------------------------------------

    def count_refusal(self, reason: str) -> None:
        """Count a handshake refused by the transport (for metrics); `reason` is a fixed word."""
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def at_capacity(self) -> bool:
        """Whether this node already holds `max_connections` (new handshakes get 503)."""
        return len(self._connections) >= self.config.max_connections

    def accept(self, connection: Connection, plan: SettingsPlan, answer: bool) -> None:
        """A client completed the handshake: enforce single session, join its own channels, then
        greet it.

        `plan` comes from the session's first `plan_settings` (the handshake `settings` parameter,
        or an empty request that just adds the user's own channel); `answer` says whether the
        client asked for settings and so expects a `settings` answer. `connected` is the line from
        which nothing is missed (docs/protocol.md): it goes out once the plan's channels are
        joined, carrying their positions, followed at once by the `settings` answer (when asked),
        then what recovery replays, then live pushes. It is always the first frame: what the
        client sends before it is carried out after it, in order. A client over the per-address
        limit is closed with 1013 before it is greeted.
        """
        session = connection.session
        address = connection.address
        if address is not None:
            if self._by_address.get(address, 0) >= self.config.max_connections_per_ip:
                self.count_refusal("per_address_limit")
                connection.close_with(CloseCode.TRY_AGAIN_LATER)
                return
            self._by_address[address] = self._by_address.get(address, 0) + 1
        self._connections.add(connection)
        self.connections_total += 1
        user_id = session.user_id
        if user_id is not None:
            for other in list(self._users.get(user_id, ())):
                if _older(other, connection):
                    self.logout(other, "logged_in_elsewhere")
            # Fetched again: logging the others out may have removed the user's entry.
            self._users.setdefault(user_id, set()).add(connection)
            if self.broker.shared:
                self._spawn(
                    self._tell_others(
                        UserLogin(
                            origin=self.node_id,
                            user_id=user_id,
                            session_id=session.session_id,
                            connected_at=connection.connected_at,
                        )
                    )
                )
        joined = self._join_now(connection, plan)
        if len(joined) == len(plan.add):
            # Joined at once (no broker I/O was needed): greeted now, before anything else.
            self._greet(connection, joined, answer)
            return
        self._greeting[connection] = ([], 0)
        self._spawn(self._join_then_greet(connection, plan, answer, joined))

    async def _join_then_greet(
        self, connection: Connection, plan: SettingsPlan, answer: bool, joined: list[JoinResult]
    ) -> None:
        try:
            results = await self._join_all(connection, plan, joined)
            if results is not None:
                self._greet(connection, results, answer)
        finally:
            early, _ = self._greeting.pop(connection, ([], 0))
        for frame in early:
            if not connection.is_open:
                break
            self._handle_text(connection, frame)

    def _greet(self, connection: Connection, results: list[JoinResult], answer: bool) -> None:
        """Queue `connected` (with the joined channels' positions), the settings answer when
        asked, and what follows the joins; synchronous, so nothing comes in between."""
        self.hub.send(
            connection,
            connection.session.connected_frame(
                server_time=utc_now(),
                ping_interval=self.config.ping_interval,
                idle_timeout=self.config.idle_timeout,
                node=self.node_id,
                channels=[result.state for result in results],
            ),
        )
        if answer:
            self.hub.send(
                connection, connection.session.settings_answer(self._states(connection, results))
            )
        for result in results:
            self.hub.finish_join(connection, result)

    def on_text(self, connection: Connection, frame: bytes) -> None:
        """A text message from the client: valid UTF-8, inside the rate limit (the transport
        enforces both, RFC 6455 section 8.1 and the per-connection budget). Before `connected` is
        queued it is held (bounded), and carried out after it."""
        early = self._greeting.get(connection)
        if early is not None:
            frames, size = early
            size += len(frame)
            if len(frames) >= MAX_EARLY_FRAMES or size > self.config.max_frame_bytes:
                connection.close_with(CloseCode.POLICY_VIOLATION)
                return
            frames.append(frame)
            self._greeting[connection] = (frames, size)
            return
        self._handle_text(connection, frame)

    def _handle_text(self, connection: Connection, frame: bytes) -> None:
        """A text message from the client, after `connected` was queued."""
        queue = connection.settings_queue
        # The first queued request is the one being carried out; the others wait.
        settings_allowed = queue is None or len(queue) <= MAX_QUEUED_SETTINGS
        action = connection.session.handle_frame(
            frame, server_time=utc_now, settings_allowed=settings_allowed
        )
        if action is None:
            return
        if isinstance(action, SettingsPlan):
            self.messages_in["settings"] += 1
            self._queue_settings(connection, action, True)
        else:
            kind = "ping" if action.frame.startswith(b'{"event":"pong"') else "invalid"
            self.messages_in[kind] += 1
            self.hub.send(connection, action.frame)

    def send_error(self, connection: Connection, error: ProtocolError) -> None:
        self.hub.send(connection, event_frame("error", error.to_data()))

    def on_writable(self, connection: Connection) -> None:
        """The transport: `connection`'s socket drained after a pause (see `Hub.on_writable`)."""
        self.hub.on_writable(connection)

    def on_closed(self, connection: Connection, code: int | None) -> None:
        """The transport is gone: forget the connection everywhere."""
        if connection not in self._connections:
            return
        self._connections.discard(connection)
        self._greeting.pop(connection, None)
        address = connection.address
        if address is not None:
            remaining = self._by_address.get(address, 1) - 1
            if remaining > 0:
                self._by_address[address] = remaining
            else:
                self._by_address.pop(address, None)
        if code is not None:
            # Only the documented codes are keys: a client chooses its own code.
            key = counted_as(code)
            self.closes[key] = self.closes.get(key, 0) + 1
        session = connection.session
        session.closed()
        for channel in session.subscribed:
            self.hub.leave(connection, channel)
        if session.user_id is not None:
            users = self._users.get(session.user_id)
            if users is not None:
                users.discard(connection)
                if not users:
                    del self._users[session.user_id]

    def logout(self, connection: Connection, reason: LogoutReason) -> None:
        """Send `logout` (AsyncAPI `publish-logout`) and close with the matching 4xxx code."""
        code = _LOGOUT_CODES[reason]
        if connection.session.state is not SessionState.OPEN:
            return
        if connection in self._greeting:
            # Not greeted yet: `connected` is always the first frame, so the close code alone
            # says why (the client never learnt of a session to log out of).
            connection.close_with(code)
            return
        self.hub.send(
            connection,
            event_frame(
                "logout",
                Status(
                    status="logout",
                    serverTime=utc_now(),
                    reason=reason,
                    code=int(code),
                    message=close_reason(code),
                ),
            ),
        )
        connection.close_with(code)

    # --- settings ----------------------------------------------------------------------------

    def _queue_settings(self, connection: Connection, plan: SettingsPlan, answer: bool) -> None:
        """Carry out `plan` after those already queued (the caller checked the queue's bound):
        at once when none is and its channels can be joined at once, else in a task."""
        queue = connection.settings_queue
        if queue is not None:
            queue.append((plan, answer))
            return
        joined = self._start_settings(connection, plan)
        if len(joined) == len(plan.add):
            self._answer_settings(connection, joined, answer)
            return
        connection.settings_queue = deque([(plan, answer)])
        self._spawn(self._run_settings(connection, joined))

    def _start_settings(self, connection: Connection, plan: SettingsPlan) -> list[JoinResult]:
        """Drop the channels `plan` removes; join at once those that can be (`_join_now`)."""
        for channel in plan.remove:
            self.hub.leave(connection, channel)
        return self._join_now(connection, plan)

    async def _run_settings(self, connection: Connection, joined: list[JoinResult]) -> None:
        """Carry out the queued plans in order; the first one is started (`joined`)."""
        queue = connection.settings_queue
        started: list[JoinResult] | None = joined
        try:
            while queue and connection.is_open:
                plan, answer = queue[0]
                if started is None:
                    started = self._start_settings(connection, plan)
                results: list[JoinResult] | None = started
                if len(started) < len(plan.add):
                    results = await self._join_all(connection, plan, started)
                started = None
                if results is not None:
                    self._answer_settings(connection, results, answer)
                queue.popleft()
        finally:
            connection.settings_queue = None

    def _answer_settings(
        self, connection: Connection, results: list[JoinResult], answer: bool
    ) -> None:
        """The settings answer (when asked) and what follows the joins, together: nothing comes
        in between."""
        if answer:
            self.hub.send(
                connection, connection.session.settings_answer(self._states(connection, results))
            )
        for result in results:
            self.hub.finish_join(connection, result)

    def _join_now(self, connection: Connection, plan: SettingsPlan) -> list[JoinResult]:
        """The joins of `plan` done at once (`Hub.join_now`), in order, up to the first that
        cannot be: `_join_all` does the rest. None of a plan with history (one allowance is
        shared by its channels), none from the first channel to recover on."""
        joined: list[JoinResult] = []
        if plan.history:
            return joined
        recover = plan.recover
        join_now = self.hub.join_now
        for channel in plan.add:
            if channel in recover:
                break
            result = join_now(connection, channel)
            if result is None:
                break
            joined.append(result)
        return joined

    async def _join_all(
        self, connection: Connection, plan: SettingsPlan, joined: list[JoinResult]
    ) -> list[JoinResult] | None:
        """Join every channel `plan` adds after those `joined` already (its first ones), or
        none: None (and the connection closed with 1013 when the broker could not answer) when
        the connection is gone."""
        # One allowance for the whole request: its history is bounded however many channels.
        allowance = self.hub.history_allowance() if plan.history else None
        rest = plan.add[len(joined) :]
        try:
            if len(rest) == 1:  # the usual case (a user channel, one game): no gather tasks
                channel = rest[0]
                recover = plan.recover.get(channel)
                results = [
                    *joined,
                    await self.hub.join(connection, channel, recover, plan.history, allowance),
                ]
            else:
                results = joined + list(
                    await asyncio.gather(
                        *(
                            self.hub.join(
                                connection, ch, plan.recover.get(ch), plan.history, allowance
                            )
                            for ch in rest
                        )
                    )
                )
        except BrokerError as exc:
            log.warning("settings failed: broker unavailable", extra={"error": str(exc)})
            for channel in plan.add:
                self.hub.leave(connection, channel)
            connection.close_with(CloseCode.TRY_AGAIN_LATER)
            return None
        if not connection.is_open:
            for channel in plan.add:
                self.hub.leave(connection, channel)
            return None
        return results

    def _states(self, connection: Connection, results: Iterable[JoinResult]) -> list[ChannelState]:
        fresh = {r.state.channel: r.state for r in results}
        states = []
        for channel in connection.session.subscribed:
            state = fresh.get(channel)
            if state is None:
                position = self.hub.position_of(connection, channel)
                if position is None:
                    continue
                state = ChannelState(channel=channel, offset=position[0], epoch=position[1])
            states.append(state)
        return states

    # --- publishing and logout through the API -----------------------------------------------

    @property
    def publishes_at_once(self) -> bool:
        """Whether `publish` finishes without waiting (`Broker.publishes_at_once`)."""
        return self.broker.publishes_at_once

    async def publish(
        self, publication: ValidatedPublication, *, idempotency_key: str | None = None
    ) -> PublishResult:
        """Append and fan out one validated publication (D2: once per `idempotency_key` and
        channel within the broker's window). Raises `BrokerError`."""
        return await self.broker.publish(
            publication.channel,
            publication.event,
            publication.data_json,
            idempotency_key=idempotency_key,
        )

    async def publish_many(
        self, items: Sequence[tuple[ValidatedPublication, str | None]]
    ) -> list[PublishResult]:
        """Publish validated publications, each with its idempotency key, as `publish` would one
        after the other (each channel's offsets follow the list order; a key repeated in the
        list is a duplicate of its first item), but handed to the broker together: one round
        trip, and their deliveries come back together (`Broker.publish_many`). Raises
        `BrokerError` once every item has settled; any of them may then have been published."""
        return await self.broker.publish_many(
            [(p.channel, p.event, p.data_json, key) for p, key in items]
        )

    async def logout_user(
        self, user_id: str, reason: Literal["forced", "token_expired"] = "forced"
    ) -> int:
        """Log `user_id` out on every node; returns how many connections closed here."""
        closed = self._logout_local(user_id, reason)
        await self._tell_others(UserLogout(origin=self.node_id, user_id=user_id, reason=reason))
        return closed

    def _logout_local(self, user_id: str, reason: LogoutReason) -> int:
        connections = list(self._users.get(user_id, ()))
        for connection in connections:
            self.logout(connection, reason)
        return len(connections)

    async def _tell_others(self, message: ControlKinds) -> None:
        try:
            await self.broker.publish_control(message)
        except BrokerError as exc:
            log.warning("could not tell other nodes", extra={"error": str(exc)})

    # --- broker events -----------------------------------------------------------------------

    def on_control(self, message: ControlKinds) -> None:
        if message.origin == self.node_id:
            return
        if isinstance(message, UserLogin):
            for connection in list(self._users.get(message.user_id, ())):
                session = connection.session
                if (connection.connected_at, session.session_id) < (
                    message.connected_at,
                    message.session_id,
                ):
                    self.logout(connection, "logged_in_elsewhere")
        elif isinstance(message, UserLogout):
            self._logout_local(message.user_id, message.reason)
        elif isinstance(message, NodePresence) and (
            message.origin in self._peers or len(self._peers) < MAX_PEERS
        ):
            self._peers[message.origin] = (time.monotonic(), message)

    def on_broker_state(self, state: BrokerState) -> None:
        log.info("broker state", extra={"state": state.value})
        if state is BrokerState.DISCONNECTED:
            self._was_disconnected = True
        elif state is BrokerState.CONNECTED and self._was_disconnected:
            self._was_disconnected = False
            self.hub.resync_all()

    # --- timers ------------------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.sweep(time.monotonic(), time.time())

    def sweep(self, monotonic_now: float, wall_now: float) -> None:
        """Close idle connections (4004) and log out those whose token expired (4003)."""
        idle_after = self.config.idle_timeout
        for connection in list(self._connections):
            if connection.expires_at is not None and wall_now >= connection.expires_at:
                self.logout(connection, "token_expired")
            elif monotonic_now - connection.last_seen > idle_after:
                connection.close_with(CloseCode.IDLE_TIMEOUT)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _older(a: Connection, b: Connection) -> bool:
    return (a.connected_at, a.session.session_id) < (b.connected_at, b.session.session_id)
