"""The ``casengine repo``, ``tag``, ``manifest``, ``usage`` and ``quota`` commands, run as
real subprocesses on a local root that the Python API prepared (and closed) first."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from casengine.engine import Engine
from casengine.errors import QuotaExceeded
from casengine.registry import Registry, usage
from tests.helpers import digest_of, ok, one_line_error, run_cli
from tests.registry_helpers import config, index, layer, oci_manifest, push

BASE = layer("base", 1000)
APP = oci_manifest(config("app"), [BASE, layer("app", 100)])
WEB = oci_manifest(config("web"), [BASE, layer("web", 200)])
TOOL = oci_manifest(config("tool"), [BASE])


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@contextmanager
def registry(root: Path) -> Iterator[Registry]:
    """The Python API on the same root; closed before any CLI process runs."""
    with Engine.open(str(root)) as engine:
        yield Registry(engine)


def cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cli(list(args), cwd=root.parent, env={"CASENGINE_ROOT": str(root)})


@pytest.fixture
def populated(root: Path) -> dict:
    """team/app (v1, latest), team/web (v1), other/tool (v1) sharing one base layer."""
    with registry(root) as reg:
        push(reg, "team/app", APP, "v1")
        reg.put_manifest("team/app", "latest", APP.content)
        push(reg, "team/web", WEB, "v1")
        push(reg, "other/tool", TOOL, "v1")
        report = usage(reg).to_json()
    return report


def test_repo_create_and_ls(root: Path) -> None:
    assert ok(cli(root, "repo", "create", "team/app")) == "created: team/app\n"
    assert ok(cli(root, "repo", "create", "team/app")) == "exists: team/app\n"
    ok(cli(root, "repo", "create", "other/x"))
    listed = json.loads(ok(cli(root, "repo", "ls", "--json")))
    assert [r["name"] for r in listed] == ["other/x", "team/app"]
    assert all(r["logical"] == 0 and r["created"] > 0 for r in listed)
    assert ok(cli(root, "repo", "ls")) == "other/x\nteam/app\n"
    assert ok(cli(root, "repo", "ls", "team/")) == "team/app\n"
    with registry(root) as reg:  # really there, for the API too
        assert list(reg.repositories()) == ["other/x", "team/app"]


@pytest.mark.parametrize("name", ["A", "../x", "a//b", "-a", "a" * 256])
def test_bad_names_exit_4_with_one_line(root: Path, name: str) -> None:
    err = one_line_error(cli(root, "repo", "create", "--", name), 4)  # '--': "-a" is no option
    assert "invalid repository name" in err
    shown = repr(name) if len(name) <= 80 else repr(name[:80] + "...")
    assert shown in err
    one_line_error(cli(root, "tag", "ls", "--", name), 4)
    assert json.loads(ok(cli(root, "repo", "ls", "--json"))) == []
    assert not (root / "repositories").exists() or not any((root / "repositories").iterdir())
    assert {p.name for p in root.parent.iterdir()} <= {"store"}  # nothing escaped the root


def test_bad_references_exit_4(root: Path, populated: dict) -> None:
    for ref in ("team/app", "Team/app:v1", "team/app:.v1", "team/app@sha256:abc"):
        one_line_error(cli(root, "manifest", "get", ref), 4)


def test_tag_ls(root: Path, populated: dict) -> None:
    assert ok(cli(root, "tag", "ls", "team/app")) == f"latest\t{APP.digest}\nv1\t{APP.digest}\n"
    assert json.loads(ok(cli(root, "tag", "ls", "--json", "team/app"))) == {
        "latest": APP.digest, "v1": APP.digest}
    ok(cli(root, "repo", "create", "team/empty"))
    assert ok(cli(root, "tag", "ls", "team/empty")) == ""
    assert json.loads(ok(cli(root, "tag", "ls", "--json", "team/empty"))) == {}
    err = one_line_error(cli(root, "tag", "ls", "team/nope"), 3)
    assert "team/nope" in err


def test_manifest_get(root: Path, populated: dict) -> None:
    out = cli(root, "manifest", "get", "team/app:v1")
    assert out.returncode == 0 and out.stderr == b""
    assert out.stdout == APP.content  # the exact bytes, nothing added
    assert cli(root, "manifest", "get", f"team/web@{WEB.digest}").stdout == WEB.content
    record = json.loads(ok(cli(root, "manifest", "get", "--json", f"team/app@{APP.digest}")))
    assert record == {
        "repository": "team/app", "digest": APP.digest,
        "media_type": "application/vnd.oci.image.manifest.v1+json", "size": APP.size,
        "refs": [b.digest for b in APP.blobs], "subject": None, "artifact_type": None}
    err = one_line_error(cli(root, "manifest", "get", "team/app:v2"), 3)
    assert "team/app:v2" in err
    one_line_error(cli(root, "manifest", "get", f"team/web@{APP.digest}"), 3)  # other repo's


def test_manifest_get_an_index(root: Path) -> None:
    multi = index([APP, WEB])
    with registry(root) as reg:
        push(reg, "team/multi", multi, "latest")
    assert cli(root, "manifest", "get", "team/multi:latest").stdout == multi.content
    record = json.loads(ok(cli(root, "manifest", "get", "--json", "team/multi:latest")))
    assert record["media_type"] == "application/vnd.oci.image.index.v1+json"
    assert record["refs"] == [APP.digest, WEB.digest]


def test_manifest_rm(root: Path, populated: dict) -> None:
    assert ok(cli(root, "manifest", "rm", "team/app:latest")) == f"deleted team/app@{APP.digest}\n"
    assert json.loads(ok(cli(root, "tag", "ls", "--json", "team/app"))) == {}  # v1 went too
    one_line_error(cli(root, "manifest", "get", f"team/app@{APP.digest}"), 3)
    one_line_error(cli(root, "manifest", "rm", f"team/app@{APP.digest}"), 3)
    with registry(root) as reg:
        assert reg.engine.exists(APP.digest)  # blobs stay until GC
    multi = index([WEB])
    with registry(root) as reg:
        push(reg, "team/web", multi, "multi")
    err = one_line_error(cli(root, "manifest", "rm", f"team/web@{WEB.digest}"), 6)
    assert "team/web" in err
    assert cli(root, "manifest", "get", "team/web:v1").stdout == WEB.content


def test_usage_json(root: Path, populated: dict) -> None:
    report = json.loads(ok(cli(root, "usage", "--json")))
    assert report == populated  # what the API computed before the engine was closed
    app = APP.size + sum(b.size for b in APP.blobs)
    web = WEB.size + sum(b.size for b in WEB.blobs)
    tool = TOOL.size + sum(b.size for b in TOOL.blobs)
    total = dict(report["total"])
    stored = total.pop("stored_bytes")  # compressed blobs count compressed
    assert total == {"name": "", "repositories": 3, "logical_bytes": app + web + tool,
                     "physical_bytes": app + web + tool - 2000, "shared_bytes": 2000}
    assert 0 < stored <= total["physical_bytes"]
    assert {n["name"]: (n["logical_bytes"], n["physical_bytes"], n["shared_bytes"])
            for n in report["namespaces"]} == {"other/": (tool, tool, 0),
                                               "team/": (app + web, app + web - 1000, 1000)}
    team = json.loads(ok(cli(root, "usage", "--json", "team/")))
    assert [r["name"] for r in team["repositories"]] == ["team/app", "team/web"]
    assert team["total"]["logical_bytes"] == app + web
    text = ok(cli(root, "usage"))
    assert "team/app" in text and "(all)" in text
    names = [line.split()[0] for line in ok(cli(root, "usage", "team/")).splitlines()[1:]]
    assert names == ["team/app", "team/web", "team/", "(all"]  # the total says it is one


def test_quota_set_ls_and_a_push_over_it(root: Path, populated: dict) -> None:
    team_used = next(n["logical_bytes"] for n in populated["namespaces"] if n["name"] == "team/")
    assert ok(cli(root, "quota", "set", "team/", "1K")) == ""
    assert json.loads(ok(cli(root, "quota", "ls", "--json"))) == {
        "team/": {"limit_bytes": 1024, "used_bytes": team_used, "over": team_used > 1024}}
    assert team_used > 1024  # set below what is stored: said so
    assert ok(cli(root, "quota", "ls")).startswith("team/\t") and "OVER" in ok(
        cli(root, "quota", "ls"))
    one_line_error(cli(root, "quota", "set", "team/", "lots"), 4)
    one_line_error(cli(root, "quota", "set", "Team/", "1G"), 4)  # no repository is named so
    assert "no quota on 'nobody/'" in one_line_error(cli(root, "quota", "rm", "nobody/"), 3)
    # no CLI command pushes into a repository: the push goes through the API
    assert QuotaExceeded.exit_code == 10
    with registry(root) as reg:
        assert reg.quotas.all() == {"team/": 1024}
        with pytest.raises(QuotaExceeded):
            reg.ingest_blob("team/app", b"one more byte")
        assert not reg.is_linked("team/app", digest_of(b"one more byte"))
        assert usage(reg).to_json() == populated
        reg.ingest_blob("other/tool", b"one more byte")  # not covered
    ok(cli(root, "quota", "set", "other/tool", "10M"))
    quotas = json.loads(ok(cli(root, "quota", "ls", "--json")))
    assert quotas["other/tool"]["limit_bytes"] == 10 << 20
    ok(cli(root, "quota", "rm", "team/"))
    assert list(json.loads(ok(cli(root, "quota", "ls", "--json")))) == ["other/tool"]
    with registry(root) as reg:
        reg.ingest_blob("team/app", b"one more byte")  # no quota any more


def test_tag_rm_and_repo_rm(root: Path, populated: dict) -> None:
    assert ok(cli(root, "tag", "rm", "team/app:latest")) == ""
    assert json.loads(ok(cli(root, "tag", "ls", "--json", "team/app"))) == {"v1": APP.digest}
    one_line_error(cli(root, "tag", "rm", "team/app:latest"), 3)
    assert cli(root, "manifest", "get", f"team/app@{APP.digest}").stdout == APP.content
    err = one_line_error(run_cli(["repo", "rm", "team/web"], cwd=root.parent, input=b"",
                                 env={"CASENGINE_ROOT": str(root)}), 2)  # stdin: a pipe
    assert "--yes" in err
    assert "team/web" in [r["name"] for r in json.loads(ok(cli(root, "repo", "ls", "--json")))]
    ok(cli(root, "repo", "rm", "--yes", "team/web"))
    assert [r["name"] for r in json.loads(ok(cli(root, "repo", "ls", "--json")))] == [
        "other/tool", "team/app"]
    one_line_error(cli(root, "repo", "rm", "--yes", "team/web"), 3)
    with registry(root) as reg:
        assert reg.engine.exists(WEB.digest)  # blobs stay until GC
        assert list(reg.engine.backend.list("repositories/team/web/")) == []
