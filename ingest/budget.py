"""Per-tenant request budgets of one edge process: a token bucket per limited tenant.

A tenant that sends more than its ``max_per_second`` (after authentication, so nobody without the
tenant's key can spend its budget) gets 429 with ``Retry-After``; the others are not slowed by it.
A bucket holds :data:`BURST_SECONDS` of the rate, so short bursts pass. Tenants without a limit
cost one dictionary miss.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

BURST_SECONDS = 2.0
"""A full bucket: this many seconds of the tenant's rate, sent at once."""


class Budgets:
    """Token buckets by tenant; :meth:`take` spends one request."""

    def __init__(self, rates: Mapping[str, float], clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        now = clock()
        self._buckets = {tenant: _Bucket(rate, max(rate, 1.0) * BURST_SECONDS, now)
                         for tenant, rate in rates.items() if rate > 0}

    def take(self, tenant: str) -> float | None:
        """None when ``tenant`` may send now (one token spent), else the seconds until it may."""
        bucket = self._buckets.get(tenant)
        if bucket is None:
            return None
        now = self._clock()
        tokens = min(bucket.capacity, bucket.tokens + (now - bucket.at) * bucket.rate)
        bucket.at = now
        if tokens >= 1.0:
            bucket.tokens = tokens - 1.0
            return None
        bucket.tokens = tokens
        return (1.0 - tokens) / bucket.rate


class _Bucket:
    __slots__ = ("at", "capacity", "rate", "tokens")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.at = now
