"""uvicorn's HTTP/1.1 protocol with what uvicorn leaves out (chatsvc note 17): a deadline for each
request's headers, and a way for the app to abort a connection.

`python chatsvc.py` serves with it through `ServerConfig`. Under another server neither exists: a
follower that stops reading is then closed gracefully, and slow headers are that server's affair.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import struct
import uuid
import weakref
from collections.abc import Callable
from typing import Any

import uvicorn
from starlette.responses import Response
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

#: The ASGI scope extension that `HttpProtocol` offers: `scope["extensions"][ABORT_EXTENSION]["abort"]()`.
ABORT_EXTENSION = "chatsvc.abort"
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, for 0 s: close() resets, dropping what is queued


class ServerConfig(uvicorn.Config):
    """uvicorn's configuration, with this protocol and what it needs from the app: the headers'
    deadline, and the app's 408 for a request that missed it, given a new correlation id. With
    several workers, uvicorn pickles it to each."""

    def __init__(
        self,
        app: Any,
        *,
        headers_timeout_s: float,
        timeout_response: Callable[[str, float], Response],
        **options: Any,
    ) -> None:
        super().__init__(app, http=HttpProtocol, **options)
        self.headers_timeout_s = headers_timeout_s
        self.timeout_response = timeout_response


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's protocol (httptools, which uvicorn picks by itself) with one timer per request, from
    the connection's start (or a kept-alive connection's next first byte) to the end of the headers,
    and `abort` offered to the app in each request's scope."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        assert isinstance(config, ServerConfig), "HttpProtocol reads its settings from a ServerConfig"
        self.headers_timeout_s = config.headers_timeout_s
        self.timeout_response = config.timeout_response
        self.headers_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.headers_timer = self.loop.call_later(self.headers_timeout_s, self.headers_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_headers_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # Through a weak reference: the scope is this protocol's, and its own bound method in it
        # would hold it in a cycle, left for the collector after the connection closes.
        self.scope["extensions"] = {ABORT_EXTENSION: {"abort": functools.partial(_abort, weakref.ref(self))}}
        if self.headers_timer is None:  # a later request on a kept-alive connection: from its first byte
            self.headers_timer = self.loop.call_later(self.headers_timeout_s, self.headers_timed_out)

    def on_headers_complete(self) -> None:
        self.stop_headers_timer()
        super().on_headers_complete()

    def stop_headers_timer(self) -> None:
        if self.headers_timer is not None:
            self.headers_timer.cancel()
            self.headers_timer = None

    def headers_timed_out(self) -> None:
        self.headers_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request behind an answer still going: no 408 in the middle of that answer;
            # the connection closes after it, as at uvicorn's shutdown.
            self.cycle.keep_alive = False
            return
        # The timer runs only while headers are awaited, and uvicorn makes a request's scope at its
        # first byte: with a scope, some of the request came, and can be answered.
        if self.scope is not None:
            response = self.timeout_response(str(uuid.uuid4()), self.headers_timeout_s)
            headers = [*self.server_state.default_headers, *response.raw_headers]
            status_line = STATUS_LINE[response.status_code]
            self.transport.write(
                b"".join([status_line, *(b"%s: %s\r\n" % header for header in headers), b"\r\n", response.body])
            )
        self.transport.close()

    def abort(self) -> None:
        """Drop the connection now, with what is queued for it: asyncio's buffer (transport.abort)
        and the kernel's (SO_LINGER 0: the peer gets a reset)."""
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        self.transport.abort()
        if self.cycle is not None and not self.cycle.response_complete:
            # As connection_lost will, soon: the answer ends here, which uvicorn need not report
            # as an app that "returned without completing response".
            self.cycle.disconnected = True


def _abort(protocol: weakref.ref[HttpProtocol]) -> None:
    if (alive := protocol()) is not None:
        alive.abort()
