"""The little of ASGI the adapter needs: typed aliases, a request, responses, one error type.

Blocking engine work runs in worker threads (:func:`blocking`); request bodies reach it as a
plain iterator of byte chunks that the event loop reads ahead (:meth:`Request.body_stream`),
so a body streams into the engine with back-pressure and bounded memory, never buffered whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from functools import partial
from typing import Any, TypeVar
from urllib.parse import parse_qs

import anyio
import anyio.to_thread

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

T = TypeVar("T")

#: How much request body a worker thread takes from the event loop per hop.
BODY_BATCH = 1 << 20
#: The ASGI extension for file bodies sent by the server (``sendfile``): a message of this
#: type has ``file``, ``offset``, ``count`` and ``more_body``. See casengine.http.protocol.
ZEROCOPY = "http.response.zerocopy"
#: A key of ``http.request`` messages from our server protocol: the body as the list of
#: pieces the socket gave, so that no copy of it is made on the event loop's thread (the
#: loop is the busiest thread of a push). ``body`` is then empty. See casengine.http.protocol.
BODY_PARTS = "casengine.body_parts"
#: Worker threads for blocking engine calls, per process.
_LIMITER: anyio.CapacityLimiter | None = None
#: Worker threads for engine calls that read a request body, per process (see
#: :func:`receiving`).
RECEIVERS = 64
_RECEIVERS: anyio.CapacityLimiter | None = None


def _limiter() -> anyio.CapacityLimiter:
    global _LIMITER
    if _LIMITER is None:
        _LIMITER = anyio.CapacityLimiter(64)
    return _LIMITER


def _receivers() -> anyio.CapacityLimiter:
    global _RECEIVERS
    if _RECEIVERS is None:
        _RECEIVERS = anyio.CapacityLimiter(RECEIVERS)
    return _RECEIVERS


async def blocking(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` in a worker thread, off the event loop."""
    return await anyio.to_thread.run_sync(partial(fn, *args, **kwargs), limiter=_limiter())


async def receiving(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn``, which reads a request body (:meth:`Request.body_stream`), in a worker
    thread of its own kind.

    Such a call holds its thread for as long as the client takes to send the body, which
    a slow or hostile client makes as long as it likes (a byte a minute beats any stall
    timeout). Sharing :func:`blocking`'s threads, 64 such uploads left no thread for
    anything else, pulls included; on threads of their own they can only make other
    uploads wait.
    """
    return await anyio.to_thread.run_sync(partial(fn, *args, **kwargs), limiter=_receivers())


class HTTPError(Exception):
    """An OCI error response: status, code, message, and extra headers."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None, detail: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.detail = detail

    def body(self) -> bytes:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return json.dumps({"errors": [error]}).encode()


class Request:
    """One HTTP request: method, path, query, headers, and the body as it arrives."""

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self.scope = scope
        self._receive = receive
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self._query = parse_qs(scope.get("query_string", b"").decode("latin-1"),
                               keep_blank_values=True)
        self.query = {k: v[-1] for k, v in self._query.items()}
        # a header sent on several lines is one comma-separated list (RFC 9110 5.3); skopeo
        # sends each Accept type on its own line. Joined once per name: joining line by line
        # copied the list so far each time, and a head of many short lines of one name held
        # the event loop (and every other client) for seconds
        lines: dict[str, list[str]] = {}
        for k, v in scope.get("headers", []):
            lines.setdefault(k.decode("latin-1").lower(), []).append(v.decode("latin-1"))
        self.headers: dict[str, str] = {k: ", ".join(v) for k, v in lines.items()}
        self._more = True
        self._asked = False  #: the body was asked for (which sends a 100 Continue, if awaited)
        self.bytes_in = 0

    @property
    def body_pending(self) -> bool:
        """Part of the body is still unread."""
        return self._more

    def query_all(self, name: str) -> list[str]:
        """Every value of a repeated query parameter (``scope=...&scope=...``)."""
        return self._query.get(name, [])

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("content-length")
        if value is None:
            return None
        if not (value.isascii() and value.isdigit()):  # '²' is a digit to isdigit()
            raise HTTPError(400, "SIZE_INVALID", f"invalid Content-Length {value!r}")
        return int(value)

    async def _take(self, at_least: int) -> list[bytes]:
        """Body pieces from the loop: at least ``at_least`` bytes unless the body ends first;
        an empty list at the end. Joining them is left to the caller's thread."""
        parts: list[bytes] = []
        got = 0
        self._asked = True
        while self._more and got < at_least:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            pieces = message.get(BODY_PARTS) or [message.get("body", b"")]
            for piece in pieces:
                if piece:
                    parts.append(piece)
                    got += len(piece)
            self._more = message.get("more_body", False)
        self.bytes_in += got
        return parts

    @contextlib.asynccontextmanager
    async def body_stream(self, depth: int = 8) -> AsyncIterator[Iterator[bytes]]:
        """The body as an iterator for a worker thread, read ahead by the event loop.

        A task on the loop receives up to ``depth`` batches of about 1 MiB ahead of the
        worker, so receiving overlaps hashing and writing instead of taking turns with
        them; memory stays bounded at ``depth`` batches. It starts once the worker does:
        a request still waiting for a thread read ahead all the same, and a few hundred
        such uploads took gigabytes. Leaving the block stops the task.
        """
        loop = asyncio.get_running_loop()
        ready: queue.SimpleQueue[Any] = queue.SimpleQueue()
        room = asyncio.Semaphore(depth)
        reading = asyncio.Event()

        async def pump() -> None:
            try:
                await reading.wait()
                while True:
                    await room.acquire()
                    parts = await self._take(BODY_BATCH)
                    if not parts:
                        break
                    ready.put(parts)
                ready.put(_END)
            except asyncio.CancelledError:
                ready.put(_END)
                raise
            except BaseException as exc:  # noqa: BLE001 - handed to the worker to raise
                ready.put(_Failed(exc))

        def chunks() -> Iterator[bytes]:
            loop.call_soon_threadsafe(reading.set)
            while (item := ready.get()) is not _END:
                if isinstance(item, _Failed):
                    raise item.exc
                loop.call_soon_threadsafe(room.release)
                yield item[0] if len(item) == 1 else b"".join(item)  # joined off the loop
            if self.content_length is not None and self.bytes_in < self.content_length:
                raise ClientGone

        task = loop.create_task(pump())
        try:
            yield chunks()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def body(self, limit: int, too_big: HTTPError | None = None) -> bytes:
        """The whole (small) body; more than ``limit`` bytes raises ``too_big``."""
        data = b"".join(await self._take(limit + 1))
        if len(data) > limit:
            raise too_big or HTTPError(413, "SIZE_INVALID", f"body over the {limit} byte limit")
        return data

    async def drain(self) -> None:
        while self._more:
            await self._take(BODY_BATCH)

    async def drain_quietly(self, limit: int = 1 << 20) -> None:
        """Read what is left of a small body before an error reply; a large one is left to
        the connection's close (reading gigabytes to refuse them helps nobody). A client
        that awaits a ``100 Continue`` before it sends the body gets none: the refusal
        comes first, and the body is never sent (RFC 9110 10.1.1)."""
        if not self._asked and "100-continue" in (self.header("expect") or "").lower():
            return
        try:
            while self._more and self.bytes_in < limit:
                await self._take(BODY_BATCH)
        except ClientGone:
            pass


class ClientGone(Exception):
    """The client closed the connection before its body was complete."""


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_END = object()


async def start_response(send: Send, status: int, headers: dict[str, str]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(k.lower().encode("latin-1"), str(v).encode("latin-1"))
                            for k, v in headers.items()]})


async def respond(send: Send, status: int, headers: dict[str, str], body: bytes = b"",
                  *, head: bool = False) -> None:
    # RFC 9110 8.6: a 204 carries no Content-Length; a 304's would describe the full body
    if status not in (204, 304) and "content-length" not in {k.lower() for k in headers}:
        headers = {**headers, "Content-Length": str(len(body))}
    await start_response(send, status, headers)
    await send({"type": "http.response.body", "body": b"" if head else body})


async def respond_json(send: Send, status: int, obj: Any, headers: dict[str, str] | None = None,
                       *, content_type: str = "application/json") -> None:
    body = json.dumps(obj).encode()
    await respond(send, status, {"Content-Type": content_type, **(headers or {})}, body)
