"""How long to wait before trying again: job retries, spooled uploads and webhook calls all back off alike."""

from __future__ import annotations


def backoff(attempt: int, base: float, cap: float, rand: float) -> float:
    """Seconds before attempt `attempt + 1`: doubling from `base`, capped, times a jitter in [0.5, 1.5) from
    `rand` in [0, 1), so workers that failed together do not all come back together."""
    return min(cap, base * 2 ** (attempt - 1)) * (0.5 + rand)
