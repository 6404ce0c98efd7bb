#!/usr/bin/env python3
"""GC soak: workers push, pull, mount and delete while collectors loop with grace 0.

    python3 tools/gc_soak.py [--seconds 60] [--workers 3] [--root PATH|URL | --s3]
                             [--index DIR] [-o KEY=VALUE ...] [--collectors 1]
                             [--untagged] [--chunked] [--no-mounts] [--gc-pause 0.15]
                             [--seed 0] [--json] [--keep]

The long version of ``tests/test_gc_soak.py`` (issue 7): ``--workers`` processes push random
small images (some of them indexes) that share a pool of layers into a few repositories,
delete tags and manifests and push deleted content again, while ``--collectors`` processes
loop ``Collector(grace=0)``. Workers retry the refusals the protocol may answer before
acknowledging a push (Conflict, ManifestBlobUnknown); any other error is a failure. Then one
final collection, and the verification: every tag acknowledged and not deleted pulls back
completely with the right digests; deleted tags are gone; nothing unreachable is left; the
index audit is clean. See tests/gc_helpers.py for the details.

Roots: a temporary local directory by default (removed at the end unless --keep); ``--root``
for a directory or any store URL (``s3://bucket/prefix`` with ``--index`` and ``-o
endpoint_url=...``); ``--s3`` for a fresh bucket on a moto server started for the run.

Options that exercise more than the default policy: ``--untagged`` (the collectors delete
untagged manifests too), ``--chunked`` (some blobs go through chunked upload sessions).

Exit status: 0 all verified; 1 acknowledged data lost, garbage left or the audit failed;
2 an unexpected error in a worker or collector (or the harness); 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.gc_helpers import SoakSpec, run_soak

COUNTS = [
    ("pushes", "pushes acknowledged (new and re-pushed)"),
    ("repushes", "  of which deleted content pushed again"),
    ("conflicts", "pushes refused with Conflict (retried)"),
    ("blob_unknown", "manifests refused with ManifestBlobUnknown (retried)"),
    ("gave_up", "pushes given up after retries"),
    ("mounts", "cross-repository mounts"),
    ("blob_not_found", "mounts/manifests failed with BlobNotFound (known bug, retried)"),
    ("chunked", "blobs pushed through upload sessions"),
    ("pulls", "pulls verified during the run"),
    ("tag_deletes", "tags deleted"),
    ("manifest_deletes", "manifests deleted"),
    ("gc_runs", "gc runs"),
    ("dry_runs", "gc dry runs"),
    ("lock_busy", "gc runs refused by the lock"),
    ("blobs_reclaimed", "blobs reclaimed"),
    ("bytes_reclaimed", "bytes reclaimed"),
    ("links_removed", "dead links removed"),
    ("manifests_removed", "manifests removed (--untagged)"),
    ("final_orphans", "orphans removed at the end"),
]


@contextlib.contextmanager
def moto_bucket() -> Iterator[tuple[str, dict[str, Any]]]:
    import boto3

    from casengine.testing.s3server import DUMMY_CREDENTIALS, moto_server

    with moto_server() as endpoint:
        bucket = f"gc-soak-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                     aws_access_key_id=DUMMY_CREDENTIALS["key"],
                     aws_secret_access_key=DUMMY_CREDENTIALS["secret"]).create_bucket(
            Bucket=bucket)
        yield f"s3://{bucket}/root", {"endpoint_url": endpoint, **DUMMY_CREDENTIALS,
                                      "client_kwargs": {"region_name": "us-east-1"}}


def parse_options(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"gc_soak: -o {item!r}: want KEY=VALUE")
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--collectors", type=int, default=1)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--root", help="store path or URL (default: a temporary directory)")
    where.add_argument("--s3", action="store_true", help="a fresh bucket on a moto server")
    parser.add_argument("--index", help="LMDB index directory (remote roots)")
    parser.add_argument("-o", "--storage-option", dest="options", action="append", default=[],
                        metavar="KEY=VALUE")
    parser.add_argument("--repos", type=int, default=3)
    parser.add_argument("--pool", type=int, default=12, help="shared layers")
    parser.add_argument("--gc-pause", type=float, default=0.15,
                        help="mean pause between collections, seconds")
    parser.add_argument("--untagged", action="store_true")
    parser.add_argument("--chunked", action="store_true")
    parser.add_argument("--no-mounts", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--keep", action="store_true", help="keep temporary directories")
    args = parser.parse_args(argv)

    scratch = tempfile.mkdtemp(prefix="gc-soak-")
    try:
        with contextlib.ExitStack() as stack:
            options = parse_options(args.options)
            index = args.index
            if args.s3:
                root, options = stack.enter_context(moto_bucket())
                index = index or os.path.join(scratch, "index")
            else:
                root = args.root or os.path.join(scratch, "root")
                if "://" in root and not root.startswith("file://") and index is None:
                    index = os.path.join(scratch, "index")
            spec = SoakSpec(root=root, index=index, options=options, workers=args.workers,
                            seconds=args.seconds, repos=args.repos, pool=args.pool,
                            collectors=args.collectors, gc_pause=args.gc_pause,
                            untagged=args.untagged, chunked=args.chunked,
                            mounts=not args.no_mounts, seed=args.seed)
            print(f"gc soak: {args.workers} workers, {args.collectors} collector(s), "
                  f"{args.seconds:g} s on {root}", file=sys.stderr, flush=True)
            last = [0.0]

            def log(msg: str) -> None:
                if time.monotonic() - last[0] >= 5:
                    last[0] = time.monotonic()
                    print(msg, file=sys.stderr, flush=True)

            result = run_soak(spec, log=log)
    except KeyboardInterrupt:
        print("gc_soak: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the harness itself failed
        print(f"gc_soak: harness error: {exc!r}", file=sys.stderr)
        return 2
    finally:
        if args.keep:
            print(f"kept {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    summary = result.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for key, label in COUNTS:
            if key in result.counts:
                print(f"{label:<55} {result.counts[key]:>10}")
        print(f"{'tags verified after the run':<55} {result.tags_checked:>10}")
        print(f"{'final gc: runs / blobs / links reclaimed':<55} "
              f"{result.final_runs:>4} / {result.final_report.get('blobs', 0)} / "
              f"{result.final_report.get('links', 0)}")
        print(f"timings: {result.seconds}")
        for title, items in (("ERRORS", result.errors), ("LOST", result.lost),
                             ("GARBAGE LEFT", result.garbage), ("AUDIT", result.unsound)):
            for item in items[:20]:
                print(f"{title}: {item}")
        print("verification:", "OK" if result.ok else "FAILED")
    if result.errors:
        return 2
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
