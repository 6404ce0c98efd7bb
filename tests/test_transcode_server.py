"""``serve --transcode-on-push``'s worker, driven directly (the skopeo test drives it
through a real server): what it converts, what it leaves alone, and how it fails."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from casengine.engine import Engine
from casengine.http.server import TranscodeOnPush
from casengine.registry import Registry, parse_manifest
from casengine.transcode import made_by_transcode
from tests.interop import images
from tests.test_transcode import gz, image_of, load


@pytest.fixture
def registry(tmp_path: Path):
    with Engine.open(str(tmp_path / "root")) as engine:
        yield Registry(engine)


def pushed(registry: Registry, repo: str, tag: str):
    data, record = registry.get_manifest(repo, tag)
    return parse_manifest(data, record.media_type)


def settle(worker: TranscodeOnPush) -> None:
    assert worker.wait(60), "the worker did not finish its jobs in 60 s"


def test_converts_tag_pushes_only(registry: Registry, tmp_path: Path) -> None:
    image = images.single_image(tmp_path / "src")
    load(registry, image.layout, image.digest, "team/app", "v1")
    load(registry, image.layout, image.digest, "team/app", "v2-zstd")
    worker = TranscodeOnPush(registry, "zstd", 3)
    try:
        manifest = pushed(registry, "team/app", "v1")
        worker("team/app", image.digest, manifest)  # by digest: an index's child
        worker("team/app", "v2-zstd", manifest)  # looks converted: never again
        worker("team/app", "v1", manifest)
        settle(worker)
    finally:
        worker.close()
    tags = registry.tag_map("team/app")
    assert sorted(tags) == ["v1", "v1-zstd", "v2-zstd"]
    assert tags["v1"] == tags["v2-zstd"] == image.digest
    assert made_by_transcode(registry, "team/app", "v1-zstd")


def test_leaves_a_clients_own_zstd_tag_alone(registry: Registry, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    image = images.single_image(tmp_path / "src")
    other = images.zstd_image(tmp_path / "other")
    load(registry, image.layout, image.digest, "team/app", "v1")
    load(registry, other.layout, other.digest, "team/app", "v1-zstd")
    worker = TranscodeOnPush(registry, "zstd", 3)
    with caplog.at_level(logging.WARNING, logger="casengine.http"):
        worker("team/app", "v1", pushed(registry, "team/app", "v1"))
        settle(worker)
        worker.close()
    assert registry.tag_map("team/app") == {"v1": image.digest, "v1-zstd": other.digest}
    assert "v1-zstd was pushed by a client" in caplog.text


def test_errors_are_logged_and_the_worker_goes_on(registry: Registry, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    small = images.tar_bytes({"a": b"a" * 10_000})
    bad = image_of(tmp_path / "bad", [(gz(small)[:-30], images.LAYER_GZIP)],
                   diff_ids=[images.sha256(small)])
    load(registry, tmp_path / "bad", bad["digest"], "team/bad", "v1")
    image = images.single_image(tmp_path / "src")
    load(registry, image.layout, image.digest, "team/app", "v1")
    worker = TranscodeOnPush(registry, "zstd", 3)
    with caplog.at_level(logging.ERROR, logger="casengine.http"):
        worker("team/bad", "v1", pushed(registry, "team/bad", "v1"))
        worker("team/app", "v1", pushed(registry, "team/app", "v1"))
        settle(worker)
        worker.close()
    assert registry.tag_map("team/bad") == {"v1": bad["digest"]}
    assert "transcode of team/bad:v1" in caplog.text and "truncated" in caplog.text
    assert "Traceback" not in caplog.text
    assert "v1-zstd" in registry.tag_map("team/app")


def test_a_full_queue_drops_the_job_with_a_warning(registry: Registry, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    image = images.single_image(tmp_path / "src")
    load(registry, image.layout, image.digest, "team/app", "v1")
    worker = TranscodeOnPush(registry, "zstd", 3, depth=1)
    worker.close()  # no one takes jobs now
    manifest = pushed(registry, "team/app", "v1")
    with caplog.at_level(logging.WARNING, logger="casengine.http"):
        worker("team/app", "v1", manifest)
        worker("team/app", "v2", manifest)
    assert "transcode queue full: team/app:v2 is not converted" in caplog.text


def test_a_conversion_of_an_image_the_tag_moved_off_is_not_tagged(
        registry: Registry, tmp_path: Path) -> None:
    """Two pushes of one tag, converted in turn (or by two workers): the conversion of the
    older image may finish last, and must not take the alias from the newer one's."""
    old = images.single_image(tmp_path / "old")
    new, _ = images.multi_platform(tmp_path / "new")
    load(registry, old.layout, old.digest, "team/app", "v1")
    old_manifest = pushed(registry, "team/app", "v1")
    load(registry, new.layout, new.digest, "team/app", "v1")  # the tag moves on
    worker = TranscodeOnPush(registry, "zstd", 3)
    try:
        worker("team/app", "v1", old_manifest)  # the older push's job, run late
        settle(worker)
        assert "v1-zstd" not in registry.tag_map("team/app")
        worker("team/app", "v1", pushed(registry, "team/app", "v1"))
        settle(worker)
        converted = registry.tag_map("team/app")["v1-zstd"]
        worker("team/app", "v1", old_manifest)  # and once more, after the newer one's
        settle(worker)
    finally:
        worker.close()
    assert registry.tag_map("team/app")["v1-zstd"] == converted
    assert made_by_transcode(registry, "team/app", "v1-zstd")
    _, record = registry.get_manifest("team/app", "v1-zstd")
    assert record.media_type == pushed(registry, "team/app", "v1").media_type  # new's: an index
