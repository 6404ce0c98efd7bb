"""``casengine serve``: the OCI registry over HTTP, on uvicorn."""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import socket

import click

from casengine.cli.common import Settings


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _public_url(value: str | None) -> str | None:
    """``--public-url``, checked: it is quoted into every auth challenge."""
    if value is None:
        return None
    url = value.rstrip("/")
    if not re.fullmatch(r"https?://[A-Za-z0-9.:\[\]-]+(/[A-Za-z0-9._~/-]*)?", url):
        raise click.BadParameter(f"{value!r}: want http(s)://HOST[:PORT][/PATH]",
                                 param_hint="--public-url")
    return url


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=5000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Worker processes; they share the root and its index.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), help="PEM certificate.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="PEM private key.")
@click.option("--redirect", is_flag=True,
              help="Answer blob GETs with a 307 to a presigned URL where the backend can (S3).")
@click.option("--auth", "auth_file", type=click.Path(dir_okay=False),
              help="Credentials file (see 'casengine auth'); without it there is no auth.")
@click.option("--public-url", metavar="URL", callback=lambda ctx, param, v: _public_url(v),
              help="Where clients reach the registry (e.g. https://registry.example.com "
                   "behind a TLS proxy): the token realm of --auth challenges points there. "
                   "Default: the scheme and Host of each request.")
@click.option("--insecure", is_flag=True,
              help="Allow serving without --auth on an address other than loopback.")
@click.option("--gc-interval", metavar="DURATION",
              help="Run garbage collection in the background this often (e.g. 6h).")
@click.option("--gc-grace", default="1h", show_default=True, metavar="DURATION",
              help="Grace window of the background collection.")
@click.option("--transcode-on-push", type=click.Choice(["zstd"]),
              help="Convert each image pushed by tag to zstd in the background, tagged "
                   "<tag>-zstd (the pushed tag stays as it is).")
@click.option("--transcode-level", default=3, show_default=True, type=click.IntRange(1, 22),
              help="zstd level for --transcode-on-push.")
@click.option("--max-header-size", default="1M", show_default=True, metavar="SIZE",
              help="Refuse a request whose line and headers are larger (431).")
@click.option("--header-timeout", default="30s", show_default=True, metavar="DURATION",
              help="Close a connection whose request line and headers take longer to arrive.")
@click.option("--stall-timeout", default="2m", show_default=True, metavar="DURATION",
              help="Drop a client that sends no byte of its request body, or takes no byte "
                   "of a response, for this long.")
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@click.pass_context
def serve(ctx: click.Context, host: str, port: int, workers: int, tls_cert: str | None,
          tls_key: str | None, redirect: bool, auth_file: str | None, insecure: bool,
          gc_interval: str | None, gc_grace: str, transcode_on_push: str | None,
          transcode_level: int, log_level: str, public_url: str | None,
          max_header_size: str, header_timeout: str, stall_timeout: str) -> None:
    """Serve the store as an OCI Distribution (Docker Registry v2) registry."""
    try:
        import uvicorn
    except ImportError as exc:
        from casengine.errors import MissingExtra

        raise MissingExtra("casengine serve needs the 'server' extra: "
                           "pip install 'casengine[server]'") from exc
    from casengine.errors import ConfigError
    from casengine.http.protocol import ZeroCopyProtocol
    from casengine.http.server import ENV, MASTER_ENV, ServeSettings, build_app

    if not auth_file and not insecure and not _is_loopback(host):
        raise ConfigError(f"refusing to serve {host} without --auth: anyone who can reach it "
                          "could read and write everything. Use --auth FILE, bind 127.0.0.1, "
                          "or pass --insecure if something in front of it authenticates")
    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if tls_cert and tls_key:
        _check_tls(tls_cert, tls_key)
    _check_listen(host, port)
    s: Settings = ctx.find_object(Settings)
    from casengine.units import parse_duration

    settings = ServeSettings(s.root, s.index, s.storage_options, redirect, auth_file,
                             public_url=public_url,
                             gc_interval=_interval(gc_interval),
                             gc_grace=parse_duration(gc_grace), compression=s.compression,
                             compression_level=s.compression_level,
                             transcode_on_push=transcode_on_push, transcode_level=transcode_level)
    tls = {"ssl_certfile": tls_cert, "ssl_keyfile": tls_key} if tls_cert else {}
    # a partial, not a subclass: uvicorn pickles it to worker processes
    protocol = functools.partial(ZeroCopyProtocol, max_head=_max_header_size(max_header_size),
                                 head_timeout=_timeout(header_timeout, "--header-timeout"),
                                 stall_timeout=_timeout(stall_timeout, "--stall-timeout"))
    common = {"host": host, "port": port, "log_level": log_level, "access_log": False,
              "http": protocol, "lifespan": "on", "timeout_keep_alive": 30, **tls}
    app = build_app(settings)  # open the store now: a bad root fails before binding
    engine = app.registry.engine
    if workers > 1 and engine.backend.ephemeral:
        engine.close()
        raise ConfigError(f"{s.root} lives in one process's memory: --workers {workers} would "
                          "give each worker a store of its own; serve it with one worker")
    _announce(host, port, bool(tls_cert), s.root, engine.index)
    from casengine.backend import Presigner

    if redirect and not isinstance(engine.backend, Presigner):
        click.echo(f"casengine: warning: --redirect does nothing on {s.root}: the backend "
                   "cannot presign URLs, so blobs are served directly", err=True)
    if workers == 1:
        uvicorn.run(app, **common)
    else:
        engine.close()  # each worker opens its own
        os.environ[ENV] = settings.to_env()
        os.environ[MASTER_ENV] = str(os.getpid())
        uvicorn.run("casengine.http.server:app_from_env", factory=True, workers=workers,
                    **common)
    click.echo("casengine: stopped", err=True)


def _max_header_size(value: str) -> int:
    from casengine.units import parse_size

    size = parse_size(value)
    if size < 1024:  # no client's request line and headers fit in less
        raise click.BadParameter(f"{value!r}: want at least 1k", param_hint="--max-header-size")
    return size


def _timeout(value: str, option: str, example: str = "30s") -> float:
    from casengine.units import parse_duration

    seconds = parse_duration(value)
    if seconds <= 0:
        raise click.BadParameter(f"{value!r}: want a duration above zero, e.g. {example}",
                                 param_hint=option)
    return seconds


def _interval(value: str | None) -> float | None:
    # zero would mean "never", which leaving the option out already says
    return None if value is None else _timeout(value, "--gc-interval", "6h")


def _announce(host: str, port: int, tls: bool, root: str, index: object) -> None:
    """One line on where clients connect and where the data lives: at the default log level
    uvicorn says nothing."""
    from casengine.backend import split_scheme

    scheme, path = split_scheme(root)
    where = os.path.abspath(path) if scheme == "file" else root
    shown = f"[{host}]" if ":" in host else host
    url = f"{'https' if tls else 'http'}://{shown}:{port}/v2/"
    if port == 0:
        url += " (port 0: the system picks one; --log-level info shows it)"
    click.echo(f"casengine: serving {url} from {where} (index {getattr(index, 'path', '-')}); "
               "Ctrl-C stops", err=True)


def _check_tls(cert: str, key: str) -> None:
    """Load the pair now: uvicorn's own failure names neither file ('PEM lib')."""
    import ssl

    from casengine.errors import ConfigError

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot use --tls-cert {cert} with --tls-key {key}: "
                          f"{exc.strerror or exc}") from None


def _check_listen(host: str, port: int) -> None:
    """Fail with a clear error, before the store is opened, where the port is taken:
    uvicorn would log the error and exit 3, the code for "not found"."""
    from casengine.errors import ConfigError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
