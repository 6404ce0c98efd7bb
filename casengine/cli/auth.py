"""``casengine auth``: users, secrets and grants in a credentials file."""

from __future__ import annotations

import click

from casengine.cli.common import emit_json

FILE = click.option("--file", "path", required=True, envvar="CASENGINE_AUTH_FILE",
                    type=click.Path(dir_okay=False),
                    help="The credentials file (created if missing). Env: CASENGINE_AUTH_FILE.")


@click.group()
def auth() -> None:
    """Credentials for 'casengine serve --auth FILE'."""


def _grants(values: tuple[str, ...]) -> list:
    from casengine.credentials import Grant

    return [Grant.parse(v) for v in values]


@auth.command("add")
@FILE
@click.argument("user", required=False)
@click.option("--grant", "grants", multiple=True, metavar="PATTERN:ACTIONS",
              help="e.g. 'team/project/*:pull,push'. Repeatable.")
@click.option("--anonymous", is_flag=True,
              help="Grant anonymous pull on the patterns instead of adding a user.")
def add(path: str, user: str | None, grants: tuple[str, ...], anonymous: bool) -> None:
    """Add USER with its grants; print its new secret once, as the last line."""
    from casengine.credentials import Credentials
    from casengine.errors import InvalidInput

    if not grants:
        raise click.UsageError("give at least one --grant PATTERN:ACTIONS")
    parsed = _grants(grants)
    if anonymous:
        if user:
            raise click.UsageError("--anonymous takes no USER")
        if any(g.actions - {"pull"} for g in parsed):
            raise InvalidInput("anonymous access can only be pull")
        with Credentials.edit(path, missing_ok=True) as creds:
            creds.anonymous.extend(parsed)
        click.echo(f"anonymous pull on {', '.join(g.pattern for g in parsed)}")
        return
    if not user:
        raise click.UsageError("missing USER (or --anonymous)")
    with Credentials.edit(path, missing_ok=True) as creds:
        secret = creds.add(user, parsed)
    click.echo(f"added {user} with {', '.join(str(g) for g in parsed)}; its secret, shown once:",
               err=True)
    click.echo(secret)


@auth.command("ls")
@FILE
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def ls(path: str, as_json: bool) -> None:
    """List users and their grants (never secrets)."""
    from casengine.credentials import Credentials

    creds = Credentials.load(path)
    users = [{"user": u.name, "grants": [str(g) for g in u.grants], "created": u.created}
             for u in creds.users.values()]
    if as_json:
        emit_json({"users": users, "anonymous": [str(g) for g in creds.anonymous]})
        return
    for u in users:
        click.echo(f"{u['user']}\t{' '.join(u['grants'])}")
    if creds.anonymous:
        click.echo(f"(anonymous)\t{' '.join(str(g) for g in creds.anonymous)}")


@auth.command("rm")
@FILE
@click.argument("user")
def rm(path: str, user: str) -> None:
    """Remove USER; its secret and tokens stop working at once, and a user added later
    under the same name does not inherit them."""
    from casengine.credentials import Credentials

    with Credentials.edit(path) as creds:
        creds.remove(user)


@auth.command("rotate")
@FILE
@click.argument("user")
def rotate(path: str, user: str) -> None:
    """Give USER a new secret (printed once, as the last line); the old one, and the
    tokens issued for it, stop working."""
    from casengine.credentials import Credentials

    with Credentials.edit(path) as creds:
        secret = creds.rotate(user)
    click.echo(f"new secret for {user}, shown once:", err=True)
    click.echo(secret)
