"""The bounded GC soak of issue 7 (the 60 s version is ``tools/gc_soak.py``).

Three worker processes push random small images (some of them indexes) that share a pool
of layers, through the :class:`~casengine.registry.Registry` API, into a few repositories of
one store; they mount, pull, delete tags and manifests, and push deleted content again,
while a collector process loops ``Collector(grace=0)``. With a grace window of zero nothing
protects a push in progress, so the protocol refuses some pushes before acknowledging them:
:class:`~casengine.errors.Conflict` (the blob was taken by the collector) or
:class:`~casengine.errors.ManifestBlobUnknown` (a pushed blob was unlinked before its
manifest came). Workers retry those; any other error fails the test.

Afterwards (see :func:`tests.gc_helpers.run_soak`):

- every tag a worker reports as acknowledged and not deleted pulls back completely (the
  manifest, its children, every blob) with the right digests and sizes; every tag it
  reports deleted is gone;
- after one final ``Collector(grace=0)``, nothing unreachable is left: the default policy
  keeps every manifest, so the links are exactly ``{(repo, d) : d is a manifest of repo or
  in the refs of one}``, the blob records exactly the digests those links name, each with
  its object, and after an orphan pass with no minimum age, no object without a record;
- :func:`tests.gc_helpers.audit_registry` finds nothing: refs counts, links/linked, no
  lease or lock left.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.gc_helpers import SoakResult, SoakSpec, run_soak

pytestmark = pytest.mark.slow

#: seconds of pushing per backend; the whole file takes about 20 s here (S3 pays for moto)
SECONDS_LOCAL = 5.0
SECONDS_S3 = 4.0


def check(result: SoakResult) -> None:
    summary = json.dumps(result.summary(), indent=1)
    assert result.ok, summary
    counts = result.counts
    assert counts["workers_reported"] == result.spec.workers, summary
    # the soak really ran: pushes landed, content was deleted and pushed again, the
    # collector looped and reclaimed something
    assert counts["pushes"] >= 5 and counts["gc_runs"] >= 3, summary
    assert counts["tag_deletes"] + counts["manifest_deletes"] > 0, summary
    assert counts["blobs_reclaimed"] > 0, summary
    assert result.tags_checked > 0, summary
    print(summary)


def test_soak_local(tmp_path: Path) -> None:
    check(run_soak(SoakSpec(root=str(tmp_path / "root"), seconds=SECONDS_LOCAL, seed=1)))


def test_soak_s3(tmp_path: Path, s3_url_and_options: tuple[str, dict[str, Any]]) -> None:
    url, options = s3_url_and_options
    check(run_soak(SoakSpec(root=url, index=str(tmp_path / "index"), options=options,
                            seconds=SECONDS_S3, seed=2)))
