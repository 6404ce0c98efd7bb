"""Blob bodies sent with ``sendfile`` (casengine.http.protocol), and where they must not be.

Raw blobs on a local root go from the page cache to the socket; the server's
``casengine_http_zerocopy_bytes_total`` shows that they did. Compressed blobs, and every
blob under TLS, are streamed through Python instead, and every byte must still be right.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from casengine.http.asgi import ClientGone
from casengine.http.protocol import sendfile_all
from tests.helpers import digest_of
from tests.http.conftest import Server, compressed, push_blob, start_server

BIG = 3 << 20


def _zerocopy_bytes(client: httpx.Client) -> int:
    text = client.get("/metrics").text
    m = re.search(r"^casengine_http_zerocopy_bytes_total (\d+)$", text, re.MULTILINE)
    assert m is not None, text
    return int(m[1])


def test_whole_blob_is_sent_zero_copy(client: httpx.Client, repo: str) -> None:
    data = os.urandom(BIG)  # random: stored raw under the default policy
    digest = push_blob(client, repo, data)
    before = _zerocopy_bytes(client)
    r = client.get(f"/v2/{repo}/blobs/{digest}")
    assert r.status_code == 200
    assert r.headers["content-length"] == str(BIG)
    assert r.headers["docker-content-digest"] == digest
    assert r.content == data
    assert _zerocopy_bytes(client) - before == BIG


def test_ranges_are_sent_zero_copy(client: httpx.Client, repo: str) -> None:
    data = os.urandom(BIG)
    digest = push_blob(client, repo, data)
    before = _zerocopy_bytes(client)
    r = client.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": "bytes=1000-1999999"})
    assert r.status_code == 206
    assert r.headers["content-range"] == f"bytes 1000-1999999/{BIG}"
    assert r.content == data[1000:2000000]

    r = client.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": "bytes=0-9,-5,100-199"})
    assert r.status_code == 206
    boundary = r.headers["content-type"].split("boundary=")[1]
    parts = r.content.split(f"--{boundary}".encode())[1:-1]
    bodies = [p.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n") for p in parts]
    assert bodies == [data[:10], data[-5:], data[100:200]]
    assert int(r.headers["content-length"]) == len(r.content)
    assert _zerocopy_bytes(client) - before == (2000000 - 1000) + 10 + 5 + 100


def test_compressed_blob_is_streamed(server: Server, client: httpx.Client,
                                     repo: str) -> None:
    data = b"".join(b"line %d of a text file that zstd shrinks well\n" % i
                    for i in range(60000))
    digest = push_blob(client, repo, data)
    compressed(server.root, digest)
    before = _zerocopy_bytes(client)
    r = client.get(f"/v2/{repo}/blobs/{digest}")
    assert r.status_code == 200 and r.content == data
    r = client.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": "bytes=5-65540"})
    assert r.status_code == 206 and r.content == data[5:65541]
    assert _zerocopy_bytes(client) == before


def test_client_leaving_mid_body(server: Server, client: httpx.Client, repo: str) -> None:
    """A download dropped halfway ends that connection only: no error in the log, and
    the next request is served."""
    data = os.urandom(32 << 20)
    digest = push_blob(client, repo, data)
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
            s.sendall(f"GET /v2/{repo}/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            got = 0
            while got < 1 << 20:
                got += len(s.recv(1 << 16))
        time.sleep(0.2)
    r = client.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": "bytes=0-99"})
    assert r.status_code == 206 and r.content == data[:100]
    assert "ASGI callable returned without completing response" not in server.log_since_mark()


# -- TLS: never sendfile past the encryption ---------------------------------------------------


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_tls_streams_without_sendfile(tmp_path: Path, log_dir: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server = start_server(str(tmp_path / "root"), log_dir,
                          args=("--tls-cert", str(cert), "--tls-key", str(key)))
    try:
        assert server.url.startswith("https://")
        with httpx.Client(base_url=server.url, verify=False, timeout=30) as client:
            data = os.urandom(BIG)
            digest = push_blob(client, "tls/app", data)
            r = client.get(f"/v2/tls/app/blobs/{digest}")
            assert r.status_code == 200 and r.content == data
            r = client.get(f"/v2/tls/app/blobs/{digest}", headers={"Range": "bytes=7-70000"})
            assert r.status_code == 206 and r.content == data[7:70001]
            assert _zerocopy_bytes(client) == 0
    finally:
        server.stop()


# -- sendfile_all on its own -------------------------------------------------------------------


def _file_of(tmp_path: Path, data: bytes) -> int:
    path = tmp_path / "blob"
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


def test_sendfile_all_waits_for_a_slow_reader(tmp_path: Path) -> None:
    data = os.urandom(4 << 20)
    fd = _file_of(tmp_path, data)
    sender, reader = socket.socketpair()
    sender.setblocking(False)
    got = bytearray()

    def read_slowly() -> None:
        while len(got) < len(data) - 1000:
            chunk = reader.recv(256 << 10)
            if not chunk:
                return
            got.extend(chunk)
            time.sleep(0.002)

    t = threading.Thread(target=read_slowly)
    t.start()
    try:
        sendfile_all(sender.fileno(), fd, 1000, len(data) - 1000)
        t.join(30)
        assert bytes(got) == data[1000:]
    finally:
        os.close(fd)
        sender.close()
        reader.close()


def test_sendfile_all_reports_a_reader_that_left(tmp_path: Path) -> None:
    fd = _file_of(tmp_path, os.urandom(8 << 20))
    sender, reader = socket.socketpair()
    sender.setblocking(False)
    reader.close()
    try:
        with pytest.raises(ClientGone):
            sendfile_all(sender.fileno(), fd, 0, 8 << 20)
    finally:
        os.close(fd)
        sender.close()


def test_sendfile_all_gives_up_on_a_stalled_reader(tmp_path: Path) -> None:
    fd = _file_of(tmp_path, os.urandom(16 << 20))
    sender, reader = socket.socketpair()  # nobody reads: the buffers fill, then nothing moves
    sender.setblocking(False)
    try:
        with pytest.raises(ClientGone):
            sendfile_all(sender.fileno(), fd, 0, 16 << 20, timeout=0.3)
    finally:
        os.close(fd)
        sender.close()
        reader.close()



def test_empty_blob(client: httpx.Client, repo: str) -> None:
    digest = push_blob(client, repo, b"")
    r = client.get(f"/v2/{repo}/blobs/{digest}")
    assert r.status_code == 200
    assert r.headers["content-length"] == "0" and r.content == b""
    assert client.head(f"/v2/{repo}/blobs/{digest}").headers["content-length"] == "0"


def test_blob_deleted_while_being_sent(server: Server, client: httpx.Client, repo: str) -> None:
    """The open file keeps its bytes: a pull that began before the stored object was
    deleted (as GC deletes it) ends complete, and the next one is a clean error."""
    data = os.urandom(32 << 20)
    digest = push_blob(client, repo, data)
    with client.stream("GET", f"/v2/{repo}/blobs/{digest}") as r:
        assert r.status_code == 200
        received = bytearray()
        deleted = False
        for piece in r.iter_raw():
            received += piece
            if not deleted and len(received) >= 1 << 20:
                with server.registry() as reg:
                    assert reg.engine.delete(digest)
                deleted = True
        assert deleted and bytes(received) == data
    assert client.get(f"/v2/{repo}/blobs/{digest}").status_code == 404


def test_pipelined_requests_get_their_own_bodies_in_order(server: Server, client: httpx.Client,
                                                          repo: str) -> None:
    """HTTP/1.1 pipelining: requests sent back to back on one connection, answered in
    order, each body whole, while earlier bodies are still being sent from a thread."""
    blobs = [os.urandom(n) for n in (3 << 20, 5 << 20, 100)]
    digests = [push_blob(client, repo, b) for b in blobs]
    requests = [f"GET /v2/{repo}/blobs/{d} HTTP/1.1\r\nHost: x\r\n\r\n" for d in digests]
    requests.append(f"GET /v2/{repo}/blobs/{digests[0]} HTTP/1.1\r\nHost: x\r\n"
                    "Range: bytes=10-19\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall("".join(requests).encode())
        pending = b""

        def response() -> tuple[bytes, bytes]:
            nonlocal pending
            while b"\r\n\r\n" not in pending:
                pending += s.recv(1 << 20)
            head, _, pending = pending.partition(b"\r\n\r\n")
            length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:")))
            while len(pending) < length:
                pending += s.recv(1 << 20)
            body, pending = pending[:length], pending[length:]
            return head.split(b"\r\n", 1)[0], body

        for data in blobs:
            status, body = response()
            assert status == b"HTTP/1.1 200 OK" and body == data
        status, body = response()
        assert status == b"HTTP/1.1 206 Partial Content" and body == blobs[0][10:20]


def test_pipelined_patches_append_their_own_bodies_in_order(server: Server, client: httpx.Client,
                                                            repo: str) -> None:
    """Request bodies that arrive while an earlier request still runs wait in the protocol
    for their own request, piece by piece, and reach it whole."""
    chunks = [os.urandom(n) for n in (3 << 20, 1 << 20, 777)]
    r = client.post(f"/v2/{repo}/blobs/uploads/")
    assert r.status_code == 202
    location = r.headers["location"]
    path = client.base_url.join(location).raw_path.decode()
    wire, offset = b"", 0
    for chunk in chunks:
        wire += (f"PATCH {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream"
                 f"\r\nContent-Range: {offset}-{offset + len(chunk) - 1}\r\n"
                 f"Content-Length: {len(chunk)}\r\n\r\n").encode() + chunk
        offset += len(chunk)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(wire)
        replies = b""
        while replies.count(b"HTTP/1.1 ") < len(chunks) or not replies.endswith(b"\r\n\r\n"):
            replies += s.recv(1 << 16)
    assert replies.count(b"HTTP/1.1 202 Accepted") == len(chunks), replies
    data = b"".join(chunks)
    r = client.put(location, params={"digest": digest_of(data)})
    assert r.status_code == 201, r.text
    assert client.get(f"/v2/{repo}/blobs/{digest_of(data)}").content == data


def test_a_raw_blob_cut_short_is_a_500_not_a_short_200(client: httpx.Client, server: Server,
                                                       repo: str) -> None:
    """The file is shorter than the record says: sent zero-copy, the client got a 200 with
    the full Content-Length and then a body that stopped short."""
    data = os.urandom(BIG)
    digest = push_blob(client, repo, data)
    path = Path(server.root) / "blobs" / "sha256" / digest[7:9] / f"{digest[7:]}.raw"
    os.truncate(path, BIG // 2)
    try:
        r = client.get(f"/v2/{repo}/blobs/{digest}")
        assert r.status_code == 500 and b"damaged" in r.content
    finally:
        path.write_bytes(data)  # the server is shared with other tests
