from pathlib import Path

import pytest

from kubeml.artifacts import FileStore, open_store
from kubeml.errors import ArtifactError, ArtifactNotFound, ConfigError


def exercise_store(store):
    """Behaviour every backend must share; the S3 integration test runs it too."""
    url = store.put_bytes("a/b/c.bin", b"\x00\x01")
    assert url == f"{store.uri}/a/b/c.bin"
    assert store.get_bytes("a/b/c.bin") == b"\x00\x01"
    assert store.exists("a/b/c.bin") and not store.exists("a/b/missing")
    store.put_text("a/d.txt", "hello")
    store.put_text("ab/e.txt", "not under a/")
    assert store.list("a") == ["a/b/c.bin", "a/d.txt"]
    with pytest.raises(ArtifactNotFound):
        store.get_bytes("nope")
    for bad in ("../escape", "/abs", "", "a/../../x"):
        with pytest.raises(ArtifactError):
            store.put_bytes(bad, b"x")
    assert store.delete("a") == 2
    assert store.list("a") == [] and store.exists("ab/e.txt")


def test_file_store_contract(tmp_path: Path):
    exercise_store(FileStore(tmp_path))


def test_dir_round_trip(tmp_path: Path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "x.txt").write_text("x")
    (src / "sub" / "y.txt").write_text("y")
    store = open_store(f"file://{tmp_path / 'store'}")
    store.put_dir("bundle", src)
    out = store.get_dir("bundle", tmp_path / "out")
    assert (out / "x.txt").read_text() == "x" and (out / "sub" / "y.txt").read_text() == "y"
    with pytest.raises(ArtifactNotFound):
        store.get_dir("empty", tmp_path / "o2")


def test_file_store_writes_are_atomic_and_leave_no_temp_files(tmp_path: Path):
    store = FileStore(tmp_path)
    store.put_bytes("k", b"1" * 10_000)
    store.put_bytes("k", b"2")
    assert store.get_bytes("k") == b"2"
    assert [p.name for p in tmp_path.iterdir()] == ["k"]


def test_unknown_scheme_is_a_config_error():
    with pytest.raises(ConfigError, match="allowed schemes"):
        open_store("gs://bucket/x")
