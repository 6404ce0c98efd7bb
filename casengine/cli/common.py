"""What every command shares: parsed settings, opening the engine, output, and errors."""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from casengine.engine import Engine

#: Exit codes beyond those of casengine.errors (documented in the README).
EXIT_USAGE = 2
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130
#: Options of ``casengine`` itself, which a command given them names as unknown.
GLOBAL_OPTIONS = ("--root", "--index", "-o", "--storage-option", "--compression",
                  "--compression-level")


@dataclass(frozen=True, slots=True)
class Settings:
    """The global options, parsed once at the edge."""

    root: str
    index: str | None
    storage_options: dict[str, str] = field(default_factory=dict)
    compression: str = "auto"  #: how new blobs are stored: auto, never, always
    compression_level: int | None = None  #: zstd level; None: the engine's default

    @classmethod
    def parse(cls, root: str, index: str | None, options: tuple[str, ...],
              compression: str = "auto", compression_level: int | None = None) -> Settings:
        parsed: dict[str, str] = {}
        for item in options:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise click.BadParameter(f"{item!r}: want KEY=VALUE", param_hint="--storage-option")
            parsed[key] = value
        return cls(root, index, parsed, compression, compression_level)


def require_store(root: str) -> None:
    """Refuse a local root that does not exist, where a command only reads or tidies: made
    there, an empty store would hide a mistyped path behind an empty answer."""
    from casengine.backend import split_scheme
    from casengine.errors import NotFound

    scheme, path = split_scheme(root)
    if scheme == "file" and not os.path.exists(path):
        raise NotFound(f"no store at {os.path.abspath(path)}: check --root (CASENGINE_ROOT); "
                       "'casengine serve' and 'casengine blob put' make a new one")


@contextmanager
def engine_from(ctx: click.Context, *, create: bool = False) -> Iterator[Engine]:
    """The engine of the global options; a missing local root is made only with ``create``."""
    from casengine.compression import Policy
    from casengine.engine import Engine

    s: Settings = ctx.find_object(Settings)
    if not create:
        require_store(s.root)
    policy = Policy.parse(s.compression, s.compression_level)
    with Engine.open(s.root, index=s.index, compression=policy, **s.storage_options) as engine:
        yield engine


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


def run_guarded(cli: click.Command, *, debug: bool = False) -> int:
    """Run ``cli``; turn every error into one line on stderr and a documented exit code."""
    from casengine.errors import CASError

    try:
        # make_context + invoke rather than main(): main() turns a broken pipe into exit 1
        with cli.make_context("casengine", sys.argv[1:]) as ctx:
            cli.invoke(ctx)
    except click.exceptions.Abort:
        click.echo("casengine: interrupted", err=True)
        return EXIT_INTERRUPTED
    except click.ClickException as exc:
        if isinstance(exc, click.NoSuchOption) and exc.option_name in GLOBAL_OPTIONS:
            exc.message = (f"{exc.option_name} is an option of casengine itself: it goes "
                           f"before the command (casengine {exc.option_name} VALUE COMMAND ...)")
            exc.possibilities = None
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("casengine: interrupted", err=True)
        return EXIT_INTERRUPTED
    except CASError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"casengine: error: {exc}", err=True)
        return exc.exit_code
    except BrokenPipeError:
        # the reader went away (| head): not an error; keep the exit flush from failing too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # a local file the user named: unreadable, unwritable, missing
        click.echo(f"casengine: error: {exc.filename or ''}: {exc.strerror or exc}", err=True)
        return 3 if isinstance(exc, FileNotFoundError) else 7
    except Exception as exc:  # noqa: BLE001 - a bug: one line, and the traceback on request
        if debug:
            traceback.print_exc()
        click.echo(f"casengine: internal error: {type(exc).__name__}: {exc} "
                   "(set CASENGINE_DEBUG=1 for the traceback)", err=True)
        return EXIT_INTERNAL
    return 0
