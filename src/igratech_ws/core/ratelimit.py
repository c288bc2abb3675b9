"""A token bucket kept as two numbers, so a connection can carry it in two slots.

`take` refills `tokens` at `rate` per second up to `burst` since `last`, then spends one token if it
can. The caller stores the returned tokens and time back on the connection.
"""

from __future__ import annotations

#: Frames refused by the rate limit in a row before the connection is closed with 1008.
STRIKES = 10


def take(tokens: float, last: float, now: float, rate: float, burst: float) -> tuple[bool, float]:
    """Whether one more message is allowed, and the tokens left (store them with `now`)."""
    tokens = min(burst, tokens + (now - last) * rate)
    if tokens >= 1.0:
        return True, tokens - 1.0
    return False, tokens
