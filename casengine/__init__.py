"""casengine: a content-addressed storage engine for OCI container registries.

    from casengine import Engine

    with Engine.open("file:///srv/cas") as engine:
        result = engine.ingest(b"hello", digest="sha256:2cf24dba...")
        data = b"".join(engine.read(result.digest))
"""

from casengine.digest import Digest
from casengine.engine import Engine, IngestResult
from casengine.errors import CASError
from casengine.index import BlobRecord

__all__ = ["BlobRecord", "CASError", "Digest", "Engine", "IngestResult"]
__version__ = "0.1.0"
