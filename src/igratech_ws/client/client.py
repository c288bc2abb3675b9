"""The client: typed events, keep-alive, settings helpers, and reconnect with gap-free resume.

A background task (the supervisor) owns the connection: it connects, waits for the connection to
end, and reconnects with `Backoff` unless the close code says not to
(`igratech_ws.core.close_codes.should_reconnect`: not after a logout, 4001-4003, nor 1000/1008).
Frames are decoded in picows' callback and put into one bounded queue that `async for` drains.

Resume: the client remembers the last (offset, epoch) it queued for every channel, from the
positions ``connected`` reports for the connection's own channels on (protocol decision D5). A
reconnect passes the followed games, the stats switch and a ``recover`` entry for every known
channel (including ``user:<id>``) in the handshake's ``settings`` query parameter, so the server
replays what was missed before any live push. Whenever the client cannot prove that nothing was
missed on a channel (``recovered: false``, a channel joined at another position than the one held,
a push that skips offsets or comes from a new epoch, a refused resume), it yields a
``recovery-failed`` event (see `RecoveryFailed`). A handshake refused with 400/403 because of a
``recover`` entry drops that entry (``recovery-failed``, reason ``refused``) and reconnects at once.

State (protocol decision D9): the latest payload of each state event (``stats``, ``balance``) of
every channel is kept, from pushes and from ``snapshot`` frames; `Client.state` returns it. A
snapshot never moves a position and is never a gap or a duplicate.

Slow consumers: if the queue is full when a frame arrives, the client drops the connection, waits
until the application has drained half the queue, and reconnects with resume, so nothing is lost;
the application sees a ``disconnected`` event with reason ``"client queue full"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import msgspec
from picows import WSHandshakeError

from igratech_ws.core import channels, close_codes
from igratech_ws.core.codec import event_frame
from igratech_ws.core.messages import (
    MAX_HISTORY,
    ChannelState,
    ErrorData,
    Ping,
    Settings,
    SettingsRequest,
    Status,
    StreamPositionData,
)

from .backoff import Backoff
from .connection import CloseInfo, Connection
from .events import (
    DISCONNECTED,
    RECOVERY_FAILED,
    STATE_EVENTS,
    Disconnected,
    Event,
    RecoveryFailed,
    connected_channels,
    decode_frame,
)

log = logging.getLogger("igratech_ws.client")

MAX_GAMES = 1000  # the protocol's bound on a settings list
MAX_PENDING_SETTINGS = 64
_QUEUE_FULL = "client queue full"
_RECONNECT_ASKED = "reconnect asked"


class ClientError(Exception):
    """Base of the SDK's errors."""


class HandshakeRejected(ClientError):
    """The server refused the WebSocket handshake (HTTP `status`, e.g. 401 for a bad token).

    `code` and `field` come from the server's JSON answer when it has one (e.g.
    ``forbidden_channel``, ``settings.recover.user:u-9``).
    """

    def __init__(
        self, status: int, code: str | None = None, field: str | None = None, reason: str = ""
    ) -> None:
        detail = f" ({code}{': ' + field if field else ''})" if code else ""
        super().__init__(f"handshake rejected with HTTP {status}{detail}")
        self.status = status
        self.code = code
        self.field = field
        #: The server's explanation (the error body's message), or "".
        self.reason = reason


class ReconnectFailed(ClientError):
    """Raised by iteration when reconnecting gave up (attempts or time exhausted)."""


class SettingsRejected(ClientError):
    """A settings request was answered with an ``error`` event (`error` holds it)."""

    def __init__(self, error: ErrorData) -> None:
        super().__init__(f"{error.code}: {error.message}")
        self.error = error


class ClientClosed(ClientError):
    """The client ended before a settings request was answered."""


class _End:
    """Queue sentinel: iteration ends (raising `error` if set)."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


class Client:
    """A connected client. Create it with `connect`; iterate it for events.

    Attributes the application may read: `session` (the last ``connected`` data), `user_id`,
    `games` (as last confirmed by the server), `stats`, `positions` (channel -> (offset, epoch),
    to persist and pass back as `recover` after a restart), `latency` (last ping round trip in
    seconds), `close_info` (why the last connection ended).
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        games: Iterable[str] = (),
        stats: bool = False,
        reconnect: bool = True,
        backoff: Backoff | None = None,
        recover: Mapping[str, tuple[int, str]] | None = None,
        max_queue: int = 1024,
        connect_timeout: float = 10.0,
        request_timeout: float = 10.0,
        reset_backoff_after: float = 30.0,
    ) -> None:
        self._url = url
        self._token = token
        # channel -> event -> (payload, offset, epoch) of the latest state publication seen
        self._states: dict[str, dict[str, tuple[Any, int, str]]] = {}
        # channels joined on the current connection (an answer lists them at their join position)
        self._in_force: set[str] = set()
        # channels whose `recover` the last handshake carried
        self._handshake_recover: set[str] = set()
        self._reconnect_asked = False
        self._want_games: list[str] = _checked_games(games, [])
        self._want_stats = stats
        self._reconnect = reconnect
        self._backoff = backoff or Backoff()
        self._connect_timeout = connect_timeout
        self._request_timeout = request_timeout
        self._reset_after = reset_backoff_after
        self.positions: dict[str, tuple[int, str]] = dict(recover or {})
        self.session: Status | None = None
        self.games: list[str] = []
        self.stats = False
        self.latency: float | None = None
        self.close_info: CloseInfo | None = None
        self._max_queue = max(2, max_queue)
        self._queue: asyncio.Queue[Event | _End] = asyncio.Queue(self._max_queue)
        self._room = asyncio.Event()
        self._room.set()
        self._conn: Connection | None = None
        self._generation = 0
        # settings answers awaited on the current connection, oldest first (one entry per request)
        self._pending: deque[list[asyncio.Future[Settings]]] = deque()
        # requests not sent (made while disconnected): the next handshake answers them
        self._unsent: list[asyncio.Future[Settings]] = []
        self._greeted = asyncio.Event()
        self._logged_out = False
        self._overflowed = False
        self._closing = False
        self._ended = False
        self._supervisor: asyncio.Task[None] | None = None
        self._pinger: asyncio.Task[None] | None = None
        self._last_frame = 0.0

    @property
    def user_id(self) -> str | None:
        user_id = self.session.userId if self.session else None
        return user_id if isinstance(user_id, str) else None

    def state(self, channel: str) -> dict[str, Any]:
        """The current state of `channel`: the latest payload of each state event received there
        (``stats``, ``balance``), by push or snapshot; ``{}`` when none (or not followed)."""
        return {event: known[0] for event, known in self._states.get(channel, {}).items()}

    def set_token(self, token: str | None) -> None:
        """Use `token` from the next connection on (`reconnect` switches now). The positions and
        state of user channels are forgotten: they belong to the previous token's user."""
        if token == self._token:
            return
        self._token = token
        for channel in [c for c in self.positions if channels.channel_kind(c) == "user"]:
            self._forget(channel)

    def reconnect(self) -> None:
        """Drop the connection and reconnect at once, resuming every channel (e.g. after
        `set_token`). Does nothing while no connection is open."""
        if self._conn is not None and not self._closing:
            self._reconnect_asked = True
            self._conn.abort()

    def _forget(self, channel: str) -> None:
        self.positions.pop(channel, None)
        self._states.pop(channel, None)

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the first connection; raises `HandshakeRejected`, `OSError` or `TimeoutError`.

        The first connection is not retried: a wrong URL or token should fail loudly.
        """
        await self._open()
        self._supervisor = asyncio.create_task(self._supervise(), name="igratech-ws-client")

    async def close(self) -> None:
        """Close the connection cleanly and stop reconnecting; iteration ends."""
        self._closing = True
        # Stop the supervisor first: it may be opening a new connection right now.
        if self._supervisor is not None and not self._supervisor.done():
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        self._stop_pinger()
        if self._conn is not None:
            self._conn.close(1000, "client closing")
            self._conn = None
        self._fail_waiters(ClientClosed("client closed"))
        self._end(None)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        if self._ended and self._queue.empty():
            raise StopAsyncIteration
        item = await self._queue.get()
        if self._queue.qsize() <= self._max_queue // 2:
            self._room.set()
        if isinstance(item, _End):
            self._ended = True
            if item.error is not None:
                raise item.error
            raise StopAsyncIteration
        return item

    # --- settings helpers -----------------------------------------------------------------

    async def follow(self, *games: str, history: int | None = None) -> Settings:
        """Follow more games; returns the server's answer (the settings now in force).

        Each game's current state (its latest ``stats``) follows the answer, marked ``snapshot``;
        `history` (0 to ``MAX_HISTORY``, 100) also asks for the game's last N stream events
        (``incident``, ``bet``), marked ``snapshot`` too, in offset order. Only on this follow: a
        reconnect resumes instead (``recover``), which replays what was missed.
        """
        if history is not None and (
            isinstance(history, bool)
            or not isinstance(history, int)
            or not 0 <= history <= MAX_HISTORY
        ):
            raise ValueError(f"history is an integer from 0 to {MAX_HISTORY}, not {history!r}")
        self._want_games = _checked_games(games, self._want_games)
        return await self._request(SettingsRequest(follow=list(games), history=history))

    async def unfollow(self, *games: str) -> Settings:
        """Stop following games; returns the server's answer."""
        self._want_games = [g for g in self._want_games if g not in set(games)]
        return await self._request(SettingsRequest(unfollow=list(games)))

    async def set_stats(self, enabled: bool) -> Settings:
        """Switch the global stats channel on or off; returns the server's answer."""
        self._want_stats = enabled
        return await self._request(SettingsRequest(stats=enabled))

    async def settings(self) -> Settings:
        """Ask for the settings in force (an empty ``settings`` request)."""
        return await self._request(SettingsRequest())

    async def _request(self, request: SettingsRequest) -> Settings:
        """Send `request` and wait for its answer.

        While disconnected, nothing is sent: the wanted state travels in the reconnect handshake,
        whose answer resolves the wait. Raises `TimeoutError`, `SettingsRejected`, `ClientClosed`.
        """
        if self._closing or self._ended:
            raise ClientClosed("client closed")
        if len(self._unsent) + sum(map(len, self._pending)) >= MAX_PENDING_SETTINGS:
            raise ClientError("too many settings requests awaiting an answer")
        future: asyncio.Future[Settings] = asyncio.get_running_loop().create_future()
        if self._conn is not None:
            self._pending.append([future])
            self._conn.send(event_frame("settings", request))
        else:
            self._unsent.append(future)
        # A timed-out future stays queued, so that later answers still pair with their requests.
        return await asyncio.wait_for(asyncio.shield(future), self._request_timeout)

    def _answer(self, data: Settings | SettingsRejected) -> None:
        """Resolve the oldest request of this connection (answers come in request order)."""
        if not self._pending:
            return
        for future in self._pending.popleft():
            if future.done():
                continue
            if isinstance(data, Settings):
                future.set_result(data)
            else:
                future.set_exception(data)
                future.exception()  # its caller may have timed out: mark it retrieved

    def _fail_waiters(self, error: BaseException) -> None:
        for future in [f for futures in self._pending for f in futures] + self._unsent:
            if not future.done():
                future.set_exception(error)
                future.exception()
        self._pending.clear()
        self._unsent.clear()

    # --- connection ---------------------------------------------------------------------

    def _handshake_url(self) -> str:
        """The URL with the wanted settings (and resume positions) in the ``settings`` query."""
        recover = {
            ch: StreamPositionData(offset=offset, epoch=epoch)
            for ch, (offset, epoch) in self.positions.items()
            if self._token is not None or channels.channel_kind(ch) != "user"
        }
        self._handshake_recover = set(recover)
        if not (self._want_games or self._want_stats or recover or self._generation > 0):
            return self._url
        request = SettingsRequest(
            games=list(self._want_games), stats=self._want_stats, recover=recover or None
        )
        parts = urllib.parse.urlsplit(self._url)
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        query = [(k, v) for k, v in query if k != "settings"]
        query.append(("settings", msgspec.json.encode(request).decode()))
        return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))

    async def _open(self) -> Connection:
        """Open a connection. Its frames may arrive before this returns, so the state they need
        (the handshake's pending answer) is set up before connecting."""
        url = self._handshake_url()
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else None
        covered, self._unsent = self._unsent, []
        self._pending.clear()
        handshake_settings = "settings=" in url
        if handshake_settings:
            self._pending.append(covered)
        self._generation += 1
        self._overflowed = False
        self._in_force = set()
        self._greeted.clear()
        try:
            conn = await Connection.open(
                url, self._on_text, headers=headers, handshake_timeout=self._connect_timeout
            )
        except WSHandshakeError as exc:
            self._unsent = covered + self._unsent
            status = exc.response.status if exc.response is not None else 0
            raise HandshakeRejected(
                int(status), *_refusal(exc), reason=_refusal_reason(exc.raw_body)
            ) from None
        except BaseException:
            self._unsent = covered + self._unsent
            raise
        self._conn = conn
        self._last_frame = time.monotonic()
        if self._overflowed or self._closing:
            conn.abort()
        # requests made while the handshake was in flight are not in it: send the wanted state
        late = self._unsent if handshake_settings else covered + self._unsent
        self._unsent = []
        if late:
            request = SettingsRequest(games=list(self._want_games), stats=self._want_stats)
            self._pending.append(late)
            conn.send(event_frame("settings", request))
        self._pinger = asyncio.create_task(self._ping_loop(conn))
        return conn

    async def _supervise(self) -> None:
        """Wait for each connection to end, then reconnect or end iteration."""
        try:
            while True:
                assert self._conn is not None
                opened_at = time.monotonic()
                info = await self._conn.closed
                self._stop_pinger()
                self._conn = None
                self.close_info = info
                # requests sent on the lost connection are covered by the next handshake
                self._unsent = [f for futures in self._pending for f in futures] + self._unsent
                self._pending.clear()
                if self._overflowed:
                    info = CloseInfo(None, _QUEUE_FULL)
                elif self._reconnect_asked:
                    info = CloseInfo(None, _RECONNECT_ASKED)
                self._reconnect_asked = False
                if time.monotonic() - opened_at >= self._reset_after:
                    self._backoff.reset()
                if not await self._reconnect_after(info):
                    return
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # never let the iterator hang on a crashed supervisor
            log.exception("client supervisor failed")
            self._fail_waiters(ClientClosed("client failed"))
            self._end(exc)

    async def _reconnect_after(self, info: CloseInfo) -> bool:
        """Reconnect after `info`; False once iteration has been ended instead."""
        if (
            self._logged_out
            or not self._reconnect
            or (info.code is not None and not close_codes.should_reconnect(info.code))
        ):
            await self._put(Event(DISCONNECTED, Disconnected(info.code, info.reason, False)))
            self._fail_waiters(ClientClosed(f"connection closed: {info.reason}"))
            await self._finish(None)
            return False
        retry_now = info.reason in (_QUEUE_FULL, _RECONNECT_ASKED)
        while True:
            delay = 0.0 if retry_now else self._backoff.next_delay()
            retry_now = False
            if delay is None:
                event = Disconnected(info.code, info.reason, False, self._backoff.attempt)
                await self._put(Event(DISCONNECTED, event))
                self._fail_waiters(ClientClosed("reconnect gave up"))
                await self._finish(ReconnectFailed(f"gave up reconnecting after: {info.reason}"))
                return False
            attempt = self._backoff.attempt
            await self._put(
                Event(DISCONNECTED, Disconnected(info.code, info.reason, True, attempt, delay))
            )
            await asyncio.sleep(delay)
            await self._room.wait()
            try:
                await self._open()
                # a cancellation racing the connect's completion may have been swallowed
                return not self._closing
            except HandshakeRejected as exc:
                lost = self._refused_recovery(exc)
                if lost:
                    # The resume was refused, not the client: drop what was refused, say so,
                    # and connect again at once without it.
                    for channel in lost:
                        self._forget(channel)
                    await self._put(Event(RECOVERY_FAILED, RecoveryFailed(lost, "refused")))
                    info, retry_now = CloseInfo(None, str(exc)), True
                    continue
                if 400 <= exc.status < 500 and exc.status not in (408, 429):
                    await self._put(Event(DISCONNECTED, Disconnected(None, str(exc), False)))
                    self._fail_waiters(ClientClosed(str(exc)))
                    await self._finish(exc)
                    return False
                info = CloseInfo(None, str(exc))
            except (OSError, TimeoutError) as exc:
                info = CloseInfo(None, f"connect failed: {exc or type(exc).__name__}")

    def _refused_recovery(self, exc: HandshakeRejected) -> list[str]:
        """The channels to stop recovering after handshake refusal `exc` (empty: not the resume).

        A 400/403 whose `field` names a ``recover`` entry refuses that channel; one that names no
        field of the request, when the handshake carried ``recover``, refuses all of it (the
        next attempt, without it, tells whether something else is refused).
        """
        if exc.status not in (400, 403) or not self._handshake_recover:
            return []
        prefix = "settings.recover."
        if exc.field and exc.field.startswith(prefix):
            named = exc.field[len(prefix) :]
            hits = [c for c in self._handshake_recover if c[:80] == named]
            if hits:
                return sorted(hits)
        if exc.field and exc.field != "settings":
            return []  # another field (e.g. too many games): recovery is not what was refused
        return sorted(self._handshake_recover)

    async def _put(self, event: Event) -> None:
        await self._queue.put(event)

    async def _finish(self, error: BaseException | None) -> None:
        """Queue the end of iteration after every queued event (waits for room)."""
        await self._queue.put(_End(error))
        self._ended = True

    def _end(self, error: BaseException | None) -> None:
        """Queue the end of iteration now, even if that means dropping the oldest queued event."""
        if self._ended:
            return
        while True:
            try:
                self._queue.put_nowait(_End(error))
                break
            except asyncio.QueueFull:
                self._queue.get_nowait()
        self._ended = True

    # --- frames (called by picows, synchronously) -----------------------------------------

    def _on_text(self, frame: bytes) -> None:
        if self._overflowed or self._ended:
            return
        self._last_frame = time.monotonic()
        try:
            event = decode_frame(frame)
        except msgspec.DecodeError:
            log.warning("ignoring a frame that is not an event: %.200r", frame)
            return
        if event.event == "pong":
            ts = getattr(event.data, "ts", None)
            if isinstance(ts, int | float):
                self.latency = max(0.0, time.time() - ts / 1000)
            return
        joined = connected_channels(frame) if event.event == "connected" else []
        if event.event == "settings" and isinstance(event.data, Settings):
            joined = event.data.channels
        items = self._judge(event, joined)
        if not items:
            return  # a replay overlapping what we already queued
        if self._queue.qsize() + len(items) > self._max_queue:
            self._overflow()
            return
        for item in items:
            self._queue.put_nowait(item)
        self._apply(event, joined)

    def _judge(self, event: Event, joined: list[ChannelState]) -> list[Event]:
        """What to queue for `event` (empty: a duplicate), with the ``recovery-failed`` events it
        implies. Reads the client's state only: `_apply` changes it once the items are queued, so
        a frame dropped by a full queue leaves no trace and is replayed by the resume."""
        if joined:
            lost: dict[str, list[str]] = {}
            for state in self._newly_joined(joined):
                held = self.positions.get(state.channel)
                if state.recovered is True and held is not None:
                    continue
                if held is not None and (
                    state.recovered is False or not _same(held, (state.offset, state.epoch))
                ):
                    reason = "not-recovered" if state.recovered is False else "not-resumed"
                    lost.setdefault(reason, []).append(state.channel)
            gaps = [Event(RECOVERY_FAILED, RecoveryFailed(c, r)) for r, c in lost.items()]
            return [event, *gaps]
        if (
            event.channel is None
            or event.offset is None
            or event.epoch is None
            or event.snapshot  # the current state, at or below the position: never a gap
        ):
            return [event]
        held = self.positions.get(event.channel)
        if held is None:
            return [event]
        same_epoch = held[1] == event.epoch
        if same_epoch and event.offset <= held[0]:
            return []
        nxt = event.offset == 1 if held[0] == 0 else same_epoch and event.offset == held[0] + 1
        # A conflated state push replaced older ones of its event: skipped offsets are expected.
        if nxt or (event.conflated and same_epoch and event.event in STATE_EVENTS):
            return [event]
        gap = RecoveryFailed([event.channel], "skipped" if same_epoch else "epoch")
        return [Event(RECOVERY_FAILED, gap), event]

    def _newly_joined(self, joined: list[ChannelState]) -> list[ChannelState]:
        """The channels of an answer not yet joined on this connection (their first listing)."""
        seen = set(self._in_force)
        fresh = []
        for state in joined:
            if state.channel not in seen:
                seen.add(state.channel)
                fresh.append(state)
        return fresh

    def _overflow(self) -> None:
        self._overflowed = True
        self._room.clear()
        if self._conn is not None:
            self._conn.abort()

    def _apply(self, event: Event, joined: list[ChannelState]) -> None:
        """Update the client's state from an event that was just queued."""
        data = event.data
        if event.channel is not None and event.offset is not None and event.epoch is not None:
            if not event.snapshot:
                self.positions[event.channel] = (event.offset, event.epoch)
            if event.event in STATE_EVENTS:
                self._keep_state(event, event.channel, event.offset, event.epoch)
        elif event.event == "connected":
            if isinstance(data, Status):
                self.session = data
            self._join(joined)
            self._greeted.set()
        elif event.event == "settings" and isinstance(data, Settings):
            self._apply_settings(data)
            self._answer(data)
        elif event.event == "logout":
            self._logged_out = True
        elif event.event == "error" and isinstance(data, ErrorData) and data.event == "settings":
            self._want_games, self._want_stats = list(self.games), self.stats
            self._answer(SettingsRejected(data))

    def _apply_settings(self, data: Settings) -> None:
        self.games, self.stats = list(data.games), data.stats
        self._join(data.channels)
        listed = {state.channel for state in data.channels}
        self._in_force &= listed
        for channel in list(self.positions):
            if channel not in listed and channels.channel_kind(channel) != "user":
                self._forget(channel)  # unfollowed: forget, so the maps stay bounded

    def _join(self, joined: list[ChannelState]) -> None:
        """Record the positions of newly joined channels (the rule `_judge` applied).

        A recovered channel's missed pushes follow the answer: the older position is kept, so a
        drop during the replay resumes from where the client really is. Any other newly joined
        channel starts from the server's position (after a gap, if it differs from the held one).
        """
        for state in self._newly_joined(joined):
            self._in_force.add(state.channel)
            if state.recovered is True and state.channel in self.positions:
                continue
            self.positions[state.channel] = (state.offset, state.epoch)

    def _keep_state(self, event: Event, channel: str, offset: int, epoch: str) -> None:
        states = self._states.setdefault(channel, {})
        known = states.get(event.event)
        # An older publication of the same stream (a snapshot, say) never replaces a newer one.
        if known is not None and known[2] == epoch and offset < known[1]:
            return
        states[event.event] = (event.data, offset, epoch)

    # --- keep-alive -----------------------------------------------------------------------

    def _stop_pinger(self) -> None:
        if self._pinger is not None:
            self._pinger.cancel()  # it holds no resource: no need to await it
            self._pinger = None

    async def _ping_loop(self, conn: Connection) -> None:
        """Ping every pingInterval (from ``connected``); drop a connection silent for two
        intervals, as it is dead (the server answers every ping)."""
        await self._greeted.wait()
        while True:
            interval = max(float((self.session and self.session.pingInterval) or 25), 0.05)
            await asyncio.sleep(interval)
            silent = time.monotonic() - self._last_frame
            if silent > 2 * interval:
                log.warning("no frame for %.1f s: dropping the connection", silent)
                conn.abort()
                return
            conn.send(event_frame("ping", Ping(ts=round(time.time() * 1000))))


def _same(held: tuple[int, str], other: tuple[int, str]) -> bool:
    """Whether two positions are the same; offset 0 (nothing seen) matches any epoch (D1)."""
    return held[0] == other[0] and (held[1] == other[1] or held[0] == 0)


def _refusal(exc: WSHandshakeError) -> tuple[str | None, str | None]:
    """The error code and field of a refused handshake's JSON answer, when it has them."""
    try:
        error = msgspec.json.decode(getattr(exc, "raw_body", None) or b"{}").get("error") or {}
        code, field = error.get("code"), error.get("field")
    except (msgspec.DecodeError, AttributeError):
        return None, None
    return (
        code if isinstance(code, str) else None,
        field if isinstance(field, str) else None,
    )


def _checked_games(new: Iterable[str], current: list[str]) -> list[str]:
    games = list(current)
    for game in new:
        if not channels.is_valid_id(game):
            raise ValueError(f"not a valid game id: {game!r}")
        if game not in games:
            games.append(game)
    if len(games) > MAX_GAMES:
        raise ValueError(f"at most {MAX_GAMES} games may be followed")
    return games


@contextlib.asynccontextmanager
async def connect(
    url: str,
    token: str | None = None,
    *,
    games: Iterable[str] = (),
    stats: bool = False,
    reconnect: bool = True,
    backoff: Backoff | None = None,
    recover: Mapping[str, tuple[int, str]] | None = None,
    max_queue: int = 1024,
    connect_timeout: float = 10.0,
    request_timeout: float = 10.0,
    reset_backoff_after: float = 30.0,
) -> AsyncIterator[Client]:
    """Connect to the gateway at `url` (``ws://host:8080/wspublic``) and yield the `Client`.

    `token` (a JWT) authenticates the connection; `games` and `stats` are applied in the
    handshake, before any push. `recover` resumes channels from saved positions (e.g. a previous
    run's `client.positions`). `backoff` bounds reconnects (default: full jitter from 0.5 s up to
    30 s, giving up after 300 s of waiting); the attempt counter resets once a connection has lived
    `reset_backoff_after` seconds. `max_queue` bounds the events waiting for the application.
    `connect_timeout` bounds each handshake, `request_timeout` each settings helper.
    The first connection is not retried: its errors (`HandshakeRejected`, `OSError`,
    `TimeoutError`) propagate. The connection is closed when the block exits.
    """
    client = Client(
        url,
        token,
        games=games,
        stats=stats,
        reconnect=reconnect,
        backoff=backoff,
        recover=recover,
        max_queue=max_queue,
        connect_timeout=connect_timeout,
        request_timeout=request_timeout,
        reset_backoff_after=reset_backoff_after,
    )
    await client.start()
    try:
        yield client
    finally:
        await client.close()


def _refusal_reason(body: bytes | None) -> str:
    """The message of a refused handshake's JSON error body (``{"error": {"message": ...}}``)."""
    try:
        error = msgspec.json.decode(body or b"").get("error", {})
        return str(error["message"])[:500]
    except (msgspec.DecodeError, AttributeError, KeyError, TypeError):
        return (body or b"").decode("utf-8", "replace").strip()[:500]
