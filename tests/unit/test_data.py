from dataclasses import replace

import numpy as np
import pytest

from kubeml.artifacts import FileStore
from kubeml.config import DataConfig, ValidationConfig
from kubeml.data import ingest, load_dataset, load_source, validate
from kubeml.errors import ArtifactNotFound, DataValidationError


@pytest.fixture
def store(tmp_path):
    return FileStore(tmp_path / "store")


def test_same_data_same_version_and_nothing_rewritten(store):
    m1 = ingest(store, DataConfig(max_rows=300))
    before = {k: store.local_path(k).stat().st_mtime_ns for k in store.list("datasets")}
    m2 = ingest(store, DataConfig(max_rows=300))
    assert m1 == m2 and m1.version.startswith("v-")
    assert {k: store.local_path(k).stat().st_mtime_ns for k in store.list("datasets")} == before


def test_different_data_or_split_gives_a_different_version(store):
    base = ingest(store, DataConfig(max_rows=300)).version
    assert ingest(store, DataConfig(max_rows=301)).version != base
    assert ingest(store, DataConfig(max_rows=300, seed=1)).version != base


def test_round_trip_preserves_rows_split_and_labels(store):
    src = load_source(DataConfig(max_rows=200, test_fraction=0.25))
    m = ingest(store, DataConfig(max_rows=200, test_fraction=0.25))
    ds = load_dataset(store, m.name, m.version)
    np.testing.assert_array_equal(ds.x, src.x)
    np.testing.assert_array_equal(ds.y, src.y)
    assert ds.is_test.sum() == 50 == m.test_rows
    assert set(np.unique(ds.test()[1])) == set(range(10)), "split is stratified"


def test_tampered_data_is_detected(store):
    m = ingest(store, DataConfig(max_rows=100))
    other = ingest(store, DataConfig(max_rows=120))
    key = f"datasets/digits/{m.version}/data.parquet"
    store.put_bytes(key, store.get_bytes(f"datasets/digits/{other.version}/data.parquet"))
    with pytest.raises(DataValidationError, match="content hash mismatch"):
        load_dataset(store, "digits", m.version)


def test_unknown_version_is_not_found(store):
    with pytest.raises(ArtifactNotFound, match="digits@v-nope"):
        load_dataset(store, "digits", "v-nope")


def test_digits_pass_the_default_constraints():
    report = validate(load_source(DataConfig()), ValidationConfig())
    assert report["rows"] == 1797 and report["max_value"] == 16.0


def test_every_failing_constraint_is_listed_with_its_values():
    ds = load_source(DataConfig(max_rows=200))
    x = ds.x.copy()
    x[0, 0] = np.nan
    x[1, 1] = -3
    y = ds.y.copy()
    y[:60] = 0  # class 0 now far over its share
    bad = replace(ds, x=x, y=y)
    with pytest.raises(DataValidationError) as e:
        validate(bad, ValidationConfig(min_rows=500))
    text = str(e.value)
    assert "completeness: 200 rows, fewer than min_rows=500" in text
    assert "missing fraction" in text
    assert "min value -3 < min_value=0" in text
    assert "class balance: class 0 share" in text
    assert len(e.value.failures) >= 4


def test_schema_mismatch_is_reported():
    ds = load_source(DataConfig(max_rows=200))
    with pytest.raises(DataValidationError, match="expected 65 feature columns, found 64"):
        validate(ds, ValidationConfig(expected_features=65))


def test_validation_error_pickles_with_its_failures():
    import pickle

    err = pickle.loads(pickle.dumps(DataValidationError(["a", "b"])))
    assert err.failures == ("a", "b")
