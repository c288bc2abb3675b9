"""Reconnect delays: exponential backoff with full jitter, bounded in attempts and in time.

Full jitter (a uniformly random delay between 0 and the exponential cap) spreads the reconnects of
many clients dropped at once, e.g. by a server restart, instead of bringing them back in waves.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays for successive reconnect attempts.

    Attempt n (from 1) waits uniform(0, min(maximum, initial * multiplier ** (n - 1))) seconds.
    `next_delay` returns None once `max_attempts` attempts were made or `max_elapsed` seconds of
    waiting have been spent since the last `reset` (None: unbounded). The caller calls `reset` when
    a connection has proved healthy.
    """

    initial: float = 0.5
    maximum: float = 30.0
    multiplier: float = 2.0
    max_attempts: int | None = None
    max_elapsed: float | None = 300.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0
    elapsed: float = 0.0

    def next_delay(self) -> float | None:
        if self.max_attempts is not None and self.attempt >= self.max_attempts:
            return None
        if self.max_elapsed is not None and self.elapsed >= self.max_elapsed:
            return None
        cap = min(self.maximum, self.initial * self.multiplier**self.attempt)
        self.attempt += 1
        delay = self.rng.uniform(0, cap)
        if self.max_elapsed is not None:
            delay = min(delay, self.max_elapsed - self.elapsed)
        self.elapsed += delay
        return delay

    def reset(self) -> None:
        self.attempt = 0
        self.elapsed = 0.0
