"""The OCI Distribution v2 adapter: routing, authorization, headers and error mapping.

It is thin on purpose: every route maps HTTP onto one call of the registry model
(:mod:`casengine.registry`), run in a worker thread; there is no hashing, codec or storage
logic here. Every request passes :meth:`RegistryApp.authorize` before its handler runs,
the one place where access is decided.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Protocol

from casengine.backend import Presigner
from casengine.digest import Digest
from casengine.errors import (
    BlobNotFound,
    CASError,
    InvalidDigest,
    OffsetMismatch,
    RepositoryNotFound,
)
from casengine.http.asgi import (
    ZEROCOPY,
    ClientGone,
    HTTPError,
    Receive,
    Request,
    Scope,
    Send,
    blocking,
    receiving,
    respond,
    respond_json,
    start_response,
)
from casengine.http.errors import to_http
from casengine.http.metrics import Metrics
from casengine.http.ranges import parse_content_range, parse_range
from casengine.layout import blob_key
from casengine.registry.manifests import INDEX_TYPES, OCI_INDEX
from casengine.registry.names import check_name, is_digest

if TYPE_CHECKING:
    from casengine.registry import Registry

log = logging.getLogger("casengine.http")

API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}
#: Chunk size for streaming blobs out: big enough that a thread hop per chunk is noise.
SEND_CHUNK = 4 << 20


def _check_transfer_coding(request: Request) -> None:
    """Only chunked is decoded below us: a body in another coding (gzip, chunked) would be
    stored as sent, a blob other than the one the client meant (RFC 9112 6.1: 501)."""
    coding = request.header("transfer-encoding")
    if coding is None:
        return
    unknown = [c for c in (p.strip().lower() for p in coding.split(",")) if c != "chunked"]
    if unknown:
        raise HTTPError(501, "UNSUPPORTED", f"Transfer-Encoding {coding!r}: only chunked "
                        "is understood; send the body as it is")

class Authorizer(Protocol):
    """Decides who may do what (see :mod:`casengine.http.auth`)."""

    async def authorize(self, request: Request, repository: str | None,
                        actions: frozenset[str]) -> Any:
        """Return the caller's identity, or raise HTTPError 401/403."""
        ...

    def can_read(self, identity: Any, repository: str) -> bool: ...


class AllowAll:
    """No authentication: for loopback use only (``casengine serve`` enforces that)."""

    async def authorize(self, request: Request, repository: str | None,
                        actions: frozenset[str]) -> Any:
        return None

    def can_read(self, identity: Any, repository: str) -> bool:
        return True


Handler = Callable[..., Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    pattern: re.Pattern[str]
    #: method -> (handler attribute, actions needed on the repository)
    methods: dict[str, tuple[str, frozenset[str]]]


PULL, PUSH, DELETE = frozenset({"pull"}), frozenset({"push"}), frozenset({"delete"})
_NAME = r"(?P<name>.+?)"
ROUTES = [
    Route("base", re.compile(r"/v2/?"), {"GET": ("base", frozenset())}),
    Route("catalog", re.compile(r"/v2/_catalog"), {"GET": ("catalog", frozenset())}),
    Route("uploads", re.compile(rf"/v2/{_NAME}/blobs/uploads/?(?P<upload>[^/]*)"), {
        "POST": ("upload_start", PUSH), "PATCH": ("upload_patch", PUSH),
        "PUT": ("upload_put", PUSH), "GET": ("upload_get", PUSH),
        "DELETE": ("upload_delete", PUSH)}),
    Route("blobs", re.compile(rf"/v2/{_NAME}/blobs/(?P<digest>[^/]+)"), {
        "GET": ("blob_get", PULL), "HEAD": ("blob_get", PULL),
        "DELETE": ("blob_delete", DELETE)}),
    Route("manifests", re.compile(rf"/v2/{_NAME}/manifests/(?P<reference>[^/]+)"), {
        "GET": ("manifest_get", PULL), "HEAD": ("manifest_get", PULL),
        "PUT": ("manifest_put", PUSH), "DELETE": ("manifest_delete", DELETE)}),
    Route("tags", re.compile(rf"/v2/{_NAME}/tags/list"), {"GET": ("tags", PULL)}),
    Route("referrers", re.compile(rf"/v2/{_NAME}/referrers/(?P<digest>[^/]+)"), {
        "GET": ("referrers", PULL)}),
]


def _owner(identity: Any) -> str | None:
    """Who an upload session belongs to: the authenticated user, if any."""
    return getattr(identity, "user", None)


def _digest(text: str) -> Digest:
    return Digest.parse(text)


def _mount_args(request: Request) -> tuple[Digest | None, str | None]:
    """``mount`` and ``from``; a mount that cannot be (a malformed digest or source name)
    is no mount, and the POST starts a plain upload: 'If a mount fails due to invalid
    repository or digest arguments, the registry will fall back to the standard upload
    behavior' (distribution spec). An empty ``from`` is none."""
    mount, source = request.query.get("mount"), request.query.get("from") or None
    if mount is None:
        return None, None
    try:
        digest = _digest(mount)
        if source is not None:
            check_name(source)
    except CASError:
        return None, None
    return digest, source


def _not_modified(request: Request, etag: str) -> bool:
    """Whether ``If-None-Match`` names ``etag`` (a digest's content never changes)."""
    wanted = request.header("if-none-match")
    return wanted is not None and (wanted.strip() == "*" or etag in
                                   (t.strip().removeprefix("W/") for t in wanted.split(",")))


def _page_args(request: Request) -> tuple[int | None, str | None]:
    n = request.query.get("n")
    if n is not None and (not (n.isascii() and n.isdigit()) or len(n) > 9):  # not '²'
        raise HTTPError(400, "UNSUPPORTED", f"invalid n {n!r}: want a whole number")
    return (int(n) if n is not None else None), request.query.get("last")


def _link(path: str, n: int | None, last: str, **more: str) -> dict[str, str]:
    from urllib.parse import urlencode

    query = urlencode({**({"n": n} if n is not None else {}), "last": last, **more})
    return {"Link": f'<{path}?{query}>; rel="next"'}


#: A referrers page stays under this many bytes of descriptors: clients read the list with
#: the limit they put on any manifest (oras-go: 4 MiB), and follow ``Link`` for the rest.
REFERRERS_PAGE_BYTES = 4_000_000


def _referrers_page(found: list[dict[str, Any]], n: int | None,
                    last: str | None) -> tuple[list[dict[str, Any]], str | None]:
    """The descriptors after ``last`` (in digest order) that fit a page, and the digest to
    go on from, if more remain."""
    rest = [d for d in found if last is None or d["digest"] > last]
    page: list[dict[str, Any]] = []
    size = 0
    for d in rest:
        size += len(json.dumps(d)) + 2
        if page and (size > REFERRERS_PAGE_BYTES or (n is not None and len(page) >= n)):
            return page, page[-1]["digest"]
        page.append(d)
    return page, None


class RegistryApp:
    """The ASGI application. ``registry`` is shared by every request of this process."""

    def __init__(self, registry: Registry, *, auth: Authorizer | None = None,
                 redirect: bool = False, on_close: Callable[[], None] | None = None,
                 on_manifest: Callable[[str, str, Any], None] | None = None) -> None:
        self.registry = registry
        #: called (on the event loop: it must not block) with repository, reference and
        #: the Manifest after each successful manifest PUT
        self._on_manifest = on_manifest
        self.auth: Authorizer = auth or AllowAll()
        self.redirect = redirect
        self.metrics = Metrics()
        self._on_close = on_close

    # -- the ASGI entry point ---------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        state = {"status": 0, "out": 0, "zerocopy": 0}

        async def tracked(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message["headers"],
                                      *((k.lower().encode(), v.encode()) for k, v in API_VERSION.items())]
                state["status"] = message["status"]
            elif message["type"] == ZEROCOPY:
                state["out"] += message["count"]
                state["zerocopy"] += message["count"]
            else:
                state["out"] += len(message.get("body", b""))
            await send(message)

        route_name = "other"
        try:
            _check_transfer_coding(request)
            route_name, handler, params = self._route(request)
            actions = params.pop("_actions")
            identity = None
            if actions is not None:  # None: health, metrics and the token endpoint
                identity = await self.auth.authorize(request, params.get("name"), actions)
            await handler(request, tracked, identity=identity, **params)
        except ClientGone:
            state["status"] = state["status"] or 499
        except BaseException as exc:
            error = to_http(exc)
            if isinstance(exc, CASError) and error.status >= 500:
                # a known failure (the backend, damaged data): its message says it all, and
                # a traceback per request would flood the log while a backend throttles
                log.warning("%s %s: %s %s", request.method, request.path, error.status, exc)
            elif error.status >= 500 and not isinstance(exc, HTTPError):
                log.error("%s %s failed", request.method, request.path, exc_info=exc)
            if not isinstance(exc, Exception):
                raise
            if state["status"]:
                return  # the response had started: all we can do is end the connection
            await request.drain_quietly()
            headers = {"Content-Type": "application/json", **error.headers}
            if request.body_pending:  # the rest of a big body would be read as a new request
                headers["Connection"] = "close"
            await respond(tracked, error.status, headers, error.body(),
                          head=request.method == "HEAD")
        finally:
            self.metrics.observe(route_name, request.method, state["status"], request.bytes_in,
                                 state["out"], state["zerocopy"])

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._on_close is not None:
                    self._on_close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _route(self, request: Request) -> tuple[str, Handler, dict[str, Any]]:
        if request.path == "/healthz":
            return "healthz", self.healthz, {"_actions": None}
        if request.path == "/metrics":
            return "metrics", self.metrics_page, {"_actions": None}
        token_endpoint = getattr(self.auth, "token_endpoint", None)
        if request.path == "/token" and token_endpoint is not None:
            if request.method not in ("GET", "POST"):  # GET: Docker's flow; POST: OAuth2's
                raise HTTPError(405, "UNSUPPORTED", f"{request.method} is not supported on "
                                "the token endpoint", headers={"Allow": "GET, POST"})
            return "token", token_endpoint, {"_actions": None}
        for route in ROUTES:
            m = route.pattern.fullmatch(request.path)
            if m is None:
                continue
            if request.method not in route.methods:
                raise HTTPError(405, "UNSUPPORTED", f"{request.method} is not supported on "
                                f"{route.name}", headers={"Allow": ", ".join(route.methods)})
            attr, actions = route.methods[request.method]
            params = {k: v for k, v in m.groupdict().items() if v is not None}
            if "name" in params:
                check_name(params["name"])
            return route.name, getattr(self, attr), {**params, "_actions": actions}
        raise HTTPError(404, "NAME_UNKNOWN", f"no route for {request.path}")

    # -- base, health, metrics, catalog ---------------------------------------------------

    async def base(self, request: Request, send: Send, identity: Any) -> None:
        await respond_json(send, 200, {})

    async def healthz(self, request: Request, send: Send, identity: Any) -> None:
        await respond(send, 200, {"Content-Type": "text/plain"}, b"ok\n")

    async def metrics_page(self, request: Request, send: Send, identity: Any) -> None:
        open_uploads = await blocking(self.registry.index.count, "uploads")
        await respond(send, 200, {"Content-Type": "text/plain; version=0.0.4"},
                      self.metrics.render(open_uploads).encode())

    async def catalog(self, request: Request, send: Send, identity: Any) -> None:
        n, last = _page_args(request)

        # a token for registry:catalog:* lists by its user's grants, not by its repositories
        can_list = getattr(self.auth, "can_list", self.auth.can_read)

        def visible() -> Iterator[str]:
            return (r for r in self.registry.repositories() if can_list(identity, r))

        from casengine.registry.model import paginate

        page = await blocking(lambda: paginate(visible(), n, last))
        headers = _link("/v2/_catalog", n, page.next_last) if page.next_last else {}
        await respond_json(send, 200, {"repositories": page.items}, headers)

    # -- blobs --------------------------------------------------------------------------

    async def blob_get(self, request: Request, send: Send, identity: Any, name: str,
                       digest: str) -> None:
        d = _digest(digest)
        record = await blocking(self.registry.stat_blob, name, d)
        head = request.method == "HEAD"
        # the bytes never change under their digest (a year, as the reference registry)
        base = {"Docker-Content-Digest": str(d), "ETag": f'"{d}"', "Accept-Ranges": "bytes",
                "Cache-Control": "max-age=31536000"}
        if _not_modified(request, base["ETag"]):
            await respond(send, 304, base)
            return
        if_range = request.header("if-range")
        # a validator that is not this blob's ETag (another blob's, or a date: we send no
        # Last-Modified) means the client's partial copy is of something else: send it all
        wanted = None if if_range is not None and if_range.strip() != base["ETag"] else (
            request.header("range"))
        ranges = parse_range(wanted, record.size)
        if not head and not ranges and self.redirect:
            backend = self.registry.backend
            if isinstance(backend, Presigner) and record.codec == "raw":
                url = await blocking(backend.presign, blob_key(d, record.codec), 300)
                # the URL expires: a cache must not keep the redirect as it keeps the bytes
                await respond(send, 307, {**base, "Location": url, "Cache-Control": "no-store"})
                return
        if ranges is None:
            headers = {**base, "Content-Type": "application/octet-stream",
                       "Content-Length": str(record.size)}
            await self._stream(request, send, 200, headers, [(0, record.size - 1)], name, d)
        elif len(ranges) == 1:
            start, end = ranges[0]
            headers = {**base, "Content-Type": "application/octet-stream",
                       "Content-Length": str(end - start + 1),
                       "Content-Range": f"bytes {start}-{end}/{record.size}"}
            await self._stream(request, send, 206, headers, ranges, name, d)
        else:
            boundary = secrets.token_hex(16)
            parts = [(f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
                      f"Content-Range: bytes {s}-{e}/{record.size}\r\n\r\n").encode()
                     for s, e in ranges]
            tail = f"\r\n--{boundary}--\r\n".encode()
            length = sum(len(p) + e - s + 1 for p, (s, e) in zip(parts, ranges, strict=True))
            length += 2 * (len(ranges) - 1) + len(tail)
            headers = {**base, "Content-Length": str(length),
                       "Content-Type": f"multipart/byteranges; boundary={boundary}"}
            await self._stream(request, send, 206, headers, ranges, name, d, parts, tail)

    async def _stream(self, request: Request, send: Send, status: int, headers: dict[str, str],
                      ranges: list[tuple[int, int]], name: str, digest: Digest,
                      parts: list[bytes] | None = None, tail: bytes = b"") -> None:
        if request.method == "HEAD":
            await respond(send, status, headers, head=True)
            return
        # a local raw file goes out with sendfile (casengine.http.protocol); else every range
        # is opened as a stream, all before the status goes out: a missing object is an error
        f: IO[bytes] | None = None
        if ZEROCOPY in request.scope.get("extensions", {}):
            f = await blocking(self.registry.open_blob_file, name, digest)
        with f or contextlib.nullcontext():
            streams = [] if f is not None else [
                await blocking(self.registry.read_blob, name, digest, s, e - s + 1,
                               chunk_size=SEND_CHUNK) for s, e in ranges]
            await start_response(send, status, headers)
            for i, (s, e) in enumerate(ranges):
                if parts is not None:
                    await send({"type": "http.response.body",
                                "body": (b"\r\n" if i else b"") + parts[i], "more_body": True})
                if f is not None:
                    await send({"type": ZEROCOPY, "file": f, "offset": s, "count": e - s + 1,
                                "more_body": True})
                    continue
                # read the next chunk while this one is sent: disk and socket overlap
                chunks = streams[i]
                upcoming = asyncio.ensure_future(blocking(next, chunks, None))
                while (chunk := await upcoming) is not None:
                    upcoming = asyncio.ensure_future(blocking(next, chunks, None))
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": tail, "more_body": False})

    async def blob_delete(self, request: Request, send: Send, identity: Any, name: str,
                          digest: str) -> None:
        d = _digest(digest)
        if not await blocking(self.registry.unlink, name, d):
            raise BlobNotFound(d)
        await respond(send, 202, {})

    # -- uploads ------------------------------------------------------------------------

    def _upload_headers(self, name: str, upload_id: str, offset: int) -> dict[str, str]:
        return {"Location": f"/v2/{name}/blobs/uploads/{upload_id}",
                "Range": f"0-{offset - 1 if offset else 0}", "Docker-Upload-UUID": upload_id}

    async def _created(self, send: Send, name: str, digest: Digest) -> None:
        await respond(send, 201, {"Location": f"/v2/{name}/blobs/{digest}",
                                  "Docker-Content-Digest": str(digest)})

    async def upload_start(self, request: Request, send: Send, identity: Any, name: str,
                           upload: str) -> None:
        if upload:
            raise HTTPError(405, "UNSUPPORTED", "POST goes to /v2/<name>/blobs/uploads/")
        mount, source = _mount_args(request)
        if mount is not None:
            d = mount
            if (source is None or self.auth.can_read(identity, source)) and await blocking(
                    self.registry.mount, name, d, source,
                    lambda r: self.auth.can_read(identity, r)):
                await self._created(send, name, d)
                return
        digest = request.query.get("digest")
        if digest is not None:
            d = _digest(digest)
            async with request.body_stream() as body:
                result = await receiving(self.registry.ingest_blob, name, body,
                                        digest=d, size=request.content_length)
            await self._created(send, name, result.digest)
            return
        await request.drain()
        status = await blocking(self.registry.start_upload, name, _owner(identity))
        headers = self._upload_headers(name, status.id, 0)
        min_chunk = self.registry.engine.uploads.min_chunk
        if min_chunk:
            headers["OCI-Chunk-Min-Length"] = str(min_chunk)
        await respond(send, 202, headers)

    def _chunk_length(self, request: Request, name: str, upload: str, offset: int) -> int | None:
        """The declared length of a chunk; its Content-Range must start at ``offset``."""
        length = request.content_length
        content_range = request.header("content-range")
        if not content_range:
            return length
        start, end = parse_content_range(content_range)
        if start != offset:
            raise HTTPError(416, "BLOB_UPLOAD_INVALID",
                            f"chunk starts at {start}, the upload is at {offset}",
                            headers=self._upload_headers(name, upload, offset))
        if length is not None and length != end - start + 1:
            raise HTTPError(400, "SIZE_INVALID",
                            f"Content-Length {length} does not match Content-Range {content_range}")
        return end - start + 1

    async def upload_get(self, request: Request, send: Send, identity: Any, name: str,
                         upload: str) -> None:
        status = await blocking(self.registry.upload_status, name, upload, _owner(identity))
        await respond(send, 204, self._upload_headers(name, upload, status.offset))

    async def upload_patch(self, request: Request, send: Send, identity: Any, name: str,
                           upload: str) -> None:
        content_range = request.header("content-range")
        if content_range:
            # the chunk says where it starts, and the append refuses any other offset, so
            # the session is read once, by the append (a worker-thread hop less per chunk)
            offset, _ = parse_content_range(content_range)
        else:
            status = await blocking(self.registry.upload_status, name, upload, _owner(identity))
            offset = status.offset
        length = self._chunk_length(request, name, upload, offset)
        try:
            async with request.body_stream() as body:
                status = await receiving(self.registry.append_upload, name, upload, body,
                                        offset, length=length, owner=_owner(identity))
        except OffsetMismatch as exc:
            raise HTTPError(416, "BLOB_UPLOAD_INVALID", str(exc),
                            headers=self._upload_headers(name, upload, exc.offset)) from None
        await respond(send, 202, self._upload_headers(name, upload, status.offset))

    async def upload_put(self, request: Request, send: Send, identity: Any, name: str,
                         upload: str) -> None:
        digest = request.query.get("digest")
        if digest is None:
            raise HTTPError(400, "DIGEST_INVALID", "a PUT that ends an upload needs ?digest=")
        d = _digest(digest)
        status = await blocking(self.registry.upload_status, name, upload, _owner(identity))
        has_body = bool(request.content_length) or \
            "chunked" in (request.header("transfer-encoding") or "")
        length = self._chunk_length(request, name, upload, status.offset) if has_body else None
        async with request.body_stream() as body:
            result = await receiving(self.registry.commit_upload, name, upload, d,
                                    last=body if has_body else None,
                                    last_length=length, owner=_owner(identity))
        await self._created(send, name, result.digest)

    async def upload_delete(self, request: Request, send: Send, identity: Any, name: str,
                            upload: str) -> None:
        await blocking(self.registry.cancel_upload, name, upload, _owner(identity))
        await respond(send, 204, {})

    # -- manifests, tags, referrers -----------------------------------------------------

    async def manifest_get(self, request: Request, send: Send, identity: Any, name: str,
                           reference: str) -> None:
        head = request.method == "HEAD"
        # HEAD reads and verifies the bytes too: a 200 it answers promises a GET works
        data, record = await blocking(self.registry.get_manifest, name, reference)
        accept = request.header("accept") or ""
        if (record.media_type in INDEX_TYPES and accept and "*/*" not in accept
                and record.media_type not in accept):
            raise HTTPError(404, "MANIFEST_UNKNOWN", f"{name}:{reference} is an index "
                            f"({record.media_type}), which the Accept header does not allow")
        headers = {"Content-Type": record.media_type, "Docker-Content-Digest": record.digest,
                   "ETag": f'"{record.digest}"', "Content-Length": str(record.size)}
        if _not_modified(request, headers["ETag"]):
            del headers["Content-Length"]
            await respond(send, 304, headers)
            return
        await respond(send, 200, headers, data, head=head)

    async def manifest_put(self, request: Request, send: Send, identity: Any, name: str,
                           reference: str) -> None:
        limit = self.registry.max_manifest_size
        too_big = HTTPError(413, "MANIFEST_INVALID", f"manifest over the {limit} byte limit")
        if (request.content_length or 0) > limit:
            raise too_big
        data = await request.body(limit, too_big)  # a chunked body says its size at the end
        manifest = await blocking(self.registry.put_manifest, name, reference, data,
                                  request.header("content-type"))
        if self._on_manifest is not None:
            self._on_manifest(name, reference, manifest)
        headers = {"Location": f"/v2/{name}/manifests/{manifest.digest}",
                   "Docker-Content-Digest": str(manifest.digest)}
        if manifest.subject is not None:
            headers["OCI-Subject"] = str(manifest.subject.digest)
        await respond(send, 201, headers)

    async def manifest_delete(self, request: Request, send: Send, identity: Any, name: str,
                              reference: str) -> None:
        if is_digest(reference):
            await blocking(self.registry.delete_manifest, name, _digest(reference))
        else:
            await blocking(self.registry.delete_tag, name, reference)
        await respond(send, 202, {})

    async def tags(self, request: Request, send: Send, identity: Any, name: str) -> None:
        n, last = _page_args(request)
        page = await blocking(self.registry.tags, name, n, last)
        headers = _link(f"/v2/{name}/tags/list", n, page.next_last) if page.next_last else {}
        await respond_json(send, 200, {"name": name, "tags": page.items}, headers)

    async def referrers(self, request: Request, send: Send, identity: Any, name: str,
                        digest: str) -> None:
        try:
            d = _digest(digest)
        except InvalidDigest as exc:
            raise HTTPError(400, "DIGEST_INVALID", str(exc)) from exc
        # an empty filter names no type: everything, as if none were given
        artifact_type = request.query.get("artifactType") or None
        n, last = _page_args(request)
        try:
            found = await blocking(self.registry.referrers, name, d, artifact_type)
        except RepositoryNotFound:
            found = []  # the spec: never a 404 from a registry with the referrers API
        page, next_last = _referrers_page(found, n or None, last)
        headers = {"OCI-Filters-Applied": "artifactType"} if artifact_type else {}
        if next_last is not None:
            more = {"artifactType": artifact_type} if artifact_type else {}
            headers.update(_link(f"/v2/{name}/referrers/{d}", n, next_last, **more))
        await respond_json(send, 200, {"schemaVersion": 2, "mediaType": OCI_INDEX,
                                       "manifests": page}, headers, content_type=OCI_INDEX)
