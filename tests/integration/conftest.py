"""Fixtures for the integration tests: one real control plane per session.

``cluster`` is a local etcd + kube-apiserver + controller-manager + scheduler + kwok (built
from Go modules on first use), or with ``KUBEML_TEST_CLUSTER=existing`` the cluster in
``KUBECONFIG``. ``kafka_broker`` is a single-node Kafka broker (``hack/kafka``), started only
when a test asks for it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kubernetes.client import ApiClient

from kubeml.cluster.testing import build_assets_if_needed, cluster_fixture, temporary_namespace
from tests.integration.kafka_fixtures import kafka_broker  # noqa: F401 (one broker per session)

cluster = cluster_fixture()


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
