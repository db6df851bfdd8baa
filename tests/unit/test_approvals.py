"""Approvals pinned to content: signed over the registered digest, verified on deploy,
never by the version's own author in a manual environment."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubeml.testing.serving import write_digits_bundle
from typer.testing import CliRunner

from kubeml.bundle import bundle_digest
from kubeml.cli import app
from kubeml.config import load_config
from kubeml.errors import ApprovalError, ConfigError
from kubeml.registry import AUTHOR_TAG, BUNDLE_DIGEST_TAG, Registry, verified_bundle
from tests.conftest import approver_keys, write_config

runner = CliRunner()


@pytest.fixture
def staging(project: Path, monkeypatch):
    private, public = approver_keys(project)
    write_config(project, {}, staging={"signing": {"private_key": private, "public_key": public}})
    cfg = load_config("kubeml.yaml", "staging")
    bundle = write_digits_bundle(project / "bundle")
    reg = Registry(cfg.registry.tracking_uri, artifact_root=cfg.artifact_store.uri)
    reg.register(cfg.registry.model_name, "file:///x/bundle", metrics={"accuracy": 0.97}, auto_approve=False,
                 tags={BUNDLE_DIGEST_TAG: bundle_digest(bundle), AUTHOR_TAG: "alice"})
    return cfg, reg, bundle


def test_the_author_may_not_approve_in_a_manual_environment(staging, monkeypatch):
    cfg, reg, _ = staging
    monkeypatch.setenv("KUBEML_USER", "alice")
    r = runner.invoke(app, ["models", "approve", "1", "--env", "staging"])
    assert r.exit_code == 1 and "may not also approve it" in r.output
    assert not reg.get(cfg.registry.model_name, 1).approved


def test_a_signed_approval_verifies_and_any_edit_of_it_does_not(staging, monkeypatch):
    cfg, reg, bundle = staging
    monkeypatch.setenv("KUBEML_USER", "bob")
    r = runner.invoke(app, ["models", "approve", "1", "--env", "staging"])
    assert r.exit_code == 0 and "approved (signed)" in r.output, r.output
    mv = reg.get(cfg.registry.model_name, 1)
    assert verified_bundle(mv, bundle, public_key=cfg.signing.public_key) == bundle_digest(bundle)
    # Someone with write access to MLflow edits the approval: it no longer verifies.
    reg._client.set_model_version_tag(cfg.registry.model_name, "1", "approved_by", "mallory")
    with pytest.raises(ApprovalError, match="does not verify"):
        verified_bundle(reg.get(cfg.registry.model_name, 1), bundle, public_key=cfg.signing.public_key)


def test_an_unsigned_approval_does_not_deploy_where_signatures_are_verified(staging):
    cfg, reg, bundle = staging
    reg.set_approval(cfg.registry.model_name, 1, "approved", by="bob")  # straight to MLflow, unsigned
    with pytest.raises(ApprovalError, match="no signed approval"):
        verified_bundle(reg.get(cfg.registry.model_name, 1), bundle, public_key=cfg.signing.public_key)


def test_a_signed_approval_does_not_carry_over_to_a_swapped_bundle(staging, monkeypatch, project: Path):
    cfg, reg, _ = staging
    monkeypatch.setenv("KUBEML_USER", "bob")
    assert runner.invoke(app, ["models", "approve", "1", "--env", "staging"]).exit_code == 0
    other = write_digits_bundle(project / "other", seed=1)
    from kubeml.errors import BundleError

    with pytest.raises(BundleError, match="is not the registered"):
        verified_bundle(reg.get(cfg.registry.model_name, 1), other, public_key=cfg.signing.public_key)


def test_keys_are_references_never_inline(project: Path):
    write_config(project, {"signing": {"private_key": "-----BEGIN PRIVATE KEY-----..."}})
    with pytest.raises(ConfigError, match="signing.private_key.*reference"):
        load_config("kubeml.yaml", "dev")


# -- every deploy path refuses every bypass ----------------------------------------------------
#
# Each refusal below happens before any server starts (``kubeml deploy`` would otherwise
# start a router and a model server); the approved, untouched bundle is shown to get past
# the same checks, so the refusals are the checks' doing.


def _deploy(version: str, *extra: str, model: str = "digits-cnn") -> object:
    return runner.invoke(app, ["deploy", model, "--version", version, "--env", "staging", "--no-replay", *extra])


def test_a_rejected_version_is_not_deployed_from_the_registry_nor_from_a_local_copy(staging, monkeypatch):
    cfg, reg, bundle = staging
    monkeypatch.setenv("KUBEML_USER", "bob")
    assert runner.invoke(app, ["models", "reject", "1", "--env", "staging"]).exit_code == 0
    for extra in ((), ("--bundle", str(bundle))):
        r = _deploy("1", *extra)
        assert r.exit_code == 1 and "is rejected, not approved" in r.output, (extra, r.output)


def test_a_local_bundle_swapped_or_edited_after_approval_is_refused(staging, monkeypatch, project: Path):
    import shutil

    from kubeml.registry import verified_bundle

    cfg, reg, bundle = staging
    monkeypatch.setenv("KUBEML_USER", "bob")
    assert runner.invoke(app, ["models", "approve", "1", "--env", "staging"]).exit_code == 0
    # The approved bundle itself passes every check --bundle makes.
    verified_bundle(reg.get(cfg.registry.model_name, 1), bundle, public_key=cfg.signing.public_key)

    other = write_digits_bundle(project / "other", seed=1)  # another model, its own valid manifest
    r = _deploy("1", "--bundle", str(other))
    assert r.exit_code == 1 and "is not the registered" in r.output, r.output

    edited = project / "edited"
    shutil.copytree(bundle, edited)
    weights = next(p for p in edited.iterdir() if p.suffix == ".safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one bit of the weights, manifest untouched
    weights.write_bytes(bytes(data))
    r = _deploy("1", "--bundle", str(edited))
    assert r.exit_code == 1 and "manifest" in r.output.lower(), r.output

    r = _deploy("1", "--bundle", str(project / "missing"))
    assert r.exit_code == 2 and "is not a directory" in r.output, r.output


def test_an_unregistered_bundle_is_not_deployed_under_any_version(project: Path):
    bundle = write_digits_bundle(project / "bundle")
    write_config(project, {})
    r = runner.invoke(app, ["deploy", load_config("kubeml.yaml", "dev").registry.model_name, "--version", "1",
                            "--bundle", str(bundle), "--no-replay"])
    assert r.exit_code == 1 and "version 1 is not registered" in r.output, r.output


def test_the_deploy_stage_verifies_before_any_target_serves(project: Path):
    """Whatever ``serving.target`` says (here the cluster's, ``kserve``), the stage checks the
    registered digest first: a bundle replaced in the artifact store after approval is refused
    before the target is asked to serve it."""
    import shutil

    from kubeml.pipelines.stages import deploy_stage, ingest_stage

    from kubeml.errors import KubemlError

    write_config(project, {"serving": {"target": "kserve"}})
    cfg = load_config("kubeml.yaml", "dev")
    ingest_stage(cfg.model_dump_json(), "r1")  # the held-out rows a deploy replays
    store = cfg.artifact_store.open()
    approved = write_digits_bundle(project / "approved")
    store.put_dir("models/r1/bundle", approved)
    reg = Registry(cfg.registry.tracking_uri, artifact_root=cfg.artifact_store.uri)
    reg.register(cfg.registry.model_name, store.url("models/r1/bundle"), metrics={"accuracy": 0.97},
                 auto_approve=True, tags={BUNDLE_DIGEST_TAG: bundle_digest(approved)})  # fmt: skip

    # Untouched, the stage gets past the checks to the target (which is not built yet).
    with pytest.raises(ConfigError, match="serving.target 'kserve'"):
        deploy_stage(cfg.model_dump_json(), "r1", 1)

    swapped = write_digits_bundle(project / "swapped", seed=1)
    local = store.local_path("models/r1/bundle")
    shutil.rmtree(local)
    shutil.copytree(swapped, local)
    # (A new pipeline run: the ledger answers a retry of r1's deploy with its recorded failure.)
    ingest_stage(cfg.model_dump_json(), "r2")
    with pytest.raises(KubemlError, match="is not the registered"):
        deploy_stage(cfg.model_dump_json(), "r2", 1)
