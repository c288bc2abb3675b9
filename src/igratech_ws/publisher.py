"""Publish events to an igratech-ws gateway from a Python backend, safely retried.

    from igratech_ws.core.messages import BalanceData
    from igratech_ws.publisher import Publisher

    async with Publisher("http://127.0.0.1:8081", api_key) as publisher:
        answer = await publisher.publish(
            BalanceData(balance="125.50", currency="EUR", updatedAt="2026-11-23T19:45:00Z"),
            user_id="u-1",
            idempotency_key="wallet-tx-8812",
        )

Payloads are the contract's own structs (`igratech_ws.core.messages`): the event follows from
the payload's type (`IncidentData` is an ``incident``, ...), the target from `game_id` /
`user_id` (neither: global stats). Requests go over one keep-alive connection pool.

**Retries are safe.** Every publish carries an idempotency key (the caller's, or a random one made
per call); a request that times out, loses its connection, or is answered 502/503/504 is sent
again with the *same* key, with exponential backoff and full jitter, so a publication the gateway
did make the first time is answered as a duplicate instead of being published twice (within the
gateway's idempotency window, 300 s by default). A 4xx answer is the caller's mistake and is
raised at once as `PublishError`; when every attempt failed, `PublishUnavailable` is raised (the
publication may or may not have been made: publishing again with the same key is safe).

`publish_many` sends batches of up to `max_batch_items` through ``/api/v1/publish/batch``: each
batch is validated whole before any of it is published, and published in order.

This module is for backends: it imports no server module, only the contract's payload types.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp
import msgspec

from igratech_ws.core.messages import (
    PUBLISHED_EVENTS,
    BalanceData,
    BetData,
    BetsResultData,
    IncidentData,
    StatsData,
)

#: The payloads a backend may publish; the event is the payload's type's.
Payload = IncidentData | BetData | BetsResultData | BalanceData | StatsData
_EVENT_OF: dict[type[msgspec.Struct], str] = {kind: ev for ev, kind in PUBLISHED_EVENTS.items()}
_RETRY_STATUSES = frozenset({502, 503, 504})


class PublishAnswer(msgspec.Struct, frozen=True):
    """Where a publication went: its channel's offset and epoch; `duplicate` when the key had
    already been published (then offset and epoch are the first publication's)."""

    channel: str
    offset: int
    epoch: str
    event: str
    duplicate: bool = False


class _BatchAnswer(msgspec.Struct):
    results: list[PublishAnswer]


class _ErrorBody(msgspec.Struct):
    code: str
    message: str
    field: str | None = None


class _ErrorAnswer(msgspec.Struct):
    error: _ErrorBody


class _Request(msgspec.Struct, omit_defaults=True):
    event: str
    data: Any
    gameId: str | None = None
    userId: str | None = None
    idempotencyKey: str | None = None


class _Batch(msgspec.Struct):
    items: list[_Request]


class PublishError(Exception):
    """The gateway refused the request (4xx): fix it, do not retry it as it is.

    `status` is the HTTP status, `code` the API's error code, `field` the offending field.
    """

    def __init__(self, status: int, code: str, message: str, field: str | None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.field = field


class PublishUnavailable(Exception):
    """Every attempt failed (timeouts, connection errors, 502/503/504). The publication may or may
    not have been made; publishing again with the same idempotency key is safe."""


@dataclass(frozen=True, slots=True)
class Item:
    """One publication of `Publisher.publish_many`."""

    data: Payload
    game_id: str | None = None
    user_id: str | None = None
    idempotency_key: str | None = None


_encoder = msgspec.json.Encoder()
_answer_decoder = msgspec.json.Decoder(PublishAnswer)
_batch_decoder = msgspec.json.Decoder(_BatchAnswer)
_error_decoder = msgspec.json.Decoder(_ErrorAnswer)


class Publisher:
    """A keep-alive HTTP client of the gateway's publish API. Use as an async context manager,
    or call `close` at the end.

    `timeout` bounds one attempt (seconds); `attempts` is how many are made in all; backoff
    between attempts doubles from `backoff_min` to `backoff_max` (full jitter). `connections`
    bounds the pool. `max_batch_items` must not exceed the gateway's (1000 by default).
    """

    def __init__(
        self,
        api_url: str,
        api_key: str,
        *,
        timeout: float = 5.0,
        attempts: int = 5,
        backoff_min: float = 0.05,
        backoff_max: float = 2.0,
        connections: int = 16,
        max_batch_items: int = 1000,
    ) -> None:
        if attempts < 1 or timeout <= 0 or max_batch_items < 1:
            raise ValueError("attempts and max_batch_items must be at least 1, timeout positive")
        self.api_url = api_url.rstrip("/")
        self.timeout = timeout
        self.attempts = attempts
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.max_batch_items = max_batch_items
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Publisher:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection pool. Idempotent."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._connections),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers=self._headers,
            )
        return self._session

    async def publish(
        self,
        data: Payload,
        *,
        game_id: str | None = None,
        user_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> PublishAnswer:
        """Publish `data` to a game, a user or everyone; retried safely (see the module)."""
        body = _encoder.encode(_request(Item(data, game_id, user_id, idempotency_key)))
        answer = await self._post("/api/v1/publish", body)
        return _answer_decoder.decode(answer)

    async def publish_many(self, items: Sequence[Item]) -> list[PublishAnswer]:
        """Publish `items` in order, in batches of `max_batch_items` (each retried safely).

        A batch that the gateway refuses (4xx) raises `PublishError` naming ``items[i]`` of that
        batch; the batches before it were published.
        """
        answers: list[PublishAnswer] = []
        for start in range(0, len(items), self.max_batch_items):
            chunk = items[start : start + self.max_batch_items]
            body = _encoder.encode(_Batch([_request(item) for item in chunk]))
            answer = await self._post("/api/v1/publish/batch", body)
            answers.extend(_batch_decoder.decode(answer).results)
        return answers

    async def _post(self, path: str, body: bytes) -> bytes:
        url = self.api_url + path
        last: str = ""
        for attempt in range(self.attempts):
            if attempt:
                ceiling = min(self.backoff_max, self.backoff_min * 2 ** (attempt - 1))
                await asyncio.sleep(random.uniform(0, ceiling))
            try:
                async with self._http().post(url, data=body) as response:
                    answer = await response.read()
                    status = response.status
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
                last = f"{type(exc).__name__}: {exc}"
                continue
            if status == 200:
                return answer
            if status in _RETRY_STATUSES:
                last = f"HTTP {status}"
                continue
            raise _error(status, answer)
        raise PublishUnavailable(f"{self.attempts} attempts to POST {path} failed; last: {last}")


def _request(item: Item) -> _Request:
    event = _EVENT_OF.get(type(item.data))
    if event is None:
        raise TypeError(f"not a publishable payload: {type(item.data).__name__}")
    return _Request(
        event=event,
        data=item.data,
        gameId=item.game_id,
        userId=item.user_id,
        # A key per call, made before the first attempt: every retry sends the same one.
        idempotencyKey=item.idempotency_key or uuid.uuid4().hex,
    )


def _error(status: int, answer: bytes) -> PublishError:
    try:
        body = _error_decoder.decode(answer).error
    except msgspec.DecodeError:
        return PublishError(status, f"http_{status}", answer[:200].decode(errors="replace"), None)
    return PublishError(status, body.code, body.message, body.field)
