"""The house rule on client tools: a missing one skips the test on a developer's machine and
fails it under CI=true, where a missing tool is a failure, not a skip."""

from __future__ import annotations

import importlib
import os
import shutil
from types import ModuleType
from typing import NoReturn

import pytest

INSTALL = {
    "skopeo": "apt-get install -y --no-install-recommends skopeo (Debian/Ubuntu package)",
    "oras": "pip install oras (oras-py; it is in the dev extra: pip install -e '.[dev]')",
}


def _missing(what: str, how: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is missing and CI=true, where a missing tool is a failure, "
                    f"not a skip. Install it: {how}", pytrace=False)
    pytest.skip(f"{what} is not installed on this machine (install: {how})")


def require_tool(name: str) -> str:
    """The path of the command ``name``; skips the test without it (fails it under CI)."""
    path = shutil.which(name)
    if path is None:
        _missing(f"the '{name}' command", INSTALL.get(name, f"install {name}"))
    return path


def require_module(name: str) -> ModuleType:
    """The Python module ``name``; skips the test without it (fails it under CI)."""
    package = name.split(".")[0]
    try:
        return importlib.import_module(name)
    except ImportError:
        _missing(f"the Python package '{package}'", INSTALL.get(package, f"pip install {package}"))
