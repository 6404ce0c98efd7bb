"""The ``casengine blob`` commands, run as real subprocesses through the console script."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from casengine.engine import Engine
from casengine.errors import BlobNotFound, ConfigError, IntegrityError, InvalidInput
from casengine.registry import Registry
from tests.helpers import MIB, casengine_command, digest_of, ok, one_line_error, run_cli


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


def cli(root: Path, *args: str, cwd: Path | None = None, input: bytes | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_cli(["--root", str(root), *args], cwd=cwd or root.parent, input=input, env=env)


def test_exit_codes_match_the_errors() -> None:
    assert (InvalidInput.exit_code, IntegrityError.exit_code, BlobNotFound.exit_code,
            ConfigError.exit_code) == (4, 5, 3, 8)


def test_put_file_prints_the_digest(root: Path, tmp_path: Path) -> None:
    data = os.urandom(3 * MIB + 11)
    f = tmp_path / "layer.bin"
    f.write_bytes(data)
    out = ok(cli(root, "blob", "put", str(f)))
    assert out == f"sha256:{hashlib.sha256(data).hexdigest()}\n"
    with Engine.open(str(root)) as engine:  # really stored, in that root
        assert b"".join(engine.read(out.strip())) == data


def test_put_json_and_dedupe(root: Path, tmp_path: Path) -> None:
    f = tmp_path / "x"
    f.write_bytes(b"json me")
    first = json.loads(ok(cli(root, "blob", "put", "--json", str(f))))
    assert first == {"digest": digest_of(b"json me"), "size": 7, "created": True}
    again = json.loads(ok(cli(root, "blob", "put", "--json", str(f))))
    assert again == {**first, "created": False}


def test_put_sha512(root: Path, tmp_path: Path) -> None:
    f = tmp_path / "x"
    f.write_bytes(b"five twelve")
    assert ok(cli(root, "blob", "put", "--algorithm", "sha512", str(f))).strip() == \
        digest_of(b"five twelve", "sha512")


def test_put_from_stdin(root: Path) -> None:
    data = os.urandom(9 * MIB + 5)
    out = ok(cli(root, "blob", "put", "-", input=data))
    assert out.strip() == digest_of(data)
    assert ok(cli(root, "blob", "put", "--digest", digest_of(b""), "-", input=b"")).strip() == \
        digest_of(b"")


def test_put_with_the_right_digest(root: Path) -> None:
    data = b"right"
    assert ok(cli(root, "blob", "put", "--digest", digest_of(data), "-", input=data)).strip() == \
        digest_of(data)


def test_put_with_a_wrong_digest_stores_nothing(root: Path) -> None:
    data = os.urandom(100_000)
    wrong = digest_of(b"not this")
    err = one_line_error(cli(root, "blob", "put", "--digest", wrong, "-", input=data), 5)
    assert wrong in err and digest_of(data) in err
    one_line_error(cli(root, "blob", "stat", digest_of(data)), 3)
    one_line_error(cli(root, "blob", "stat", wrong), 3)
    assert json.loads(ok(cli(root, "blob", "ls", "--json"))) == []
    assert [p for p in (root / "blobs").rglob("*") if p.is_file()] == []
    assert os.listdir(root / ".tmp") == []


def test_get_round_trips(root: Path, tmp_path: Path) -> None:
    data = os.urandom(5 * MIB + 1)
    digest = ok(cli(root, "blob", "put", "-", input=data)).strip()
    out = tmp_path / "out.bin"
    assert ok(cli(root, "blob", "get", digest, "-o", str(out))) == ""
    assert out.read_bytes() == data
    to_stdout = cli(root, "blob", "get", digest)
    assert to_stdout.returncode == 0 and to_stdout.stdout == data


def test_get_unknown_writes_no_file(root: Path, tmp_path: Path) -> None:
    ok(cli(root, "blob", "put", "-", input=b"something"))
    out = tmp_path / "out.bin"
    err = one_line_error(cli(root, "blob", "get", digest_of(b"nope"), "-o", str(out)), 3)
    assert digest_of(b"nope") in err
    assert not out.exists()


def test_stat(root: Path) -> None:
    data = b"stat me" * 1000
    digest = ok(cli(root, "--compression", "never", "blob", "put", "-", input=data)).strip()
    record = json.loads(ok(cli(root, "blob", "stat", "--json", digest)))
    assert record["digest"] == digest
    assert record["size"] == record["stored_size"] == len(data)
    assert record["codec"] == "raw"
    assert record["created"] <= record["touched"]
    text = ok(cli(root, "blob", "stat", digest))
    assert f"digest: {digest}\n" in text and f"size: {len(data)}\n" in text
    import datetime

    when = datetime.datetime.fromtimestamp(record["created"], datetime.UTC)
    assert f"created: {when.isoformat(timespec='seconds')}\n" in text  # a time, not a float


def test_ls(root: Path) -> None:
    blobs = [b"one", b"two", b"three", b""]
    digests = [ok(cli(root, "blob", "put", "-", input=b)).strip() for b in blobs]
    listed = json.loads(ok(cli(root, "blob", "ls", "--json")))
    assert [r["digest"] for r in listed] == sorted(digests)
    sizes = {digest_of(b): len(b) for b in blobs}
    assert {r["digest"]: r["size"] for r in listed} == sizes
    lines = ok(cli(root, "blob", "ls")).splitlines()
    assert lines == [f"{d}\t{sizes[d]}" for d in sorted(digests)]


def test_rm(root: Path) -> None:
    digest = ok(cli(root, "blob", "put", "-", input=b"remove me")).strip()
    assert ok(cli(root, "blob", "rm", digest)) == ""
    err = one_line_error(cli(root, "blob", "rm", digest), 3)
    assert digest in err
    one_line_error(cli(root, "blob", "get", digest), 3)
    assert json.loads(ok(cli(root, "blob", "ls", "--json"))) == []


def test_rm_refuses_a_blob_repositories_link(root: Path) -> None:
    digest = ok(cli(root, "blob", "put", "-", input=b"a layer")).strip()
    with Engine.open(str(root)) as engine:
        Registry(engine).link("team/app", digest)
    err = one_line_error(cli(root, "blob", "rm", digest), 6)
    assert "team/app" in err and "--force" in err
    assert ok(cli(root, "blob", "get", digest)).encode() == b"a layer"
    assert ok(cli(root, "blob", "rm", "--force", digest)) == ""
    one_line_error(cli(root, "blob", "get", digest), 3)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_get_refuses_damaged_bytes(root: Path, tmp_path: Path, damage: str) -> None:
    data = os.urandom(300_000)
    digest = ok(cli(root, "--compression", "never", "blob", "put", "-", input=data)).strip()
    hexdigest = digest.split(":", 1)[1]
    stored = root / "blobs" / "sha256" / hexdigest[:2] / f"{hexdigest}.raw"
    damaged = bytearray(data)
    if damage == "flip":
        damaged[1234] ^= 1
    else:
        del damaged[100_000:]
    stored.write_bytes(damaged)
    out = tmp_path / "out.bin"
    err = one_line_error(cli(root, "blob", "get", digest, "-o", str(out)), 5)
    assert "damaged" in err and "check" in err
    assert not out.exists()
    run = cli(root, "blob", "get", digest)  # to stdout: written, then refused
    assert run.returncode == 5 and "not the blob" in run.stderr.decode()


def test_environment_names_the_root_and_the_index(tmp_path: Path) -> None:
    store, index = tmp_path / "env-store", tmp_path / "env-index"
    env = {"CASENGINE_ROOT": str(store)}
    digest = ok(run_cli(["blob", "put", "-"], cwd=tmp_path, input=b"env", env=env)).strip()
    assert (store / ".index").is_dir()
    assert not (tmp_path / "casengine-data").exists()  # not the default root
    assert ok(run_cli(["blob", "get", digest], cwd=tmp_path, env=env)) == "env"
    with Engine.open(str(store)) as engine:
        assert engine.exists(digest)
    # --root beats the environment
    one_line_error(run_cli(["--root", str(tmp_path / "other"), "blob", "get", digest],
                           cwd=tmp_path, env=env), 3)
    env2 = {"CASENGINE_ROOT": str(tmp_path / "s2"), "CASENGINE_INDEX": str(index)}
    d2 = ok(run_cli(["blob", "put", "-"], cwd=tmp_path, input=b"idx", env=env2)).strip()
    assert (index / "data.mdb").is_file()
    assert not (tmp_path / "s2" / ".index").exists()
    assert ok(run_cli(["--index", str(index), "--root", str(tmp_path / "s2"), "blob", "get",
                       d2], cwd=tmp_path)) == "idx"


def test_default_root_is_in_the_working_directory(tmp_path: Path) -> None:
    digest = ok(run_cli(["blob", "put", "-"], cwd=tmp_path, input=b"default")).strip()
    with Engine.open(str(tmp_path / "casengine-data")) as engine:
        assert engine.exists(digest)


@pytest.mark.parametrize(("command", "bad"), [
    (["blob", "stat"], "sha256:abc"),
    (["blob", "get"], "sha256:" + "A" * 64),
    (["blob", "rm"], "nonsense"),
    (["blob", "stat"], "md5:" + "0" * 32),
    (["blob", "put", "-", "--digest"], "sha256:" + "a" * 65),
])
def test_malformed_digest_exits_4(root: Path, command: list[str], bad: str) -> None:
    err = one_line_error(cli(root, *command, bad, input=b"x"), 4)
    assert repr(bad) in err
    assert not (root / "blobs").exists()


@pytest.mark.parametrize("command", [
    ["blob", "ls"], ["blob", "stat", "sha256:" + "0" * 64], ["usage"], ["repo", "ls"],
    ["uploads", "ls", "--json"], ["uploads", "purge"], ["gc"], ["reindex"], ["quota", "ls"],
])
def test_a_missing_root_is_not_made_by_commands_that_only_read_or_tidy(
        root: Path, command: list[str]) -> None:
    err = one_line_error(cli(root, *command), 3)
    assert f"no store at {root}" in err
    assert not root.exists()  # a mistyped --root stays visible, and no empty store appears


@pytest.mark.parametrize("command", [["repo", "create", "team/app"],
                                     ["quota", "set", "team/", "1G"]])
def test_commands_that_store_make_a_new_root(root: Path, command: list[str]) -> None:
    ok(cli(root, *command))
    assert root.is_dir()
    ok(cli(root, "usage"))


def test_remote_root_without_an_index_exits_8(tmp_path: Path) -> None:
    err = one_line_error(run_cli(["--root", "s3://bucket/x", "blob", "ls"], cwd=tmp_path), 8)
    assert "--index" in err


@pytest.mark.parametrize("url", ["nope://x", "definitely-not-a-scheme://bucket/prefix"])
def test_unknown_scheme_exits_8(tmp_path: Path, url: str) -> None:
    err = one_line_error(run_cli(["--root", url, "blob", "ls"], cwd=tmp_path), 8)
    assert "scheme" in err


@pytest.mark.parametrize(("args", "code"), [
    (["blob", "put", "{tmp}/no-such-file"], 3),
    (["blob", "get", "{digest}", "-o", "{tmp}/no-such-dir/out"], 3),
    (["--root", "{tmp}/a-file", "blob", "ls"], 8),  # a root that cannot be one: configuration
], ids=["put-missing-input", "get-into-missing-dir", "root-is-a-file"])
def test_bad_local_paths_are_clear_errors(root: Path, tmp_path: Path, args: list[str],
                                          code: int) -> None:
    digest = ok(cli(root, "blob", "put", "-", input=b"here")).strip()
    (tmp_path / "a-file").write_bytes(b"")
    args = [a.format(tmp=tmp_path, digest=digest) for a in args]
    one_line_error(cli(root, *args), code)


def test_reader_going_away_is_not_an_error(root: Path) -> None:
    digest = ok(cli(root, "blob", "put", "-", input=os.urandom(4 * MIB))).strip()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASENGINE_")}
    proc = subprocess.Popen([*casengine_command(), "--root", str(root), "blob", "get", digest],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    assert len(proc.stdout.read(10)) == 10
    proc.stdout.close()  # like '| head -c 10'
    assert proc.wait(timeout=60) == 0
    assert proc.stderr.read() == b""
    proc.stderr.close()


def test_purge_goes_on_past_staged_data_the_backend_fails_to_discard(root: Path) -> None:
    """Staged bytes that will not go are named, with exit 7, after the rest of the sweep
    (here the temp file of a dead writer), not instead of it; the next purge takes them."""
    with Engine.open(str(root)) as engine:
        ids = []
        for _ in range(2):
            s = engine.uploads.start("team/app")
            engine.uploads.append(s.id, b"x" * 1000, 0)
            engine.index.update_upload(s.id, lambda r: {**r, "updated": 1000.0})
            ids.append(s.id)
    dead_writer = root / ".tmp" / "left-by-a-kill"
    dead_writer.write_bytes(b"partial")
    os.utime(dead_writer, (1000.0, 1000.0))
    failing = f"faulty+file://{root}?eio=1&lost_reply=0&calls=discard"
    proc = subprocess.run(casengine_command() + ["--root", failing, "uploads", "purge",
                                                 "--older-than", "1h", "--json"],
                          capture_output=True, timeout=60, check=False)
    assert proc.returncode == 7, proc.stderr
    report = json.loads(proc.stdout)
    assert sorted(report["failed"]) == sorted(ids) and report["leftovers"] == 1, report
    assert not dead_writer.exists()
    assert all(i.encode() in proc.stderr for i in ids) and b"Traceback" not in proc.stderr
    with Engine.open(str(root)) as engine:
        assert sorted(k.split("/")[1] for k in engine.backend.list("uploads/")) == sorted(ids)
    ok(cli(root, "uploads", "purge", "--older-than", "0s"))  # now idle as long as asked
    with Engine.open(str(root)) as engine:
        assert list(engine.backend.list("uploads/")) == []


def test_usage_errors_exit_2(root: Path) -> None:
    proc = cli(root, "blob", "put")
    assert proc.returncode == 2 and b"Traceback" not in proc.stderr
    proc = cli(root, "blob", "frobnicate")
    assert proc.returncode == 2 and b"Traceback" not in proc.stderr
    proc = cli(root, "blob", "put", "--algorithm", "md5", "-", input=b"x")
    assert proc.returncode == 2 and b"Traceback" not in proc.stderr


def test_uploads_ls_and_purge(root: Path) -> None:
    with Engine.open(str(root)) as engine:
        old = engine.uploads.start("team/app")
        engine.uploads.append(old.id, b"x" * 1000, 0)
        aged = {**engine.index.get_upload(old.id), "updated": 1000.0}
        engine.index.update_upload(old.id, lambda _: aged)
        fresh = engine.uploads.start("team/app").id
    dead_writer = root / ".tmp" / "left-by-a-kill"
    dead_writer.write_bytes(b"partial")
    os.utime(dead_writer, (1000.0, 1000.0))
    listed = json.loads(ok(cli(root, "uploads", "ls", "--json")))
    assert sorted(s["id"] for s in listed) == sorted([old.id, fresh])
    dry = json.loads(ok(cli(root, "uploads", "purge", "--older-than", "1h", "--dry-run",
                            "--json")))
    assert (dry["ids"], dry["bytes"], dry["leftovers"]) == ([old.id], 1000, 0)
    assert dead_writer.exists()
    young_writer = root / ".tmp" / "a-push-in-progress"  # for all a purge can tell
    young_writer.write_bytes(b"partial")
    out = ok(cli(root, "uploads", "purge", "--older-than", "1h"))
    assert out.strip() == "purged 1 sessions, 1000 B; dropped 1 leftovers of dead writers"
    assert not dead_writer.exists() and young_writer.exists()
    assert [s["id"] for s in json.loads(ok(cli(root, "uploads", "ls", "--json")))] == [fresh]
    ok(cli(root, "uploads", "purge", "--older-than", "0s", "--writers-idle", "0s"))
    assert not young_writer.exists()  # the registry is stopped: nothing of it is live


@pytest.mark.parametrize("url", ["local", "memory://"])
def test_an_unknown_storage_option_is_a_configuration_error(tmp_path: Path, url: str) -> None:
    root = str(tmp_path) if url == "local" else url
    run = run_cli(["--root", root, "-o", "bogus=1", "blob", "ls"], cwd=tmp_path)
    err = one_line_error(run, 8)
    assert "unknown storage option bogus" in err


def test_ctrl_c_while_put_reads_a_silent_terminal_exits_130(tmp_path: Path) -> None:
    """The reader thread blocked on the terminal holds stdin's lock: the interpreter's
    shutdown used to abort on it (SIGABRT, 'Fatal Python error') instead of exiting 130."""
    import pty
    import signal
    import time

    main, tty = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASENGINE_")}
    proc = subprocess.Popen([*casengine_command(), "--root", str(tmp_path / "r"), "blob", "put",
                             "-"], stdin=tty, stderr=subprocess.PIPE, env=env)
    try:
        os.write(main, b"some bytes, then silence\n")
        time.sleep(1.0)  # started, and reading
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        os.close(main)
        os.close(tty)
    assert proc.returncode == 130, err
    assert err == b"casengine: interrupted\n"
