"""Fixtures for the integration tests: one real control plane per session.

``cluster`` is a local etcd + kube-apiserver + controller-manager + scheduler + kwok (built
from Go modules on first use), or with ``KUBEML_TEST_CLUSTER=existing`` the cluster in
``KUBECONFIG``. ``real_cluster`` is a second local cluster whose one node is real (kubelet +
containerd running real pods), shared by every module that runs pods; it starts when the first
of them needs it. ``kafka_broker`` is a single-node Kafka broker (``hack/kafka``), started only
when a test asks for it. ``s3_endpoint`` is moto's S3 API server on loopback (the one stand-in
for AWS), and ``bucket`` a fresh bucket in it with dummy credentials in the environment.
``runtime_image`` is the runtime image of this tree, loaded into the real node once.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubeml.testing.cluster.fixtures import (
    build_assets_if_needed,
    cluster_fixture,
    real_node_cluster_fixture,
    temporary_namespace,
)
from kubernetes.client import ApiClient

from kubeml.images import image_ref
from tests.conftest import free_port
from tests.integration.kafka_fixtures import kafka_broker  # noqa: F401 (one broker per session)

ROOT = Path(__file__).resolve().parents[2]

cluster = cluster_fixture()
# Generous: the KubeRay operator and CoreDNS start with the node on a loaded machine.
real_cluster = real_node_cluster_fixture("pytest-real", scope="session", timeout_s=300.0)

#: Modules that start (and stop) real nodes of their own.
_OWN_REAL_NODES = ("test_real_node_lifecycle.py",)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the tests that need a real node last: first those that start nodes of their own,
    then every user of the shared ``real_cluster``, one after another.

    A machine holds one real node at a time (its kubelet owns fixed host paths), and the
    shared node stays up from its first user to the end of the session: grouped at the end,
    it runs only while it is used, instead of idling beside the rest of the suite.
    """
    own = [item for item in items if item.path.name in _OWN_REAL_NODES]
    shared = [item for item in items if item not in own and "real_cluster" in getattr(item, "fixturenames", ())]
    if not own and not shared:
        return
    placed = {id(item) for item in (*own, *shared)}
    items[:] = [item for item in items if id(item) not in placed] + own + shared


def pytest_collection_finish(session: pytest.Session) -> None:
    # Outside any test's timeout: a cold asset build takes tens of minutes.
    build_assets_if_needed(session.items)


@pytest.fixture(scope="session")
def admin(cluster) -> Iterator[ApiClient]:
    """An ApiClient with cluster-admin rights."""
    with cluster.api_client() as client:
        yield client


@pytest.fixture
def namespace(admin: ApiClient) -> Iterator[str]:
    """A fresh namespace, deleted after the test."""
    with temporary_namespace(admin) as name:
        yield name


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    import uuid

    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    name = f"kubeml-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def runtime_image(real_cluster) -> str:
    """The runtime image of this tree, in the node's containerd (several GB: PyTorch's CUDA build).

    ``hack/images/build.sh runtime`` rebuilds it if the code changed since ``make test``
    built it (its dependency layers are cached, so that is the code layer only) and loads it
    into the running node.
    """
    result = subprocess.run(["bash", str(ROOT / "hack" / "images" / "build.sh"), "runtime"], cwd=ROOT,
                            capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, f"building or loading the runtime image failed:\n{result.stderr[-3000:]}"
    ref = image_ref("runtime")
    assert any(name.endswith(ref.split("/", 1)[-1]) for name in real_cluster.node.images()), real_cluster.node.images()
    return ref
