"""Each kubeml image runs its entrypoint in a real container on the real node.

The images come from ``make images`` (hack/images/build.sh: a Debian base from
mmdebstrap, the Containerfiles built with buildah), loaded into the node's containerd.
Every pod runs under Pod Security ``restricted`` as the image's non-root user.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes.client import CoreV1Api

from kubeml.images import image_ref
from kubeml.testing.cluster import image_archive, real_node_pod_spec
from kubeml.testing.cluster.fixtures import real_node_cluster_fixture, temporary_namespace, wait_until

pytestmark = pytest.mark.integration

real_cluster = real_node_cluster_fixture("pytest-images")

_RESTRICTED = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


@pytest.fixture(scope="module")
def core(real_cluster) -> Iterator[CoreV1Api]:
    node = real_cluster.node
    for kind in ("operator", "server", "runtime"):
        node.import_image(image_archive(kind))
    assert {image_ref(k) for k in ("operator", "server", "runtime")} <= set(node.images())
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
    # Without credentials it stops at once with the reason, not a traceback.
    phase, log = _finish(core, ns, "operator-no-api", [_container("operator", args=[
        "--kubeconfig", "/nonexistent/kubeconfig"])], automountServiceAccountToken=False)
    assert phase == "Failed"
    assert "/nonexistent/kubeconfig" in log
    assert "Traceback" not in log


def test_runtime_image_has_the_cli_ray_and_torch(core: CoreV1Api, ns: str) -> None:
    phase, log = _finish(core, ns, "runtime-help", [_container("runtime", args=["--help"])])
    assert phase == "Succeeded", log
    assert "kubeml" in log and "train" in log
    check = ("import ray, torch, kfp, mlflow, kubeml.training.ray_main; "
             "print('ok', ray.__version__, torch.nn.Linear(4, 2)(torch.zeros(1, 4)).shape)")
    phase, log = _finish(core, ns, "runtime-imports", [_container("runtime", command=["python3", "-c", check])])
    assert phase == "Succeeded", log
    assert log.startswith("ok 2.") and "torch.Size([1, 2])" in log


def test_server_image_serves_a_bundle(core: CoreV1Api, ns: str, tmp_path: Path) -> None:
    from kubeml.testing.serving import write_digits_bundle

    bundle = write_digits_bundle(tmp_path / "bundle")
    core.create_namespaced_config_map(ns, {
        "metadata": {"name": "digits-bundle"},
        "binaryData": {f.name: base64.b64encode(f.read_bytes()).decode() for f in bundle.iterdir()},
    })
    # A ConfigMap volume is a tree of symlinks, which bundle loading refuses; an init
    # container copies it into an emptyDir as plain files, as KServe's initializer would.
    spec = real_node_pod_spec([_container(
        "server",
        args=["--model-dir", "/models/digits", "--model-name", "digits", "--host", "0.0.0.0",
              "--http-port", "8080", "--grpc-port", "8081"],
        volumeMounts=[{"name": "models", "mountPath": "/models"}],
        readinessProbe={"httpGet": {"path": "/v2/models/digits/ready", "port": 8080}, "periodSeconds": 1},
    )], initContainers=[{
        **_container("server", command=["sh", "-c", "mkdir -p /models/digits && cp -L /bundle/* /models/digits/"],
                     volumeMounts=[{"name": "bundle", "mountPath": "/bundle"},
                                   {"name": "models", "mountPath": "/models"}]),
        "name": "copy",
    }], volumes=[{"name": "bundle", "configMap": {"name": "digits-bundle"}}, {"name": "models", "emptyDir": {}}])
    spec["restartPolicy"] = "Always"
    core.create_namespaced_pod(ns, {"metadata": {"name": "server", "labels": {"app": "server"}}, "spec": spec})

    def ready() -> object:
        pod = core.read_namespaced_pod("server", ns)
        statuses = pod.status.container_statuses or []
        return pod if statuses and statuses[0].ready else None

    pod = wait_until(ready, timeout_s=120, what="the model server Ready (model loaded)")
    url = f"http://{pod.status.pod_ip}:8080/v2/models/digits"
    phase, log = _finish(core, ns, "client", [{
        "name": "probe", "image": "kubeml.local/probe:1", "imagePullPolicy": "Never",
        "args": ["fetch", "-timeout", "5s", url], "securityContext": _RESTRICTED}])
    assert phase == "Succeeded", log
    assert log.startswith("200 ") and '"name":"digits"' in log.replace(" ", "")
