"""The local control plane: etcd, kube-apiserver, controller-manager, scheduler and kwok.

A :class:`Cluster` is a handle on a named state directory
(``~/.cache/kubeml/clusters/<name>/``) holding the PKI, kubeconfigs, etcd data, logs and a
``state.json`` naming the running processes. Everything a second process needs to stop or
inspect the cluster is in that directory, so ``kubeml cluster down`` works from any shell.

Start-up order and why: etcd; kube-apiserver (needs etcd); then controller-manager,
scheduler and kwok together (each needs the apiserver); then the CRDs and the fake nodes.
``up()`` returns once the nodes are Ready and the controller-manager has created the
``default`` ServiceAccount, i.e. once a Pod can be created, scheduled and run.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import shutil
import ssl
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubeml.testing.cluster._assets import Assets, cache_root, find_assets
from kubeml._proc import pid_alive
from kubeml.errors import ClusterAlreadyRunning, ClusterError, ComponentFailed
from kubeml.testing.cluster._kubeconfig import write_kubeconfig
from kubeml.testing.cluster._node import RealNode
from kubeml.testing.cluster._nodes import DEFAULT_NODE_GROUPS, KWOK_ANNOTATION, NodeGroup
from kubeml.testing.cluster._pki import CertificateAuthority, KeyPair, write_service_account_keys
from kubeml.testing.cluster._process import (
    ProcessRecord,
    check_port_free,
    free_ports,
    is_alive,
    log_tail,
    probe,
    start_process,
    stop_processes,
    wait_healthy,
)

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

__all__ = ["Cluster", "ClusterStatus", "ComponentStatus"]

log = logging.getLogger("kubeml.testing.cluster")

#: Components in start order; `down` stops them in reverse. containerd and the kubelet are
#: the real node's, started only with ``real_node=True``.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok",
              "containerd", "kubelet", "kube-proxy", "network-policies", "apiserver-proxy", "coredns",
              "kuberay-operator")

# Admission plugins beyond the apiserver's defaults are listed explicitly so the set the
# tests rely on (PodSecurity, ResourceQuota, NodeRestriction, LimitRanger) cannot silently
# change with a version bump.
_ADMISSION_PLUGINS = (
    "NamespaceLifecycle,LimitRanger,ServiceAccount,DefaultStorageClass,DefaultTolerationSeconds,"
    "NodeRestriction,Priority,PodSecurity,ResourceQuota,StorageObjectInUseProtection,"
    "RuntimeClass,TaintNodesByCondition,PersistentVolumeClaimResize,CertificateApproval,"
    "CertificateSigning,ClusterTrustBundleAttest,CertificateSubjectRestriction,"
    "MutatingAdmissionPolicy,MutatingAdmissionWebhook,ValidatingAdmissionPolicy,"
    "ValidatingAdmissionWebhook"
)
_SERVICE_CIDR = "10.96.0.0/16"
_NODE_COMPONENTS = ("containerd", "kubelet", "kube-proxy", "network-policies", "apiserver-proxy", "coredns",
                    "kuberay-operator")
_POD_CIDR = "10.244.0.1/16"
_ADMIN_USER = "kubeml-admin"
_USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,120}$")


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    pid: int | None
    running: bool
    healthy: bool
    detail: str
    """The health endpoint's answer, or why it could not be asked."""
    log: str


@dataclass(frozen=True)
class ClusterStatus:
    name: str
    state_dir: Path
    server: str | None
    """``https://127.0.0.1:<port>``; ``None`` when the cluster was never started."""
    admin_kubeconfig: Path | None
    user_kubeconfigs: tuple[Path, ...]
    components: tuple[ComponentStatus, ...]

    @property
    def running(self) -> bool:
        return bool(self.components) and any(c.running for c in self.components)

    @property
    def healthy(self) -> bool:
        return bool(self.components) and all(c.healthy for c in self.components)


@dataclass(frozen=True)
class _StartPlan:
    """Where one start of the control plane puts each component, and by when it must be up."""

    api_port: int
    """kube-apiserver's secure port on 127.0.0.1."""
    etcd_port: int
    peer_port: int
    """etcd's client and peer ports."""
    kcm_port: int
    sched_port: int
    kwok_port: int
    """Health ports of the controller-manager, scheduler and kwok."""
    deadline: float
    """``time.monotonic()`` by which every component must be healthy."""

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"


class Cluster:
    """A local, real Kubernetes control plane with fake (kwok) nodes.

    >>> cluster = Cluster("demo")            # doctest: +SKIP
    >>> cluster.up()                         # doctest: +SKIP
    >>> cluster.kubeconfig_for("alice", ["team-a"])  # doctest: +SKIP
    >>> cluster.down()                       # doctest: +SKIP

    ``up`` returns ``self``, and the handle is a context manager that calls ``down``.
    """

    def __init__(
        self,
        name: str = "kubeml",
        *,
        state_dir: str | Path | None = None,
        apiserver_port: int = 0,
        node_groups: tuple[NodeGroup, ...] = DEFAULT_NODE_GROUPS,
        assets: Assets | None = None,
        real_node: bool = False,
    ):
        """
        Args:
            name: cluster name; picks the state directory and appears in kubeconfigs.
            state_dir: where PKI, kubeconfigs, etcd data and logs go
                (default ``~/.cache/kubeml/clusters/<name>``).
            apiserver_port: port for kube-apiserver on 127.0.0.1; 0 picks a free one.
            node_groups: the fake nodes to create (default: EKS-like CPU + p4d GPU groups).
            assets: the binaries; default: found via ``KUBEBUILDER_ASSETS`` or the cache.
            real_node: also start a real node (kubelet + containerd) whose pods run real
                containers; needs root, and one per machine (see ``_node.py``).
        """
        if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,40}[a-z0-9])?", name):
            raise ClusterError(
                f"cluster name {name!r} is invalid: use lower-case letters, digits and '-' "
                "(at most 42 characters)"
            )
        if not 0 <= apiserver_port <= 65535:
            raise ClusterError(f"apiserver_port must be 0..65535, got {apiserver_port}")
        self.name = name
        self.state_dir = Path(state_dir) if state_dir else cache_root() / "clusters" / name
        self.apiserver_port = apiserver_port
        self.node_groups = node_groups
        self._assets = assets
        self.real_node = real_node
        self._handles: dict[int, subprocess.Popen[bytes]] = {}

    # --- paths -----------------------------------------------------------------------------
    @property
    def _state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def _pki_dir(self) -> Path:
        return self.state_dir / "pki"

    @property
    def kubeconfig_dir(self) -> Path:
        return self.state_dir / "kubeconfigs"

    @property
    def admin_kubeconfig(self) -> Path:
        """Kubeconfig of ``kubeml-admin`` (group ``system:masters``)."""
        return self.kubeconfig_dir / "admin.kubeconfig"

    @property
    def server(self) -> str:
        state = self._read_state()
        if not state:
            raise ClusterError(f"cluster {self.name!r} is not running; start it with `kubeml cluster up`")
        return str(state["server"])

    @property
    def node(self) -> RealNode | None:
        """The running real node (its containerd, for ``ctr``), or ``None`` without one."""
        state = self._read_state() or {}
        if not state.get("node"):
            return None
        return RealNode(self.name, self.state_dir, self._assets or Assets(Path(str(state.get("assets")))))

    # --- state file --------------------------------------------------------------------------
    def _read_state(self) -> dict[str, Any] | None:
        try:
            return json.loads(self._state_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("unreadable state file %s (%s); treating it as stale", self._state_file, exc)
            return {"components": [], "stale": True}

    def _write_state(self, state: dict[str, Any]) -> None:
        tmp = self._state_file.with_name(".state.json.tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self._state_file)

    @staticmethod
    def _records(state: dict[str, Any] | None) -> list[ProcessRecord]:
        if not state:
            return []
        return [ProcessRecord.from_dict(c) for c in state.get("components", [])]

    # --- lifecycle ---------------------------------------------------------------------------
    def up(self, *, build_assets: bool = False, timeout_s: float = 120.0, owner_pid: int | None = None) -> Cluster:
        """Start the cluster and wait until a Pod can be scheduled and run.

        Args:
            build_assets: build missing binaries with ``hack/cluster/build.sh`` first
                (a cold build takes tens of minutes) instead of raising ``AssetsMissing``.
            timeout_s: overall start-up budget in seconds. A warm start takes ~10-20 s.
            owner_pid: a process whose death makes this cluster stale (the test fixture
                passes its own pid); ``None`` for a cluster that outlives its starter.

        Raises:
            AssetsMissing, PortInUse, ClusterAlreadyRunning, ComponentFailed.
        """
        assets = self._assets or find_assets(build=build_assets)
        self._assets = assets
        self._clean_stale()
        if self.apiserver_port:
            check_port_free(self.apiserver_port, "kube-apiserver")
        deadline = time.monotonic() + timeout_s
        for sub in ("pki", "kubeconfigs", "logs", "etcd", "certs/kcm", "certs/scheduler"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        etcd_port, peer_port, kcm_port, sched_port, kwok_port, free_api = free_ports(6)
        plan = _StartPlan(api_port=self.apiserver_port or free_api, etcd_port=etcd_port, peer_port=peer_port,
                          kcm_port=kcm_port, sched_port=sched_port, kwok_port=kwok_port, deadline=deadline)
        state: dict[str, Any] = {
            "name": self.name,
            "server": plan.server,
            "owner_pid": owner_pid,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "assets": str(assets.bin_dir),
            "health": {},
            "components": [],
        }
        self._write_state(state)
        try:
            self._start_all(assets, state, plan)
        except BaseException:
            # Leave nothing behind: a half-started cluster would make the next `up` stale.
            self._stop(state)
            raise
        return self

    def _start_all(self, assets: Assets, state: dict[str, Any], plan: _StartPlan) -> None:
        t0 = time.monotonic()
        server, api_port, deadline = plan.server, plan.api_port, plan.deadline
        etcd_port, peer_port = plan.etcd_port, plan.peer_port
        kcm_port, sched_port, kwok_port = plan.kcm_port, plan.sched_port, plan.kwok_port

        def phase(what: str) -> None:
            log.info("cluster %s: %s after %.1f s", self.name, what, time.monotonic() - t0)

        # Importing the kubernetes client (~1-2 s) and parsing ~2 MB of CRD YAML (~0.5 s)
        # overlap with etcd and the apiserver starting, instead of following them.
        prefetch = _Prefetch(assets.crds_dir)
        prefetch.start()
        pki = self._write_pki()
        bin_ = assets.binary
        logs = self.state_dir / "logs"

        def launch(name: str, argv: list[str], health: str) -> tuple[subprocess.Popen[bytes], ProcessRecord]:
            proc, record = start_process(name, argv, logs / f"{name}.log")
            self._handles[proc.pid] = proc
            state["components"].append(record.to_dict())
            state["health"][name] = health
            self._write_state(state)
            return proc, record

        etcd_url = f"http://127.0.0.1:{etcd_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        proc, rec = launch("etcd", [
            str(bin_("etcd")),
            "--name=kubeml",
            f"--data-dir={self.state_dir / 'etcd'}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=kubeml={peer_url}",
            # A throwaway test store: skipping fsync saves ~10 ms per write on slow disks
            # and loses nothing that matters when the machine crashes.
            "--unsafe-no-fsync",
            "--log-level=warn",
        ], f"{etcd_url}/health")
        wait_healthy(rec, f"{etcd_url}/health", deadline=deadline, proc=proc)
        phase("etcd healthy")

        proc, rec = launch("kube-apiserver", [
            str(bin_("kube-apiserver")),
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            # The endpoint reconciler refuses a loopback advertise address; with a real
            # node, the `kubernetes` Service's EndpointSlice names the relay on the pod
            # bridge instead (_node.py), written by the node's start.
            "--endpoint-reconciler-type=none",
            f"--secure-port={api_port}",
            f"--tls-cert-file={pki['apiserver.crt']}",
            f"--tls-private-key-file={pki['apiserver.key']}",
            f"--client-ca-file={pki['ca.crt']}",
            "--authorization-mode=Node,RBAC",
            f"--enable-admission-plugins={_ADMISSION_PLUGINS}",
            # Privileged pods are allowed cluster-wide so that PodSecurity labels on a
            # namespace, not this flag, decide: that is how EKS behaves.
            "--allow-privileged=true",
            f"--service-cluster-ip-range={_SERVICE_CIDR}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki['sa.pub']}",
            f"--service-account-signing-key-file={pki['sa.key']}",
            f"--cert-dir={self.state_dir / 'certs'}",
            f"--kubelet-client-certificate={pki['kubelet-client.crt']}",
            f"--kubelet-client-key={pki['kubelet-client.key']}",
            f"--kubelet-certificate-authority={pki['ca.crt']}",
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            "--profiling=false",
            "--v=1",
        ], f"{server}/readyz")
        wait_healthy(rec, f"{server}/readyz", deadline=deadline, proc=proc,
                     context=self._admin_ssl_context())
        phase("kube-apiserver ready")

        kcm_kubeconfig = self.kubeconfig_dir / "kube-controller-manager.kubeconfig"
        sched_kubeconfig = self.kubeconfig_dir / "kube-scheduler.kubeconfig"
        kwok_kubeconfig = self.kubeconfig_dir / "kwok.kubeconfig"
        kcm_url = f"https://127.0.0.1:{kcm_port}/healthz"
        sched_url = f"https://127.0.0.1:{sched_port}/healthz"
        kwok_url = f"http://127.0.0.1:{kwok_port}/healthz"
        started = [
            (*launch("kube-controller-manager", [
                str(bin_("kube-controller-manager")),
                f"--kubeconfig={kcm_kubeconfig}",
                f"--authentication-kubeconfig={kcm_kubeconfig}",
                f"--authorization-kubeconfig={kcm_kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={kcm_port}",
                f"--cert-dir={self.state_dir / 'certs' / 'kcm'}",
                "--leader-elect=false",
                f"--root-ca-file={pki['ca.crt']}",
                f"--service-account-private-key-file={pki['sa.key']}",
                f"--cluster-signing-cert-file={pki['ca.crt']}",
                f"--cluster-signing-key-file={pki['ca.key']}",
                f"--service-cluster-ip-range={_SERVICE_CIDR}",
                f"--cluster-name={self.name}",
                # Each controller acts as its own ServiceAccount (kube-system/replicaset-
                # controller, ...) with the narrow role RBAC bootstraps for it; the
                # controller-manager's own identity may not create ReplicaSets or Pods.
                "--use-service-account-credentials=true",
                "--profiling=false",
                "--v=1",
            ], kcm_url), kcm_url),
            (*launch("kube-scheduler", [
                str(bin_("kube-scheduler")),
                f"--kubeconfig={sched_kubeconfig}",
                f"--authentication-kubeconfig={sched_kubeconfig}",
                f"--authorization-kubeconfig={sched_kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={sched_port}",
                f"--cert-dir={self.state_dir / 'certs' / 'scheduler'}",
                "--leader-elect=false",
                "--profiling=false",
                "--v=1",
            ], sched_url), sched_url),
            (*launch("kwok", [
                str(bin_("kwok")),
                f"--kubeconfig={kwok_kubeconfig}",
                f"--config={assets.kwok_stages}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION[0]}={KWOK_ANNOTATION[1]}",
                f"--cidr={_POD_CIDR}",
                "--node-ip=10.0.0.1",
                # Node leases instead of full status heartbeats: one small write per node
                # every ~10 s instead of a whole Node object.
                "--node-lease-duration-seconds=40",
                f"--server-address=127.0.0.1:{kwok_port}",
            ], kwok_url), kwok_url),
        ]
        self._create_objects(prefetch.result())
        phase("CRDs and nodes created")
        insecure = _insecure_ssl_context()
        for proc, rec, url in started:
            wait_healthy(rec, url, deadline=deadline, proc=proc,
                         context=insecure if url.startswith("https") else None)
        phase("controller-manager, scheduler and kwok healthy")
        self._wait_ready(deadline)
        phase("nodes Ready, CRDs Established, default ServiceAccount present")
        if self.real_node:
            node = RealNode(self.name, self.state_dir, assets)
            ca = CertificateAuthority.load(self._pki_dir / "ca.crt", self._pki_dir / "ca.key")
            node.start(state, ca=ca, server=server, deadline=deadline, launch=launch,
                       save=lambda: self._write_state(state), api_client=self.api_client)
            with self.api_client() as client:
                from kubernetes.client import CoreV1Api

                node.wait_ready(CoreV1Api(client), deadline)
            phase("real node Ready")
        log.info("cluster %s up at %s", self.name, server)

    def down(self, *, keep_state: bool = False) -> None:
        """Stop every component and delete the state directory (unless ``keep_state``)."""
        state = self._read_state()
        if state is not None:
            self._stop(state)
        if not keep_state and self.state_dir.exists():
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def _stop(self, state: dict[str, Any]) -> None:
        records = self._records(state)
        if state.get("node"):
            # The node first, while the apiserver still answers its last status updates.
            node_dir = Path(state["node"]["dir"])
            assets = self._assets or Assets(Path(state.get("assets", "")))
            RealNode(self.name, node_dir.parent, assets).stop(state, records, self._handles)
            records = [r for r in records if r.name not in _NODE_COMPONENTS]
        # Clients first, store last: stopping etcd under a live apiserver makes it log
        # connection errors for its whole shutdown.
        order = {name: i for i, name in enumerate(COMPONENTS)}
        records.sort(key=lambda r: order.get(r.name, -1), reverse=True)
        clients = [r for r in records if r.name not in ("kube-apiserver", "etcd")]
        stop_processes(clients, self._handles)
        stop_processes([r for r in records if r.name == "kube-apiserver"], self._handles)
        stop_processes([r for r in records if r.name == "etcd"], self._handles)
        for record in records:
            self._handles.pop(record.pid, None)

    def _clean_stale(self) -> None:
        state = self._read_state()
        if state is None:
            if (self.state_dir / "etcd").exists():
                log.warning("removing stale state directory %s (no state.json: a crashed start)",
                            self.state_dir)
                shutil.rmtree(self.state_dir)
            return
        records = self._records(state)
        owner = state.get("owner_pid")
        owner_alive = owner is None or pid_alive(int(owner))
        if records and all(is_alive(r) for r in records) and owner_alive and not state.get("stale"):
            raise ClusterAlreadyRunning(self.name, str(state.get("server")))
        alive = [r.name for r in records if is_alive(r)]
        log.warning(
            "cleaning up stale cluster %r left by a crashed or killed run (%s); "
            "stopping leftover processes: %s",
            self.name, self.state_dir, ", ".join(alive) or "none",
        )
        self._stop(state)
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    # --- status ------------------------------------------------------------------------------
    def status(self) -> ClusterStatus:
        """Which components run and answer their health endpoint; never raises for a dead one."""
        state = self._read_state()
        components: list[ComponentStatus] = []
        if state:
            health: dict[str, str] = state.get("health", {})
            insecure = _insecure_ssl_context()
            admin_ctx = self._admin_ssl_context() if self.admin_kubeconfig.exists() else insecure
            for record in self._records(state):
                running = is_alive(record)
                url = health.get(record.name, "")
                if running and url:
                    context = admin_ctx if record.name == "kube-apiserver" else (
                        insecure if url.startswith("https") else None)
                    healthy, detail = probe(url, context)
                elif running:
                    healthy, detail = True, "running (no health endpoint)"
                else:
                    healthy, detail = False, "not running"
                components.append(ComponentStatus(record.name, record.pid, running, healthy,
                                                  detail, record.log))
        users = tuple(sorted(p for p in self.kubeconfig_dir.glob("*.kubeconfig")
                             if p.name not in _SYSTEM_KUBECONFIGS)) if state else ()
        return ClusterStatus(
            name=self.name,
            state_dir=self.state_dir,
            server=state.get("server") if state else None,
            admin_kubeconfig=self.admin_kubeconfig if state else None,
            user_kubeconfigs=users,
            components=tuple(components),
        )

    # --- credentials -------------------------------------------------------------------------
    def kubeconfig_for(self, user: str, groups: tuple[str, ...] | list[str] = ()) -> Path:
        """A kubeconfig that authenticates as ``user`` in ``groups`` (client certificate).

        The user has no permissions until RBAC grants some; ``system:authenticated`` is
        added by the apiserver to every authenticated user, as on any cluster.
        """
        if not _USER_NAME.fullmatch(user) or user.startswith("system:"):
            raise ClusterError(
                f"user name {user!r} is not allowed here: use letters, digits and ._@:- "
                "and not the reserved system: prefix"
            )
        groups = tuple(groups)
        if "system:masters" in groups:
            raise ClusterError("refusing to issue a system:masters user; use admin_kubeconfig")
        ca = CertificateAuthority.load(self._pki_dir / "ca.crt", self._pki_dir / "ca.key")
        pair = ca.issue(user, organizations=groups)
        suffix = f"-{_short_hash(','.join(groups))}" if groups else ""
        path = self.kubeconfig_dir / f"user-{_safe(user)}{suffix}.kubeconfig"
        return write_kubeconfig(path, cluster_name=self.name, server=self.server,
                                ca_pem=ca.keypair.cert_pem, user=user,
                                cert_pem=pair.cert_pem, key_pem=pair.key_pem)

    def api_client(self, user: str | None = None, groups: tuple[str, ...] | list[str] = ()) -> ApiClient:
        """A ``kubernetes`` ApiClient as admin (``user=None``) or as ``user`` in ``groups``."""
        from kubernetes import config

        path = self.admin_kubeconfig if user is None else self.kubeconfig_for(user, groups)
        return config.new_client_from_config(config_file=str(path))

    # --- internals ---------------------------------------------------------------------------
    def _write_pki(self) -> dict[str, Path]:
        pki, kubeconfigs = self._pki_dir, self.kubeconfig_dir
        ca = CertificateAuthority.create(f"kubeml-{self.name}-ca")
        paths: dict[str, Path] = {}
        paths["ca.crt"], paths["ca.key"] = ca.keypair.write(pki, "ca")
        serving = ca.issue(
            "kube-apiserver",
            dns_names=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                       "kubernetes.default.svc.cluster.local"),
            ip_addresses=("127.0.0.1", "10.96.0.1"),
            server=True,
            client=False,
        )
        paths["apiserver.crt"], paths["apiserver.key"] = serving.write(pki, "apiserver")
        paths["sa.key"], paths["sa.pub"] = write_service_account_keys(pki)
        state = self._read_state() or {}
        server = str(state.get("server"))
        clients: dict[str, KeyPair] = {
            "admin": ca.issue(_ADMIN_USER, organizations=("system:masters",)),
            "kube-controller-manager": ca.issue("system:kube-controller-manager"),
            "kube-scheduler": ca.issue("system:kube-scheduler"),
            # kwok writes node and pod status for every fake node and deletes pods; the
            # built-in roles that cover that are node-scoped (system:node), so it runs as
            # a cluster admin, as kwokctl does.
            "kwok": ca.issue("kwok", organizations=("system:masters",)),
        }
        # The apiserver's identity towards kubelets (logs, exec, port-forward); the kubelet
        # authorizes it with a SubjectAccessReview like any other caller.
        kubelet_client = ca.issue("kube-apiserver-kubelet-client", organizations=("system:masters",))
        paths["kubelet-client.crt"], paths["kubelet-client.key"] = kubelet_client.write(pki, "kube-apiserver-kubelet-client")
        for name, pair in clients.items():
            pair.write(pki, name)
            user = {"admin": _ADMIN_USER, "kwok": "kwok"}.get(name, f"system:{name}")
            write_kubeconfig(kubeconfigs / f"{name}.kubeconfig", cluster_name=self.name,
                             server=server, ca_pem=ca.keypair.cert_pem, user=user,
                             cert_pem=pair.cert_pem, key_pem=pair.key_pem)
        return paths

    def _admin_ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self._pki_dir / "ca.crt"))
        context.load_cert_chain(self._pki_dir / "admin.crt", self._pki_dir / "admin.key")
        return context

    def _create_objects(self, crds: list[dict[str, Any]]) -> None:
        """Create the CRDs and the fake nodes, concurrently: the apiserver builds each CRD's
        structural schema on create (~0.5 s for the 1 MB InferenceService), so one at a
        time would add seconds to every start."""
        from kubernetes.client import ApiextensionsV1Api, CoreV1Api
        from kubernetes.client.exceptions import ApiException

        nodes = [node for group in self.node_groups for node in group.manifests()]
        from kubernetes import client as k8s, config

        configuration = k8s.Configuration()
        config.load_kube_config(config_file=str(self.admin_kubeconfig), client_configuration=configuration)
        # One connection per worker thread; urllib3's default pool keeps 4 and warns beyond.
        configuration.connection_pool_maxsize = 8
        with k8s.ApiClient(configuration) as client:
            ext, core = ApiextensionsV1Api(client), CoreV1Api(client)
            with ThreadPoolExecutor(max_workers=8) as pool:
                futures = {pool.submit(ext.create_custom_resource_definition, crd): f"CRD {crd['metadata']['name']}"
                           for crd in crds}
                futures |= {pool.submit(core.create_node, node): f"node {node['metadata']['name']}"
                            for node in nodes}
                for future, what in futures.items():
                    try:
                        future.result()
                    except ApiException as exc:
                        raise ClusterError(f"creating {what} failed: {exc.status} {exc.reason}: "
                                           f"{exc.body[:500] if exc.body else ''}") from exc

    def _wait_ready(self, deadline: float) -> None:
        from kubernetes.client import ApiextensionsV1Api, CoreV1Api
        from kubernetes.client.exceptions import ApiException

        wanted = {n for g in self.node_groups for n in g.node_names()}
        with self.api_client() as client:
            core, ext = CoreV1Api(client), ApiextensionsV1Api(client)
            pending, last = "nodes", ""
            while time.monotonic() < deadline:
                nodes = core.list_node(label_selector="type=kwok").items
                not_ready = wanted - {n.metadata.name for n in nodes if _node_ready(n)}
                if not_ready:
                    pending = f"nodes not Ready: {', '.join(sorted(not_ready))}"
                else:
                    crds = ext.list_custom_resource_definition().items
                    unestablished = [c.metadata.name for c in crds if not _established(c)]
                    if unestablished:
                        pending = f"CRDs not Established: {', '.join(unestablished)}"
                    else:
                        try:
                            core.read_namespaced_service_account("default", "default")
                            return
                        except ApiException as exc:
                            if exc.status != 404:
                                raise
                            pending = "controller-manager has not created ServiceAccount default/default"
                if pending != last:
                    log.debug("cluster %s: waiting: %s", self.name, pending)
                    last = pending
                time.sleep(0.2)
        kcm_log = str(self.state_dir / "logs" / "kube-controller-manager.log")
        kwok_log = str(self.state_dir / "logs" / "kwok.log")
        component = "kwok" if pending.startswith("nodes") else "kube-controller-manager"
        log_path = kwok_log if component == "kwok" else kcm_log
        raise ComponentFailed(component, f"cluster not ready in time: {pending}",
                              log_tail(log_path), log_path)


class _Prefetch(threading.Thread):
    """Imports the kubernetes client and loads the CRD manifests in the background."""

    def __init__(self, crds_dir: Path):
        super().__init__(name="kubeml-cluster-prefetch", daemon=True)
        self._crds_dir = crds_dir
        self._crds: list[dict[str, Any]] = []
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            import kubernetes.client  # noqa: F401  (the import is the work)
            import yaml

            loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~10x faster
            for path in sorted(self._crds_dir.glob("*.yaml")):
                with path.open() as handle:
                    self._crds.extend(d for d in yaml.load_all(handle, Loader=loader) if d)
        except BaseException as exc:  # re-raised in the starting thread by result()
            self._error = exc

    def result(self) -> list[dict[str, Any]]:
        self.join()
        if self._error is not None:
            raise ClusterError(f"could not load the CRDs from {self._crds_dir}: {self._error}") from self._error
        return self._crds


_SYSTEM_KUBECONFIGS = {
    "admin.kubeconfig",
    "kube-controller-manager.kubeconfig",
    "kube-scheduler.kubeconfig",
    "kwok.kubeconfig",
}


def _node_ready(node: Any) -> bool:
    for condition in (node.status.conditions or []) if node.status else []:
        if condition.type == "Ready":
            return condition.status == "True"
    return False


def _established(crd: Any) -> bool:
    for condition in (crd.status.conditions or []) if crd.status else []:
        if condition.type == "Established":
            return condition.status == "True"
    return False


def _insecure_ssl_context() -> ssl.SSLContext:
    # controller-manager and scheduler serve /healthz with a self-signed certificate they
    # generate at start; only liveness is read from it, nothing is sent.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context




def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:8]
