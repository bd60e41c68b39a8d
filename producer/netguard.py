"""Which outbound URLs svdq may call: http(s) only, and only public addresses unless allowed.

Checked where the URL is accepted (submit) and again where it is used, right before connecting, whose
caller then connects to the address checked here (not to a new lookup, which could answer otherwise).
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import SplitResult, urljoin, urlsplit

Resolver = Callable[..., list[tuple]]


class UnsafeURL(ValueError):
    pass


class PrivateAddress(UnsafeURL):
    """The host resolves to an address off the public internet: allowed where an operator says so."""


@dataclass(frozen=True)
class CheckedURL:
    scheme: str
    host: str
    port: int
    address: str  # the checked address to connect to
    path: str  # path and query, for the request line


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
# Ranges that embed IPv4 in layouts that vary (RFC 6052's /32-/64 forms under the local-use NAT64 prefix, SIIT's
# ::ffff:0:0:0/96) or that are for local networks: never public, whatever the IPv4 inside.
_NEVER_PUBLIC = (ipaddress.ip_network("64:ff9b:1::/48"), ipaddress.ip_network("::ffff:0:0:0/96"))
# Cloud hosts' own endpoints at addresses Python calls global: Azure's WireServer, which every Azure VM reaches
# and which hands out the VM's agent configuration (the metadata services elsewhere sit at link-local addresses).
_PLATFORM_ENDPOINTS = (ipaddress.ip_network("168.63.129.16/32"),)


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries and routes to: IPv4-mapped (::ffff:a.b.c.d), NAT64
    (64:ff9b::a.b.c.d, RFC 6052 and 8215), 6to4 (2002:AABB:CCDD::), Teredo (server and client), and the
    deprecated IPv4-compatible form (::a.b.c.d). Each is reachable as that IPv4 address."""
    found = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return [v4 for v4 in found if v4 is not None]


def is_public(address: str) -> bool:
    """True for a globally reachable unicast address. An IPv6 address that carries an IPv4 one in a fixed place
    (IPv4-mapped, NAT64's 64:ff9b::/96, 6to4, IPv4-compatible) is judged by that IPv4 address alone: it is where
    the connection goes (64:ff9b::7f00:1 is 127.0.0.1), and Python's verdict on those IPv6 ranges differs across
    releases (6to4 is global on 3.11.7 and not on 3.13 or a patched 3.11.2). Teredo is judged by both."""
    ip = ipaddress.ip_address(address)
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if any(ip in net for net in _NEVER_PUBLIC):
            return False
        carried = embedded_ipv4(ip)
        candidates = [*carried] if carried and ip.teredo is None else [ip, *carried]
    return all(c.is_global and not c.is_multicast and not any(c in n for n in _PLATFORM_ENDPOINTS) for c in candidates)


# Where a URL ends up: a request line (http.client refuses these characters there) and records (JobRequest's
# limit, producer.contract.MAX_REFERENCE; netguard imports nothing of svdq's).
MAX_URL_LENGTH = 2048
_UNSENDABLE = re.compile(r"[\x00-\x20\x7f]")


def _split(url: str) -> tuple[SplitResult, int]:
    try:
        parts = urlsplit(url)
        return parts, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:  # "Invalid IPv6 URL", a port out of range or not a number
        raise UnsafeURL(f"malformed URL: {exc}") from None


def _check_text(url: str) -> None:
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeURL(f"the URL is {len(url):,} characters long, over {MAX_URL_LENGTH:,}")
    if _UNSENDABLE.search(url):  # the URL is not repeated: it may hold a token
        raise UnsafeURL("the URL holds a space or a control character: percent-encode it")
    if not url.isascii():  # a request line is ASCII (http.client raises UnicodeEncodeError on the rest)
        raise UnsafeURL("the URL holds a non-ASCII character: percent-encode it (and a host name in punycode)")


def _check_scheme(scheme: str) -> None:
    if scheme in ("http", "https"):
        return
    if not scheme:  # the URL is not repeated: it may hold a token
        raise UnsafeURL("not a URL: it does not start with http:// or https://")
    raise UnsafeURL(f"only http and https URLs are allowed, not {scheme}:")


def check_url(
    url: str,
    *,
    allow_private: bool = False,
    resolve: Resolver = socket.getaddrinfo,
    public: Callable[[str], bool] | None = None,
) -> CheckedURL:
    _check_text(url)
    parts, port = _split(url)
    _check_scheme(parts.scheme)
    if not parts.hostname:
        raise UnsafeURL("the URL has no host")
    if parts.username or parts.password:
        raise UnsafeURL("credentials in the URL are not allowed")
    try:
        infos = resolve(parts.hostname, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UnsafeURL(f"cannot resolve {parts.hostname}: {exc.strerror}") from None
    except UnicodeError as exc:  # a label over 63 characters, or one IDNA cannot encode
        raise UnsafeURL(f"malformed host name: {exc}") from None
    addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise UnsafeURL(f"{parts.hostname} has no address")
    if not allow_private:
        private = [a for a in addresses if not (public or is_public)(a)]
        if private:
            raise PrivateAddress(f"{parts.hostname} resolves to a non-public address ({private[0]})")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return CheckedURL(parts.scheme, parts.hostname, port, addresses[0], path)


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to the address that was checked, whatever a new DNS lookup would say."""

    def __init__(self, target: CheckedURL, timeout: float):
        super().__init__(target.host, target.port, timeout=timeout)
        self._address = target.address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, target: CheckedURL, timeout: float):
        super().__init__(target.host, target.port, timeout=timeout, context=ssl.create_default_context())
        self._address = target.address

    def connect(self) -> None:
        raw = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname=self.host)  # type: ignore[attr-defined]


def connect(target: CheckedURL, timeout: float) -> http.client.HTTPConnection:
    """An HTTP(S) connection to the checked address (TLS still verifies the host's name)."""
    return (_PinnedHTTPS if target.scheme == "https" else _PinnedHTTP)(target, timeout)


class TooLarge(ValueError):
    pass


class HTTPFailure(OSError):
    """A response that is not the image: `status` says which (0 for too many redirects)."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)


class BadResponse(ValueError):
    """A response that does not parse as HTTP (a bad status line, a header line too long, a Content-Length that is
    no number): the host's to fix, and retrying does not help. Its text is never the host's own bytes."""


class Stopped(OSError):
    """The fetch ran past its deadline, or its caller said stop (the job was canceled) while it waited."""


class Watch:
    """Ends a fetch from outside the thread blocked in it: a host that sends a byte every few seconds passes
    every per-read timeout, so only closing its socket stops the read. Polls `stop` twice a second."""

    def __init__(self, deadline: float, stop: Callable[[], bool] | None):
        self.ends_at = time.monotonic() + deadline
        self.deadline, self.stop = deadline, stop
        self.why: str | None = None
        self.conn: http.client.HTTPConnection | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="svdq-fetch-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(min(0.5, max(0.0, self.ends_at - time.monotonic()))):
            if time.monotonic() >= self.ends_at:
                self._end(f"took longer than {self.deadline:g}s")
            elif self._stopping():
                self._end("stopped: the job was canceled or its worker is stopping")
            if self.why is not None:
                return

    def _stopping(self) -> bool:
        try:
            return self.stop is not None and self.stop()
        except Exception:  # the caller's check failed (Redis away): the deadline still stands
            return False

    def _end(self, why: str) -> None:
        with self._lock:
            self.why = why
            sock = self.conn.sock if self.conn is not None else None
            if sock is not None:
                with contextlib.suppress(OSError):  # already closed
                    sock.shutdown(socket.SHUT_RDWR)

    def attach(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self.conn = conn
        if self.why is not None:
            raise Stopped(self.why)

    def detach(self) -> None:
        """Before the connection closes: its descriptor's number may be reused at once, by a socket not ours."""
        with self._lock:
            self.conn = None

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=1.0)  # a stop() still asking Redis is not waited for: the thread is a daemon


@contextlib.contextmanager
def watched(conn: http.client.HTTPConnection, watch: Watch) -> Iterator[None]:
    """`conn` connected under `watch`, for the block's requests: Stopped for any failure once the watch has ended
    it, and the connection let go of and closed at the end (fetch's GETs and webhooks' POSTs alike)."""
    try:
        watch.attach(conn)
        conn.connect()  # here, not in request(): the watch can close its socket from now on
        watch.attach(conn)
        yield
    except (http.client.HTTPException, OSError, ValueError):
        if watch.why is not None:
            raise Stopped(watch.why) from None
        raise
    finally:
        watch.detach()
        conn.close()


def fetch(
    url: str,
    *,
    max_bytes: int,
    allow_private: bool = False,
    timeout: float = 15.0,
    deadline: float = 60.0,
    stop: Callable[[], bool] | None = None,
    max_redirects: int = 3,
    resolve: Resolver = socket.getaddrinfo,
    public: Callable[[str], bool] | None = None,
) -> bytes:
    """GET a URL through the guard: every redirect checked again, the body capped while it streams. The whole
    fetch, redirects included, ends within `deadline` seconds or once `stop()` is true (Stopped); `timeout`
    bounds each connect and read. A response that is not HTTP raises BadResponse."""
    watch = Watch(deadline, stop)
    try:
        for _ in range(max_redirects + 1):
            target = check_url(url, allow_private=allow_private, resolve=resolve, public=public)
            conn = connect(target, timeout)
            try:
                with watched(conn, watch):
                    body, location = _get(conn, target, max_bytes, watch)
            except (http.client.HTTPException, OSError, ValueError) as exc:
                raise _why(exc, watch, target.host) from None
            if location is None:
                return body
            url = urljoin(url, location)
        raise HTTPFailure(0, f"more than {max_redirects} redirects")
    finally:
        watch.close()


def _get(
    conn: http.client.HTTPConnection, target: CheckedURL, max_bytes: int, watch: Watch
) -> tuple[bytes, str | None]:
    """One GET on a watched connection: the body, or a redirect's location."""
    conn.request("GET", target.path, headers={"user-agent": "svdq", "accept": "image/*"})
    with contextlib.closing(conn.getresponse()) as response:  # conn.close() leaves a will_close response open
        if response.status in (301, 302, 303, 307, 308) and response.getheader("location"):
            return b"", response.getheader("location", "")
        if response.status != 200:
            raise HTTPFailure(response.status, f"HTTP {response.status} from {target.host}")
        declared = _content_length(response.getheader("content-length"), target.host)
        if declared > max_bytes:
            raise TooLarge(f"{declared} bytes, over the {max_bytes}-byte limit")
        body = response.read(max_bytes + 1)
    if len(body) > max_bytes:
        raise TooLarge(f"over the {max_bytes}-byte limit")
    if watch.why is not None:  # a read the watch cut short returns what it had
        raise Stopped(watch.why)
    return body, None


def _why(exc: Exception, watch: Watch, host: str) -> Exception:
    """What a failed GET raises: Stopped when the watch ended it, whatever the read then saw."""
    if watch.why is not None:
        return Stopped(watch.why)
    if isinstance(exc, http.client.IncompleteRead | http.client.RemoteDisconnected):
        return ConnectionError(f"{host} closed the connection early")
    if isinstance(exc, http.client.HTTPException):
        return BadResponse(f"{host} sent a malformed HTTP response ({type(exc).__name__})")
    return exc


def _content_length(value: str | None, host: str) -> int:
    try:
        declared = int(value or 0)
    except ValueError:
        raise BadResponse(f"{host} sent a Content-Length that is not a number") from None
    if declared < 0:
        raise BadResponse(f"{host} sent a negative Content-Length")
    return declared
