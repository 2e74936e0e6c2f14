"""A loopback TCP proxy that cuts a connection where a real network might: the first response it
relays is cut at a byte position chosen from what has passed so far (between events, or inside
one), with a reset, as when a phone changes networks. Once that cut is done, everything passes
untouched. (Not "the first connection": node's fetch may open a spare one that it never uses.)
With `then_port`, the connections opened after the cut go there: a load balancer that sends the
reconnect to another replica."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable

#: Given the response bytes relayed so far on the connection to cut, where to cut (an offset into
#: them), or None to relay on.
CutAt = Callable[[bytes], int | None]


class CuttingProxy:
    def __init__(self, target_port: int, cut_at: CutAt, then_port: int | None = None) -> None:
        self.target_port = target_port
        self.then_port = then_port
        self.cut_at = cut_at
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.connections = 0
        self.cut_done = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> CuttingProxy:
        self._spawn(self._accept)
        return self

    def stop(self) -> None:
        self.listener.close()

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # stopped
                return
            self.connections += 1
            after_cut = self.then_port is not None and self.cut_done.is_set()
            upstream = socket.create_connection(("127.0.0.1", self.then_port if after_cut else self.target_port))
            self._spawn(self._pipe, client, upstream, None)
            self._spawn(self._pipe, upstream, client, self.cut_at)

    def _pipe(self, source: socket.socket, sink: socket.socket, cut_at: CutAt | None) -> None:
        seen = b""
        with contextlib.suppress(OSError):  # either side may go first
            while data := source.recv(65536):
                if cut_at is not None and not self.cut_done.is_set():
                    cut = cut_at(seen + data)
                    if cut is not None:
                        self.cut_done.set()  # first: whatever fails below, no other connection is cut
                        sink.sendall(data[: max(0, cut - len(seen))])
                        self._reset(sink)
                        break
                    seen += data
                sink.sendall(data)
        for sock in (source, sink):  # the other direction's thread then ends too
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    @staticmethod
    def _reset(sock: socket.socket) -> None:
        """Close with a reset (RST), not a clean end: the client must see the connection die."""
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # The other direction's thread is blocked in recv() on this socket, which keeps it open
        # past close(): SHUT_RD wakes that reader (and sends nothing), so that close() resets.
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RD)
        sock.close()


def at_marker(marker: bytes, occurrence: int, offset: int) -> CutAt:
    """Cut `offset` bytes after the start of the `occurrence`-th (from 1) `marker` in the response."""

    def cut_at(seen: bytes) -> int | None:
        start = -1
        for _ in range(occurrence):
            start = seen.find(marker, start + 1)
            if start < 0:
                return None
        return start + offset if len(seen) >= start + offset else None

    return cut_at
