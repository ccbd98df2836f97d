"""The console's listening socket and the bound on what its clients may hold.

aiohttp closes an idle keep-alive connection only after an hour and a connection that never
finishes its request headers never; each holds a file descriptor, and the process shares its
open-file limit with the gRPC port. :class:`ConnectionGuard` sits between the socket and aiohttp's
protocol, and:

* accepts at most ``max_connections`` connections at once; a further one is closed as soon as it
  is accepted (counted, logged at most once a minute), so console clients never take the file
  descriptors the cameras' connections and health checks need;
* closes a connection whose request headers are not complete ``header_timeout_s`` after it opened
  (or after the first byte of its next request), and one that sits idle between requests for
  ``idle_timeout_s``; a request being answered (an event stream included) is never timed out here;
* does TLS itself (``loop.start_tls``, with ``header_timeout_s`` for the handshake), so a
  connection is counted from the moment it is accepted, handshake included.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: A refused connection is logged at most this often (seconds).
REFUSAL_LOG_INTERVAL_S = 60.0


@dataclass(eq=False)
class _Connection:
    transport: asyncio.BaseTransport
    deadline: float | None  # time.monotonic() it is closed at unless a request is under way
    requests: int = 0  # being answered now
    idle: bool = False  # between requests, no byte of the next one yet


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, behind the guard's accounting."""

    def __init__(self, guard: ConnectionGuard, handler: asyncio.Protocol) -> None:
        self.guard = guard
        self.handler = handler
        self.connection: _Connection | None = None
        self.started = False  # handler.connection_made was called
        self.early: list[bytes] = []  # decrypted before start_tls returned

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.connection = self.guard.admit(self, transport)
        if self.connection is None:
            return
        if self.guard.ssl_context is None:
            self.started = True
            self.handler.connection_made(transport)
        else:
            transport.pause_reading()  # type: ignore[attr-defined]
            self.guard.spawn(self._start_tls(transport))

    async def _start_tls(self, transport: asyncio.BaseTransport) -> None:
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(transport, self, self.guard.ssl_context, server_side=True,  # type: ignore[arg-type]
                                       ssl_handshake_timeout=self.guard.header_timeout_s)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            log.debug("console TLS handshake failed: %r", exc)
            transport.abort()  # type: ignore[attr-defined]
            return
        if tls is None or self.connection is None:
            return
        self.connection.transport = tls
        self.started = True
        self.handler.connection_made(tls)
        for data in self.early:
            self.handler.data_received(data)
        self.early.clear()

    def data_received(self, data: bytes) -> None:
        connection = self.connection
        if connection is not None and connection.idle:
            connection.idle = False
            connection.deadline = time.monotonic() + self.guard.header_timeout_s
        if self.started:
            self.handler.data_received(data)
        else:
            self.early.append(data)

    def eof_received(self) -> bool | None:
        return self.handler.eof_received() if self.started else None

    def pause_writing(self) -> None:
        if self.started:
            self.handler.pause_writing()

    def resume_writing(self) -> None:
        if self.started:
            self.handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.forget(self)
        if self.started:
            self.handler.connection_lost(exc)


class ConnectionGuard:
    """Bounds and times out the connections of one aiohttp server (see the module docstring).

    Args:
        handler_factory: aiohttp's protocol factory (``AppRunner.server``).
        max_connections: connections held at once.
        header_timeout_s: seconds a connection has to complete its request headers (and TLS handshake).
        idle_timeout_s: seconds a connection may sit between requests without sending a byte.
        ssl_context: serve TLS with it.
    """

    def __init__(self, handler_factory: Callable[[], asyncio.Protocol], max_connections: int,
                 header_timeout_s: float, idle_timeout_s: float, ssl_context: ssl.SSLContext | None = None) -> None:
        self.handler_factory = handler_factory
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.ssl_context = ssl_context
        self.refused = 0  # connections closed at once: the bound was reached
        self.timed_out = 0  # connections closed by a timeout
        self._connections: dict[_Guarded, _Connection] = {}
        self._by_handler: dict[Any, _Connection] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._last_refusal_log = -REFUSAL_LOG_INTERVAL_S

    @property
    def open(self) -> int:
        return len(self._connections)

    async def listen(self, host: str, port: int) -> int:
        """Opens the listening socket; returns its port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Guarded(self, self.handler_factory()), host, port)
        self.spawn(self._sweep())
        return int(self._server.sockets[0].getsockname()[1])

    def spawn(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def admit(self, protocol: _Guarded, transport: asyncio.BaseTransport) -> _Connection | None:
        if len(self._connections) >= self.max_connections:
            transport.abort()  # type: ignore[attr-defined]
            self.refused += 1
            now = time.monotonic()
            if now - self._last_refusal_log >= REFUSAL_LOG_INTERVAL_S:
                self._last_refusal_log = now
                log.warning("event=console_connections_full max_connections=%d refused=%d: further console "
                            "connections are closed at once", self.max_connections, self.refused)
            return None
        connection = self._connections[protocol] = _Connection(transport, time.monotonic() + self.header_timeout_s)
        self._by_handler[protocol.handler] = connection
        return connection

    def forget(self, protocol: _Guarded) -> None:
        self._connections.pop(protocol, None)
        self._by_handler.pop(protocol.handler, None)

    async def middleware(self, request: Any, handler: Callable[[Any], Awaitable[Any]]) -> Any:
        """aiohttp middleware: no timeout while a request is answered; the idle clock after it."""
        connection = self._by_handler.get(request.protocol)
        if connection is None:
            return await handler(request)
        connection.requests += 1
        connection.deadline = None
        try:
            return await handler(request)
        finally:
            connection.requests -= 1
            if connection.requests == 0:
                connection.idle = True
                connection.deadline = time.monotonic() + self.idle_timeout_s

    async def _sweep(self) -> None:
        period = min(1.0, self.header_timeout_s / 4, self.idle_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for connection in [c for c in self._connections.values() if c.deadline is not None and c.deadline <= now]:
                self.timed_out += 1
                connection.transport.abort()  # type: ignore[attr-defined]

    def close(self) -> None:
        """Stops accepting."""
        if self._server is not None:
            self._server.close()

    async def abort_all(self) -> None:
        """Closes every connection at once (the last step of the console's stop)."""
        for connection in list(self._connections.values()):
            connection.transport.abort()  # type: ignore[attr-defined]
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            try:
                async with asyncio.timeout(2.0):
                    await self._server.wait_closed()
            except TimeoutError:
                log.warning("event=console_close_slow open=%d", self.open)


__all__ = ["ConnectionGuard"]
