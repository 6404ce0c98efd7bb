"""Repository names, tags and references, per the OCI distribution spec.

A repository name is ``[a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*)*``,
at most 255 characters. Every component starts and ends with a letter or digit, so a name
can never be ``..``, absolute, or empty, and it can be used in a backend key as it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from casengine.digest import Digest
from casengine.errors import InvalidName

MAX_NAME = 255
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_COMPONENT_RE = re.compile(_COMPONENT)
_TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")


def _why(name: str) -> str:
    if not name:
        return "it is empty"
    if len(name) > MAX_NAME:
        return f"it has {len(name)} characters, at most {MAX_NAME} are allowed"
    if name != name.lower():
        return "it has uppercase letters"
    for part in name.split("/"):
        if not part:
            return "it has an empty path component (a leading, trailing or double '/')"
        if not _COMPONENT_RE.fullmatch(part):
            return (f"component {part!r} must be lowercase letters and digits, separated by "
                    "'.', '_', '__' or dashes, and start and end with a letter or digit")
    return "it does not match the OCI name grammar"


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid repository name, else raise :class:`InvalidName`."""
    if not isinstance(name, str) or len(name) > MAX_NAME or not _NAME.fullmatch(name):
        shown = repr(name if not isinstance(name, str) or len(name) <= 80 else name[:80] + "...")
        reason = _why(name) if isinstance(name, str) else "it is not a string"
        raise InvalidName(f"invalid repository name {shown}: {reason}")
    return name


def check_tag(tag: str) -> str:
    if not isinstance(tag, str) or not _TAG.fullmatch(tag):
        raise InvalidName(f"invalid tag {str(tag)[:140]!r}: want [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}")
    return tag


def is_digest(reference: str) -> bool:
    return ":" in reference


@dataclass(frozen=True, slots=True)
class Reference:
    """``repo:tag`` or ``repo@digest``."""

    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @property
    def ref(self) -> str:
        """The tag or digest part, as the HTTP API's ``<reference>``."""
        return self.tag if self.tag is not None else str(self.digest)

    @classmethod
    def parse(cls, text: str) -> Reference:
        if not isinstance(text, str):
            raise InvalidName(f"a reference must be a string, not {type(text).__name__}")
        if "@" in text:
            repo, _, digest = text.partition("@")
            return cls(check_name(repo), digest=Digest.parse(digest))
        repo, sep, tag = text.rpartition(":")
        if not sep or "/" in tag:
            raise InvalidName(f"invalid reference {text!r}: want repo:tag or repo@digest")
        return cls(check_name(repo), tag=check_tag(tag))

    def __str__(self) -> str:
        return f"{self.repository}:{self.tag}" if self.tag else f"{self.repository}@{self.digest}"
