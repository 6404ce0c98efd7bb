"""What every command shares: parsed settings, opening the engine, output, and errors."""

from __future__ import annotations

import json
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


@dataclass(frozen=True, slots=True)
class Settings:
    """The global options, parsed once at the edge."""

    root: str
    index: str | None
    storage_options: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, root: str, index: str | None, options: tuple[str, ...]) -> Settings:
        parsed: dict[str, str] = {}
        for item in options:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise click.BadParameter(f"{item!r}: want KEY=VALUE", param_hint="--storage-option")
            parsed[key] = value
        return cls(root, index, parsed)


@contextmanager
def engine_from(ctx: click.Context) -> Iterator[Engine]:
    from casengine.engine import Engine

    s: Settings = ctx.find_object(Settings)
    with Engine.open(s.root, index=s.index, **s.storage_options) as engine:
        yield engine


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


def run_guarded(cli: click.Command, *, debug: bool = False) -> int:
    """Run ``cli``; turn every error into one line on stderr and a documented exit code."""
    from casengine.errors import CASError

    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("casengine: interrupted", err=True)
        return EXIT_INTERRUPTED
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("casengine: interrupted", err=True)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        sys.stderr.close()  # the reader went away (| head): not an error worth a message
        return 0
    except CASError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"casengine: error: {exc}", err=True)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - a bug: one line, and the traceback on request
        if debug:
            traceback.print_exc()
        click.echo(f"casengine: internal error: {type(exc).__name__}: {exc} "
                   "(set CASENGINE_DEBUG=1 for the traceback)", err=True)
        return EXIT_INTERNAL
    return 0
