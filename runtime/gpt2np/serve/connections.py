"""The HTTP connections of `gpt-serve`: a deadline for each request's headers and a bound on open
connections, in uvicorn's h11 protocol (what uvicorn lacks: a client that opens a socket and sends
half a request line, or nothing, holds it forever; the body's deadline is `app.Guard`'s).

Both answers are written on the socket before any request is parsed, in OpenAI's error shape,
and the connection is closed: 408 when a request's headers have not all come within
`header_timeout` seconds of its first byte (or of the connection), 503 when `max_connections`
are open already.
"""

from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import error_body

DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 1024


def _raw_response(status: int, reason: bytes, body: dict, headers: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    content = json.dumps(body).encode()
    head = [b"HTTP/1.1 %d %s" % (status, reason), b"content-type: application/json",
            b"content-length: %d" % len(content), b"connection: close", *(k + b": " + v for k, v in headers)]
    return b"\r\n".join(head) + b"\r\n\r\n" + content


TOO_SLOW = _raw_response(408, b"Request Timeout", error_body(
    "the request's headers did not arrive in time", code="request_timeout"))
TOO_MANY = _raw_response(503, b"Service Unavailable", error_body(
    "the server has too many open connections; retry shortly", type="server_error", code="too_many_connections"),
    ((b"retry-after", b"1"),))


def guarded_protocol(header_timeout: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a header deadline and a connection bound (pass it as `http=`)."""

    class GuardedH11Protocol(H11Protocol):
        header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                self._refuse(TOO_MANY)
                return
            self._start_header_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:  # a request has begun, or none: headers still due
                if self.header_timer is None and not self.transport.is_closing():
                    self._start_header_timer()  # a keep-alive connection's next request
            else:
                self._stop_header_timer()  # the headers are in; the body has its own deadline

        def on_response_complete(self) -> None:
            self._stop_header_timer()  # an idle connection is uvicorn's keep-alive timeout's to close
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self._stop_header_timer()
            super().connection_lost(exc)

        def _start_header_timer(self) -> None:
            self.header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _stop_header_timer(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _headers_too_slow(self) -> None:
            self.header_timer = None
            if self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete):
                self._refuse(TOO_SLOW)

        def _refuse(self, response: bytes) -> None:
            if not self.transport.is_closing():
                self.transport.write(response)
                self.transport.close()

    return GuardedH11Protocol
