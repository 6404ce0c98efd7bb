"""Building the app for ``casengine serve``: settings parsed once, engine opened per process.

With several workers uvicorn starts each process from an import string, so the settings
travel to :func:`app_from_env` as one JSON environment variable, parsed here at the edge.
Background work of the server process lives here too: garbage collection every
``--gc-interval``, and :class:`TranscodeOnPush` for ``--transcode-on-push``.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import queue
import signal
import threading
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from casengine.http.app import RegistryApp
from casengine.ingest import linux_call
from casengine.registry.names import is_digest

if TYPE_CHECKING:
    from casengine.registry import Manifest, Registry

ENV = "CASENGINE_SERVE_SETTINGS"
#: The pid of the process that starts the workers, in their environment.
MASTER_ENV = "CASENGINE_SERVE_MASTER"
_PR_SET_PDEATHSIG = 1
log = logging.getLogger("casengine.http")


@dataclass(frozen=True, slots=True)
class ServeSettings:
    root: str
    index: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    redirect: bool = False
    auth_file: str | None = None
    public_url: str | None = None  #: where clients reach us, for the token realm
    create_on_push: bool = True
    gc_interval: float | None = None  #: seconds between background collections
    gc_grace: float = 3600.0
    compression: str = "auto"  #: the engine's compression policy (casengine.compression)
    compression_level: int | None = None
    transcode_on_push: str | None = None  #: convert pushed gzip images to this ("zstd")
    transcode_level: int = 3

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> ServeSettings:
        return cls(**json.loads(os.environ[ENV]))


#: glibc's ``mallopt`` parameters.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Freed memory a server process keeps for its next requests, per glibc arena.
KEEP_FREED = 64 << 20


def keep_freed_memory() -> bool:
    """Make glibc keep freed buffers for reuse; return whether it applied.

    Request bodies pass through buffers of about a MiB. By default glibc memory-maps each
    such buffer and unmaps it when freed, and trims its heap above a few MiB, so every
    request faulted fresh zeroed pages in again: on a VM whose freed memory goes back to
    the host, a third of a chunked push's server time. Settings the operator made through
    ``GLIBC_TUNABLES`` or ``MALLOC_*`` win.
    """
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or any(
            k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False  # not glibc
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(
        mallopt(_M_TRIM_THRESHOLD, KEEP_FREED))


def build_app(settings: ServeSettings) -> RegistryApp:
    from casengine.compression import Policy
    from casengine.engine import Engine
    from casengine.registry import Registry

    keep_freed_memory()

    policy = Policy.parse(settings.compression, settings.compression_level)
    engine = Engine.open(settings.root, index=settings.index, compression=policy,
                         **settings.storage_options)
    registry = Registry(engine, create_on_push=settings.create_on_push)
    if policy.mode != "never":
        engine.compactor.resume()  # blobs a stopped server left raw, before compressing them
    auth = None
    if settings.auth_file:
        from casengine.http.auth import TokenAuth

        auth = TokenAuth.from_file(settings.auth_file, settings.public_url)
    stop = threading.Event()
    threading.Thread(target=_mark_every, name="casengine-mark", daemon=True,
                     args=(engine, stop)).start()
    if settings.gc_interval:
        threading.Thread(target=_collect_every, name="casengine-gc", daemon=True,
                         args=(registry, settings.gc_interval, settings.gc_grace, stop)).start()
    on_push = None
    if settings.transcode_on_push:
        on_push = TranscodeOnPush(registry, settings.transcode_on_push, settings.transcode_level)

    def close() -> None:
        stop.set()
        if on_push is not None:
            on_push.close()
        if "compactor" in engine.__dict__:
            engine.compactor.close(finish=False)  # the next start takes up the rest
        engine.close()

    return RegistryApp(registry, auth=auth, redirect=settings.redirect, on_close=close,
                       on_manifest=on_push)


def _mark_every(engine: Any, stop: threading.Event) -> None:
    """Keep the store's index mark close behind the index, so that an index restored from
    a backup is refused at the next start (see casengine.index_binding)."""
    from casengine.errors import CASError
    from casengine.index_binding import MARK_INTERVAL

    while not stop.wait(MARK_INTERVAL):
        try:
            engine.mark_index()
        except CASError as exc:
            log.warning("cannot record the index's progress in the store: %s", exc)


def _collect_every(registry: Any, interval: float, grace: float, stop: threading.Event) -> None:
    """Background GC for ``serve --gc-interval``; with several workers, the index lock lets
    one collect at a time and the others skip that round."""
    from casengine.errors import CASError, Conflict
    from casengine.gc import Collector

    while not stop.wait(interval):
        try:
            report = Collector(registry, grace=grace).run()
            log.info("gc: %d blobs (%d bytes), %d links, %d upload sessions", report.blobs,
                     report.bytes, report.links, report.uploads)
        except Conflict:
            continue
        except CASError as exc:
            log.error("gc failed: %s", exc)


class TranscodeOnPush:
    """``serve --transcode-on-push``: converts each image pushed by tag in the background
    and tags the result ``<tag>-zstd``.

    The app calls it on the event loop after each manifest PUT; it only queues the job
    (a bounded queue: when full, the push is logged and not converted). One worker thread
    converts, off the event loop; its errors are logged and never reach the client, whose
    push was answered already. It never touches the pushed tag, leaves a ``<tag>-zstd``
    the client pushed itself alone, and cannot loop on its own output: that is stored
    in-process (no PUT), has no gzip layer, and its tag ends in ``-zstd``, which is skipped.
    """

    def __init__(self, registry: Registry, to: str, level: int, depth: int = 64) -> None:
        self.registry = registry
        self.to = to
        self.level = level
        self._jobs: queue.Queue[tuple[str, str, str]] = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="casengine-transcode",
                                        daemon=True)
        self._thread.start()

    def __call__(self, repo: str, reference: str, manifest: Manifest) -> None:
        if is_digest(reference) or reference.endswith(f"-{self.to}"):
            return  # an index's children (by digest), or a converted image
        try:
            self._jobs.put_nowait((repo, reference, str(manifest.digest)))
        except queue.Full:
            log.warning("transcode queue full: %s:%s is not converted", repo, reference)

    def _run(self) -> None:
        from casengine.errors import CASError

        while not self._stop.is_set():
            try:
                repo, tag, digest = self._jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.convert(repo, tag, digest)
            except CASError as exc:
                log.error("transcode of %s:%s (%s) failed: %s", repo, tag, digest, exc)
            except Exception:  # a bug: keep serving, with the traceback in the log
                log.exception("transcode of %s:%s (%s) failed", repo, tag, digest)
            finally:
                self._jobs.task_done()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every queued job is done; False if ``timeout`` came first."""
        with self._jobs.all_tasks_done:
            return self._jobs.all_tasks_done.wait_for(lambda: not self._jobs.unfinished_tasks,
                                                      timeout)

    def convert(self, repo: str, tag: str, digest: str) -> None:
        from casengine.errors import NotFound
        from casengine.transcode import default_tag, made_by_transcode, needs_transcode, transcode

        if not needs_transcode(self.registry, repo, digest):
            return
        new_tag = default_tag(tag, self.to)
        if new_tag in self.registry.tag_map(repo) and not made_by_transcode(
                self.registry, repo, new_tag):
            log.warning("transcode of %s:%s skipped: %s was pushed by a client", repo, tag,
                        new_tag)
            return
        report = transcode(self.registry, repo, digest, to=self.to, level=self.level)
        if report.target == digest:
            return  # nothing to convert after all
        # the tag may have moved on (or gone) while this ran: a later push's conversion
        # tags that one, and this one must not overwrite it with an older image
        try:
            current = self.registry.resolve(repo, tag).digest
        except NotFound:
            current = None
        if current != digest:
            log.info("transcode of %s:%s (%s) not tagged %s: the tag now names %s", repo, tag,
                     digest, new_tag, current or "nothing")
            return
        data, stored = self.registry.get_manifest(repo, report.target)
        self.registry.put_manifest(repo, new_tag, data, stored.media_type)
        log.info("transcoded %s:%s to %s (%d layers converted, %d reused)", repo, tag, new_tag,
                 report.count("converted"), report.count("reused"))

    def close(self, timeout: float = 60.0) -> None:
        """Stop after the conversion in progress (queued ones are dropped)."""
        self._stop.set()
        self._thread.join(timeout)


def die_with_master() -> bool:
    """Have the kernel stop this worker (SIGTERM, so it finishes its requests) when the
    master dies; return whether it will.

    A master killed with ``kill -9`` cannot stop its workers: they went on serving the
    port, writing to the root, and a restart could not bind the port.
    """
    master = os.environ.get(MASTER_ENV)
    prctl = linux_call("prctl", ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                       ctypes.c_ulong)
    if master is None or prctl is None or prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0):
        return False
    if os.getppid() != int(master):  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def app_from_env() -> RegistryApp:
    """The uvicorn factory for worker processes."""
    die_with_master()
    return build_app(ServeSettings.from_env())
