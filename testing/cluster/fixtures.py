"""pytest support: a session-scoped control-plane fixture and a throwaway-namespace helper.

In a ``conftest.py``::

    from kubeml.testing.cluster.fixtures import cluster_fixture

    cluster = cluster_fixture()            # a fixture named "cluster"

By default the fixture starts a local cluster (building the assets first if they are
missing) and stops it when the session ends. With ``KUBEML_TEST_CLUSTER=existing`` it uses
the cluster of ``KUBECONFIG`` instead (kind, EKS) and leaves it running.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from kubeml.testing.cluster._assets import cache_root
from kubeml.testing.cluster._cluster import Cluster
from kubeml.errors import ClusterError
from kubeml.testing.cluster._existing import ExistingCluster
from kubeml.testing.cluster._nodes import DEFAULT_NODE_GROUPS, NodeGroup

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

__all__ = [
    "build_assets_if_needed",
    "cluster_fixture",
    "real_node_cluster_fixture",
    "temporary_namespace",
    "wait_until",
]

T = TypeVar("T")

#: ``KUBEML_TEST_CLUSTER`` values.
_MODES = ("local", "existing")


def cluster_fixture(
    name: str = "pytest",
    *,
    scope: str = "session",
    node_groups: tuple[NodeGroup, ...] = DEFAULT_NODE_GROUPS,
    build_assets: bool = True,
    timeout_s: float = 180.0,
) -> Any:
    """Make a pytest fixture yielding a running ``Cluster`` (or an ``ExistingCluster``).

    Args:
        name: local cluster name prefix; the cluster is ``<name>-<pid>`` and its state lives
            in ``~/.cache/kubeml/clusters/<name>-<pid>``. Clusters with this prefix left by
            a killed session (their pytest process is gone) are stopped and removed on start.
        scope: pytest scope; "session" starts one cluster for the whole run (~15 s).
        node_groups: fake nodes to create (ignored for an existing cluster).
        build_assets: build missing binaries instead of failing (a cold build takes tens
            of minutes; ``make cluster-assets`` does it ahead of time).
        timeout_s: start-up budget; generous because CI machines are often loaded.
    """

    @pytest.fixture(scope=scope)  # type: ignore[misc]
    def _cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster | ExistingCluster]:
        mode = os.environ.get("KUBEML_TEST_CLUSTER", "local") or "local"
        if mode not in _MODES:
            raise pytest.UsageError(
                f"KUBEML_TEST_CLUSTER={mode!r} is not understood; use one of {', '.join(_MODES)}"
            )
        if mode == "existing":
            yield ExistingCluster.from_env(work_dir=tmp_path_factory.mktemp("kubeconfigs"))
            return
        _reap_crashed_sessions(name)
        # One cluster per pytest process: two sessions on one machine (a developer and CI,
        # or two checkouts) must not share, or stop, each other's cluster.
        cluster = Cluster(f"{name}-{os.getpid()}", node_groups=node_groups)
        try:
            cluster.up(build_assets=build_assets, timeout_s=timeout_s, owner_pid=os.getpid())
        except ClusterError as exc:
            pytest.fail(f"could not start the test cluster: {exc}", pytrace=False)
        try:
            yield cluster
        finally:
            cluster.down()

    return _cluster


def real_node_cluster_fixture(name: str = "pytest-node", *, scope: str = "module",
                              timeout_s: float = 180.0) -> Any:
    """Make a fixture yielding a local ``Cluster`` with a real node (kubelet + containerd).

    The real node needs root; without it the tests that use this fixture are skipped with
    that reason (the kwok-only cluster still covers the API side). On root, every other
    obstacle (a missing binary, a kernel feature, a real node of another cluster) fails the
    test with what to install or stop.
    """

    @pytest.fixture(scope=scope)  # type: ignore[misc]
    def _real_cluster() -> Iterator[Cluster]:
        if os.environ.get("KUBEML_TEST_CLUSTER") == "existing":
            pytest.skip("the real node is part of the local cluster; an existing cluster has its own nodes")
        if os.geteuid() != 0:
            pytest.skip("a real node needs root (kubelet and containerd manage mounts, cgroups, netns)")
        _reap_crashed_sessions(name)
        cluster = Cluster(f"{name}-{os.getpid()}", node_groups=(), real_node=True)
        try:
            cluster.up(build_assets=True, timeout_s=timeout_s, owner_pid=os.getpid())
        except ClusterError as exc:
            pytest.fail(f"could not start the real-node cluster: {exc}", pytrace=False)
        try:
            yield cluster
        finally:
            cluster.down()

    return _real_cluster


def _reap_crashed_sessions(prefix: str) -> None:
    clusters = cache_root() / "clusters"
    for state_dir in clusters.glob(f"{prefix}-*"):
        pid = state_dir.name.removeprefix(f"{prefix}-")
        if not pid.isdigit() or int(pid) == os.getpid() or Path(f"/proc/{pid}").exists():
            continue
        Cluster(state_dir.name, state_dir=state_dir).down()


def build_assets_if_needed(items: list[pytest.Item], fixture_name: str = "cluster") -> None:
    """Build missing control-plane assets before any test runs, if a test needs a cluster.

    Call it from ``pytest_collection_finish``: a cold build takes tens of minutes, longer
    than a per-test timeout allows, and hooks run outside those timeouts.
    """
    if os.environ.get("KUBEML_TEST_CLUSTER") == "existing":
        return
    users = [item for item in items if fixture_name in getattr(item, "fixturenames", ())]
    if not users or users[0].config.getoption("collectonly", False):
        return
    from kubeml.testing.cluster._assets import find_assets

    # Show the build's progress: it is the only sign of life for many minutes.
    capture = users[0].config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        find_assets(build=True)


@contextlib.contextmanager
def temporary_namespace(
    client: ApiClient,
    *,
    prefix: str = "test",
    labels: dict[str, str] | None = None,
    ready_timeout_s: float = 30.0,
) -> Iterator[str]:
    """Create a uniquely named namespace, yield its name, delete it afterwards.

    Waits for the ``default`` ServiceAccount first: until the controller-manager creates it
    (tens of ms, seconds on a loaded machine), the ServiceAccount admission plugin rejects
    every pod in the namespace.
    """
    from kubernetes.client import CoreV1Api
    from kubernetes.client.exceptions import ApiException

    core = CoreV1Api(client)
    name = f"{prefix}-{secrets.token_hex(3)}"
    core.create_namespace({"metadata": {"name": name, "labels": labels or {}}})
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            try:
                core.read_namespaced_service_account("default", name)
                break
            except ApiException as exc:
                if exc.status != 404 or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield name
    finally:
        with contextlib.suppress(ApiException):
            core.delete_namespace(name)


def wait_until(
    check: Callable[[], T | None],
    *,
    timeout_s: float = 30.0,
    interval_s: float = 0.2,
    what: str = "condition",
) -> T:
    """Call ``check`` until it returns something truthy; return that, or fail the test.

    Controllers converge asynchronously; a bounded poll states what the test waits for and
    fails with that description instead of hanging until the pytest timeout.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}", pytrace=False)
        time.sleep(interval_s)
