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
from kubeml.testing.cluster.fixtures import temporary_namespace, wait_until

pytestmark = pytest.mark.integration

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


# -- the security settings of the pods kubeml generates, in real containers --------------------

_SECURITY_PROBE = """
import json, os
out = {"uid": os.getuid(), "gid": os.getgid()}
try:
    open("/kubeml-root-write", "w").close()
    out["root"] = "writable"
except OSError as exc:
    out["root"] = exc.errno
with open("/tmp/kubeml-scratch", "w") as f:
    f.write("ok")
out["tmp"] = "writable"
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
out.update({k: status[k].strip() for k in ("NoNewPrivs", "Seccomp", "CapEff", "CapBnd")})
print("probe", json.dumps(out))  # (a log that is all JSON comes back from the client as a dict's repr)
"""


@pytest.mark.parametrize("kind", ["predictor", "ray-head", "ray-worker"])
def test_generated_pods_run_with_their_security_settings_in_a_restricted_namespace(
    core: CoreV1Api, ns: str, kind: str
) -> None:
    """The predictor and Ray pods as kubeml builds them (pod and container securityContext,
    volumes and mounts kept as they are) run in a namespace that enforces Pod Security
    ``restricted``: as uid/gid 65532, on a read-only root with /tmp writable, no new
    privileges, seccomp filtering and no capabilities.

    Only what makes them start here is changed: the image and command are the operator
    image's python running a probe (the server and runtime images carry the CUDA build of
    PyTorch, about 5-6 GB each, and ``make test`` does not build them), placement is the real
    node's, resources are small, and the HTTP probes of a server that is not there are dropped.
    """
    import json

    from kubeml._kube import PLATFORM_POD_UID
    from tests.integration.platform_pods import platform_pods

    spec = platform_pods(ns)[kind]["spec"]
    (container,) = spec["containers"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        container.pop(probe, None)
    container.update(image=image_ref("operator"), imagePullPolicy="Never", command=["python3", "-c", _SECURITY_PROBE],
                     args=[], resources={"requests": {"cpu": "50m", "memory": "64Mi"},
                                         "limits": {"cpu": "500m", "memory": "256Mi"}})
    name = f"generated-{kind}"
    kept = {k: v for k, v in spec.items() if k in ("securityContext", "volumes")}
    phase, log = _finish(core, ns, name, [container], **kept)
    assert phase == "Succeeded", log
    seen = json.loads(log.strip().splitlines()[-1].removeprefix("probe "))
    assert (seen["uid"], seen["gid"]) == (PLATFORM_POD_UID, PLATFORM_POD_UID)
    assert seen["root"] == 30 and seen["tmp"] == "writable"  # EROFS on /, the emptyDir on /tmp
    assert seen["NoNewPrivs"] == "1" and seen["Seccomp"] == "2"  # 2: a seccomp filter is loaded
    assert int(seen["CapEff"], 16) == 0 and int(seen["CapBnd"], 16) == 0
