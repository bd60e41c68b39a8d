"""Which outbound URLs svdq may call: http(s) only, and only public addresses unless allowed.

Checked where the URL is accepted (submit) and again where it is used, right before connecting, whose
caller then connects to the address checked here (not to a new lookup, which could answer otherwise).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

Resolver = Callable[..., list[tuple]]


class UnsafeURL(ValueError):
    pass


@dataclass(frozen=True)
class CheckedURL:
    scheme: str
    host: str
    port: int
    address: str  # the checked address to connect to
    path: str  # path and query, for the request line


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback, whatever its notation
    return ip.is_global and not ip.is_multicast


def check_url(url: str, *, allow_private: bool = False, resolve: Resolver = socket.getaddrinfo) -> CheckedURL:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise UnsafeURL(f"only http and https URLs are allowed, not {parts.scheme or 'none'!r}")
    if not parts.hostname:
        raise UnsafeURL("the URL has no host")
    if parts.username or parts.password:
        raise UnsafeURL("credentials in the URL are not allowed")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = resolve(parts.hostname, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UnsafeURL(f"cannot resolve {parts.hostname}: {exc.strerror}") from None
    addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise UnsafeURL(f"{parts.hostname} has no address")
    if not allow_private:
        private = [a for a in addresses if not is_public(a)]
        if private:
            raise UnsafeURL(f"{parts.hostname} resolves to a non-public address ({private[0]})")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return CheckedURL(parts.scheme, parts.hostname, port, addresses[0], path)
