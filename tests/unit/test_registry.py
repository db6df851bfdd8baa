import pytest

from kubeml.errors import RegistryError
from kubeml.registry import Registry, code_version


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    d = tmp_path_factory.mktemp("reg")
    return Registry(f"sqlite:///{d}/mlflow.db", artifact_root=f"file://{d}/artifacts")


def test_versions_increase_and_carry_provenance(registry):
    kw = dict(metrics={"accuracy": 0.97, "macro_f1": 0.96}, tags={"dataset_version": "v-abc", "code_version": "git:1"})
    v1 = registry.register("m-prov", "file:///b/1", auto_approve=True, **kw)
    v2 = registry.register("m-prov", "file:///b/2", auto_approve=True, **kw)
    assert (v1.version, v2.version) == (1, 2)
    assert v2.source == "file:///b/2"
    assert v2.tags["dataset_version"] == "v-abc" and v2.tags["metric.accuracy"] == "0.970000"
    assert v1.approved and v1.tags["approved_by"].startswith("auto")
    assert [v.version for v in registry.versions("m-prov")] == [1, 2]


def test_manual_approval_workflow(registry):
    v = registry.register("m-appr", "file:///b/1", metrics={"accuracy": 0.9}, auto_approve=False)
    assert v.approval_status == "pending" and not v.approved
    assert registry.set_approval("m-appr", v.version, "approved", by="alice").approved
    assert registry.get("m-appr", v.version).tags["approved_by"] == "alice"
    assert registry.set_approval("m-appr", v.version, "rejected").approval_status == "rejected"


def test_unknown_version_and_status_are_clear_errors(registry):
    with pytest.raises(RegistryError, match="version 42 is not registered"):
        registry.get("m-none", 42)
    registry.register("m-bad", "file:///b", metrics={}, auto_approve=False)
    with pytest.raises(RegistryError, match="allowed values: approved, pending, rejected"):
        registry.set_approval("m-bad", 1, "maybe")


def test_code_version_names_the_commit_or_the_package(tmp_path):
    assert code_version(tmp_path).startswith("kubeml:")
    here = code_version(".")
    assert here.startswith("git:") or here.startswith("kubeml:")


@pytest.fixture
def client_env(monkeypatch):
    """MLflow's HTTP client settings unset, and restored after the test (a server registry sets them)."""
    from kubeml.registry import HTTP_CLIENT_DEFAULTS

    for name in HTTP_CLIENT_DEFAULTS:
        monkeypatch.setenv(name, "")  # recorded, so that teardown restores what was there
        monkeypatch.delenv(name)
    return monkeypatch


def test_a_tracking_server_refuses_a_local_bundle_path_before_any_request(client_env):
    # Nothing listens on port 9: the refusal must come before the first request.
    server = Registry("http://127.0.0.1:9")
    for source in ("file:///home/me/bundle", "/home/me/bundle"):
        with pytest.raises(RegistryError, match="artifact_store.uri on S3"):
            server.register("m", source, metrics={"accuracy": 0.9}, auto_approve=False)


def test_a_tracking_server_gets_short_client_retries_unless_the_user_set_them(client_env):
    import os

    client_env.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    Registry("http://127.0.0.1:9")

    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "5"  # the user's own setting wins
