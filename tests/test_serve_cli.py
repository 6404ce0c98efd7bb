"""What ``casengine serve`` says to the operator who starts and stops it."""

from __future__ import annotations

import signal
from pathlib import Path

from tests.helpers import ServeProcess, one_line_error, run_cli


def test_serve_says_where_to_connect_and_where_the_data_lives(tmp_path: Path) -> None:
    server = ServeProcess(root=tmp_path / "root", log=tmp_path / "serve.log")
    server.start()
    try:
        assert server.process is not None
        first = server.log_text().splitlines()[0]
        assert f"serving http://127.0.0.1:{server.port}/v2/ from {tmp_path / 'root'}" in first
        assert str(tmp_path / "root" / ".index") in first
        server.process.send_signal(signal.SIGINT)  # Ctrl-C
        assert server.process.wait(timeout=30) == 0
        assert server.log_text().splitlines()[-1] == "casengine: stopped"
    finally:
        server.stop()


def test_serve_refuses_workers_on_a_store_in_memory(tmp_path: Path) -> None:
    """Each worker would get a memory:// store of its own: every chunked push would fail
    with 'upload unknown' when its next request reached the other worker."""
    err = one_line_error(run_cli(["--root", "memory://", "serve", "--port", "0",
                                  "--workers", "2"], cwd=tmp_path), 8)
    assert "one worker" in err


def test_serve_names_a_certificate_it_cannot_use(tmp_path: Path) -> None:
    bad = tmp_path / "cert.pem"
    bad.write_text("not a certificate\n")
    err = one_line_error(run_cli(["--root", str(tmp_path / "root"), "serve", "--port", "0",
                                  "--tls-cert", str(bad), "--tls-key", str(bad)],
                                 cwd=tmp_path), 8)
    assert str(bad) in err


def test_a_global_option_after_the_command_says_where_it_goes(tmp_path: Path) -> None:
    proc = run_cli(["serve", "--root", str(tmp_path)], cwd=tmp_path)
    assert proc.returncode == 2
    assert b"--root is an option of casengine itself: it goes before the command" in proc.stderr


def test_a_gc_interval_of_zero_is_refused_not_taken_for_never(tmp_path: Path) -> None:
    proc = run_cli(["--root", str(tmp_path / "root"), "serve", "--port", "0",
                    "--gc-interval", "0s"], cwd=tmp_path)
    assert proc.returncode == 2 and b"above zero" in proc.stderr


def test_redirect_on_a_backend_that_cannot_presign_says_so(tmp_path: Path) -> None:
    server = ServeProcess(root=tmp_path / "root", log=tmp_path / "serve.log",
                          args=["--redirect"])
    server.start()
    try:
        assert "--redirect does nothing" in server.log_text()
    finally:
        server.stop()
