"""A TCP proxy on loopback that delays each direction by half a round trip: a server one network hop away.

Bytes are forwarded as they come, each chunk `rtt / 2` seconds after it was read, so pipelined traffic keeps
flowing (as on a network) while every request-and-reply pays the round trip. One reader and one writer thread
per direction; for benchmarks, where its own CPU use is a cost the measured side also pays.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time

from producer.local_redis import free_port


class LatencyProxy:
    def __init__(self, upstream_port: int, rtt: float):
        self.upstream_port, self.delay = upstream_port, rtt / 2
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for source, sink in ((client, upstream), (upstream, client)):
                chunks: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()
                threading.Thread(target=self._read, args=(source, chunks), daemon=True).start()
                threading.Thread(target=self._write, args=(sink, chunks), daemon=True).start()

    def _read(self, source: socket.socket, chunks: queue.SimpleQueue[tuple[float, bytes]]) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                chunks.put((time.monotonic() + self.delay, data))
        chunks.put((0.0, b""))

    def _write(self, sink: socket.socket, chunks: queue.SimpleQueue[tuple[float, bytes]]) -> None:
        try:
            while True:
                due, data = chunks.get()
                if not data:
                    return
                if (wait := due - time.monotonic()) > 0:
                    time.sleep(wait)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
