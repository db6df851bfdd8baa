"""A bundle's manifest pins every file; the registered digest is what every deploy path checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubeml.bundle import MANIFEST_FILE, SPEC_FILE, WEIGHTS_FILE, bundle_digest, verify_bundle, write_manifest
from kubeml.errors import BundleError
from kubeml.registry import BUNDLE_DIGEST_TAG, ModelVersionInfo, verified_bundle
from kubeml.testing.serving import write_digits_bundle


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return write_digits_bundle(tmp_path / "digits")


def test_the_manifest_lists_every_file_and_verifies(bundle: Path):
    import json

    files = json.loads((bundle / MANIFEST_FILE).read_text())["files"]
    assert set(files) == {WEIGHTS_FILE, SPEC_FILE}
    assert verify_bundle(bundle) == bundle_digest(bundle)
    assert bundle_digest(bundle).startswith("sha256:")


@pytest.mark.parametrize("change", ["weights", "spec", "added", "removed"])
def test_any_change_after_the_manifest_is_refused(bundle: Path, change: str):
    digest = bundle_digest(bundle)
    if change == "weights":
        data = bytearray((bundle / WEIGHTS_FILE).read_bytes())
        data[-1] ^= 1
        (bundle / WEIGHTS_FILE).write_bytes(bytes(data))  # same size, one bit flipped
    elif change == "spec":
        (bundle / SPEC_FILE).write_text((bundle / SPEC_FILE).read_text().replace('"0"', '"zero"'))
    elif change == "added":
        (bundle / "model.onnx").write_bytes(b"a graph that was never registered")
    else:
        (bundle / SPEC_FILE).unlink()
    with pytest.raises(BundleError, match="differs|differ from"):
        verify_bundle(bundle, digest)


def test_a_rewritten_manifest_does_not_match_the_registered_digest(bundle: Path):
    registered = bundle_digest(bundle)
    (bundle / "model.onnx").write_bytes(b"swapped graph")
    write_manifest(bundle)  # an attacker who can write the bundle can rewrite its manifest too
    with pytest.raises(BundleError, match="is not the registered"):
        verify_bundle(bundle, registered)


def _version(**tags: str) -> ModelVersionInfo:
    return ModelVersionInfo(name="digits", version=3, source="file:///b", approval_status="approved", run_id="r", tags=tags)


def test_deploy_paths_refuse_a_version_without_a_digest(bundle: Path):
    with pytest.raises(BundleError, match="no registered bundle digest"):
        verified_bundle(_version(), bundle)
    assert verified_bundle(_version(**{BUNDLE_DIGEST_TAG: bundle_digest(bundle)}), bundle) == bundle_digest(bundle)
