"""uvicorn with connection-level limits for `lmm serve`: slow or idle clients cannot hold the server.

    run(app, host="127.0.0.1", port=8000, header_timeout=10, keep_alive_timeout=5, max_connections=256)

- header timeout: a connection must deliver a request's complete headers within `header_timeout` seconds of
  its first byte (or of connecting); otherwise it gets a 408 and is closed (uvicorn alone waits forever);
- keep-alive timeout: an idle connection between requests is closed after `keep_alive_timeout` seconds
  (uvicorn's `timeout_keep_alive`);
- connection cap: connections beyond `max_connections` get a 503 and are closed at once.
The body's own deadline (`Limits.body_timeout`, a 408) is enforced by the app, which reads the body.
"""

from __future__ import annotations

import logging

log = logging.getLogger("lmm.serve")

_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s"
)
_SLOW = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s"
)


def _raw_response(template: bytes, message: str, code: str) -> bytes:
    import json

    body = json.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    ).encode()
    return template % (len(body), body)


def guarded_protocol(header_timeout: float, max_connections: int):
    """An h11 protocol class for uvicorn with a header deadline and a connection cap."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    if header_timeout <= 0 or max_connections < 1:
        raise ValueError("header_timeout must be positive and max_connections at least 1")

    class GuardedH11Protocol(H11Protocol):
        _header_timer = None
        _rejected = False

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                self._rejected = True
                log.warning("connection refused: %d connections open (--max-connections)", len(self.connections) - 1)
                transport.write(
                    _raw_response(
                        _BUSY, f"the server has {max_connections} connections open; retry later", "too_many_connections"
                    )
                )
                transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._rejected:
                return
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:  # the request's headers are not complete yet
                self._arm()
            else:
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is None and not self.transport.is_closing():
                self._header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self.cycle is None or self.cycle.response_complete:
                self.transport.write(
                    _raw_response(
                        _SLOW, f"request headers did not arrive within {header_timeout:g} s", "request_timeout"
                    )
                )
            self.transport.close()

    return GuardedH11Protocol


def run(
    app,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    header_timeout: float = 10.0,
    keep_alive_timeout: int = 5,
    max_connections: int = 256,
) -> None:
    """Serve `app` with uvicorn (blocks until interrupted)."""
    import uvicorn

    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=guarded_protocol(header_timeout, max_connections),
        timeout_keep_alive=keep_alive_timeout,
    )
