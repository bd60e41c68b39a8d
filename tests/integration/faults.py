"""A TCP proxy on loopback that can cut a service off and bring it back: real outages for tests.

While down, new connections are accepted and closed at once and open ones are dropped, as when a
server or the network between goes away; the service behind keeps its data.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from producer.local_redis import free_port


class CuttableProxy:
    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.port = free_port()
        self._up = threading.Event()
        self._up.set()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._closed = False
        self._lose_after: bytes | None = None
        self._lost = threading.Event()
        self._muted: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def down(self) -> None:
        self._up.clear()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self._open.clear()

    def up(self) -> None:
        self._up.set()

    def close(self) -> None:
        self._closed = True
        self.down()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._up.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b, a is client), daemon=True).start()

    def lose_reply_to(self, request: bytes) -> threading.Event:
        """Once: pass on the first request containing `request`, then drop its connection instead of the reply, as
        a Redis restart or a failover does after running a command. The event is set when that has happened."""
        self._lose_after, self._lost = request, threading.Event()
        return self._lost

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while data := source.recv(65536):
                if source in self._muted:  # the reply to the doomed request: it goes nowhere
                    break
                doomed = from_client and self._lose_after is not None and self._lose_after in data
                if doomed:
                    self._lose_after = None
                    self._muted.add(sink)
                sink.sendall(data)
                if doomed:
                    time.sleep(0.5)  # the server runs it and answers, and its answer is dropped
                    self._lost.set()
                    break
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.close()
            with self._lock:
                self._open.discard(source)
                self._open.discard(sink)
