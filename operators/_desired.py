"""The desired state of a Tenant: pure functions from a validated spec to manifests.

Nothing here talks to the API, so every rule is unit-tested without a cluster. A value of
``None`` in a manifest's labels or annotations means "this key must be absent": the
operator owns those keys and removes them when the spec stops asking for them (for
example when ``iamRoleArn`` is dropped, the ServiceAccount loses its IRSA annotation).

The set of children does not depend on the spec (only on :class:`OperatorConfig`), so a
spec change never leaves an object of a kind the new spec no longer wants behind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from kubernetes.utils import parse_quantity

from kubeml.operators._spec import ROLES, TenantSpec

__all__ = [
    "API_VERSION",
    "DELETION_POLICY_LABEL",
    "FINALIZER",
    "GROUP",
    "IAM_ROLE_ANNOTATION",
    "MANAGED_BY",
    "MANAGED_BY_LABEL",
    "ORPHANED_AT_ANNOTATION",
    "ORPHANED_FROM_ANNOTATION",
    "ORPHANED_LABEL",
    "TENANT_LABEL",
    "OperatorConfig",
    "Peer",
    "desired_children",
    "namespaced_children",
    "owner_reference",
    "tenant_role_name",
]

GROUP = "kubeml.io"
API_VERSION = f"{GROUP}/v1alpha1"
TENANT_LABEL = "kubeml.io/tenant"
COST_CENTER_LABEL = "kubeml.io/cost-center"
NODE_GROUPS_ANNOTATION = "kubeml.io/node-groups"
S3_PREFIX_ANNOTATION = "kubeml.io/s3-prefix"
IRSA_ANNOTATION = "eks.amazonaws.com/role-arn"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "kubeml-operator"
FINALIZER = "kubeml.io/tenant-cleanup"
#: The tenant's IAM role on its namespace: the admission policy that checks a SageMaker
#: TrainingJob's ``spec.roleARN`` reads it there (``namespaceObject``). Tenants cannot edit
#: their namespace, so they cannot change it.
IAM_ROLE_ANNOTATION = "kubeml.io/iam-role-arn"
#: ``Retain`` or ``Delete``, mirrored from the Tenant: the chart's admission policy refuses
#: to delete a namespace labelled ``Retain``, whoever asks (the operator, the garbage
#: collector of a foreground deletion, an administrator).
DELETION_POLICY_LABEL = "kubeml.io/deletion-policy"
#: Set on a retained namespace once its Tenant is gone, with when and from which Tenant.
ORPHANED_LABEL = "kubeml.io/orphaned"
ORPHANED_AT_ANNOTATION = "kubeml.io/orphaned-at"
ORPHANED_FROM_ANNOTATION = "kubeml.io/orphaned-from"

#: ServiceAccount the tenant's workloads run as (training jobs, model servers).
WORKLOAD_SERVICE_ACCOUNT = "kubeml-workload"

# Per-container defaults the LimitRange fills in, so a pod without requests is still
# admitted under the ResourceQuota: 100m / 256Mi requested, 1 core / 1Gi limit. Capped at
# the quota itself for tiny tenants, otherwise the LimitRange would be invalid.
_DEFAULT_CPU_REQUEST = "100m"
_DEFAULT_CPU_LIMIT = "1"
_DEFAULT_MEMORY_REQUEST = "256Mi"
_DEFAULT_MEMORY_LIMIT = "1Gi"

# The instance metadata service: pods must get AWS credentials through IRSA (their own
# ServiceAccount's role), never through the node's instance role.
_IMDS_CIDR = "169.254.169.254/32"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def _check_ports(what: str, ports: tuple[int, ...]) -> None:
    if not ports:
        raise ValueError(f"{what} needs at least one port")
    for port in ports:
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"{what}: port {port!r} must be an integer in 1..65535")


@dataclass(frozen=True)
class Peer:
    """A platform service in its own namespace that tenant pods may reach, or that may reach them.

    ``namespace`` empty switches the flow off (an install without Kafka, say).
    """

    namespace: str
    ports: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.namespace and not _DNS_LABEL.match(self.namespace):
            raise ValueError(f"peer namespace {self.namespace!r} must be a DNS label")
        if self.namespace:
            _check_ports(f"peer {self.namespace}", self.ports)

    @classmethod
    def parse(cls, text: str) -> Peer:
        """``"mlflow:5000"`` or ``"kafka:9092,9093"``; ``""`` or ``"none"`` is no peer."""
        if text in ("", "none"):
            return cls("", ())
        namespace, sep, ports = text.partition(":")
        if not sep or not ports:
            raise ValueError(f"peer {text!r} must be NAMESPACE:PORT[,PORT...], e.g. mlflow:5000, or 'none'")
        try:
            numbers = tuple(int(p) for p in ports.split(","))
        except ValueError:
            raise ValueError(f"peer {text!r}: ports must be numbers, e.g. kafka:9092,9093") from None
        return cls(namespace, numbers)

    def __str__(self) -> str:
        return f"{self.namespace}:{','.join(map(str, self.ports))}" if self.namespace else "none"


@dataclass(frozen=True)
class OperatorConfig:
    """Cluster-level settings of the Tenant operator (the Helm chart sets them)."""

    pod_security_version: str = "v1.33"
    """Pinned Pod Security Standards version for ``enforce``: a cluster upgrade must not
    tighten (and break) running tenants by surprise. ``warn``/``audit`` use ``latest`` so
    users see upcoming checks first."""
    ingress_gateway_namespace: str = "istio-system"
    """Namespace of the ingress gateway allowed to reach tenant pods (KServe via Istio)."""
    serving_ports: tuple[int, ...] = (8080, 8081, 8012)
    """Ports the ingress gateway may reach: the predictor's HTTP (8080) and gRPC (8081) ports,
    and Knative's queue-proxy (8012) in front of them when KServe runs in Serverless mode."""
    monitoring_namespace: str = "monitoring"
    """Namespace of Prometheus, allowed to scrape tenant pods."""
    metrics_ports: tuple[int, ...] = (8080,)
    """Ports Prometheus may scrape: KServe predictors serve ``/metrics`` on their HTTP port
    8080, and KubeRay sets Ray's ``--metrics-export-port`` to 8080."""
    dns_namespace: str = "kube-system"
    """Namespace of the cluster DNS (pods labelled ``k8s-app=kube-dns``; CoreDNS on EKS keeps
    that label), reachable on port 53 over UDP and TCP."""
    kuberay: Peer = field(default_factory=lambda: Peer("kubeflow", (8265,)))
    """The KubeRay operator's namespace, and the Ray head ports it calls (the dashboard's job
    API, 8265, which RayJob submission and status use). Only Ray head pods are opened."""
    mlflow: Peer = field(default_factory=lambda: Peer("mlflow", (5000,)))
    """The MLflow tracking server that training and registration talk to."""
    kafka: Peer = field(default_factory=lambda: Peer("kafka", (9092,)))
    """The Kafka brokers of the payload log (plaintext 9092; add 9093 for TLS)."""
    pipelines: Peer = field(default_factory=lambda: Peer("kubeflow", (8887, 8888, 8080)))
    """Kubeflow Pipelines, which component pods report to: the ml-pipeline API (gRPC 8887,
    HTTP 8888) and the metadata gRPC service (8080)."""
    kubeflow_profiles: bool = True
    """Create a Kubeflow ``Profile`` per tenant (needs the kubeflow.org Profile CRD)."""
    role_prefix: str = "kubeml-tenant"
    """ClusterRoles ``<prefix>-admin|editor|viewer`` shipped by the chart; tenants get them
    through namespaced RoleBindings only."""
    resync_s: float = 60.0
    """Seconds between level-triggered resyncs of each Tenant; bounds how long drift lasts."""

    def __post_init__(self) -> None:
        if self.resync_s <= 0:
            raise ValueError(f"resync_s must be > 0 seconds, got {self.resync_s}")
        if not (self.pod_security_version == "latest" or self.pod_security_version.startswith("v1.")):
            raise ValueError(f"pod_security_version must be 'latest' or 'v1.<minor>', "
                             f"got {self.pod_security_version!r}")
        _check_ports("serving_ports", self.serving_ports)
        _check_ports("metrics_ports", self.metrics_ports)
        for name in ("ingress_gateway_namespace", "monitoring_namespace", "dns_namespace"):
            if not _DNS_LABEL.match(getattr(self, name)):
                raise ValueError(f"{name} {getattr(self, name)!r} must be a DNS label")


def tenant_role_name(config: OperatorConfig, role: str) -> str:
    return f"{config.role_prefix}-{role}"


def owner_reference(spec: TenantSpec) -> dict[str, Any]:
    # controller=True: exactly one manager per child; blockOwnerDeletion: foreground
    # deletion of the Tenant waits for its children.
    return {"apiVersion": API_VERSION, "kind": "Tenant", "name": spec.name, "uid": spec.uid,
            "controller": True, "blockOwnerDeletion": True}


def _meta(spec: TenantSpec, name: str, *, namespaced: bool = True,
          labels: dict[str, Any] | None = None, annotations: dict[str, Any] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "labels": {MANAGED_BY_LABEL: MANAGED_BY, TENANT_LABEL: spec.name, **(labels or {})},
        "ownerReferences": [owner_reference(spec)],
    }
    if namespaced:
        meta["namespace"] = spec.namespace
    if annotations:
        meta["annotations"] = annotations
    return meta


def _min_quantity(a: str, b: str) -> str:
    return a if parse_quantity(a) <= parse_quantity(b) else b


def namespace(spec: TenantSpec, config: OperatorConfig) -> dict[str, Any]:
    labels: dict[str, Any] = {
        COST_CENTER_LABEL: spec.cost_center,
        DELETION_POLICY_LABEL: spec.deletion_policy,
        # A namespace the Tenant owns is not orphaned (the label only appears once it is gone).
        ORPHANED_LABEL: None,
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": config.pod_security_version,
        "pod-security.kubernetes.io/warn": "restricted",
        "pod-security.kubernetes.io/warn-version": "latest",
        "pod-security.kubernetes.io/audit": "restricted",
        "pod-security.kubernetes.io/audit-version": "latest",
    }
    annotations: dict[str, Any] = {
        NODE_GROUPS_ANNOTATION: ",".join(spec.node_groups) or None,
        S3_PREFIX_ANNOTATION: spec.s3_prefix,
        IAM_ROLE_ANNOTATION: spec.iam_role_arn,
        ORPHANED_AT_ANNOTATION: None,
        ORPHANED_FROM_ANNOTATION: None,
        # The Kubeflow profile controller adopts an existing namespace only when this
        # annotation names the Profile's owner.
        "owner": spec.owners[0],
    }
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": _meta(spec, spec.namespace, namespaced=False, labels=labels, annotations=annotations)}


def resource_quota(spec: TenantSpec) -> dict[str, Any]:
    q = spec.quota
    hard = {
        "requests.cpu": q.cpu,
        "requests.memory": q.memory,
        "limits.memory": q.memory,
        "requests.nvidia.com/gpu": str(q.gpus),
        "pods": str(q.pods),
    }
    return {"apiVersion": "v1", "kind": "ResourceQuota",
            "metadata": _meta(spec, "kubeml-quota"), "spec": {"hard": hard}}


def limit_range(spec: TenantSpec) -> dict[str, Any]:
    q = spec.quota
    cpu_limit = _min_quantity(_DEFAULT_CPU_LIMIT, q.cpu)
    memory_limit = _min_quantity(_DEFAULT_MEMORY_LIMIT, q.memory)
    limits = [{
        "type": "Container",
        "default": {"cpu": cpu_limit, "memory": memory_limit},
        "defaultRequest": {"cpu": _min_quantity(_DEFAULT_CPU_REQUEST, cpu_limit),
                           "memory": _min_quantity(_DEFAULT_MEMORY_REQUEST, memory_limit)},
    }]
    return {"apiVersion": "v1", "kind": "LimitRange",
            "metadata": _meta(spec, "kubeml-limits"), "spec": {"limits": limits}}


def role_bindings(spec: TenantSpec, config: OperatorConfig) -> list[dict[str, Any]]:
    """One RoleBinding per role, to the chart's namespaced-only ClusterRoles.

    Binding a ClusterRole with a RoleBinding grants its rules in this namespace only. The
    operator holds ``bind`` on exactly these three ClusterRoles, never ``escalate``, so it
    cannot hand out anything else, even if its own code were subverted.
    """
    bindings = []
    for role in ROLES:
        name = tenant_role_name(config, role)
        bindings.append({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _meta(spec, name, labels={"kubeml.io/role": role}),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}
                         for user in spec.subjects(role)],
        })
    return bindings


def _namespace_selector(name: str) -> dict[str, Any]:
    # kubernetes.io/metadata.name is set by the apiserver on every namespace and cannot be
    # forged by a namespace's own labels.
    return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}


def _ports(ports: tuple[int, ...], protocol: str = "TCP") -> list[dict[str, Any]]:
    return [{"protocol": protocol, "port": port} for port in ports]


def network_policies(spec: TenantSpec, config: OperatorConfig) -> list[dict[str, Any]]:
    """Default deny, then one allow per platform flow; no rule names another tenant.

    Ingress comes only from the tenant's own pods, the ingress gateway (serving ports), the
    monitoring namespace (metrics ports) and the KubeRay operator (Ray head, dashboard port).
    Egress goes only to the tenant's own pods, the cluster DNS, MLflow, Kafka, Kubeflow
    Pipelines, and HTTPS outside the cluster (S3, ECR, STS) minus the instance metadata
    service. Another tenant's pods stay unreachable because their own namespace admits
    ingress from none of these peers but its own pods.
    """
    def policy(name: str, body: dict[str, Any], pods: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": _meta(spec, name), "spec": {"podSelector": pods or {}, **body}}

    dns_pods = {**_namespace_selector(config.dns_namespace), "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}
    egress: list[dict[str, Any]] = [
        {"to": [dns_pods], "ports": _ports((53,), "UDP") + _ports((53,))},
        # S3, ECR, STS and the like live outside the cluster; the node's metadata
        # service does not count.
        {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": [_IMDS_CIDR]}}], "ports": _ports((443,))},
    ]
    for peer in (config.mlflow, config.kafka, config.pipelines):
        if peer.namespace:
            egress.append({"to": [_namespace_selector(peer.namespace)], "ports": _ports(peer.ports)})
    kuberay_ingress = ([{"from": [_namespace_selector(config.kuberay.namespace)], "ports": _ports(config.kuberay.ports)}]
                       if config.kuberay.namespace else [])

    return [
        policy("kubeml-default-deny", {"policyTypes": ["Ingress", "Egress"]}),
        policy("kubeml-allow-same-tenant", {
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"podSelector": {}}]}],
            "egress": [{"to": [{"podSelector": {}}]}],
        }),
        policy("kubeml-allow-ingress-gateway", {
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [_namespace_selector(config.ingress_gateway_namespace)],
                         "ports": _ports(config.serving_ports)}],
        }),
        policy("kubeml-allow-monitoring", {
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [_namespace_selector(config.monitoring_namespace)],
                         "ports": _ports(config.metrics_ports)}],
        }),
        # An empty ingress list with policyType Ingress allows nothing: switching the KubeRay
        # flow off keeps the object (the set of children does not change) and opens nothing.
        policy("kubeml-allow-kuberay", {"policyTypes": ["Ingress"], "ingress": kuberay_ingress},
               pods={"matchLabels": {"ray.io/node-type": "head"}}),
        policy("kubeml-allow-egress", {"policyTypes": ["Egress"], "egress": egress}),
    ]


def service_account(spec: TenantSpec) -> dict[str, Any]:
    annotations: dict[str, Any] = {
        IRSA_ANNOTATION: spec.iam_role_arn,
        # Regional STS endpoints: the global one is a single point of failure in us-east-1.
        "eks.amazonaws.com/sts-regional-endpoints": "true" if spec.iam_role_arn else None,
        S3_PREFIX_ANNOTATION: spec.s3_prefix,
    }
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": _meta(spec, WORKLOAD_SERVICE_ACCOUNT, annotations=annotations)}


def profile(spec: TenantSpec) -> dict[str, Any]:
    q = spec.quota
    body: dict[str, Any] = {
        "owner": {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": spec.owners[0]},
        "resourceQuotaSpec": {"hard": {"requests.cpu": q.cpu, "requests.memory": q.memory,
                                       "requests.nvidia.com/gpu": str(q.gpus)}},
        "plugins": [],
    }
    if spec.iam_role_arn:
        # annotateOnly: the role's trust policy is managed in IaC, not by Kubeflow.
        body["plugins"] = [{"kind": "AwsIamForServiceAccount",
                            "spec": {"awsIamRole": spec.iam_role_arn, "annotateOnly": True}}]
    return {"apiVersion": "kubeflow.org/v1", "kind": "Profile",
            "metadata": _meta(spec, spec.name, namespaced=False), "spec": body}


def desired_children(spec: TenantSpec, config: OperatorConfig) -> list[dict[str, Any]]:
    """Every object the Tenant owns, Namespace first (the others live in it)."""
    children = [
        namespace(spec, config),
        resource_quota(spec),
        limit_range(spec),
        *role_bindings(spec, config),
        *network_policies(spec, config),
        service_account(spec),
    ]
    if config.kubeflow_profiles:
        children.append(profile(spec))
    return children


def namespaced_children(name: str, config: OperatorConfig) -> list[tuple[str, str, str]]:
    """``(apiVersion, kind, name)`` of every child inside the namespace of tenant ``name``.

    The set of children does not depend on the spec, so this holds for a Tenant whose spec
    no longer validates too (its deletion must still find what it owns).
    """
    placeholder = TenantSpec(name=name, uid="", owners=("placeholder",))
    return [(c["apiVersion"], c["kind"], c["metadata"]["name"]) for c in desired_children(placeholder, config)
            if "namespace" in c["metadata"]]


def quantity_equal(a: Any, b: Any) -> bool:
    """Compare two quantities by value: the apiserver stores "1024Mi" as "1Gi"."""
    try:
        return Decimal(parse_quantity(a)) == Decimal(parse_quantity(b))
    except (ValueError, TypeError, ArithmeticError):
        return a == b
