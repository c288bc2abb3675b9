"""The close-code table of the gateway (RFC 6455 section 7.4; 4000-4999 are the application's).

Every way the server ends a connection maps to one row here, so that clients can decide whether to
reconnect. The table is reproduced in `docs/protocol.md` and the AsyncAPI document.
"""

from __future__ import annotations

import enum


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    LOGGED_IN_ELSEWHERE = 4001
    FORCED_LOGOUT = 4002
    TOKEN_EXPIRED = 4003
    IDLE_TIMEOUT = 4004


#: code -> (short reason sent in the close frame, whether a client should reconnect)
CLOSE_TABLE: dict[CloseCode, tuple[str, bool]] = {
    CloseCode.NORMAL: ("normal closure", False),
    CloseCode.GOING_AWAY: ("going away", True),
    CloseCode.PROTOCOL_ERROR: ("protocol error", False),
    CloseCode.INVALID_DATA: ("invalid UTF-8 data", False),
    CloseCode.POLICY_VIOLATION: ("policy violation", False),
    CloseCode.MESSAGE_TOO_BIG: ("message too big", False),
    CloseCode.INTERNAL_ERROR: ("internal error", True),
    CloseCode.SERVICE_RESTART: ("server restarting, reconnect", True),
    CloseCode.TRY_AGAIN_LATER: ("slow consumer or overload, reconnect later", True),
    CloseCode.LOGGED_IN_ELSEWHERE: ("logged in from another client", False),
    CloseCode.FORCED_LOGOUT: ("logged out by the platform", False),
    CloseCode.TOKEN_EXPIRED: ("token expired", False),
    CloseCode.IDLE_TIMEOUT: ("idle timeout", True),
}


def close_reason(code: CloseCode) -> str:
    """The short human reason sent with `code` in the close frame."""
    return CLOSE_TABLE[code][0]


#: The `Node.closes` key (metric label ``other``) of every close code outside the table: a client
#: may close with any of about 2,000 valid codes, and each must not become a metric series.
OTHER = 0


def counted_as(code: int) -> int:
    """The key a close with `code` is counted under: the code when the table has it, else OTHER."""
    return code if code in _DOCUMENTED else OTHER


def should_reconnect(code: int) -> bool:
    """Whether a client receiving `code` should reconnect (unknown codes: yes, with backoff)."""
    try:
        return CLOSE_TABLE[CloseCode(code)][1]
    except ValueError:
        return True


_DOCUMENTED = frozenset(int(code) for code in CLOSE_TABLE)
