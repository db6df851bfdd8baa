"""The real node runs real containers: logs through the apiserver, enforced memory limits,
a pod network between pods, NetworkPolicies that drop packets, and a guard that keeps pod
traffic off the host and the outside.

Every pod here runs the probe image (``hack/cluster/node/probe``) under Pod Security
``restricted``, in a namespace that enforces it.
"""

from __future__ import annotations

import http.server
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
from kubernetes.client import CoreV1Api
from kubernetes.client.exceptions import ApiException

from kubeml.testing.cluster import POD_CIDR
from kubeml.testing.cluster.fixtures import temporary_namespace, wait_until
from tests.integration import probe_pods as probes

pytestmark = pytest.mark.integration

@pytest.fixture(scope="module")
def core(real_cluster) -> Iterator[CoreV1Api]:
    with real_cluster.api_client() as client:
        yield CoreV1Api(client)


@pytest.fixture
def ns(real_cluster) -> Iterator[str]:
    with real_cluster.api_client() as client, temporary_namespace(
        client, prefix="node", labels={"pod-security.kubernetes.io/enforce": "restricted"}
    ) as name:
        yield name


def test_container_runs_and_its_log_reaches_the_api(core: CoreV1Api, ns: str) -> None:
    phase, log = probes.run_to_end(core, ns, "hello", ["echo", "hello", "from", "a", "container"])
    assert phase == "Succeeded"
    assert log == "hello from a container\n"
    pod = core.read_namespaced_pod("hello", ns)
    assert pod.spec.node_name == "real-0"
    status = pod.status.container_statuses[0]
    assert status.state.terminated.exit_code == 0
    assert status.container_id.startswith("containerd://")


def test_failing_container_reports_its_exit_code(core: CoreV1Api, ns: str) -> None:
    phase, log = probes.run_to_end(core, ns, "no-such", ["no-such-command"])
    assert phase == "Failed"
    assert 'unknown command "no-such-command"' in log
    status = core.read_namespaced_pod("no-such", ns).status.container_statuses[0]
    assert status.state.terminated.exit_code == 2


def test_memory_limit_is_enforced(core: CoreV1Api, ns: str) -> None:
    limits = {"memory": "32Mi", "cpu": "500m"}
    core.create_namespaced_pod(ns, probes.probe("hog", ["alloc", "-mib", "256"],
                                          resources={"limits": limits, "requests": limits}))
    pod = probes.phase(core, ns, "hog", ("Failed",))
    terminated = pod.status.container_statuses[0].state.terminated
    assert terminated.reason == "OOMKilled"
    assert terminated.exit_code == 137


def test_pods_reach_each_other_over_the_pod_network(core: CoreV1Api, ns: str) -> None:
    core.create_namespaced_pod(ns, probes.probe("server", ["serve", "-addr", ":8080"]))
    server = probes.phase(core, ns, "server", ("Running",))
    ip = server.status.pod_ip
    assert ip.startswith(POD_CIDR.rsplit(".", 2)[0] + ".")
    # Running is reported when the process starts; the listener follows within milliseconds.
    wait_until(lambda: "serving on" in core.read_namespaced_pod_log("server", ns), what="the server listening")
    phase, log = probes.run_to_end(core, ns, "client", ["fetch", f"http://{ip}:8080/"])
    assert phase == "Succeeded", log
    client_ip = core.read_namespaced_pod("client", ns).status.pod_ip
    assert log.startswith(f"200 server {client_ip}:")


def test_a_service_reaches_its_pods_through_kube_proxy(core: CoreV1Api, ns: str) -> None:
    core.create_namespaced_pod(ns, probes.probe("backend", ["serve", "-addr", ":8080"]))
    probes.phase(core, ns, "backend", ("Running",))
    service = core.create_namespaced_service(ns, {
        "metadata": {"name": "backend"},
        "spec": {"selector": {"app": "backend"}, "ports": [{"port": 80, "targetPort": 8080}]},
    })
    cluster_ip = service.spec.cluster_ip
    wait_until(lambda: "serving on" in core.read_namespaced_pod_log("backend", ns), what="the backend listening")
    # kube-proxy programs the Service within its minimum sync period (1 s) of the
    # EndpointSlice; a client retries for a few seconds rather than racing it.
    phase, log = probes.run_to_end(core, ns, "svc-client", [
        "fetch", "-timeout", "2s", "-retry", "10s", f"http://{cluster_ip}/"])
    assert phase == "Succeeded", log
    assert log.splitlines()[-1].startswith("200 backend ")


def test_pods_find_services_by_name_through_the_cluster_dns(core: CoreV1Api, ns: str) -> None:
    """CoreDNS answers Service names (short, namespaced and fully qualified) from the
    pod's search path; the pod's resolver is the kube-dns Service, nothing else."""
    core.create_namespaced_pod(ns, probes.probe("named", ["serve", "-addr", ":8080"]))
    probes.phase(core, ns, "named", ("Running",))
    core.create_namespaced_service(ns, {
        "metadata": {"name": "named"},
        "spec": {"selector": {"app": "named"}, "ports": [{"port": 80, "targetPort": 8080}]},
    })
    wait_until(lambda: "serving on" in core.read_namespaced_pod_log("named", ns), what="the backend listening")
    for i, host in enumerate(("named", f"named.{ns}", f"named.{ns}.svc.cluster.local")):
        phase, log = probes.run_to_end(core, ns, f"dns-client-{i}", [
            "fetch", "-timeout", "2s", "-retry", "15s", f"http://{host}/"])
        assert phase == "Succeeded", (host, log)
        assert log.splitlines()[-1].startswith("200 named "), (host, log)
    pod = core.read_namespaced_pod("dns-client-0", ns)
    assert pod.spec.dns_policy == "ClusterFirst"


def test_names_outside_the_cluster_do_not_resolve(core: CoreV1Api, ns: str) -> None:
    """No forwarder: a name outside cluster.local is NXDOMAIN, answered on the node."""
    phase, log = probes.run_to_end(core, ns, "outside", ["fetch", "-timeout", "3s", "http://example.com/"])
    assert phase == "Failed", log
    assert "no such host" in log, log
    phase, log = probes.run_to_end(core, ns, "missing-svc", ["fetch", "-timeout", "3s", f"http://nothing-here.{ns}.svc/"])
    assert phase == "Failed", log
    assert "no such host" in log, log


def _reject_count() -> int:
    out = subprocess.run(["iptables", "-w", "5", "-L", "KUBEML-NODE", "-v", "-x", "-n"],
                         capture_output=True, text=True, check=True).stdout
    return sum(int(line.split()[0]) for line in out.splitlines()[2:] if "REJECT" in line)


class _Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the http.server protocol)
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def host_listener() -> Iterator[str]:
    """An HTTP server on an address of this host that is not the node's.

    It stands for "anything outside the pod network": the host's own services and, past
    the host, every other machine. The address is from 198.18.0.0/15 (benchmark testing),
    added to the host's loopback interface for the test, so no packet to it can leave the
    machine whatever the guard does.
    """
    address = "198.18.0.1"
    # replace, not add: a run killed mid-test (SIGKILL skips teardown) leaves the address.
    subprocess.run(["ip", "addr", "replace", f"{address}/32", "dev", "lo"], check=True)
    try:
        server = http.server.ThreadingHTTPServer((address, 0), _Ok)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://{address}:{server.server_address[1]}/"
        finally:
            server.shutdown()
            server.server_close()
    finally:
        subprocess.run(["ip", "addr", "del", f"{address}/32", "dev", "lo"], check=False)


def test_pod_traffic_to_the_host_and_beyond_is_rejected(core: CoreV1Api, ns: str, host_listener: str) -> None:
    import urllib.request

    # The listener answers the host itself: what stops the pod is the node's guard.
    with urllib.request.urlopen(host_listener, timeout=5) as response:
        assert response.status == 200
    node = core.read_node("real-0")
    kubelet = f"http://{node.status.addresses[0].address}:{node.status.daemon_endpoints.kubelet_endpoint.port}/"
    before = _reject_count()
    targets = {"host": host_listener, "kubelet": kubelet, "metadata": "http://169.254.169.254/latest/meta-data/"}
    for name, url in targets.items():
        phase, log = probes.run_to_end(core, ns, f"to-{name}", ["fetch", "-timeout", "3s", url])
        assert phase == "Failed", f"{name}: {log}"
        # Rejected at once with ICMP admin-prohibited ("no route to host"), not timed out.
        assert "no route to host" in log, f"{name}: {log}"
    assert _reject_count() >= before + len(targets)


def test_deleting_a_running_pod_stops_its_container(core: CoreV1Api, ns: str, real_cluster) -> None:
    core.create_namespaced_pod(ns, probes.probe("sleeper", ["sleep"]))
    pod = probes.phase(core, ns, "sleeper", ("Running",))
    container_id = pod.status.container_statuses[0].container_id.removeprefix("containerd://")
    core.delete_namespaced_pod("sleeper", ns)

    def gone() -> bool:
        try:
            core.read_namespaced_pod("sleeper", ns)
        except ApiException as exc:
            return exc.status == 404
        return False

    wait_until(gone, timeout_s=30, what="the pod deleted")
    node = real_cluster.node
    assert node is not None
    deadline = time.monotonic() + 30
    while container_id in node.ctr("tasks", "list", "--quiet").stdout.split():
        assert time.monotonic() < deadline, "the container still runs after its pod was deleted"
        time.sleep(0.2)


def test_an_image_the_node_lacks_is_never_pulled_from_outside(core: CoreV1Api, ns: str) -> None:
    body = probes.probe("remote", ["echo", "hi"], image="registry.example.com/team/app:1", imagePullPolicy="IfNotPresent")
    core.create_namespaced_pod(ns, body)

    def waiting() -> object:
        statuses = core.read_namespaced_pod("remote", ns).status.container_statuses or []
        state = statuses[0].state.waiting if statuses and statuses[0].state else None
        return state if state and state.reason in ("ErrImagePull", "ImagePullBackOff") else None

    state = wait_until(waiting, timeout_s=60, what="the pull to fail")
    # containerd was sent to the closed loopback port, not to registry.example.com.
    assert "127.0.0.1:9" in (state.message or ""), state.message


def test_the_images_no_registry_can_give_back_are_pinned(real_cluster) -> None:
    """Pinned, the kubelet's disk reclaim (the host's disk is shared) never deletes them."""
    from kubeml.testing.cluster import NODE_IMAGES

    listing = real_cluster.node.ctr("images", "list").stdout.splitlines()
    for ref in NODE_IMAGES.values():
        line = next((row for row in listing if row.split()[0] == ref), None)
        assert line is not None, (ref, listing)
        assert "io.cri-containerd.pinned=pinned" in line, line


def test_a_rayjob_whose_image_cannot_start_is_reported_stalled(real_cluster, core: CoreV1Api, ns: str) -> None:
    """The KubeRay operator (a real one) makes the Ray cluster's pods; their image (a tag no
    build makes: the shared node may hold the runtime image) is not on the node, and the wait
    reports that instead of waiting out its day. Deleting the job removes its pods."""
    from kubernetes.client import CustomObjectsApi

    from kubeml.config import KubemlConfig
    from kubeml.images import image_ref
    from kubeml.errors import JobStalled
    from kubeml.training.launchers import run_job
    from kubeml.training.launchers.kuberay import KubeRayOptions, rayjob_manifest

    toleration = {"key": "kubeml.io/node", "operator": "Equal", "value": "real", "effect": "NoSchedule"}
    cfg = KubemlConfig(environments={"dev": {"artifact_store": {"uri": "s3://kubeml-test/artifacts"}, "training": {
        "workers": 1, "launcher": {"namespace": ns, "node_group": "local", "head_node_group": "local",
                                   "image": image_ref("runtime").rpartition(":")[0] + ":never-built",
                                   "gpus_per_worker": 0, "cpus_per_worker": "1", "memory_per_worker": "1Gi",
                                   "head_cpu": "500m", "head_memory": "1Gi", "shm_size": "64Mi",
                                   "service_account": "default", "tolerations": [toleration],
                                   "head_tolerations": [toleration]}}}}).environment("dev")
    opts = KubeRayOptions.from_training(cfg.training)
    manifest = rayjob_manifest(cfg, run_id="stall-1", dataset="digits", dataset_version="v1", options=opts)
    with real_cluster.api_client() as client:
        with pytest.raises(JobStalled) as info:
            run_job(manifest, namespace=ns, poll_s=1, stall_s=180, image_grace_s=5, api_client=client)
        message = str(info.value)
        # The head, or a worker's KubeRay init container (wait-gcs-ready, same image), whichever first.
        assert "is stalled: pod kubeml-stall-1-" in message and "cannot start container " in message
        assert "ErrImagePull" in message or "ImagePullBackOff" in message
        assert opts.image in message
        pods = core.list_namespaced_pod(ns, label_selector="ray.io/is-ray-node=yes").items
        assert pods and all(p.spec.node_name == "real-0" for p in pods)
        CustomObjectsApi(client).delete_namespaced_custom_object("ray.io", "v1", ns, "rayjobs", manifest["metadata"]["name"])
    wait_until(lambda: not core.list_namespaced_pod(ns, label_selector="ray.io/is-ray-node=yes").items,
               timeout_s=60, what="the Ray pods removed with their RayJob")


# --- NetworkPolicy: enforced on the node, packet by packet ------------------------------------

def _isolate(net: object, ns: str) -> None:
    """A tenant's baseline: deny all ingress, then admit the namespace's own pods."""
    net.create_namespaced_network_policy(ns, {
        "metadata": {"name": "default-deny-ingress"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}})
    net.create_namespaced_network_policy(ns, {
        "metadata": {"name": "allow-same-namespace"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"from": [{"podSelector": {}}]}]}})


@pytest.fixture
def tenants(real_cluster) -> Iterator[tuple[str, str]]:
    labels = {"pod-security.kubernetes.io/enforce": "restricted"}
    with real_cluster.api_client() as client, \
            temporary_namespace(client, prefix="tenant-a", labels=labels) as a, \
            temporary_namespace(client, prefix="tenant-b", labels=labels) as b:
        yield a, b


def test_network_policy_drops_another_tenants_packets_until_it_is_removed(
        real_cluster, core: CoreV1Api, tenants: tuple[str, str]) -> None:
    from kubernetes.client import NetworkingV1Api

    a, b = tenants
    node = real_cluster.node
    with real_cluster.api_client() as client:
        net = NetworkingV1Api(client)
        for ns in tenants:
            _isolate(net, ns)
        a_ip, b_ip = probes.server(core, a, "server"), probes.server(core, b, "server")
        # The enforcer watches the same pods and policies; the watch events that told this
        # test the servers run reach it within milliseconds. A second covers a loaded machine.
        time.sleep(1)

        before = node.policy_verdicts()
        phase, log = probes.run_to_end(core, a, "same-tenant", ["fetch", "-timeout", "3s", f"http://{a_ip}:8080/"])
        assert phase == "Succeeded", log
        assert log.startswith("200 server ")

        phase, log = probes.run_to_end(core, a, "other-tenant", ["fetch", "-timeout", "3s", f"http://{b_ip}:8080/"])
        assert phase == "Failed", log
        # Dropped, not rejected: the SYN gets no answer and the client times out.
        assert "Client.Timeout exceeded" in log or "i/o timeout" in log, log
        after = node.policy_verdicts()
        assert after.get("drop", 0) > before.get("drop", 0), (before, after)
        assert after.get("accept", 0) > before.get("accept", 0), (before, after)

        for name in ("default-deny-ingress", "allow-same-namespace"):
            net.delete_namespaced_network_policy(name, b)
        phase, log = probes.run_to_end(core, a, "after-removal", [
            "fetch", "-timeout", "2s", "-retry", "10s", f"http://{b_ip}:8080/"])
        assert phase == "Succeeded", log
        assert log.splitlines()[-1].startswith("200 server ")


def test_a_policy_that_allows_all_egress_still_cannot_reach_instance_metadata(
        real_cluster, core: CoreV1Api, tenants: tuple[str, str]) -> None:
    """The node's guard chain sits below the policies: an allow-everything egress policy in
    a tenant namespace does not open the instance-metadata address."""
    from kubernetes.client import NetworkingV1Api

    a, _ = tenants
    with real_cluster.api_client() as client:
        net = NetworkingV1Api(client)
        _isolate(net, a)
        net.create_namespaced_network_policy(a, {
            "metadata": {"name": "allow-all-egress"},
            "spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{}]}})
    before = _reject_count()
    phase, log = probes.run_to_end(core, a, "to-metadata", [
        "fetch", "-timeout", "3s", "http://169.254.169.254/latest/meta-data/"])
    assert phase == "Failed", log
    assert "no route to host" in log, log
    assert _reject_count() > before
