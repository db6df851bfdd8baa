"""The operator image runs its entrypoint in a real container on the real node.

The image comes from ``make images`` (hack/images/build.sh: a Debian base from mmdebstrap,
the Containerfile built with buildah), loaded into the node's containerd. The pods run under
Pod Security ``restricted`` as the image's non-root user, and as the chart's uid (65532),
which the image's /etc/passwd does not list.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kubernetes.client import CoreV1Api

from kubeml.images import image_ref
from kubeml.testing.cluster import RESTRICTED_CONTAINER, image_archive, real_node_pod_spec
from kubeml.testing.cluster.fixtures import real_node_cluster_fixture, temporary_namespace, wait_until

pytestmark = pytest.mark.integration

real_cluster = real_node_cluster_fixture("pytest-images")

_RESTRICTED = RESTRICTED_CONTAINER


@pytest.fixture(scope="module")
def core(real_cluster) -> Iterator[CoreV1Api]:
    node = real_cluster.node
    node.import_image(image_archive("operator"))
    assert image_ref("operator") in node.images()
    with real_cluster.api_client() as client:
        yield CoreV1Api(client)


@pytest.fixture
def ns(real_cluster, core) -> Iterator[str]:
    with real_cluster.api_client() as client, temporary_namespace(
        client, prefix="img", labels={"pod-security.kubernetes.io/enforce": "restricted"}
    ) as name:
        yield name


def _container(kind: str, **fields: object) -> dict:
    return {"name": kind, "image": image_ref(kind), "imagePullPolicy": "Never",
            "securityContext": _RESTRICTED, **fields}


def _finish(core: CoreV1Api, ns: str, name: str, containers: list[dict], timeout_s: float = 120,
            **spec: object) -> tuple[str, str]:
    core.create_namespaced_pod(ns, {"metadata": {"name": name}, "spec": real_node_pod_spec(containers, **spec)})

    def done() -> object:
        pod = core.read_namespaced_pod(name, ns)
        return pod if pod.status.phase in ("Succeeded", "Failed") else None

    pod = wait_until(done, timeout_s=timeout_s, what=f"pod {name} to finish")
    return pod.status.phase, core.read_namespaced_pod_log(name, ns, container=containers[-1]["name"])


def test_operator_image_runs_the_operator(core: CoreV1Api, ns: str) -> None:
    phase, log = _finish(core, ns, "operator-help", [_container("operator", args=["--help"])])
    assert phase == "Succeeded", log
    assert log.startswith("usage: python -m kubeml.operators")
    pod = core.read_namespaced_pod("operator-help", ns)
    assert pod.status.container_statuses[0].image == image_ref("operator")
    # Without credentials it stops at once with the reason, not a traceback.
    phase, log = _finish(core, ns, "operator-no-api", [_container("operator", args=[
        "--kubeconfig", "/nonexistent/kubeconfig"])], automountServiceAccountToken=False)
    assert phase == "Failed"
    assert "/nonexistent/kubeconfig" in log
    assert "Traceback" not in log


def test_operator_image_runs_as_an_unlisted_uid(core: CoreV1Api, ns: str) -> None:
    # kopf (and Ray) ask getpass.getuser() for the user name; with a uid that /etc/passwd does
    # not list that fails unless the image names the user in the environment.
    check = "import getpass, os; print(os.getuid(), getpass.getuser())"
    phase, log = _finish(core, ns, "operator-uid", [_container(
        "operator", command=["python3", "-c", check],
        securityContext={**_RESTRICTED, "runAsUser": 65532, "runAsGroup": 65532})])
    assert phase == "Succeeded", log
    assert log.strip() == "65532 kubeml"
