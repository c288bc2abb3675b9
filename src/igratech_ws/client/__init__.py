"""The Python client SDK of the Igratech WebSocket API.

    async with connect("ws://127.0.0.1:8080/wspublic", token, games=["g-1001"]) as client:
        async for event in client:
            print(event.event, event.channel, event.data)

See docs/client-sdk.md for the reference: typed events, keep-alive, settings helpers, reconnect
with backoff and gap-free resume, and the events the SDK synthesizes (``disconnected``,
``recovery-failed``).
"""

from igratech_ws.client.backoff import Backoff
from igratech_ws.client.client import (
    Client,
    ClientClosed,
    ClientError,
    HandshakeRejected,
    ReconnectFailed,
    SettingsRejected,
    connect,
)
from igratech_ws.client.connection import CloseInfo
from igratech_ws.client.events import (
    DISCONNECTED,
    RECOVERY_FAILED,
    SDK_EVENTS,
    Disconnected,
    Event,
    RecoveryFailed,
)

__all__ = [
    "DISCONNECTED",
    "RECOVERY_FAILED",
    "SDK_EVENTS",
    "Backoff",
    "Client",
    "ClientClosed",
    "ClientError",
    "CloseInfo",
    "Disconnected",
    "Event",
    "HandshakeRejected",
    "ReconnectFailed",
    "RecoveryFailed",
    "SettingsRejected",
    "connect",
]
