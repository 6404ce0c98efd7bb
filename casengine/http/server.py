"""Building the app for ``casengine serve``: settings parsed once, engine opened per process.

With several workers uvicorn starts each process from an import string, so the settings
travel to :func:`app_from_env` as one JSON environment variable, parsed here at the edge.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from casengine.http.app import RegistryApp

ENV = "CASENGINE_SERVE_SETTINGS"


@dataclass(frozen=True, slots=True)
class ServeSettings:
    root: str
    index: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    redirect: bool = False
    auth_file: str | None = None
    create_on_push: bool = True

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> ServeSettings:
        return cls(**json.loads(os.environ[ENV]))


def build_app(settings: ServeSettings) -> RegistryApp:
    from casengine.engine import Engine
    from casengine.registry import Registry

    engine = Engine.open(settings.root, index=settings.index, **settings.storage_options)
    registry = Registry(engine, create_on_push=settings.create_on_push)
    auth = None
    if settings.auth_file:
        from casengine.http.auth import TokenAuth

        auth = TokenAuth.from_file(settings.auth_file)
    return RegistryApp(registry, auth=auth, redirect=settings.redirect, on_close=engine.close)


def app_from_env() -> RegistryApp:
    """The uvicorn factory for worker processes."""
    return build_app(ServeSettings.from_env())
