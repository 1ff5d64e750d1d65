"""How uvicorn serves the HTTP front end: TLS, connection limits, keep-alive, no
Server header, and a read timeout against slow clients.

uvicorn closes idle keep-alive connections but has no limit on how long a client
may take to send a request: a client trickling its headers or body a byte at a
time holds its connection (and its memory) as long as it likes. `SlowClientH11Protocol`
gives each request `read_timeout_s` from the moment the connection opens (or the
previous response ends) until its body is complete, then closes the connection.
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.h11_impl import H11Protocol

from serving.settings import Settings

log = logging.getLogger("gateway.http")


class SlowClientH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on receiving each whole request."""

    read_timeout_s = 30.0  # set per server by `protocol_class`

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._read_timer: asyncio.TimerHandle | None = None
        self._arm_read_timer()

    def _arm_read_timer(self) -> None:
        self._cancel_read_timer()
        self._read_timer = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

    def _cancel_read_timer(self) -> None:
        timer = getattr(self, "_read_timer", None)
        if timer is not None:
            timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if not self.transport.is_closing():
            log.warning("closed a connection whose request took too long to arrive",
                        extra={"fields": {"client": f"{self.client[0]}:{self.client[1]}" if self.client else None,
                                          "read_timeout_s": self.read_timeout_s}})
            self.transport.close()  # the handler, if any, sees the client disconnect

    def handle_events(self) -> None:
        super().handle_events()
        cycle = self.cycle  # the latest request's (a finished one stays until the next request's headers)
        if cycle is not None and not cycle.more_body and not cycle.response_complete:  # arrived whole
            self._cancel_read_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_read_timer()  # the next request on this connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read_timer()
        super().connection_lost(exc)


def protocol_class(read_timeout_s: float) -> type[SlowClientH11Protocol]:
    return type("SlowClientH11Protocol", (SlowClientH11Protocol,), {"read_timeout_s": read_timeout_s})


def uvicorn_options(settings: Settings) -> dict:
    """uvicorn.Config keywords for the front end's security and limits (defaults: plain HTTP, no
    connection limit, as before; never a Server header, so no version is advertised)."""
    options = {"http": protocol_class(settings.read_timeout_s), "server_header": False,
               "timeout_keep_alive": settings.keep_alive_s, "limit_concurrency": settings.max_connections}
    if settings.tls_cert is not None:
        options.update(ssl_certfile=str(settings.tls_cert), ssl_keyfile=str(settings.tls_key))
    return options
