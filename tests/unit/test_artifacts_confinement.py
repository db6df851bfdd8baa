"""get_dir / put_dir never write or read outside their directories, whatever the keys say.

S3 keys are arbitrary strings ("a//b", "a/../b", "/etc/x" are all valid keys), so the
download side is tried with a store whose listing is hostile. The store is a real
``ArtifactStore`` held in a dict: ``get_dir`` is the base class's, the code under test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kubeml.artifacts import ArtifactStore, FileStore
from kubeml.errors import ArtifactError


class DictStore(ArtifactStore):
    """Keys exactly as given (no cleaning), as an S3 bucket holds them."""

    uri = "mem://bucket"

    def __init__(self, objects: dict[str, bytes]):
        self.objects = dict(objects)

    def put_bytes(self, key: str, data: bytes) -> str:
        self.objects[key] = data
        return self.url(key)

    def get_bytes(self, key: str) -> bytes:
        return self.objects[key]

    def exists(self, key: str) -> bool:
        return key in self.objects

    def list(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self.objects if k.startswith(prefix.rstrip("/") + "/"))

    def delete(self, prefix: str) -> int:
        raise NotImplementedError


HOSTILE = [
    "models/b//tmp/escaped",
    "models/b/../../escaped",
    "models/b/a/../../../escaped",
    "models/b/./escaped",
    "models/b/x/",
]


@pytest.mark.parametrize("key", HOSTILE)
def test_get_dir_refuses_a_hostile_key_and_writes_nothing(tmp_path: Path, key: str):
    dest = tmp_path / "out" / "bundle"
    store = DictStore({"models/b/model.safetensors": b"w", key: b"attacker"})
    with pytest.raises(ArtifactError, match="refusing to download"):
        store.get_dir("models/b", dest)
    assert not dest.exists()  # checked before the first byte: not even the good file
    written = {p.relative_to(tmp_path) for p in tmp_path.rglob("*")}
    assert written <= {Path("out")}, written


def test_get_dir_does_not_follow_a_link_out_of_the_destination(tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "bundle"
    dest.mkdir()
    os.symlink(outside, dest / "sub")
    store = DictStore({"models/b/sub/payload": b"attacker"})
    with pytest.raises(ArtifactError, match="leads outside"):
        store.get_dir("models/b", dest)
    assert list(outside.iterdir()) == []


def test_get_dir_replaces_a_link_at_the_target_instead_of_writing_through_it(tmp_path: Path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    dest = tmp_path / "bundle"
    dest.mkdir()
    inside = dest / "real"
    inside.write_text("old")
    os.symlink(inside, dest / "spec.json")  # points inside: allowed, but replaced, not followed
    DictStore({"models/b/spec.json": b"new"}).get_dir("models/b", dest)
    assert not (dest / "spec.json").is_symlink() and (dest / "spec.json").read_bytes() == b"new"
    assert inside.read_text() == "old" and victim.read_text() == "keep"


def test_put_dir_refuses_a_directory_with_links(tmp_path: Path):
    secret = tmp_path / "secret"
    secret.write_text("token")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "model.safetensors").write_bytes(b"w")
    os.symlink(secret, bundle / "kubeml-model.json")
    store = FileStore(tmp_path / "store")
    with pytest.raises(ArtifactError, match="symbolic links"):
        store.put_dir("models/b", bundle)
    assert store.list("models") == []


def test_a_plain_bundle_still_round_trips(tmp_path: Path):
    store = DictStore({"models/b/model.safetensors": b"w", "models/b/nested/spec.json": b"{}"})
    out = store.get_dir("models/b", tmp_path / "out")
    assert (out / "model.safetensors").read_bytes() == b"w" and (out / "nested" / "spec.json").read_bytes() == b"{}"
