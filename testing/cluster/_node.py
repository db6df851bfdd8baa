"""A real node beside the kwok ones: a kubelet with containerd, runc and the CNI bridge.

Pods bound to it run in real containers. Everything the node owns lives in the cluster's
state directory under ``node/`` (containerd's root and state, the kubelet's root, CNI
configuration and IPAM data, logs); what it must change on the host is recorded first
(:mod:`._host`) and put back by :meth:`RealNode.stop`.

Layout of the pod network: the ``kubeml0`` bridge, pod addresses from
:data:`POD_CIDR`, the bridge's own address as the pods' gateway. The ``KUBEML-NODE``
iptables chain, jumped to from INPUT and FORWARD for packets coming in on the bridge, lets pod
traffic reach other pods and Services and rejects everything else, so no pod packet
leaves the machine or reaches the host's own services unless a later rule lets it.
NetworkPolicies are enforced by kube-network-policies (Kubernetes SIG Network): the first
packet of each new connection goes to NFQUEUE :data:`NFQUEUE_ID`, where the enforcer
accepts or drops it. Its own nftables table :data:`NETPOL_TABLE` queues only pods that a
policy selects; on a kernel without the nftables queue expression the node's
:data:`NETPOL_CHAIN` queues every new connection to a pod instead (the enforcer accepts
those no policy selects).

The node is tainted :data:`REAL_NODE_TAINT` and labelled :data:`REAL_NODE_LABEL`: pods
meant to run select it and tolerate the taint, and nothing meant for a fake node lands on
it by accident. Only one real node can run per machine (the kubelet and containerd use a
few fixed host paths); a claim file in ``/run/kubeml`` says whose it is.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from kubeml._kube import restricted_container_security
from kubeml._proc import free_ports, port_free, udp_port_free
from kubeml.errors import ClusterError, ComponentFailed
from kubeml.testing.cluster import _host
from kubeml.testing.cluster._kubeconfig import write_kubeconfig
from kubeml.testing.cluster._nodes import Taint
from kubeml.testing.cluster._process import (
    ProcessRecord,
    is_alive,
    log_tail,
    stop_processes,
    wait_healthy,
)

if TYPE_CHECKING:
    import subprocess as _sp

    from kubeml.testing.cluster._assets import Assets
    from kubeml.testing.cluster._pki import CertificateAuthority

__all__ = [
    "NETPOL_CHAIN",
    "NETPOL_TABLE",
    "NFQUEUE_ID",
    "NODE_IMAGES",
    "POD_CIDR",
    "REAL_NODE_LABEL",
    "REAL_NODE_TAINT",
    "RESTRICTED_CONTAINER",
    "RealNode",
    "node_binaries",
    "preflight",
    "real_node_pod_spec",
]

log = logging.getLogger("kubeml.testing.cluster")

POD_CIDR = "10.88.0.0/24"
GATEWAY = "10.88.0.1"
BRIDGE = "kubeml0"
CHAIN = "KUBEML-NODE"
CGROUP_ROOT = "kubeml"
#: Where pods reach the apiserver: the ``kubernetes`` Service's endpoint, relayed to the
#: apiserver on loopback by the ``apiserver-proxy`` component (``_forward.py``).
APISERVER_PROXY_PORT = 6443
#: The cluster DNS: the ``kube-dns`` Service's ClusterIP (the kubelet's ``clusterDNS``), whose
#: endpoint is CoreDNS on the node's address.
CLUSTER_DNS = "10.96.0.10"
DNS_PORT = 53
#: The NetworkPolicy enforcer's nftables table (``"<family> <name>"``; the name is the
#: upstream default) and the NFQUEUE its rules hand new connections to (upstream's default
#: number; a queue has one listener, so two enforcers on one machine cannot share it).
NETPOL_TABLE = "inet kube-network-policies"
NFQUEUE_ID = 100
#: The iptables chain that queues new connections to pods when the kernel lacks nftables'
#: ``queue`` expression (CONFIG_NFT_QUEUE) but has the xtables NFQUEUE target.
NETPOL_CHAIN = "KUBEML-NETPOL"
_NFQUEUE_PROC = Path("/proc/net/netfilter/nfnetlink_queue")
#: Bridged pod-to-pod packets reach netfilter (kube-proxy's DNAT, the enforcer's hook) only
#: with this on.
_BRIDGE_NF = "net.bridge.bridge-nf-call-iptables"
NODE_NAME = "real-0"
NODE_GROUP = "local"
REAL_NODE_LABEL = ("kubeml.io/node", "real")
REAL_NODE_TAINT = Taint("kubeml.io/node", "real", "NoSchedule")
#: Images every real node has from the start, built by hack/cluster/build.sh from the
#: programs in hack/cluster/node/ (no registry is needed for them).
NODE_IMAGES = {"pause": "kubeml.local/pause:1", "probe": "kubeml.local/probe:1"}
#: Binaries of a real node, relative to the assets' ``bin`` directory.
NODE_BINARIES = (
    "ray-operator",
    "coredns",
    "kube-network-policies",
    "kubelet",
    "kube-proxy",
    "containerd",
    "containerd-shim-runc-v2",
    "ctr",
    "cni/bridge",
    "cni/host-local",
    "cni/loopback",
    "cni/portmap",
)
_CLAIM = Path("/run/kubeml/real-node.json")
#: Where the node's containerd "pulls" from: the discard port on loopback, closed, so a pull
#: fails at once and nothing is sent off the machine.
NO_REGISTRY = "http://127.0.0.1:9"
_SOCKET_DIR = Path("/run/kubeml/node")
_REQUIRED_CGROUPS = ("cpu", "cpuacct", "memory", "pids", "cpuset")


#: A container ``securityContext`` that passes Pod Security ``restricted`` on its own (the
#: platform's container context plus the seccomp profile, which it otherwise takes from the pod).
RESTRICTED_CONTAINER: dict[str, Any] = {**restricted_container_security(),
                                        "seccompProfile": {"type": "RuntimeDefault"}}


def node_binaries(assets: Assets) -> list[Path]:
    return [assets.bin_dir / name for name in NODE_BINARIES]


def real_node_pod_spec(containers: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """A pod spec that runs on the real node: its selector and toleration, no restarts."""
    spec: dict[str, Any] = {
        "nodeSelector": {REAL_NODE_LABEL[0]: REAL_NODE_LABEL[1]},
        "tolerations": [{"key": REAL_NODE_TAINT.key, "operator": "Equal",
                         "value": REAL_NODE_TAINT.value, "effect": REAL_NODE_TAINT.effect}],
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": 2,
        "containers": containers,
    }
    spec.update(extra)
    return spec


def preflight(assets: Assets) -> list[str]:
    """Why a real node cannot start on this machine; empty when it can."""
    problems: list[str] = []
    if platform.system() != "Linux":
        return [f"a real node needs Linux, this is {platform.system()}"]
    if os.geteuid() != 0:
        problems.append("a real node needs root (the kubelet and containerd manage mounts, "
                        "cgroups and network namespaces); run as root or start the cluster "
                        "with --no-real-node")
    # nft: the enforcer itself programs nftables over netlink; the node checks the kernel's
    # queue support and lists and deletes the enforcer's table with nft (`down`, crashes).
    for tool, package in (("runc", "runc"), ("iptables", "iptables"), ("iptables-save", "iptables"),
                          ("ip", "iproute2"), ("nft", "nftables"), ("unshare", "util-linux")):
        if shutil.which(tool) is None:
            problems.append(f"{tool} is not on PATH: install the {package} package "
                            "(`make cluster-assets` does it as root)")
    missing = [str(p) for p in node_binaries(assets) if not os.access(p, os.X_OK)]
    missing += [str(assets.root / "images" / f"{name}.tar") for name in NODE_IMAGES
                if not (assets.root / "images" / f"{name}.tar").is_file()]
    if missing:
        problems.append(f"real-node assets missing: {', '.join(missing)}; run `make cluster-assets`")
    try:
        filesystems = Path("/proc/filesystems").read_text()
    except OSError:
        filesystems = ""
    if "overlay" not in filesystems:
        problems.append("the kernel has no overlay filesystem (containerd's snapshotter needs it): "
                        "`modprobe overlay` or use a kernel with CONFIG_OVERLAY_FS")
    mounted = {p.name for p in _host.cgroup_mounts()} | {
        c for p in _host.cgroup_mounts() for c in p.name.split(",")}
    unified = Path("/sys/fs/cgroup/cgroup.controllers")
    if not unified.exists():
        absent = [c for c in _REQUIRED_CGROUPS if c not in mounted]
        if absent:
            problems.append(f"cgroup controllers not mounted: {', '.join(absent)} "
                            "(the kubelet enforces pod limits with them)")
    if not _NFQUEUE_PROC.exists():
        problems.append("the kernel has no NFQUEUE (no /proc/net/netfilter/nfnetlink_queue), which the "
                        "NetworkPolicy enforcer hands new connections to: `modprobe nfnetlink_queue` or use a "
                        "kernel with CONFIG_NETFILTER_NETLINK_QUEUE (and CONFIG_NFT_QUEUE or "
                        "CONFIG_NETFILTER_XT_TARGET_NFQUEUE)")
    if _host.read_tunable(_BRIDGE_NF) is None:
        problems.append("bridged pod traffic bypasses netfilter (no net.bridge.bridge-nf-call-iptables), so "
                        "Services and NetworkPolicies would not apply between pods: `modprobe br_netfilter` "
                        "or use a kernel with CONFIG_BRIDGE_NETFILTER")
    if not Path("/proc/sys/net/ipv4/ip_forward").exists():
        problems.append("no IPv4 forwarding control in /proc/sys: the kernel lacks networking the pods need")
    return problems


#: The label by which containerd's CRI reports an image as pinned (never garbage-collected).
PINNED_LABEL = "io.cri-containerd.pinned"

class RealNode:
    """Starts and stops the real node of one cluster."""

    def __init__(self, cluster_name: str, state_dir: Path, assets: Assets):
        self.cluster_name = cluster_name
        self.dir = state_dir / "node"
        self.assets = assets

    # --- paths ---------------------------------------------------------------------------
    @property
    def containerd_socket(self) -> Path:
        # A unix socket path has at most 107 bytes, less than a state directory under a
        # test's tmp_path can take; there is one real node per machine, so a fixed place.
        return _SOCKET_DIR / "containerd.sock"

    def _claim(self) -> None:
        _CLAIM.parent.mkdir(parents=True, exist_ok=True)
        try:
            current = json.loads(_CLAIM.read_text())
        except FileNotFoundError:
            current = None
        except (OSError, ValueError):
            current = None
        if current and current.get("node_dir") != str(self.dir):
            other = Path(current.get("state_dir", ""))
            if (other / "state.json").exists() and _state_alive(other / "state.json"):
                raise ClusterError(
                    f"a real node already runs on this machine for cluster {current.get('cluster')!r} "
                    f"({other}); stop it with `kubeml cluster down --name {current.get('cluster')}` "
                    "or start this cluster with --no-real-node")
            log.warning("taking over the real-node claim of stale cluster %s", current.get("cluster"))
            stale = Path(current.get("node_dir", ""))
            snapshot = current.get("snapshot")
            if snapshot and stale.name == "node":
                _host.restore_host(_host.HostSnapshot.from_dict(snapshot), node_dir=stale,
                                   cgroup_root=CGROUP_ROOT, own_chains=(CHAIN, NETPOL_CHAIN), bridge=BRIDGE,
                                   own_nft_tables=(NETPOL_TABLE,))
        self.dir.mkdir(parents=True, exist_ok=True)
        _SOCKET_DIR.mkdir(parents=True, exist_ok=True)

    # --- start ---------------------------------------------------------------------------
    def start(self, state: dict[str, Any], *, ca: CertificateAuthority, server: str, deadline: float,
              launch: Any, save: Any, api_client: Any) -> None:
        """Bring the node up; ``launch(name, argv, health)`` starts and records a process.

        The host snapshot is written to ``state`` before anything changes, so a crash at any
        point leaves a record :meth:`stop` can restore from.
        """
        problems = preflight(self.assets)
        if problems:
            raise ClusterError("cannot start the real node:\n  - " + "\n  - ".join(problems))
        self._claim()
        snapshot = _host.HostSnapshot.take()
        state["node"] = {"dir": str(self.dir), "snapshot": snapshot.to_dict(), "name": NODE_NAME}
        save()
        _CLAIM.write_text(json.dumps({"cluster": self.cluster_name, "state_dir": str(self.dir.parent),
                                      "node_dir": str(self.dir), "snapshot": snapshot.to_dict()}))
        t0 = time.monotonic()
        self._network()
        self._start_containerd(launch, deadline)
        self._import_images(deadline)
        log.info("real node: containerd up, images imported after %.1f s", time.monotonic() - t0)
        self._start_kubelet(launch, ca=ca, server=server, deadline=deadline)
        self._start_kube_proxy(launch, ca=ca, server=server, deadline=deadline)
        self._start_network_policies(launch, ca=ca, server=server, api_client=api_client, deadline=deadline)
        self._expose_apiserver(launch, server=server, api_client=api_client, deadline=deadline)
        self._start_coredns(launch, ca=ca, server=server, api_client=api_client, deadline=deadline)
        self._start_kuberay(launch, ca=ca, server=server, deadline=deadline)

    def _network(self) -> None:
        cni = self.dir / "cni"
        (cni / "net.d").mkdir(parents=True, exist_ok=True)
        (cni / "ipam").mkdir(parents=True, exist_ok=True)
        conflist = {
            "cniVersion": "1.0.0",
            "name": "kubeml",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "isDefaultGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_CIDR, "gateway": GATEWAY}]],
                        "dataDir": str(cni / "ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        (cni / "net.d" / "10-kubeml.conflist").write_text(json.dumps(conflist, indent=2))
        # The bridge exists before the first pod: its address is the node's InternalIP,
        # where the apiserver reaches the kubelet (a kubelet refuses a loopback node IP).
        if BRIDGE not in _host.network_links():
            _run(["ip", "link", "add", BRIDGE, "type", "bridge"], "creating the pod bridge")
        _run(["ip", "addr", "replace", f"{GATEWAY}/{POD_CIDR.split('/')[1]}", "dev", BRIDGE], "addressing the pod bridge")
        _run(["ip", "link", "set", BRIDGE, "up"], "starting the pod bridge")
        # The guard chain: pod traffic may go to pods and Services; anything else from a pod
        # (other hosts, the host's own addresses) is rejected before it is routed.
        _host.remove_chain("filter", CHAIN)
        for args in (
            ("-N", CHAIN),
            ("-A", CHAIN, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "RETURN"),
            # The apiserver, through the relay (the `kubernetes` Service's endpoint).
            ("-A", CHAIN, "-d", GATEWAY, "-p", "tcp", "--dport", str(APISERVER_PROXY_PORT), "-j", "RETURN"),
            # CoreDNS, the kube-dns Service's endpoint.
            ("-A", CHAIN, "-d", GATEWAY, "-p", "udp", "--dport", str(DNS_PORT), "-j", "RETURN"),
            ("-A", CHAIN, "-d", GATEWAY, "-p", "tcp", "--dport", str(DNS_PORT), "-j", "RETURN"),
            # The node's own address on the bridge (the kubelet listens there) is not a pod.
            ("-A", CHAIN, "-d", GATEWAY, "-j", "REJECT", "--reject-with", "icmp-admin-prohibited"),
            ("-A", CHAIN, "-d", POD_CIDR, "-j", "RETURN"),
            ("-A", CHAIN, "-j", "REJECT", "--reject-with", "icmp-admin-prohibited"),
            # By input interface, not source address: the host's own connections to the
            # kubelet on the bridge address come from that address too, but over lo.
            ("-I", "INPUT", "1", "-i", BRIDGE, "-j", CHAIN),
            ("-I", "FORWARD", "1", "-i", BRIDGE, "-j", CHAIN),
        ):
            _run(["iptables", "-w", "5", *args], "iptables")

    def _containerd_config(self) -> Path:
        root = self.dir / "containerd"
        for sub in ("root", "state", "opt", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        cni = self.dir / "cni"
        runc = shutil.which("runc") or "runc"
        config = f"""\
version = 4
root = '{root / "root"}'
state = '{root / "state"}'
temp = '{root / "tmp"}'
imports = []
disabled_plugins = [
  'io.containerd.snapshotter.v1.btrfs', 'io.containerd.snapshotter.v1.zfs',
  'io.containerd.snapshotter.v1.devmapper', 'io.containerd.snapshotter.v1.blockfile',
  'io.containerd.snapshotter.v1.erofs', 'io.containerd.differ.v1.erofs',
  'io.containerd.nri.v1.nri', 'io.containerd.tracing.processor.v1.otlp',
  'io.containerd.internal.v1.tracing', 'io.containerd.grpc.v1.cri-tcp',
]

[debug]
  level = 'info'

[plugins]
  [plugins.'io.containerd.server.v1.grpc']
    address = '{self.containerd_socket}'
  [plugins.'io.containerd.server.v1.ttrpc']
    address = '{self.containerd_socket}.ttrpc'
  [plugins.'io.containerd.internal.v1.opt']
    path = '{root / "opt"}'
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = '{NODE_IMAGES["pause"]}'
    [plugins.'io.containerd.cri.v1.images'.registry]
      config_path = '{root / "certs.d"}'
  [plugins.'io.containerd.cri.v1.runtime']
    # Root without CAP_SYS_RESOURCE cannot lower oom_score_adj; every sandbox fails to
    # start unless containerd keeps the scores at or above its own.
    restrict_oom_score_adj = true
    netns_mounts_under_state_dir = true
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = 'runc'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = 'io.containerd.runc.v2'
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          BinaryName = '{runc}'
          SystemdCgroup = false
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ['{self.assets.bin_dir / "cni"}']
      conf_dir = '{cni / "net.d"}'
      max_conf_num = 1
  [plugins.'io.containerd.grpc.v1.cri']
    stream_server_address = '127.0.0.1'
    stream_server_port = '0'
"""
        # Every registry resolves to a closed loopback port: images come from `make images`
        # and the node's own archives, and a pod naming any other image fails with
        # ErrImagePull at once instead of sending a request (or a DNS query) off the machine.
        default_hosts = root / "certs.d" / "_default"
        default_hosts.mkdir(parents=True, exist_ok=True)
        (default_hosts / "hosts.toml").write_text(
            f"# Written by kubeml: no registry is reachable from the local real node.\n"
            f"server = '{NO_REGISTRY}'\n\n[host.'{NO_REGISTRY}']\n  capabilities = ['pull', 'resolve']\n")
        path = root / "config.toml"
        path.write_text(config)
        return path

    def _start_containerd(self, launch: Any, deadline: float) -> None:
        config = self._containerd_config()
        proc, record = launch("containerd", [str(self.assets.binary("containerd")), f"--config={config}"], "")
        while not self.containerd_socket.exists() or not self._ctr_ok():
            if proc.poll() is not None:
                raise ComponentFailed("containerd", f"exited during startup (status {proc.returncode})",
                                      log_tail(record.log), record.log)
            if time.monotonic() > deadline:
                raise ComponentFailed("containerd", "its socket did not answer in time",
                                      log_tail(record.log), record.log)
            time.sleep(0.1)

    def ctr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.assets.binary("ctr")), "--address", str(self.containerd_socket),
                               "--namespace", "k8s.io", *args], capture_output=True, text=True, timeout=timeout)

    def import_image(self, archive: Path, timeout_s: float = 600.0) -> None:
        """Load an OCI archive (``make images`` writes them) into the node's containerd, pinned.

        No registry can give these images back, so each is pinned (CRI's
        ``io.cri-containerd.pinned`` label): the kubelet reclaiming disk under pressure
        (the host's disk is shared with everything else on the machine) deletes unused
        images, but never pinned ones.
        """
        result = self.ctr("images", "import", str(archive), timeout=timeout_s)
        if result.returncode != 0:
            raise ClusterError(f"importing {archive} into the node's containerd failed: "
                               f"{(result.stderr or result.stdout).strip()[-500:]}")
        self.pin_images()

    def pin_images(self) -> None:
        """Pin every image the node has (see :meth:`import_image`)."""
        for ref in self.images():
            result = self.ctr("images", "label", ref, f"{PINNED_LABEL}=pinned", timeout=30)
            if result.returncode != 0:
                raise ClusterError(f"pinning {ref} in the node's containerd failed: "
                                   f"{(result.stderr or result.stdout).strip()[-300:]}")

    def images(self) -> list[str]:
        """References of the images the node has."""
        result = self.ctr("images", "list", "--quiet", timeout=30)
        return [line for line in result.stdout.split() if not line.startswith("sha256:")]

    @contextlib.contextmanager
    def host_service(self, port: int, *, what: str = "a host service") -> Iterator[str]:
        """Let the node's pods reach a service this machine runs on ``127.0.0.1:port``.

        Pods cannot reach the host's loopback (the guard chain rejects it, and a pod's own
        loopback is itself). For the time of the ``with``, a relay listens on the node's
        address at the same port and one guard rule lets pods reach it; both go away at
        exit. Yields ``"10.88.0.1:PORT"``, the address pods use (the host can use it too).
        The tests use it for the S3 API (moto) the Ray pods write checkpoints to.
        """
        import sys

        if not port_free(GATEWAY, port):
            raise ClusterError(f"port {GATEWAY}:{port} (the pods' way to {what}) is in use; free it")
        log_path = self.dir.parent / "logs" / f"host-service-{port}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        rule = ("KUBEML-NODE", "-d", GATEWAY, "-p", "tcp", "--dport", str(port), "-j", "RETURN")
        with log_path.open("ab") as out:
            relay = subprocess.Popen([sys.executable, "-m", "kubeml.testing.cluster._forward",
                                      f"{GATEWAY}:{port}", f"127.0.0.1:{port}"],
                                     stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 15
            while port_free(GATEWAY, port):
                if relay.poll() is not None or time.monotonic() > deadline:
                    raise ComponentFailed(f"relay to {what}", f"not listening on {GATEWAY}:{port}",
                                          log_tail(str(log_path)), str(log_path))
                time.sleep(0.05)
            # Position 2: after the ESTABLISHED/RELATED shortcut, before the node address's REJECT.
            _run(["iptables", "-w", "5", "-I", rule[0], "2", *rule[1:]], f"letting pods reach {what}")
            try:
                yield f"{GATEWAY}:{port}"
            finally:
                subprocess.run(["iptables", "-w", "5", "-D", *rule], capture_output=True, timeout=30)
        finally:
            relay.terminate()
            try:
                relay.wait(timeout=10)
            except subprocess.TimeoutExpired:
                relay.kill()
                relay.wait(timeout=10)

    def _ctr_ok(self) -> bool:
        try:
            return self.ctr("version", timeout=5).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def _import_images(self, deadline: float) -> None:
        for name in NODE_IMAGES:
            tar = self.assets.root / "images" / f"{name}.tar"
            self.import_image(tar, timeout_s=max(5.0, deadline - time.monotonic()))

    def _start_kubelet(self, launch: Any, *, ca: CertificateAuthority, server: str, deadline: float) -> None:
        kubelet_dir = self.dir / "kubelet"
        pki = self.dir / "pki"
        for directory in (kubelet_dir, pki, self.dir / "pod-logs"):
            directory.mkdir(parents=True, exist_ok=True)
        serving = ca.issue(NODE_NAME, dns_names=(NODE_NAME, "localhost"), ip_addresses=(GATEWAY, "127.0.0.1"),
                           server=True, client=False)
        cert, key = serving.write(pki, "kubelet-serving")
        ca_file = pki / "ca.crt"
        ca_file.write_bytes(ca.keypair.cert_pem)
        kubeconfig = self._client_kubeconfig(ca, server, f"system:node:{NODE_NAME}", ("system:nodes",))
        _host.create_cgroup_root(CGROUP_ROOT)
        port, healthz = free_ports(2)
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": GATEWAY,
            "port": port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": healthz,
            "tlsCertFile": str(cert),
            "tlsPrivateKeyFile": str(key),
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(ca_file)}},
            "authorization": {"mode": "Webhook"},
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": f"/{CGROUP_ROOT}",
            # This machine has the cgroup v1 hierarchies (cgroup2 only at
            # /sys/fs/cgroup/unified); without this the kubelet refuses to start.
            "failCgroupV1": False,
            "failSwapOn": False,
            "makeIPTablesUtilChains": False,
            "protectKernelDefaults": False,
            # Pods resolve through the cluster DNS only: the host's resolvers are not theirs,
            # and a name outside the cluster answers NXDOMAIN (nothing leaves the machine).
            "resolvConf": "",
            "clusterDNS": [CLUSTER_DNS],
            "clusterDomain": "cluster.local",
            "podLogsDir": str(self.dir / "pod-logs"),
            "maxPods": 32,
            "registerNode": True,
            "registerWithTaints": [REAL_NODE_TAINT.to_dict()],
            "serializeImagePulls": False,
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            # The host disk is shared with everything else on the machine: evict only when
            # it is really full, not at the 10-15 % a dedicated node would keep free.
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
            "nodeStatusReportFrequency": "10s",
            "nodeStatusUpdateFrequency": "5s",
            "syncFrequency": "10s",
            "fileCheckFrequency": "20s",
            "volumeStatsAggPeriod": "0s",
            "enableServer": True,
            "localStorageCapacityIsolation": True,
            "staticPodPath": "",
            "cpuCFSQuota": True,
        }
        config_path = self.dir / "kubelet.yaml"
        config_path.write_text(json.dumps(config, indent=2))
        # An EKS-style node group label, so manifests that select node groups (the RayJob's
        # head and workers) can name this node: training.launcher.node_group: local.
        labels = ",".join([f"{REAL_NODE_LABEL[0]}={REAL_NODE_LABEL[1]}", "type=real",
                           "node.kubernetes.io/instance-type=local", f"eks.amazonaws.com/nodegroup={NODE_GROUP}"])
        health = f"http://127.0.0.1:{healthz}/healthz"
        proc, record = launch("kubelet", [
            str(self.assets.binary("kubelet")),
            f"--config={config_path}",
            f"--kubeconfig={kubeconfig}",
            f"--root-dir={kubelet_dir}",
            f"--cert-dir={pki}",
            f"--hostname-override={NODE_NAME}",
            f"--node-ip={GATEWAY}",
            f"--node-labels={labels}",
            "--v=1",
        ], health)
        wait_healthy(record, health, deadline=deadline, proc=proc)

    def _client_kubeconfig(self, ca: CertificateAuthority, server: str, user: str,
                           groups: tuple[str, ...] = ()) -> Path:
        """A kubeconfig for one of the node's components: a client certificate from the CA."""
        stem = user.replace("system:", "").replace(":", "-")
        client = ca.issue(user, organizations=groups)
        client.write(self.dir / "pki", stem)
        return write_kubeconfig(self.dir / f"{stem}.kubeconfig", cluster_name=self.cluster_name, server=server,
                                ca_pem=ca.keypair.cert_pem, user=user, cert_pem=client.cert_pem,
                                key_pem=client.key_pem)

    def _start_kube_proxy(self, launch: Any, *, ca: CertificateAuthority, server: str, deadline: float) -> None:
        """kube-proxy in iptables mode: ClusterIP Services for the pods of this node.

        Its identity is ``system:kube-proxy``, which the bootstrap ClusterRoleBinding
        ``system:node-proxier`` already grants what it needs. Conntrack sizing and timeouts
        are left as the host has them (zeros), NodePorts answer on the bridge address only,
        never on the host's loopback (``localhostNodePorts: false``, so no
        ``route_localnet``).
        """
        kubeconfig = self._client_kubeconfig(ca, server, "system:kube-proxy")
        healthz, metrics = free_ports(2)
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "hostnameOverride": NODE_NAME,
            "mode": "iptables",
            "clusterCIDR": POD_CIDR,
            "detectLocalMode": "ClusterCIDR",
            "healthzBindAddress": f"127.0.0.1:{healthz}",
            "metricsBindAddress": f"127.0.0.1:{metrics}",
            "nodePortAddresses": [f"{GATEWAY}/32"],
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s",
                          "tcpCloseWaitTimeout": "0s"},
            "iptables": {"localhostNodePorts": False, "masqueradeAll": False,
                         "syncPeriod": "30s", "minSyncPeriod": "1s"},
        }
        config_path = self.dir / "kube-proxy.yaml"
        config_path.write_text(json.dumps(config, indent=2))
        health = f"http://127.0.0.1:{healthz}/livez"
        proc, record = launch("kube-proxy", [str(self.assets.binary("kube-proxy")), f"--config={config_path}",
                                             "--v=1"], health)
        wait_healthy(record, health, deadline=deadline, proc=proc)

    def _start_network_policies(self, launch: Any, *, ca: CertificateAuthority, server: str, api_client: Any,
                                deadline: float) -> None:
        """kube-network-policies: NetworkPolicies of this node's pods, enforced per connection.

        Its nftables table hooks postrouting (before source NAT) and, for pods a policy
        selects, queues the first packet of each new connection to :data:`NFQUEUE_ID`; the
        enforcer evaluates the policies and accepts or drops it (fail closed: with the
        enforcer gone, queued packets are dropped). Later packets pass on conntrack state.
        A kernel without nftables' queue expression refuses that table (the enforcer logs
        the failed sync and keeps serving its queue); there :data:`NETPOL_CHAIN`, jumped to
        from FORWARD for packets out to the bridge, queues every new connection to a pod
        with the xtables NFQUEUE target, and the enforcer accepts those of pods no policy
        selects. Pod-to-pod traffic on the bridge reaches netfilter only with
        ``bridge-nf-call-iptables`` on, which is set here (the snapshot restores it).
        Traffic to the node's own address is not forwarded; the guard chain decides it.
        Its identity reads pods, namespaces and policies, and writes events.
        """
        from kubernetes.client import RbacAuthorizationV1Api

        if _queue_bound(NFQUEUE_ID):
            raise ClusterError(f"NFQUEUE {NFQUEUE_ID} (the NetworkPolicy enforcer's) is bound by another "
                               "process; stop it (another kube-network-policies?) and retry")
        if _host.read_tunable(_BRIDGE_NF) != "1":
            _host.write_tunable(_BRIDGE_NF, "1")
        user = "system:kubeml:network-policies"
        with api_client() as client:
            rbac = RbacAuthorizationV1Api(client)
            role = {"metadata": {"name": "kubeml:network-policies"},
                    "rules": [{"apiGroups": [""], "resources": ["pods", "namespaces"], "verbs": ["list", "watch"]},
                              {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"],
                               "verbs": ["list", "watch"]},
                              {"apiGroups": ["", "events.k8s.io"], "resources": ["events"],
                               "verbs": ["create", "patch", "update"]}]}
            binding = {"metadata": {"name": "kubeml:network-policies"},
                       "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                   "name": "kubeml:network-policies"},
                       "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]}
            _create_or_replace(rbac.create_cluster_role, rbac.replace_cluster_role, role)
            _create_or_replace(rbac.create_cluster_role_binding, rbac.replace_cluster_role_binding, binding)
        kubeconfig = self._client_kubeconfig(ca, server, user)
        _host.remove_chain("filter", NETPOL_CHAIN)
        if not _nft_queue_supported():
            try:
                for args in (
                    ("-N", NETPOL_CHAIN),
                    ("-A", NETPOL_CHAIN, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "RETURN"),
                    # No --queue-bypass: while no enforcer listens, new connections are dropped.
                    ("-A", NETPOL_CHAIN, "-j", "NFQUEUE", "--queue-num", str(NFQUEUE_ID)),
                    ("-I", "FORWARD", "1", "-o", BRIDGE, "-j", NETPOL_CHAIN),
                ):
                    _run(["iptables", "-w", "5", *args], "iptables")
            except ClusterError as exc:
                raise ClusterError(
                    "the kernel can queue packets to the NetworkPolicy enforcer neither with nftables "
                    "(CONFIG_NFT_QUEUE) nor with iptables (CONFIG_NETFILTER_XT_TARGET_NFQUEUE): "
                    f"`modprobe nft_queue` or `modprobe xt_NFQUEUE`, or use a kernel with either ({exc})") from exc
        (metrics,) = free_ports(1)
        health = f"http://127.0.0.1:{metrics}/readyz"
        proc, record = launch("network-policies", [
            str(self.assets.binary("kube-network-policies")),
            f"--kubeconfig={kubeconfig}",
            f"--hostname-override={NODE_NAME}",
            f"--nfqueue-id={NFQUEUE_ID}",
            f"--metrics-bind-address=127.0.0.1:{metrics}",
            "--v=1",
        ], health)
        wait_healthy(record, health, deadline=deadline, proc=proc)

    def _start_coredns(self, launch: Any, *, ca: CertificateAuthority, server: str, api_client: Any,
                       deadline: float) -> None:
        """CoreDNS on the node's address, and the ``kube-dns`` Service that points at it.

        Pods ask :data:`CLUSTER_DNS`; kube-proxy carries the query to CoreDNS on
        ``10.88.0.1:53``, which answers Service and pod names of ``cluster.local`` from the
        apiserver (read-only: a ClusterRole for Services, EndpointSlices and Namespaces).
        It has no ``forward``: any other name is NXDOMAIN, so no query leaves the machine.
        """
        from kubernetes.client import CoreV1Api, DiscoveryV1Api, RbacAuthorizationV1Api

        for proto, free in (("udp", udp_port_free), ("tcp", port_free)):
            if not free(GATEWAY, DNS_PORT):
                raise ClusterError(f"port {GATEWAY}:{DNS_PORT}/{proto} (the cluster DNS) is in use; free it")
        user = "system:kubeml:coredns"
        with api_client() as client:
            rbac = RbacAuthorizationV1Api(client)
            role = {"metadata": {"name": "kubeml:coredns"},
                    "rules": [{"apiGroups": [""], "resources": ["services", "namespaces"],
                               "verbs": ["list", "watch"]},
                              {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                               "verbs": ["list", "watch"]}]}
            binding = {"metadata": {"name": "kubeml:coredns"},
                       "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                   "name": "kubeml:coredns"},
                       "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]}
            _create_or_replace(rbac.create_cluster_role, rbac.replace_cluster_role, role)
            _create_or_replace(rbac.create_cluster_role_binding, rbac.replace_cluster_role_binding, binding)
            service = {"metadata": {"name": "kube-dns", "namespace": "kube-system",
                                    "labels": {"k8s-app": "kube-dns", "kubernetes.io/name": "CoreDNS"}},
                       "spec": {"clusterIP": CLUSTER_DNS,
                                "ports": [{"name": "dns", "port": DNS_PORT, "protocol": "UDP"},
                                          {"name": "dns-tcp", "port": DNS_PORT, "protocol": "TCP"}]}}
            core = CoreV1Api(client)
            _create_or_replace(lambda body: core.create_namespaced_service("kube-system", body),
                               lambda name, body: core.replace_namespaced_service(name, "kube-system", body),
                               service)
            slice_ = {"metadata": {"name": "kube-dns", "namespace": "kube-system",
                                   "labels": {"kubernetes.io/service-name": "kube-dns",
                                              "endpointslice.kubernetes.io/managed-by": "kubeml.io-local-cluster"}},
                      "addressType": "IPv4",
                      "endpoints": [{"addresses": [GATEWAY], "conditions": {"ready": True}}],
                      "ports": [{"name": "dns", "port": DNS_PORT, "protocol": "UDP"},
                                {"name": "dns-tcp", "port": DNS_PORT, "protocol": "TCP"}]}
            discovery = DiscoveryV1Api(client)
            _create_or_replace(lambda body: discovery.create_namespaced_endpoint_slice("kube-system", body),
                               lambda name, body: discovery.replace_namespaced_endpoint_slice(
                                   name, "kube-system", body), slice_)
        kubeconfig = self._client_kubeconfig(ca, server, user)
        health, ready, metrics = free_ports(3)
        corefile = self.dir / "Corefile"
        corefile.write_text(f"""\
cluster.local:{DNS_PORT} in-addr.arpa:{DNS_PORT} ip6.arpa:{DNS_PORT} {{
    bind {GATEWAY}
    errors
    health 127.0.0.1:{health}
    ready 127.0.0.1:{ready}
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        ttl 5
    }}
    cache 5
    loadbalance
}}
.:{DNS_PORT} {{
    bind {GATEWAY}
    errors
    template ANY ANY {{
        rcode NXDOMAIN
    }}
}}
""")
        url = f"http://127.0.0.1:{ready}/ready"
        proc, record = launch("coredns", [str(self.assets.binary("coredns")), "-conf", str(corefile)], url)
        wait_healthy(record, url, deadline=deadline, proc=proc)

    def _start_kuberay(self, launch: Any, *, ca: CertificateAuthority, server: str, deadline: float) -> None:
        """The KubeRay operator (the CRDs' version): RayJobs become Ray clusters of real pods.

        It runs as a cluster admin, as kwok does here; on EKS its chart gives it its own
        ServiceAccount and ClusterRole.

        It follows a job through the head's dashboard, by the head Service's cluster DNS
        name, as it does from its pod on EKS. A host process asks the host's resolver, which
        knows no cluster names, so the operator runs in a mount namespace of its own where
        ``/etc/resolv.conf`` names CoreDNS on the node's address (nothing else on the host
        sees that file); the Service's ClusterIP then reaches the head through kube-proxy's
        rules for host traffic.
        """
        kubeconfig = self._client_kubeconfig(ca, server, "kuberay-operator", ("system:masters",))
        metrics, probes = free_ports(2)
        health = f"http://127.0.0.1:{probes}/readyz"
        resolv = self.dir / "cluster-resolv.conf"
        resolv.write_text(f"nameserver {GATEWAY}\noptions ndots:1 timeout:2 attempts:3\n")
        unshare = shutil.which("unshare") or "/usr/bin/unshare"
        proc, record = launch("kuberay-operator", [
            unshare, "--mount", "--propagation", "private", "--",
            "/bin/sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(resolv),
            str(self.assets.binary("ray-operator")),
            f"-kubeconfig={kubeconfig}",
            f"-metrics-addr=127.0.0.1:{metrics}",
            f"-health-probe-bind-address=127.0.0.1:{probes}",
            "-enable-leader-election=false",
            "-zap-log-level=info",
        ], health)
        wait_healthy(record, health, deadline=deadline, proc=proc)

    def _expose_apiserver(self, launch: Any, *, server: str, api_client: Any, deadline: float) -> None:
        """Give the ``kubernetes`` Service an endpoint pods can reach: the relay on the bridge.

        The apiserver runs with ``--endpoint-reconciler-type=none`` (it listens on
        loopback, which no endpoint may name), so the EndpointSlice is written here.
        """
        import sys

        from kubernetes.client import DiscoveryV1Api

        target = server.removeprefix("https://")
        listen = f"{GATEWAY}:{APISERVER_PROXY_PORT}"
        if not port_free(GATEWAY, APISERVER_PROXY_PORT):
            raise ClusterError(f"port {listen} (the pods' way to the apiserver) is in use; free it")
        proc, record = launch("apiserver-proxy", [sys.executable, "-m", "kubeml.testing.cluster._forward",
                                                  listen, target], "")
        while port_free(GATEWAY, APISERVER_PROXY_PORT):
            if proc.poll() is not None:
                raise ComponentFailed("apiserver-proxy", f"exited during startup (status {proc.returncode})",
                                      log_tail(record.log), record.log)
            if time.monotonic() > deadline:
                raise ComponentFailed("apiserver-proxy", f"not listening on {listen} in time",
                                      log_tail(record.log), record.log)
            time.sleep(0.05)
        body = {
            "metadata": {"name": "kubernetes", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "kubernetes",
                                    "endpointslice.kubernetes.io/managed-by": "kubeml.io-local-cluster"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [GATEWAY], "conditions": {"ready": True}}],
            "ports": [{"name": "https", "port": APISERVER_PROXY_PORT, "protocol": "TCP"}],
        }
        with api_client() as client:
            discovery = DiscoveryV1Api(client)
            _create_or_replace(lambda b: discovery.create_namespaced_endpoint_slice("default", b),
                               lambda name, b: discovery.replace_namespaced_endpoint_slice(name, "default", b), body)

    def policy_verdicts(self) -> dict[str, int]:
        """Connections the NetworkPolicy enforcer has judged, by verdict (``accept``, ``drop``).

        Read from its ``/metrics`` (``kube_network_policies_packet_count``, summed over
        protocol and family); each counts the first packet of one new connection or flow.
        """
        import urllib.request

        state = json.loads((self.dir.parent / "state.json").read_text())
        health = state["health"]["network-policies"]
        with urllib.request.urlopen(health.replace("/readyz", "/metrics"), timeout=5) as response:
            text = response.read().decode()
        counts: dict[str, int] = {}
        for line in text.splitlines():
            match = re.match(r'kube_network_policies_packet_count\{.*verdict="(\w+)".*\} (\S+)$', line)
            if match:
                counts[match[1]] = counts.get(match[1], 0) + int(float(match[2]))
        return counts

    def wait_ready(self, core: Any, deadline: float) -> None:
        """Wait for the node object to be Ready (CNI configured, runtime up)."""
        why = "not registered yet"
        while time.monotonic() < deadline:
            try:
                node = core.read_node(NODE_NAME)
            except Exception as exc:  # 404 until the kubelet registers
                why = f"not registered yet ({getattr(exc, 'status', exc)})"
            else:
                for condition in node.status.conditions or []:
                    if condition.type == "Ready":
                        if condition.status == "True":
                            return
                        why = f"Ready={condition.status}: {condition.reason}: {condition.message}"
            time.sleep(0.2)
        kubelet_log = str(self.dir.parent / "logs" / "kubelet.log")
        raise ComponentFailed("kubelet", f"node {NODE_NAME} not Ready in time: {why}",
                              log_tail(kubelet_log), kubelet_log)

    # --- stop ----------------------------------------------------------------------------
    def stop(self, state: dict[str, Any], records: list[ProcessRecord],
             handles: dict[int, _sp.Popen[bytes]]) -> None:
        """Stop the kubelet, every container and containerd, then restore the host."""
        node = state.get("node") or {}
        kubelet = [r for r in records
                   if r.name in ("kuberay-operator", "coredns", "kubelet", "kube-proxy", "apiserver-proxy",
                                 "network-policies")]
        containerd = [r for r in records if r.name == "containerd"]
        stop_processes(kubelet, handles, grace_s=10.0)
        if any(is_alive(r) for r in containerd):
            self._stop_containers()
        # Shims outlive containerd by design; the ones of this node are found by its socket.
        shim = re.compile(r"containerd-shim-runc-v2 .*-address " + re.escape(str(self.containerd_socket)))
        _host.kill_cgroup_tree(CGROUP_ROOT)
        stop_processes(containerd, handles, grace_s=10.0)
        for pid in _host.processes_matching(shim):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        snapshot = node.get("snapshot")
        if snapshot is not None:
            _host.restore_host(_host.HostSnapshot.from_dict(snapshot), node_dir=self.dir,
                               cgroup_root=CGROUP_ROOT, own_chains=(CHAIN, NETPOL_CHAIN), bridge=BRIDGE,
                               own_nft_tables=(NETPOL_TABLE,))
        with contextlib.suppress(OSError, ValueError):
            if json.loads(_CLAIM.read_text()).get("node_dir") == str(self.dir):
                _CLAIM.unlink()
        shutil.rmtree(_SOCKET_DIR, ignore_errors=True)
        with contextlib.suppress(OSError):
            _CLAIM.parent.rmdir()  # only when empty

    def _stop_containers(self) -> None:
        try:
            tasks = self.ctr("tasks", "list", "--quiet", timeout=10)
            for task in tasks.stdout.split():
                self.ctr("tasks", "kill", "--signal", "SIGKILL", task, timeout=10)
            time.sleep(0.2)
            for task in tasks.stdout.split():
                self.ctr("tasks", "delete", "--force", task, timeout=10)
        except subprocess.TimeoutExpired:
            log.warning("containerd did not answer while stopping containers; killing them by cgroup")


def _nft_queue_supported() -> bool:
    """Whether the kernel takes nftables' ``queue`` expression (a check-only transaction)."""
    ruleset = ("table inet kubeml-queue-check {\n chain c {\n type filter hook postrouting priority 0;\n"
               f" queue num {NFQUEUE_ID}\n }}\n}}\n")
    try:
        return subprocess.run(["nft", "--check", "-f", "-"], input=ruleset, capture_output=True, text=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _queue_bound(queue: int) -> bool:
    """Whether a process listens on NFQUEUE ``queue`` (the kernel lists bound queues, number first)."""
    try:
        lines = _NFQUEUE_PROC.read_text().splitlines()
    except OSError:
        return False
    return any(line.split()[:1] == [str(queue)] for line in lines)


def _state_alive(path: Path) -> bool:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    for component in state.get("components", []):
        if is_alive(ProcessRecord.from_dict(component)):
            return True
    return False


def _create_or_replace(create: Any, replace: Any, body: dict[str, Any]) -> None:
    """Create ``body``; if it exists (a node restarted in the same cluster), replace it."""
    from kubernetes.client.exceptions import ApiException

    try:
        create(body)
    except ApiException as exc:
        if exc.status != 409:
            raise
        replace(body["metadata"]["name"], body)


def _run(argv: list[str], what: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise ClusterError(f"{what} failed: {' '.join(argv)}: {(result.stderr or result.stdout).strip()}")

