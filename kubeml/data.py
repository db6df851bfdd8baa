"""Datasets: ingest into the artifact store as content-addressed versions, load back, validate.

A dataset version is ``v-`` plus the first 16 hex digits of the SHA-256 of its canonical
content (features as little-endian float32, labels as int64, the split assignment, and the
column names). The same data always gets the same version, and re-ingesting it writes
nothing new.

Layout in the store::

    datasets/NAME/VERSION/data.parquet
    datasets/NAME/VERSION/manifest.json
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np

from kubeml.artifacts import ArtifactStore
from kubeml.config import DataConfig, ValidationConfig
from kubeml.errors import ArtifactNotFound, ConfigError, DataValidationError

__all__ = [
    "Dataset",
    "DatasetManifest",
    "content_version",
    "dataset_manifest",
    "ingest",
    "load_dataset",
    "load_source",
    "validate",
]

LABEL = "label"
SPLIT = "split"


@dataclass(frozen=True)
class DatasetManifest:
    name: str
    version: str
    sha256: str
    rows: int
    features: int
    train_rows: int
    test_rows: int
    source: str
    created: str
    classes: tuple[int, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Dataset:
    """An in-memory dataset: features ``x`` (N, F) float32, labels ``y`` (N,) int64, split mask."""

    x: np.ndarray
    y: np.ndarray
    is_test: np.ndarray
    feature_names: tuple[str, ...]
    manifest: DatasetManifest | None = None

    def train(self) -> tuple[np.ndarray, np.ndarray]:
        return self.x[~self.is_test], self.y[~self.is_test]

    def test(self) -> tuple[np.ndarray, np.ndarray]:
        return self.x[self.is_test], self.y[self.is_test]


def content_version(x: np.ndarray, y: np.ndarray, is_test: np.ndarray, feature_names) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(list(feature_names)).encode())
    h.update(np.ascontiguousarray(x, dtype="<f4").tobytes())
    h.update(np.ascontiguousarray(y, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(is_test, dtype=np.uint8).tobytes())
    return h.hexdigest()


def load_source(cfg: DataConfig) -> Dataset:
    """Read the configured source data set and split it (stratified, seeded)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if cfg.dataset != "digits":  # guarded by the config schema; kept for direct callers
        raise ConfigError(f"unknown dataset {cfg.dataset!r}; allowed values: digits")
    bunch = load_digits()
    x = bunch.data.astype(np.float32)
    y = bunch.target.astype(np.int64)
    idx = np.arange(len(y))
    if cfg.max_rows is not None and cfg.max_rows < len(y):
        idx, _ = train_test_split(idx, train_size=cfg.max_rows, stratify=y, random_state=cfg.seed)
        idx = np.sort(idx)
    x, y = x[idx], y[idx]
    _, test_idx = train_test_split(
        np.arange(len(y)), test_size=cfg.test_fraction, stratify=y, random_state=cfg.seed
    )
    is_test = np.zeros(len(y), dtype=bool)
    is_test[test_idx] = True
    names = tuple(f"pixel_{i}" for i in range(x.shape[1]))
    return Dataset(x=x, y=y, is_test=is_test, feature_names=names)


def _to_parquet(ds: Dataset) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {name: pa.array(ds.x[:, i], type=pa.float32()) for i, name in enumerate(ds.feature_names)}
    cols[LABEL] = pa.array(ds.y, type=pa.int64())
    cols[SPLIT] = pa.array(np.where(ds.is_test, "test", "train"))
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf)
    return buf.getvalue()


def _from_parquet(data: bytes, manifest: DatasetManifest | None) -> Dataset:
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data))
    names = tuple(c for c in table.column_names if c not in (LABEL, SPLIT))
    x = np.stack([table.column(n).to_numpy(zero_copy_only=False) for n in names], axis=1).astype(np.float32)
    y = table.column(LABEL).to_numpy().astype(np.int64)
    is_test = np.asarray(table.column(SPLIT).to_pylist()) == "test"
    return Dataset(x=x, y=y, is_test=is_test, feature_names=names, manifest=manifest)


def ingest(store: ArtifactStore, cfg: DataConfig, *, name: str | None = None, source: Dataset | None = None) -> DatasetManifest:
    """Write the source data set into ``store`` as a content-addressed version.

    Idempotent: if the version already exists its manifest is returned and nothing is written.
    """
    ds = source if source is not None else load_source(cfg)
    name = name or cfg.dataset
    digest = content_version(ds.x, ds.y, ds.is_test, ds.feature_names)
    version = "v-" + digest[:16]
    prefix = f"datasets/{name}/{version}"
    if store.exists(f"{prefix}/manifest.json") and store.exists(f"{prefix}/data.parquet"):
        return _read_manifest(store, prefix)
    manifest = DatasetManifest(
        name=name,
        version=version,
        sha256=digest,
        rows=int(len(ds.y)),
        features=int(ds.x.shape[1]),
        train_rows=int((~ds.is_test).sum()),
        test_rows=int(ds.is_test.sum()),
        source=f"sklearn.datasets.load_digits(max_rows={cfg.max_rows}, test_fraction={cfg.test_fraction}, seed={cfg.seed})",
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        classes=tuple(int(c) for c in np.unique(ds.y)),
    )
    # Data first, manifest last: a manifest's presence means the version is complete.
    store.put_bytes(f"{prefix}/data.parquet", _to_parquet(ds))
    store.put_text(f"{prefix}/manifest.json", json.dumps(asdict(manifest), indent=2))
    return manifest


def _read_manifest(store: ArtifactStore, prefix: str) -> DatasetManifest:
    d = json.loads(store.get_text(f"{prefix}/manifest.json"))
    d["classes"] = tuple(d.get("classes", ()))
    return DatasetManifest(**d)


def dataset_manifest(store: ArtifactStore, name: str, version: str) -> DatasetManifest:
    """The manifest of a stored version; :class:`ArtifactNotFound` naming it when it is not stored."""
    try:
        return _read_manifest(store, f"datasets/{name}/{version}")
    except ArtifactNotFound as exc:
        raise ArtifactNotFound(f"dataset {name}@{version} is not in {store.uri}: {exc}") from exc


def load_dataset(store: ArtifactStore, name: str, version: str, *, verify: bool = True) -> Dataset:
    """Load a stored version; with ``verify`` the content hash is recomputed and checked."""
    prefix = f"datasets/{name}/{version}"
    try:
        manifest = _read_manifest(store, prefix)
        data = store.get_bytes(f"{prefix}/data.parquet")
    except ArtifactNotFound as exc:
        raise ArtifactNotFound(f"dataset {name}@{version} is not in {store.uri}: {exc}") from exc
    ds = _from_parquet(data, manifest)
    if verify:
        digest = content_version(ds.x, ds.y, ds.is_test, ds.feature_names)
        if digest != manifest.sha256:
            raise DataValidationError([f"content hash mismatch for {name}@{version}: stored data was modified"])
    return ds


def validate(ds: Dataset, cfg: ValidationConfig) -> dict:
    """Check ``ds`` against the constraints; raise :class:`DataValidationError` listing every failure.

    Returns a report (each constraint with its observed value) when all pass.
    """
    failures: list[str] = []
    report: dict = {}
    n, f = ds.x.shape
    report["rows"] = n
    report["features"] = f
    if f != cfg.expected_features:
        failures.append(f"schema: expected {cfg.expected_features} feature columns, found {f}")
    if n < cfg.min_rows:
        failures.append(f"completeness: {n} rows, fewer than min_rows={cfg.min_rows}")
    missing = float(np.isnan(ds.x).mean()) if ds.x.size else 0.0
    report["missing_fraction"] = missing
    if missing > cfg.max_missing_fraction:
        failures.append(
            f"completeness: missing fraction {missing:.4f} exceeds max_missing_fraction={cfg.max_missing_fraction}"
        )
    finite = ds.x[np.isfinite(ds.x)]
    lo = float(finite.min()) if finite.size else math.nan
    hi = float(finite.max()) if finite.size else math.nan
    report["min_value"], report["max_value"] = lo, hi
    if finite.size and lo < cfg.min_value:
        bad = int((ds.x < cfg.min_value).sum())
        failures.append(f"value range: min value {lo:g} < min_value={cfg.min_value:g} ({bad} cells)")
    if finite.size and hi > cfg.max_value:
        bad = int((ds.x > cfg.max_value).sum())
        failures.append(f"value range: max value {hi:g} > max_value={cfg.max_value:g} ({bad} cells)")
    if np.isinf(ds.x).any():
        failures.append(f"value range: {int(np.isinf(ds.x).sum())} infinite cells")
    labels, counts = np.unique(ds.y, return_counts=True)
    unknown = [int(v) for v in labels if v < 0 or v >= cfg.num_classes]
    if unknown:
        failures.append(f"schema: labels outside 0..{cfg.num_classes - 1}: {unknown}")
    shares = {int(k): float(c) / n for k, c in zip(labels, counts)} if n else {}
    report["class_shares"] = {str(k): round(v, 4) for k, v in sorted(shares.items())}
    ref = 1.0 / cfg.num_classes
    for c in range(cfg.num_classes):
        share = shares.get(c, 0.0)
        if abs(share - ref) > cfg.class_balance_tolerance:
            failures.append(
                f"class balance: class {c} share {share:.4f} differs from reference {ref:.4f} "
                f"by more than class_balance_tolerance={cfg.class_balance_tolerance}"
            )
    if failures:
        raise DataValidationError(failures)
    return report
