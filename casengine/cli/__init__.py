"""The ``casengine`` command: global options, one error path, and the command groups.

Only click is imported at start-up; each command imports the engine when it runs, so
``casengine --help`` is instant and a big ``blob put`` spends its time on the data.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

import click

from casengine.cli.auth import auth
from casengine.cli.bench import bench
from casengine.cli.blob import blob
from casengine.cli.check import check, reindex
from casengine.cli.common import EXIT_INTERRUPTED, Settings, run_guarded
from casengine.cli.gc import gc
from casengine.cli.registry import manifest, quota, repo, tag, usage
from casengine.cli.serve import serve
from casengine.cli.transcode import transcode
from casengine.cli.uploads import uploads


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--root", envvar="CASENGINE_ROOT", default="./casengine-data", show_default=True,
              help="Store URL: a path, file:///path, memory://, s3://bucket/prefix. "
                   "Env: CASENGINE_ROOT.")
@click.option("--index", envvar="CASENGINE_INDEX", default=None,
              help="LMDB index directory (default: inside a local root; required for remote "
                   "roots). Env: CASENGINE_INDEX.")
@click.option("-o", "--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
              help="Option passed to the backend, e.g. endpoint_url=http://127.0.0.1:9000. "
                   "Repeatable.")
@click.option("--compression", envvar="CASENGINE_COMPRESSION", default="auto",
              show_default=True, type=click.Choice(["auto", "never", "always"]),
              help="How new blobs are stored: seekable zstd unless already compressed or "
                   "incompressible (auto), as they are (never), or zstd (always). "
                   "Env: CASENGINE_COMPRESSION.")
@click.option("--compression-level", envvar="CASENGINE_COMPRESSION_LEVEL", default=None,
              type=click.IntRange(-7, 22), metavar="N",
              help="zstd level for stored blobs (default 1). Env: CASENGINE_COMPRESSION_LEVEL.")
@click.version_option(package_name="casengine")
@click.pass_context
def cli(ctx: click.Context, root: str, index: str | None, storage_options: tuple[str, ...],
        compression: str, compression_level: int | None) -> None:
    """casengine: content-addressed storage for OCI registries."""
    ctx.obj = Settings.parse(root, index, storage_options, compression, compression_level)


cli.add_command(blob)
cli.add_command(uploads)
cli.add_command(transcode)
for command in (repo, tag, manifest, usage, quota, serve, auth, gc, check, reindex, bench):
    cli.add_command(command)


def main() -> None:
    code = run_guarded(cli, debug=os.environ.get("CASENGINE_DEBUG", "") not in ("", "0"))
    if code == EXIT_INTERRUPTED and any(t.daemon and t.is_alive() for t in threading.enumerate()):
        # a reader left blocked on stdin (interrupted while a terminal was silent) holds the
        # stream's lock, and the interpreter's shutdown would abort on it
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)
    sys.exit(code)
