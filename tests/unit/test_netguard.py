"""The outbound URL guard, with a resolver that answers what each case needs (no DNS, no network)."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from producer.netguard import UnsafeURL, check_url, is_public


def resolver(*addresses: str):  # type: ignore[no-untyped-def]
    def resolve(host: str, port: int, **_: object) -> list[tuple]:
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in addresses
        ]

    return resolve


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "168.63.129.16",  # Azure's WireServer: a global address, but the cloud host's own endpoint
        "64:ff9b::a83f:8110",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "0.0.0.0",
        "100.64.0.1",
        "224.0.0.1",
        # IPv6 forms that embed an IPv4 address and route to it: NAT64, 6to4, IPv4-compatible, Teredo
        "64:ff9b::7f00:1",
        "64:ff9b::a9fe:a9fe",
        "64:ff9b:1::a00:1",
        "2002:7f00:1::1",
        "2002:a9fe:a9fe::1",
        "::127.0.0.1",
        "::10.0.0.1",
        "2001:0:4136:e378:8000:63bf:80ff:fffe",
        # RFC 6052's other layouts under the local-use prefix, and SIIT's form
        "64:ff9b:1:0:7f:0:100:0",
        "64:ff9b:1:0:a:0:5ff:0",
        "64:ff9b:1:a9fe:a9:fe00:808:808",
        "::ffff:0:7f00:1",
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert not is_public(address)
    with pytest.raises(UnsafeURL, match="non-public"):
        check_url("https://hooks.example.com/x", resolve=resolver(address))


def test_one_private_address_among_public_ones_is_enough_to_refuse() -> None:
    with pytest.raises(UnsafeURL):
        check_url("https://hooks.example.com/x", resolve=resolver("93.184.216.34", "10.0.0.5"))


def test_public_addresses_pass_and_the_checked_one_is_kept() -> None:
    checked = check_url("https://hooks.example.com:8443/in?a=1", resolve=resolver("93.184.216.34"))
    assert (checked.host, checked.port, checked.address, checked.path) == (
        "hooks.example.com",
        8443,
        "93.184.216.34",
        "/in?a=1",
    )


@pytest.mark.parametrize(
    "url", ["ftp://example.com/x", "file:///etc/passwd", "gopher://x", "//nohost", "https://u:p@x.com/"]
)
def test_only_plain_http_urls(url: str) -> None:
    with pytest.raises(UnsafeURL):
        check_url(url, resolve=resolver("93.184.216.34"))


def test_private_addresses_when_allowed() -> None:
    assert check_url("http://127.0.0.1:9/x", allow_private=True, resolve=resolver("127.0.0.1")).address == "127.0.0.1"


@pytest.mark.parametrize(
    "address", ["64:ff9b::808:808", "2002:808:808::1", "::ffff:808:808", "8.8.8.8", "2606:4700:4700::1111"]
)
def test_embedded_public_ipv4_stays_allowed(address: str) -> None:
    assert is_public(address)


def test_an_address_carrying_ipv4_is_judged_by_it_whatever_python_s_ipv6_tables_say(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Python 3.13 and Debian's patched 3.11.2 call 6to4 (2002::/16) not global, 3.11.7 calls it global: as if
    every IPv6 range were not global, the IPv4 address inside still decides."""
    monkeypatch.setattr(ipaddress.IPv6Address, "is_global", property(lambda self: False))
    for address in ("2002:808:808::1", "::ffff:808:808", "64:ff9b::808:808", "::808:808"):
        assert is_public(address), address
    for address in ("2002:7f00:1::1", "::ffff:a9fe:a9fe", "64:ff9b::a00:1", "2606:4700:4700::1111"):
        assert not is_public(address), address


@pytest.mark.parametrize(
    "url",
    ["http://[::1", "http://example.com:99999/x", "http://example.com:port/x", f"http://{'a' * 64}.example.com/x"],
)
def test_malformed_urls_are_unsafe_not_crashes(url: str) -> None:
    with pytest.raises(UnsafeURL, match="malformed"):
        check_url(url)


def test_a_url_without_a_scheme_is_told_so() -> None:
    with pytest.raises(UnsafeURL, match="not a URL: it does not start with http"):  # was "not 'none'"
        check_url("notaurl", resolve=resolver("93.184.216.34"))
    with pytest.raises(UnsafeURL, match="not ftp:"):
        check_url("ftp://example.com/x", resolve=resolver("93.184.216.34"))


def test_the_longest_url_fetched_is_the_longest_reference_a_job_may_hold() -> None:
    """Two names for one limit (netguard imports nothing of svdq's): a URL the worker would refuse to fetch must
    already be refused at submit."""
    from producer import contract, netguard

    assert netguard.MAX_URL_LENGTH == contract.MAX_REFERENCE
    longest = "http://example.com/" + "a" * (contract.MAX_REFERENCE - len("http://example.com/"))
    check_url(longest, resolve=resolver("93.184.216.34"))
    with pytest.raises(UnsafeURL, match="over 2,048"):
        check_url(longest + "a", resolve=resolver("93.184.216.34"))
