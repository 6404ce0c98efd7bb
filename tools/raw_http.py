"""A bare HTTP/1.1 client for the peer benchmark's big-blob scenarios.

The benchmark measures servers, so its client should cost as little as possible on the
2-core machine it shares with them. httpx capped pulls near 1.8 GB/s whichever server
answered (a new bytes object per read, copied once more), and added 2-3 ms of its own
between a chunked push's PATCHes; this client sends a body with one ``sendall`` of the
caller's buffer and reads one into a caller's buffer with ``recv_into``. Both registries
get the same client. It speaks just what the blob endpoints answer: a status line, headers,
and a body framed by Content-Length (or chunked, for error bodies).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

READ = 1 << 20


@dataclass
class Response:
    status: int
    headers: dict[str, str]  #: names in lower case
    body: bytes

    def location(self) -> str:
        """The Location header as a request target (path and query)."""
        url = urlsplit(self.headers["location"])
        return url.path + (f"?{url.query}" if url.query else "")


class Connection:
    """One keep-alive connection; it reconnects when the server closed the last one."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._sock: socket.socket | None = None
        self._buf = b""

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _connect(self) -> socket.socket:
        if self._sock is None:
            self._sock = socket.create_connection((self.host, self.port), timeout=600)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._buf = b""
        return self._sock

    def send(self, method: str, target: str, body: bytes | memoryview = b"",
             headers: dict[str, str] | None = None) -> None:
        head = [f"{method} {target} HTTP/1.1", f"Host: {self.host}:{self.port}",
                f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        sock = self._connect()
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        if len(body):
            sock.sendall(body)

    def request(self, method: str, target: str, body: bytes | memoryview = b"",
                headers: dict[str, str] | None = None) -> Response:
        self.send(method, target, body, headers)
        status, fields = self.read_head()
        return Response(status, fields, self._read_body(fields))

    def read_head(self) -> tuple[int, dict[str, str]]:
        sock = self._connect()
        while b"\r\n\r\n" not in self._buf:
            got = sock.recv(READ)
            if not got:
                raise ConnectionError("the server closed the connection before answering")
            self._buf += got
        head, _, self._buf = self._buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        return int(lines[0].split()[1]), fields

    def read_body_into(self, fields: dict[str, str], buf: memoryview) -> int:
        """A Content-Length body straight into ``buf``; returns its length."""
        total = int(fields["content-length"])
        if total > len(buf):
            raise ValueError(f"a {total} byte body does not fit {len(buf)} bytes")
        n = min(len(self._buf), total)
        buf[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        sock = self._connect()
        while n < total:
            k = sock.recv_into(buf[n:total], min(READ, total - n))
            if not k:
                raise ConnectionError(f"the body ended after {n} of {total} bytes")
            n += k
        self._after(fields)
        return total

    def _read_body(self, fields: dict[str, str]) -> bytes:
        if fields.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self._line().split(";")[0], 16)
                body += self._exactly(size)
                self._line()
                if size == 0:
                    break
        else:
            body = self._exactly(int(fields.get("content-length", "0")))
        self._after(fields)
        return body

    def _after(self, fields: dict[str, str]) -> None:
        if fields.get("connection", "").lower() == "close":
            self.close()

    def _line(self) -> str:
        while b"\r\n" not in self._buf:
            self._fill()
        line, _, self._buf = self._buf.partition(b"\r\n")
        return line.decode("latin-1")

    def _exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._fill()
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _fill(self) -> None:
        got = self._connect().recv(READ)
        if not got:
            raise ConnectionError("the server closed the connection in a body")
        self._buf += got
