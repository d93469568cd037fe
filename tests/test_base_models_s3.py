"""Base models shared through object storage (jobs/shared_models.py): a part one host built is
fetched and verified by another instead of being built again; a part whose manifest is missing,
or whose files do not match it, is not there, and the host builds (and shares) its own."""

import shutil
import uuid
from dataclasses import replace

import pytest
from django.conf import settings

from engine import artifacts
from engine.base_models import tokenizer_folder
from engine.model_cache import part_key, prepare
from jobs.shared_models import S3SharedModels, part_prefix
from loft import storage
from tests.helpers import SMOLLM2


@pytest.fixture
def spec():
    """SmolLM2 at a revision of this test's own, so no other test's shared parts are seen."""
    return replace(SMOLLM2, revision=f"test-{uuid.uuid4().hex[:8]}")


class Builds:
    """A build of the tokenizer part (a copy of the one this run converted) that counts."""

    def __init__(self):
        self.converted = tokenizer_folder(SMOLLM2, settings.LOFT_HOME / "models")
        self.count = 0

    def __call__(self, folder):
        self.count += 1
        shutil.copytree(self.converted, folder, dirs_exist_ok=True)


@pytest.fixture
def build():
    return Builds()


def nothing_to_build(folder):
    raise AssertionError("a host built a part that was shared")


def test_a_part_built_on_one_host_is_fetched_and_verified_on_another(spec, build, tmp_path):
    store = S3SharedModels()
    first = prepare(spec, tmp_path / "first", "tokenizer", build, store)
    prefix = part_prefix(part_key(spec, "tokenizer"))
    manifest = artifacts.build_manifest(first)
    assert storage.get_bytes(f"{prefix}manifest.json")
    assert sorted(storage.list_keys(prefix)) == sorted(
        [f"{prefix}{name}" for name in manifest["files"]] + [f"{prefix}manifest.json"]
    )

    second = prepare(spec, tmp_path / "second", "tokenizer", nothing_to_build, store)
    assert build.count == 1
    assert second == tmp_path / "second" / part_key(spec, "tokenizer")
    assert artifacts.build_manifest(second) == manifest


def test_a_part_whose_object_was_changed_is_not_accepted_and_is_shared_again(spec, build, tmp_path):
    store = S3SharedModels()
    prepare(spec, tmp_path / "first", "tokenizer", build, store)
    prefix = part_prefix(part_key(spec, "tokenizer"))
    original = storage.get_bytes(f"{prefix}tokenizer.json")
    # The same size, one byte different: only the sha256 tells.
    storage.put_bytes(f"{prefix}tokenizer.json", original[:-1] + b"?")

    assert not store.fetch(part_key(spec, "tokenizer"), tmp_path / "fetched")
    prepare(spec, tmp_path / "second", "tokenizer", build, store)
    assert build.count == 2
    # The second host shared what it built over the damaged part: the next one fetches it.
    assert storage.get_bytes(f"{prefix}tokenizer.json") == original
    prepare(spec, tmp_path / "third", "tokenizer", nothing_to_build, store)


def test_a_part_without_its_manifest_does_not_exist(spec, build, tmp_path):
    store = S3SharedModels()
    prepare(spec, tmp_path / "first", "tokenizer", build, store)
    prefix = part_prefix(part_key(spec, "tokenizer"))
    storage.delete_object(f"{prefix}manifest.json")  # as if its host died before writing it

    assert not store.fetch(part_key(spec, "tokenizer"), tmp_path / "fetched")
    second = prepare(spec, tmp_path / "second", "tokenizer", build, store)
    assert build.count == 2
    assert sorted(path.name for path in second.iterdir()) == sorted(
        artifacts.build_manifest(second)["files"]
    )
    assert storage.get_bytes(f"{prefix}manifest.json")


def test_a_host_builds_the_part_itself_when_storage_does_not_answer(
    spec, build, tmp_path, settings
):
    settings.S3_ENDPOINT_URL = "http://127.0.0.1:9"  # nothing listens there
    storage.client.cache_clear()
    try:
        folder = prepare(spec, tmp_path / "alone", "tokenizer", build, S3SharedModels())
    finally:
        storage.client.cache_clear()
    assert build.count == 1 and (folder / "tokenizer.json").is_file()
