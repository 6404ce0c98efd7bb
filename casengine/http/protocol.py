"""uvicorn's httptools protocol with two changes for a registry's big bodies.

- **Zero-copy file bodies.** Apps may send ASGI's ``http.response.zerocopy`` message
  (``file``, ``offset``, ``count``, ``more_body``): the bytes go from the page cache to the
  socket with ``sendfile``, never through Python. A pull then costs the server one kernel
  copy per byte instead of a ``pread`` copy plus a ``send`` copy (perf put those two copies
  at half of the server's CPU on a 256 MiB pull). The extension is announced in
  ``scope["extensions"]`` only on plain TCP, where ``sendfile`` can reach the socket;
  under TLS apps see no extension and stream as before.
- **Request bodies in MiB batches, uncopied.** uvicorn pauses reading once 64 KiB of body
  wait for the app, so a 1 GiB push crossed the event loop 16 thousand times; the limit
  here is :data:`casengine.http.asgi.BODY_BATCH`, the batch a worker takes at once. And the
  pieces go to the app as they came from the socket (:class:`_PartsReceive`), to be joined
  on the worker's thread, not copied twice on the loop's.

uvloop keeps the socket for itself (no ``add_writer``, no ``loop.sendfile``), so
``sendfile`` runs in a worker thread that waits for room in the socket with ``poll``.
Nothing else writes to the connection meanwhile: HTTP/1.1 answers one request at a time,
and the response's headers have left uvloop's buffer before the thread starts.
"""

from __future__ import annotations

import asyncio
import functools
import os
import select
from typing import Any

import anyio
import anyio.to_thread
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from casengine.http.asgi import BODY_BATCH, BODY_PARTS, ZEROCOPY, ClientGone

#: A client that takes no byte for this long, or sends no byte of its request body, is gone:
#: its thread and buffers are needed elsewhere (``serve --stall-timeout``).
STALL_TIMEOUT = 120.0
#: The most bytes a request line and its headers may take (``serve --max-header-size``):
#: Go's net/http default, which the reference registry keeps. httptools has no limit of
#: its own, so a client streaming headers grew the server's memory without end.
MAX_HEAD = 1 << 20
#: How long a request's line and headers may take to arrive (``serve --header-timeout``).
#: uvicorn times out only a connection idle between requests, so one that sent nothing, or
#: a header a byte at a time, kept its descriptor for good: enough of them and the
#: process could accept no one else.
HEAD_TIMEOUT = 30.0
#: Threads that may wait on slow sockets at once.
SENDERS = 256


@functools.cache
def _senders() -> anyio.CapacityLimiter:
    # threads of their own: slow downloads must not starve other requests' engine calls
    return anyio.CapacityLimiter(SENDERS)


def sendfile_all(sock: int, fd: int, offset: int, count: int,
                 timeout: float = STALL_TIMEOUT) -> None:
    """Send ``count`` bytes of ``fd`` from ``offset`` to the non-blocking socket ``sock``."""
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    while count > 0:
        try:
            n = os.sendfile(sock, fd, offset, count)
        except BlockingIOError:
            if not poller.poll(timeout * 1000):
                raise ClientGone from None
            continue
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ClientGone from exc
        if n == 0:
            raise OSError(f"file ended {count} bytes before the response did")
        offset += n
        count -= n


class ZeroCopyProtocol(HttpToolsProtocol):
    """``uvicorn.run(..., http=ZeroCopyProtocol)``; see the module docstring.

    It also bounds what a request's head may cost: a head over ``max_head`` bytes is
    answered ``431`` and the connection closed, before more of it is buffered; one that has
    not fully arrived ``head_timeout`` seconds after its first byte (or the connection's
    start) has its connection closed, and so has a request whose body stalls for
    ``stall_timeout`` (see :class:`_PartsReceive`). ``functools.partial(ZeroCopyProtocol,
    max_head=..., head_timeout=..., stall_timeout=...)`` sets them.
    """

    def __init__(self, *args: Any, max_head: int = MAX_HEAD, head_timeout: float = HEAD_TIMEOUT,
                 stall_timeout: float = STALL_TIMEOUT, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_head = max_head
        self.head_timeout = head_timeout
        self.stall_timeout = stall_timeout
        #: bytes received of the current request's head; None while its body comes
        self._head_bytes: int | None = 0
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None:  # between requests the keep-alive timeout applies
            self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm_head_timer()  # a pipelined head: the answer before it is still going
            return
        if not self.transport.is_closing():
            self.logger.info("Request head not complete after %g s: connection closed.",
                             self.head_timeout)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._head_bytes is not None:
            # counted before httptools sees them: it joins a header's pieces itself, so a
            # single endless header never reaches on_header
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head:
                self._refuse_head()
                return
        super().data_received(data)

    def _refuse_head(self) -> None:
        self._head_bytes = None
        self.logger.warning("Request head over %d bytes: refused.", self.max_head)
        msg = f"request line and headers over {self.max_head} bytes"
        self.transport.write(b"".join([
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: %d\r\nconnection: close\r\n\r\n" % len(msg), msg.encode()]))
        self.transport.close()

    def on_headers_complete(self) -> None:
        self._head_bytes = None
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._head_bytes = 0  # what comes next is the next request's head
        super().on_message_complete()

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if (self.parser.should_upgrade() and self._should_upgrade()) or cycle.response_complete:
            return
        pending = _pending(cycle)
        pending.parts.append(body)
        pending.size += len(body)
        # a MiB batch only for a request whose app reads its body: until then (an upload
        # waiting for a thread, a handler that never reads) uvicorn's own 64 KiB, or every
        # connection could make the server hold a MiB it has no use for yet
        if pending.size > (BODY_BATCH if pending.asked else HIGH_WATER_LIMIT):
            self.flow.pause_reading()
        cycle.message_event.set()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        sock = self.transport.get_extra_info("socket")
        fileno = -1  # no zero-copy: the send still times out a stalled reader
        if (hasattr(os, "sendfile") and sock is not None
                and self.transport.get_extra_info("sslcontext") is None):
            cycle.scope.setdefault("extensions", {})[ZEROCOPY] = {}  # type: ignore[typeddict-item]
            fileno = sock.fileno()
        cycle.send = _ZeroCopySend(cycle, fileno, self.stall_timeout)  # type: ignore[method-assign]
        cycle.receive = _PartsReceive(cycle, self.stall_timeout)  # type: ignore[method-assign]
        super()._start_asgi_task(cycle, app)


class _Pending:
    """Body pieces received and not yet handed to the app."""

    __slots__ = ("asked", "parts", "size")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.asked = False  #: the app has asked for the body


def _pending(cycle: RequestResponseCycle) -> _Pending:
    pending = cycle.__dict__.get("_casengine_pending")
    if pending is None:
        pending = cycle.__dict__["_casengine_pending"] = _Pending()
    return pending


class _PartsReceive:
    """The cycle's ``receive`` (uvicorn 0.54's, step for step), except that the body goes
    out as the list of pieces the socket gave, under :data:`BODY_PARTS`: uvicorn copies
    each piece into a bytearray and the bytearray into bytes, two copies of every pushed
    byte on the event loop's thread, which profiling showed to be the busiest of a push.

    A body of which no byte comes for ``stall_timeout`` seconds ends as if the client had
    left (the connection is closed): a stalled upload held a worker thread for good, and
    64 of them every thread the process had for engine calls."""

    def __init__(self, cycle: RequestResponseCycle, stall_timeout: float) -> None:
        self._cycle = cycle
        self._stall_timeout = stall_timeout

    async def __call__(self) -> Any:
        cycle = self._cycle
        _pending(cycle).asked = True
        if cycle.waiting_for_100_continue and not cycle.transport.is_closing():
            cycle.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            cycle.waiting_for_100_continue = False
        if not cycle.disconnected and not cycle.response_complete:
            cycle.flow.resume_reading()
            if cycle.more_body:
                try:
                    await asyncio.wait_for(cycle.message_event.wait(), self._stall_timeout)
                except TimeoutError:
                    cycle.disconnected = True
                    cycle.transport.close()
            else:  # the body is in: what is left to wait for is the client leaving
                await cycle.message_event.wait()
            cycle.message_event.clear()
        if cycle.disconnected or cycle.response_complete:
            return {"type": "http.disconnect"}
        pending = _pending(cycle)
        parts, pending.parts, pending.size = pending.parts, [], 0
        return {"type": "http.request", "body": b"", BODY_PARTS: parts,
                "more_body": cycle.more_body}


class _ZeroCopySend:
    """The cycle's ``send``, plus ``http.response.zerocopy`` (where ``sock`` is not -1).

    A body that the client takes no byte of for ``stall_timeout`` seconds drops the
    connection, as sendfile does: uvicorn waits for room in the socket without end, and a
    pull of a compressed blob that stopped reading held about 17 MiB (the chunk sent, the
    one read ahead, the frame being decompressed) for as long as its client liked: 100
    of them, 1.7 GB.
    """

    def __init__(self, cycle: RequestResponseCycle, sock: int, stall_timeout: float) -> None:
        self._cycle = cycle
        self._send = RequestResponseCycle.send.__get__(cycle)
        self._sock = sock
        self._stall_timeout = stall_timeout

    async def __call__(self, message: Any) -> None:
        if message["type"] != ZEROCOPY:
            cycle = self._cycle
            if cycle.flow.write_paused and not cycle.disconnected:
                try:
                    await asyncio.wait_for(cycle.flow.drain(), self._stall_timeout)
                except TimeoutError:
                    cycle.disconnected = True
                    cycle.transport.abort()  # close() would wait for the buffer to drain
                    raise ClientGone from None
            await self._send(message)
            return
        cycle = self._cycle
        if self._sock < 0:
            raise RuntimeError(f"{ZEROCOPY} was not offered on this connection")
        if cycle.disconnected:
            raise ClientGone
        if not cycle.response_started or cycle.response_complete:
            raise RuntimeError(f"{ZEROCOPY} outside a response body")
        count = int(message.get("count", -1))
        offset = int(message.get("offset", 0))
        fd = message["file"].fileno()
        if count < 0:
            count = os.fstat(fd).st_size - offset
        if cycle.chunked_encoding:
            raise RuntimeError(f"{ZEROCOPY} needs a Content-Length response")
        if count > cycle.expected_content_length:
            raise RuntimeError("Response content longer than Content-Length")
        transport = cycle.transport
        try:
            while transport.get_write_buffer_size():  # the headers, rarely still queued
                if transport.is_closing():
                    raise ClientGone
                await asyncio.sleep(0.001)
            if count:
                if transport.is_closing():
                    raise ClientGone
                # the thread sends on a duplicate, made here while the transport is open:
                # uvloop closes its descriptor when the client leaves, and the number could
                # name another connection's socket before the thread noticed
                sock = os.dup(self._sock)
                try:
                    await anyio.to_thread.run_sync(sendfile_all, sock, fd, offset, count,
                                                   self._stall_timeout,
                                                   limiter=_senders())
                finally:
                    os.close(sock)
        except ClientGone:
            # the response cannot end well: drop the connection, as uvicorn does when the
            # client leaves first, so nothing waits for the missing bytes
            cycle.disconnected = True
            transport.close()
            raise
        cycle.expected_content_length -= count
        if not message.get("more_body", False):
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})
