"""The S3 backend against a real S3 API server (moto's, on loopback), not a stubbed client."""

from __future__ import annotations

import pytest

from tests.unit.test_artifacts import exercise_store

pytestmark = pytest.mark.integration


def test_s3_store_contract(s3_endpoint, bucket):
    from kubeml.artifacts import open_store

    exercise_store(open_store(f"s3://{bucket}/prefix", endpoint_url=s3_endpoint))


def test_s3_store_without_prefix_and_dir_round_trip(s3_endpoint, bucket, tmp_path):
    from kubeml.artifacts import open_store

    store = open_store(f"s3://{bucket}", endpoint_url=s3_endpoint)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.txt").write_text("data")
    assert store.put_dir("bundles/m1", tmp_path / "d") == f"s3://{bucket}/bundles/m1"
    assert store.get_dir("bundles/m1", tmp_path / "out").joinpath("f.txt").read_text() == "data"


def test_missing_bucket_says_so(s3_endpoint, bucket):
    from kubeml.artifacts import open_store
    from kubeml.errors import ArtifactError

    store = open_store(f"s3://{bucket}-absent/x", endpoint_url=s3_endpoint)
    with pytest.raises(ArtifactError, match="does not exist"):
        store.put_bytes("k", b"v")


def test_dataset_versions_are_stored_and_verified_in_s3(s3_endpoint, bucket):
    from kubeml.artifacts import open_store
    from kubeml.config import DataConfig
    from kubeml.data import ingest, load_dataset

    store = open_store(f"s3://{bucket}/kubeml", endpoint_url=s3_endpoint)
    m = ingest(store, DataConfig(max_rows=200))
    ds = load_dataset(store, m.name, m.version)
    assert ds.x.shape == (200, 64) and m.rows == 200
    assert ingest(store, DataConfig(max_rows=200)).version == m.version
