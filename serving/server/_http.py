"""uvicorn's HTTP/1.1 protocol with a header timeout: a slow client cannot hold a connection.

Where it sits: in ``kubeml.serving.server``; ``_kserve.py`` hands
:func:`header_timeout_protocol` to uvicorn's config. uvicorn bounds the idle time between
requests (``timeout_keep_alive``) but not the time a client takes to send a request's
headers: a client that dribbles one byte a second (slowloris) keeps its connection, and a
few thousand such clients exhaust the server's descriptors. Here every request's headers
must be complete within ``header_timeout_s`` of their first byte (or of the connection
opening), or the connection is closed.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["DEFAULT_HEADER_TIMEOUT_S", "DEFAULT_IDLE_TIMEOUT_S", "header_timeout_protocol"]

#: Seconds a client has to send a request's headers. A real client sends them in one
#: segment; 10 s leaves room for a slow mobile link, not for a slowloris.
DEFAULT_HEADER_TIMEOUT_S = 10.0
#: Seconds a kept-alive connection may stay idle between requests. Above the 60 s idle
#: timeout of common load balancers, so they close first and never reuse a closed socket.
DEFAULT_IDLE_TIMEOUT_S = 65


def header_timeout_protocol(header_timeout_s: float) -> type:
    """A uvicorn HTTP protocol class closing connections whose headers take too long."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
        headers_hook = "on_headers_complete"
    except ImportError:  # httptools is optional in uvicorn; h11 is always there
        from uvicorn.protocols.http.h11_impl import H11Protocol as base
        headers_hook = ""

    class HeaderTimeoutProtocol(base):  # type: ignore[misc, valid-type]
        _header_timer: asyncio.TimerHandle | None = None
        _awaiting_headers = True

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._awaiting_headers and self._header_timer is None:
                self._arm()
            super().data_received(data)
            if not headers_hook and self._awaiting_headers:
                import h11

                if self.conn.their_state is not h11.IDLE:
                    self._headers_done()

        def on_response_complete(self) -> None:
            self._awaiting_headers = True  # the next request's headers, when they come
            super().on_response_complete()

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._header_timeout)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_done(self) -> None:
            self._awaiting_headers = False
            self._disarm()

        def _header_timeout(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.logger.warning("closing a connection whose request headers took over %g s", header_timeout_s)
                self.transport.close()

    if headers_hook:
        def on_headers_complete(self: Any) -> None:
            self._headers_done()
            base.on_headers_complete(self)

        HeaderTimeoutProtocol.on_headers_complete = on_headers_complete  # type: ignore[attr-defined]
    return HeaderTimeoutProtocol
