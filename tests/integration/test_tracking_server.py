"""The shared MLflow tracking server, for real: ``mlflow server`` on PostgreSQL from Debian, with
its artifacts on S3 (moto's server, the stand-in for AWS), as the chart runs it. The registry,
the approval workflow and the CLI work through it; a second client sees what the first wrote;
the database holds it across a restart; clients upload artifacts without S3 credentials.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml
from kubeml.testing.cluster import AssetsMissing, find_assets
from kubeml.testing.postgres import running_postgres
from kubeml.testing.serving import write_digits_bundle
from kubeml.testing.tracking import running_tracking_server
from typer.testing import CliRunner

from kubeml.approvals import SIGNATURE_TAG
from kubeml.bundle import bundle_digest
from kubeml.cli import app
from kubeml.registry import AUTHOR_TAG, BUNDLE_DIGEST_TAG, Registry, verified_bundle
from tests.conftest import approver_keys, write_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
KUBEML = str(Path(sys.executable).with_name("kubeml"))
MODEL = "digits-cnn"


#: moto accepts any credentials; the server (as its IRSA role would) has these, clients none.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def postgres():
    with running_postgres(database="mlflow") as server:
        yield server


@pytest.fixture(scope="module")
def artifact_bucket(s3_endpoint: str) -> str:
    import uuid

    import boto3

    name = f"kubeml-mlflow-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint, **_boto(S3_CREDENTIALS)).create_bucket(Bucket=name)
    return name


def _boto(env: dict[str, str]) -> dict[str, str]:
    return {"aws_access_key_id": env["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
            "region_name": env["AWS_DEFAULT_REGION"]}


@pytest.fixture(scope="module")
def server_env(s3_endpoint: str) -> dict[str, str]:
    return {**S3_CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}


@pytest.fixture(scope="module")
def tracking(postgres, artifact_bucket: str, server_env, tmp_path_factory):
    """One server for the module, as the chart runs it: PostgreSQL behind, S3 for artifacts,
    the chart's Host list (plus loopback, the name the tests reach it by)."""
    allowed = f"{_chart_allowed_hosts()},127.0.0.1,127.0.0.1:*"
    with running_tracking_server(postgres.url, f"s3://{artifact_bucket}/mlflow", tmp_path_factory.mktemp("mlflow"),
                                 env=server_env, allowed_hosts=allowed) as server:
        yield server


def _kubeml(project: Path, *args: str, user: str, env: dict[str, str] | None = None,
            timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """The CLI in its own process, as another person or pod runs it."""
    return subprocess.run([KUBEML, *args], cwd=project, capture_output=True, text=True, timeout=timeout_s,
                          env={**(env or os.environ), "KUBEML_USER": user, "NO_COLOR": "1", "COLUMNS": "200"})


def test_registry_and_signed_approvals_go_through_the_server_into_postgres(
        postgres, tracking, artifact_bucket: str, server_env, s3_endpoint: str, project: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    bucket, server = artifact_bucket, tracking
    private, public = approver_keys(project)
    write_config(project, {}, staging={
        "registry": {"tracking_uri": server.url, "model_name": MODEL},
        "artifact_store": {"uri": f"s3://{bucket}/artifacts", "endpoint_url": s3_endpoint},
        "signing": {"private_key": private, "public_key": public}})
    bundle = write_digits_bundle(project / "bundle")
    digest = bundle_digest(bundle)
    # The register stage's call, as the pipeline's pod makes it.
    mv = Registry(server.url, artifact_root=f"s3://{bucket}/artifacts").register(
        MODEL, f"s3://{bucket}/artifacts/bundles/{digest[7:19]}", metrics={"accuracy": 0.98},
        tags={BUNDLE_DIGEST_TAG: digest, AUTHOR_TAG: "alice"}, auto_approve=False)
    assert (mv.version, mv.approval_status) == (1, "pending")

    # A manual environment: the author may not approve; someone else may, and signs it.
    monkeypatch.setenv("KUBEML_USER", "alice")
    refused = CliRunner().invoke(app, ["models", "approve", "1", "--env", "staging"])
    assert refused.exit_code == 1 and "may not also approve it" in refused.output
    monkeypatch.setenv("KUBEML_USER", "bob")
    approved = CliRunner().invoke(app, ["models", "approve", "1", "--env", "staging"])
    assert approved.exit_code == 0 and "approved (signed)" in approved.output, approved.output

    # Another person's process reads what the server holds.
    listed = _kubeml(project, "models", "list", "--env", "staging", "-o", "json", user="carol")
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert (row["version"], row["approval_status"]) == (1, "approved")
    fresh = Registry(server.url).get(MODEL, 1)
    assert verified_bundle(fresh, bundle, public_key=public) == digest

    # The server keeps nothing itself: the versions and the approval are rows in PostgreSQL.
    with postgres.connect() as db:
        tags = dict(db.execute("SELECT key, value FROM model_version_tags WHERE name = %s AND version = 1",
                               (MODEL,)).fetchall())
    assert tags["approval_status"] == "approved" and tags["approved_by"] == "bob"
    assert tags[BUNDLE_DIGEST_TAG] == digest and tags[SIGNATURE_TAG]

    # A new server process on the same database (a restarted or second replica) sees it all.
    with running_tracking_server(postgres.url, f"s3://{bucket}/mlflow", tmp_path / "again", env=server_env) as restarted:
        again = Registry(restarted.url).get(MODEL, 1)
        assert again.approved and again.tags["approved_by"] == "bob"


def test_clients_upload_artifacts_through_the_server_without_s3_credentials(
        tracking, artifact_bucket: str, s3_endpoint: str) -> None:
    import boto3

    server = tracking
    # A pipeline pod: no AWS credentials, no S3 endpoint; only the server's URL.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    script = (
        "import mlflow\n"
        f"mlflow.set_tracking_uri({server.url!r})\n"
        "mlflow.set_experiment('kubeml/proxied')\n"
        "with mlflow.start_run() as run:\n"
        "    mlflow.log_text('confusion matrix', 'evaluation/report.txt')\n"
        "    print('run-id', run.info.run_id)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    (run_id,) = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("run-id ")]

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, **_boto(S3_CREDENTIALS))
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=artifact_bucket, Prefix="mlflow/").get("Contents", [])]
    assert any(k.endswith(f"{run_id}/artifacts/evaluation/report.txt") for k in keys), keys


def _chart_allowed_hosts() -> str:
    try:
        helm = find_assets().binary("helm")
    except AssetsMissing as exc:
        pytest.fail(f"helm is not built ({exc}); run `make cluster-assets`")
    out = subprocess.run([str(helm), "template", "kubeml", str(ROOT / "charts/kubeml-platform"), "--namespace",
                          "kubeml-system", "--kube-version", "1.37.0", "--show-only", "templates/mlflow.yaml"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    deployment = next(d for d in yaml.safe_load_all(out) if d and d["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    return env["MLFLOW_SERVER_ALLOWED_HOSTS"]


def test_the_server_answers_its_service_names_and_refuses_other_hosts(tracking) -> None:
    """The chart's Host list, on the real server: in-cluster clients reach it by the Service's
    names; a rebound foreign name is refused; the kubelet's probes by pod IP pass."""
    api = f"{tracking.url}/api/2.0/mlflow/experiments/search?max_results=1"

    def status(url: str, host: str) -> int:
        return requests.get(url, headers={"Host": host}, timeout=10).status_code

    for host in ("kubeml-kubeml-platform-mlflow.kubeml-system.svc:5000",
                 "kubeml-kubeml-platform-mlflow.kubeml-system.svc.cluster.local:5000",
                 "kubeml-kubeml-platform-mlflow:5000"):
        assert status(api, host) == 200, host
    for host in ("attacker.example:5000", "kubeml-kubeml-platform-mlflow.other-ns.svc:5000", "10.1.2.3:5000"):
        assert status(api, host) == 403, host
    assert status(f"{tracking.url}/health", "10.1.2.3:5000") == 200
    assert status(f"{tracking.url}/version", "10.1.2.3:5000") == 200


def test_an_unreachable_server_is_named_in_seconds(project: Path) -> None:
    from kubeml._proc import free_port

    url = f"http://127.0.0.1:{free_port()}"
    write_config(project, {}, staging={"registry": {"tracking_uri": url}})
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST")}
    started = time.monotonic()
    out = _kubeml(project, "models", "list", "--env", "staging", user="carol", env=env)
    took = time.monotonic() - started

    assert out.returncode != 0
    message = " ".join((out.stdout + out.stderr).split())
    assert url in message and "the tracking server did not answer" in message, message
    assert "registry.tracking_uri" in message
    assert took < 45, took
