"""The gateway's API keys: pure logic, no services."""

from __future__ import annotations

import pytest

from producer.gateway import create_app, parse_api_keys, parse_rate
from producer.settings import Settings


def test_keys_are_named_and_no_two_keys_share_a_name() -> None:
    assert parse_api_keys("shop:k1, app:k2") == {"k1": "shop", "k2": "app"}
    assert parse_api_keys("k1,k2") == {"k1": "key1", "k2": "key2"}
    for spec in ("key2:a,b", "shop:a,shop:b", "anonymous:a", "shop:", ":k"):
        with pytest.raises(ValueError, match="SVDQ_API_KEYS"):
            parse_api_keys(spec)  # a shared name would share its jobs


def test_the_gateway_will_not_run_open_unless_told() -> None:
    with pytest.raises(ValueError, match="SVDQ_API_KEYS"):
        create_app(Settings(api_keys=None))
    assert create_app(Settings(api_keys=None), unsafe_no_auth=True) is not None


def test_rate_limits_are_requests_per_second_minute_or_hour() -> None:
    assert parse_rate("20/s") == (20, 1) and parse_rate(" 600 / m ") == (600, 60) and parse_rate(None) is None
    for spec in ("20", "0/s", "5/d", "x/s"):
        with pytest.raises(ValueError, match="SVDQ_RATE_LIMIT"):
            parse_rate(spec)
