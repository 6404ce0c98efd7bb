"""Building the app for ``casengine serve``: settings parsed once, engine opened per process.

With several workers uvicorn starts each process from an import string, so the settings
travel to :func:`app_from_env` as one JSON environment variable, parsed here at the edge.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

from casengine.http.app import RegistryApp

ENV = "CASENGINE_SERVE_SETTINGS"
log = logging.getLogger("casengine.http")


@dataclass(frozen=True, slots=True)
class ServeSettings:
    root: str
    index: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    redirect: bool = False
    auth_file: str | None = None
    create_on_push: bool = True
    gc_interval: float | None = None  #: seconds between background collections
    gc_grace: float = 3600.0
    compression: str = "auto"  #: the engine's compression policy (casengine.compression)
    compression_level: int | None = None

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> ServeSettings:
        return cls(**json.loads(os.environ[ENV]))


def build_app(settings: ServeSettings) -> RegistryApp:
    from casengine.compression import Policy
    from casengine.engine import Engine
    from casengine.registry import Registry

    policy = Policy.parse(settings.compression, settings.compression_level)
    engine = Engine.open(settings.root, index=settings.index, compression=policy,
                         **settings.storage_options)
    registry = Registry(engine, create_on_push=settings.create_on_push)
    auth = None
    if settings.auth_file:
        from casengine.http.auth import TokenAuth

        auth = TokenAuth.from_file(settings.auth_file)
    stop = threading.Event()
    if settings.gc_interval:
        threading.Thread(target=_collect_every, name="casengine-gc", daemon=True,
                         args=(registry, settings.gc_interval, settings.gc_grace, stop)).start()

    def close() -> None:
        stop.set()
        engine.close()

    return RegistryApp(registry, auth=auth, redirect=settings.redirect, on_close=close)


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


def app_from_env() -> RegistryApp:
    """The uvicorn factory for worker processes."""
    return build_app(ServeSettings.from_env())
