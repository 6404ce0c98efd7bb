"""The credentials file (casengine/credentials.py) and ``casengine auth``.

Grants are parsed strictly and matched as documented (``*`` crosses slashes); secrets are
stored only as salted scrypt hashes in a 0600 file written atomically; a check for an unknown
user does the same scrypt work as one for a known user with a wrong secret, and the final
comparison is constant-time; the CLI prints a new secret once, as the last line of stdout,
and refuses bad input with one line and a documented exit code, leaving the file untouched.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
import time
from pathlib import Path

import pytest

import casengine.credentials as credentials_module
from casengine.credentials import (
    Credentials,
    Grant,
    allowed,
    hash_secret,
    verify_secret,
)
from casengine.errors import ConfigError, Conflict, InvalidInput, NotFound
from tests.helpers import run_cli

# -- grants ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "pattern", "actions"), [
    ("team/project/*:pull,push", "team/project/*", {"pull", "push"}),
    ("team/*:pull", "team/*", {"pull"}),
    ("team/app:delete", "team/app", {"delete"}),
    ("team/app:push, pull ,delete", "team/app", {"pull", "push", "delete"}),
    ("*:pull", "*", {"pull"}),
    ("a.b/c-d_e/*:pull", "a.b/c-d_e/*", {"pull"}),
])
def test_grant_parses(text: str, pattern: str, actions: set[str]) -> None:
    grant = Grant.parse(text)
    assert grant.pattern == pattern
    assert grant.actions == frozenset(actions)
    assert Grant.parse(str(grant)) == grant  # the file's form parses back to the same grant


def test_grant_str_is_canonical() -> None:
    assert str(Grant.parse("team/*:delete,push,pull")) == "team/*:pull,push,delete"


@pytest.mark.parametrize("text", [
    "team/*",                 # no actions at all
    "team/*:",                # an empty action list
    "team/*: , ",             # only blanks
    "team/*:pull,fly",        # an unknown action
    "team/*:PULL",            # actions are lower case
    "team/*:*",               # no wildcard action
    ":pull",                  # no pattern
    "Team/*:pull",            # upper case is not a repository name
    "/team/*:pull",           # a leading slash
    "team/[ab]:pull",         # only * is a wildcard
    "team/?:pull",
    "team/* :pull",           # a blank in the pattern
    "team/*:pull:push",       # a colon in the pattern
    "",
])
def test_bad_grants_are_refused(text: str) -> None:
    with pytest.raises(InvalidInput, match="invalid grant"):
        Grant.parse(text)


@pytest.mark.parametrize(("pattern", "repository", "covered"), [
    ("team/*", "team/a", True),
    ("team/*", "team/a/b", True),          # * crosses slashes
    ("team/*", "team/a/b/c", True),
    ("team/*", "teamx/a", False),          # the slash is part of the pattern
    ("team/*", "team", False),
    ("team/*", "other/team/a", False),     # anchored at the start
    ("team/project/*", "team/project/x", True),
    ("team/project/*", "team/projectx/y", False),
    ("team/project/*", "team/other", False),
    ("team/app", "team/app", True),        # an exact name covers that name only
    ("team/app", "team/app/x", False),
    ("team/app", "team/ap", False),
    ("team/app", "team/appx", False),
    ("team/app", "xteam/app", False),
    ("*", "anything/at/all", True),
    ("team/*/ci", "team/a/ci", True),
    ("team/*/ci", "team/a/cd", False),
])
def test_pattern_matching(pattern: str, repository: str, covered: bool) -> None:
    assert Grant.parse(f"{pattern}:pull").covers(repository) is covered


def test_allowed_is_the_union_of_the_covering_grants() -> None:
    grants = [Grant.parse(g) for g in
              ("team/*:pull", "team/app:push", "team/app/ci:delete", "other/x:pull,delete")]
    assert allowed(grants, "team/app") == {"pull", "push"}
    assert allowed(grants, "team/app/ci") == {"pull", "delete"}
    assert allowed(grants, "team/web") == {"pull"}
    assert allowed(grants, "other/x") == {"pull", "delete"}
    assert allowed(grants, "other/y") == frozenset()
    assert allowed(grants, "teamx/app") == frozenset()
    assert allowed([], "team/app") == frozenset()


# -- hashing --------------------------------------------------------------------------------


def test_hash_verify_round_trip() -> None:
    stored = hash_secret("s3cret")
    assert verify_secret("s3cret", stored)
    assert not verify_secret("s3cret ", stored)
    assert not verify_secret("S3cret", stored)
    assert not verify_secret("", stored)
    assert "s3cret" not in stored


def test_hash_format_and_fresh_salt_per_hash() -> None:
    a, b = hash_secret("same"), hash_secret("same")
    scheme, n, r, p, salt_a, hash_a = a.split("$")
    assert (scheme, n, r, p) == ("scrypt", "16384", "8", "1")
    _, _, _, _, salt_b, hash_b = b.split("$")
    assert salt_a != salt_b and hash_a != hash_b
    assert verify_secret("same", a) and verify_secret("same", b)


@pytest.mark.parametrize("stored", [
    "", "garbage", "bcrypt$1$2$3$4$5", "scrypt$x$8$1$AAAA$AAAA", "scrypt$16384$8$1$!!$AAAA",
    "scrypt$16384$8$1", "scrypt$16384$8$1$a$b$c",
])
def test_malformed_stored_hash_never_verifies(stored: str) -> None:
    assert verify_secret("anything", stored) is False


@pytest.mark.parametrize("params", ["1024$8$10401", "16384$8$17", "1048576$8$1", "16384$0$1"])
def test_stored_hash_of_excessive_cost_is_refused_unhashed(
        params: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by the atheris fuzzer: p=10401 made one verification take minutes. Such a
    hash is refused before scrypt runs at all."""
    def no_scrypt(*args: object, **kwargs: object) -> bytes:
        raise AssertionError(f"scrypt ran for {params}")

    monkeypatch.setattr(credentials_module.hashlib, "scrypt", no_scrypt)
    assert verify_secret("x", f"scrypt${params}$AAAA$AAAA") is False


# -- the file ----------------------------------------------------------------------------


def test_secret_is_never_written_and_the_file_is_0600(tmp_path: Path) -> None:
    path = tmp_path / "creds.json"
    creds = Credentials.load(str(path), missing_ok=True)
    old_umask = os.umask(0)  # even a permissive umask gives a private file
    try:
        secret = creds.add("alice", [Grant.parse("team/*:pull,push")])
        creds.save()
    finally:
        os.umask(old_umask)
    raw = path.read_bytes()
    assert secret.encode() not in raw
    assert len(secret) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(raw)
    assert doc["users"]["alice"]["grants"] == ["team/*:pull,push"]
    assert doc["users"]["alice"]["secret"].startswith("scrypt$")
    assert [p.name for p in tmp_path.iterdir()] == ["creds.json"]  # no temp file left

    again = Credentials.load(str(path))
    assert again.check("alice", secret) is not None
    secret2 = again.rotate("alice")
    again.save()
    raw2 = path.read_bytes()
    assert secret.encode() not in raw2 and secret2.encode() not in raw2
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_save_replaces_the_file_atomically(tmp_path: Path) -> None:
    path = tmp_path / "creds.json"
    creds = Credentials.load(str(path), missing_ok=True)
    creds.add("alice", [Grant.parse("team/*:pull")])
    creds.save()
    before = path.read_bytes()
    os.link(path, tmp_path / "old-inode")  # a reader holding the old file

    creds.add("bob", [Grant.parse("other/*:pull")])
    creds.save()
    # a new file renamed over the old one: the old inode still holds the old document whole
    assert (tmp_path / "old-inode").read_bytes() == before
    assert set(json.loads(path.read_bytes())["users"]) == {"alice", "bob"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["creds.json", "old-inode"]


@pytest.mark.parametrize("where", ["write", "rename"])
def test_a_failed_save_leaves_the_old_file_and_no_temp(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       where: str) -> None:
    path = tmp_path / "creds.json"
    creds = Credentials.load(str(path), missing_ok=True)
    creds.add("alice", [Grant.parse("team/*:pull")])
    creds.save()
    before = path.read_bytes()

    creds.add("bob", [Grant.parse("other/*:pull")])
    if where == "write":
        def half_dump(obj, f, **kw):  # writes part of the document, then the disk fills
            f.write(json.dumps(obj, **kw)[:20])
            raise OSError(28, "No space left on device (injected)")

        monkeypatch.setattr(credentials_module.json, "dump", half_dump)
    else:
        def no_replace(src, dst):
            raise OSError(5, "Input/output error (injected)")

        monkeypatch.setattr(credentials_module.os, "replace", no_replace)
    with pytest.raises(OSError, match="injected"):
        creds.save()
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["creds.json"]


def test_load_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(ConfigError, match="does not exist"):
        Credentials.load(str(missing))
    assert Credentials.load(str(missing), missing_ok=True).users == {}
    assert not missing.exists()

    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        Credentials.load(str(bad_json))

    bad_grant = tmp_path / "grant.json"
    bad_grant.write_text(json.dumps({"version": 1, "users": {"a": {
        "secret": hash_secret("x"), "grants": ["team/*:fly"]}}}))
    with pytest.raises(ConfigError, match="malformed"):
        Credentials.load(str(bad_grant))


def test_add_rotate_remove(tmp_path: Path) -> None:
    creds = Credentials.load(str(tmp_path / "c.json"), missing_ok=True)
    secret = creds.add("alice", [Grant.parse("team/*:pull,push")])
    with pytest.raises(Conflict, match="exists"):
        creds.add("alice", [Grant.parse("x/*:pull")])
    assert creds.users["alice"].grants == [Grant.parse("team/*:pull,push")]  # unchanged
    for bad in ("", "-alice", "al ice", "al/ice", "a" * 200, "al:ice"):
        with pytest.raises(InvalidInput, match="invalid user name"):
            creds.add(bad, [Grant.parse("x/*:pull")])

    new = creds.rotate("alice")
    assert new != secret
    assert creds.check("alice", secret) is None
    assert creds.check("alice", new).name == "alice"

    creds.remove("alice")
    assert creds.check("alice", new) is None
    with pytest.raises(NotFound):
        creds.remove("alice")
    with pytest.raises(NotFound):
        creds.rotate("alice")


# -- the check: the same work for everyone, a constant-time comparison -------------------------


@pytest.fixture(scope="module")
def known() -> tuple[Credentials, str]:
    creds = Credentials("unused.json")
    secret = creds.add("alice", [Grant.parse("team/*:pull")])
    return creds, secret


def _count_calls(monkeypatch: pytest.MonkeyPatch, module, name: str) -> list[dict]:
    real = getattr(module, name)
    calls: list[dict] = []

    def wrapper(*args, **kwargs):
        calls.append({"args": args, "kwargs": kwargs})
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


@pytest.mark.parametrize("case", ["right", "wrong", "unknown"])
def test_check_does_one_scrypt_and_one_constant_time_compare(
        known: tuple[Credentials, str], monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    creds, secret = known
    scrypt = _count_calls(monkeypatch, hashlib, "scrypt")
    compare = _count_calls(monkeypatch, hmac, "compare_digest")
    name, given = {"right": ("alice", secret), "wrong": ("alice", secret + "x"),
                   "unknown": ("mallory", secret)}[case]
    user = creds.check(name, given)
    assert (user is not None) is (case == "right")
    assert len(scrypt) == 1, scrypt
    # the same cost parameters whether or not the user exists
    assert {k: v for k, v in scrypt[0]["kwargs"].items() if k != "salt"} == \
        {"n": 1 << 14, "r": 8, "p": 1, "dklen": 32}
    assert len(compare) == 1
    assert all(isinstance(a, bytes) and len(a) == 32 for a in compare[0]["args"])


def test_check_unknown_and_wrong_cost_the_same_time(known: tuple[Credentials, str]) -> None:
    creds, secret = known

    def best(fn, rounds: int = 5) -> float:
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    unknown = best(lambda: creds.check("mallory", secret))
    wrong = best(lambda: creds.check("alice", secret + "x"))
    trivial = best(lambda: hmac.compare_digest(b"a" * 32, b"b" * 32), rounds=100)
    assert 1 / 3 < unknown / wrong < 3, (unknown, wrong)
    assert min(unknown, wrong) > 100 * trivial, (unknown, wrong, trivial)
    assert min(unknown, wrong) > 0.002  # scrypt at N=2**14 is milliseconds, not microseconds


# -- the CLI ------------------------------------------------------------------------------


def auth(tmp_path: Path, *args: str):
    return run_cli(["auth", *args], cwd=tmp_path)


def one_error_line(result) -> str:
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("casengine: error:"), lines
    assert "Traceback" not in result.stderr.decode()
    return lines[0]


def test_cli_add_prints_the_secret_last_and_ls_never_shows_it(tmp_path: Path) -> None:
    f = str(tmp_path / "creds.json")
    r = auth(tmp_path, "add", "--file", f, "alice", "--grant", "team/project/*:pull,push",
             "--grant", "team/shared:pull")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode().splitlines()
    secret = out[-1].strip()
    assert len(secret) >= 32 and " " not in secret
    assert "alice" in r.stderr.decode()
    creds = Credentials.load(f)
    assert creds.check("alice", secret) is not None
    assert [str(g) for g in creds.users["alice"].grants] == \
        ["team/project/*:pull,push", "team/shared:pull"]
    assert secret.encode() not in Path(f).read_bytes()
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600

    r = auth(tmp_path, "add", "--file", f, "--anonymous", "--grant", "public/*:pull")
    assert r.returncode == 0, r.stderr

    r = auth(tmp_path, "ls", "--file", f, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["anonymous"] == ["public/*:pull"]
    assert [u["user"] for u in doc["users"]] == ["alice"]
    assert doc["users"][0]["grants"] == ["team/project/*:pull,push", "team/shared:pull"]
    assert "secret" not in doc["users"][0]
    stored = creds.users["alice"].secret_hash
    for text in (r.stdout, r.stderr):
        assert secret.encode() not in text and stored.encode() not in text
        assert b"scrypt" not in text

    r = auth(tmp_path, "ls", "--file", f)
    assert r.returncode == 0
    assert "alice\tteam/project/*:pull,push team/shared:pull" in r.stdout.decode()
    assert secret.encode() not in r.stdout and b"scrypt" not in r.stdout


def test_cli_rotate_and_rm(tmp_path: Path) -> None:
    f = str(tmp_path / "creds.json")
    old = auth(tmp_path, "add", "--file", f, "bob", "--grant", "other/*:pull").stdout \
        .decode().splitlines()[-1]
    r = auth(tmp_path, "rotate", "--file", f, "bob")
    assert r.returncode == 0, r.stderr
    new = r.stdout.decode().splitlines()[-1]
    assert new != old
    creds = Credentials.load(f)
    assert creds.check("bob", old) is None
    assert creds.check("bob", new) is not None
    assert old.encode() not in Path(f).read_bytes() and new.encode() not in Path(f).read_bytes()

    r = auth(tmp_path, "rm", "--file", f, "bob")
    assert r.returncode == 0, r.stderr
    assert Credentials.load(f).users == {}
    r = auth(tmp_path, "rm", "--file", f, "bob")
    assert r.returncode == 3
    assert "bob" in one_error_line(r)
    r = auth(tmp_path, "rotate", "--file", f, "bob")
    assert r.returncode == 3
    assert "bob" in one_error_line(r)


@pytest.mark.parametrize("grant", ["team/*", "team/*:pull,fly", "Team/*:pull", "team/*:"])
def test_cli_bad_grant_exits_4_with_one_line(tmp_path: Path, grant: str) -> None:
    f = tmp_path / "creds.json"
    r = auth(tmp_path, "add", "--file", str(f), "alice", "--grant", grant)
    assert r.returncode == 4, r.stderr
    assert "invalid grant" in one_error_line(r)
    assert r.stdout == b""
    assert not f.exists()  # nothing written


def test_cli_refusals_leave_the_file_as_it_was(tmp_path: Path) -> None:
    f = tmp_path / "creds.json"
    first = auth(tmp_path, "add", "--file", str(f), "alice", "--grant", "team/*:pull")
    assert first.returncode == 0
    secret = first.stdout.decode().splitlines()[-1]
    before = f.read_bytes()

    r = auth(tmp_path, "add", "--file", str(f), "alice", "--grant", "other/*:pull,push")
    assert r.returncode == 6  # a conflict, as the README's table says
    line = one_error_line(r)
    assert "alice" in line and "exists" in line and "rotate" in line
    assert r.stdout == b""

    r = auth(tmp_path, "add", "--file", str(f), "--anonymous", "--grant", "public/*:pull,push")
    assert r.returncode == 4
    assert "pull" in one_error_line(r)
    r = auth(tmp_path, "add", "--file", str(f), "--anonymous", "--grant", "public/*:delete")
    assert r.returncode == 4
    one_error_line(r)

    r = auth(tmp_path, "add", "--file", str(f), "carol")  # no --grant: a usage error
    assert r.returncode == 2
    assert "--grant" in r.stderr.decode() and "Traceback" not in r.stderr.decode()

    assert f.read_bytes() == before
    creds = Credentials.load(str(f))
    assert creds.anonymous == []
    assert creds.check("alice", secret) is not None


def test_cli_ls_of_a_missing_file_is_one_line(tmp_path: Path) -> None:
    r = auth(tmp_path, "ls", "--file", str(tmp_path / "nope.json"))
    assert r.returncode == 8
    assert "does not exist" in one_error_line(r)


def test_cli_concurrent_edits_are_serialised(tmp_path: Path) -> None:
    """Parallel ``auth add``/``rm``/``rotate`` processes each load, change and save the
    file: without a lock held from load to save, the last writer's stale copy wins, so
    adds vanish and a removed (leaked) user comes back."""
    import subprocess

    from tests.helpers import casengine_command

    f = tmp_path / "creds.json"
    assert auth(tmp_path, "add", "--file", str(f), "leaked", "--grant", "*:pull,push").returncode == 0
    assert auth(tmp_path, "add", "--file", str(f), "ci", "--grant", "ci/*:pull").returncode == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASENGINE_")}

    def start(*args: str) -> subprocess.Popen:
        return subprocess.Popen([*casengine_command(), "auth", *args, "--file", str(f)],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)

    adds = {f"user{i}": start("add", f"user{i}", "--grant", "team/*:pull") for i in range(8)}
    others = [start("rm", "leaked"), start("rotate", "ci")]
    out = {}
    for name, p in [*adds.items(), ("rm", others[0]), ("rotate", others[1])]:
        stdout, stderr = p.communicate(timeout=30)
        assert p.returncode == 0, (name, stderr)
        out[name] = stdout.decode().splitlines()[-1] if stdout else ""

    creds = Credentials.load(str(f))
    assert set(creds.users) == {"ci", *adds}
    for name in adds:
        assert creds.check(name, out[name]) is not None, name
    assert creds.check("ci", out["rotate"]) is not None
    assert not list(tmp_path.glob(".credentials-*"))  # no temp file left behind


@pytest.mark.parametrize("entry", [
    {"secret": None, "grants": ["team/*:pull"]},
    {"secret": 12, "grants": ["team/*:pull"]},
    {"secret": "plaintext", "grants": ["team/*:pull"]},
    {"secret": "scrypt$1024$8$10401$AAAA$AAAA", "grants": ["team/*:pull"]},  # cost
    {"secret": "scrypt$16384$8$1$!!$AAAA", "grants": ["team/*:pull"]},
    {"secret": "<hash>", "grants": "team/*:pull"},  # one string, not a list
    {"secret": "<hash>", "grants": ["team/*:pull"], "created": "yesterday"},
])
def test_a_malformed_user_entry_is_a_load_error(tmp_path: Path, entry: dict) -> None:
    """Found by the auth sweep: ``"secret": null`` loaded fine, then every login of the user
    raised inside verify_secret (a 500 with a traceback per request)."""
    entry = {k: hash_secret("x") if v == "<hash>" else v for k, v in entry.items()}
    path = tmp_path / "creds.json"
    path.write_text(json.dumps({"version": 1, "users": {"ci": entry}}))
    with pytest.raises(ConfigError, match="malformed.*ci"):
        Credentials.load(str(path))


def test_cli_add_into_a_missing_directory_says_which(tmp_path: Path) -> None:
    f = tmp_path / "no" / "such" / "creds.json"
    r = auth(tmp_path, "add", "--file", str(f), "alice", "--grant", "team/*:pull")
    assert r.returncode == 3
    line = one_error_line(r)
    assert f"no directory {f.parent}" in line and ".credentials-" not in line


def test_a_flood_of_wrong_passwords_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each check costs ~40 ms and 16 MiB of scrypt: at most SCRYPT_AT_ONCE run at once,
    and beyond SCRYPT_QUEUE running or waiting the answer is Busy (HTTP 429), so a flood
    fills neither memory nor the server's threads."""
    import hashlib
    import threading

    from casengine import credentials
    from casengine.errors import Busy

    stored = hash_secret("right")
    running, peak, lock = [0], [0], threading.Lock()
    real = hashlib.scrypt

    def counted(*args: object, **kwargs: object) -> bytes:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(credentials.hashlib, "scrypt", counted)
    outcomes: list[object] = []
    start = threading.Barrier(40)

    def login() -> None:
        start.wait()
        try:
            outcomes.append(verify_secret("wrong", stored))
        except Busy:
            outcomes.append("busy")

    threads = [threading.Thread(target=login) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert peak[0] <= credentials.SCRYPT_AT_ONCE
    assert outcomes.count("busy") >= 40 - credentials.SCRYPT_QUEUE
    assert set(outcomes) <= {False, "busy"}
    assert verify_secret("right", stored)  # and the slots are all given back
