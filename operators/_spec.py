"""Validation of a Tenant's name and spec: pure, no API calls.

This mirrors the CRD's OpenAPI schema and CEL rules (``charts/kubeml-platform/crds``) so the
operator never acts on a spec the schema would have refused, even on a cluster that runs an
older copy of the CRD. Everything is checked before any child object is written: a rejected
spec leaves no partial children behind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, Mapping

from kubernetes.utils import parse_quantity

__all__ = [
    "DELETION_POLICIES",
    "RESERVED_NAMES",
    "ROLES",
    "InvalidTenant",
    "Member",
    "Quota",
    "TenantSpec",
    "parse_tenant",
]

Role = Literal["admin", "editor", "viewer"]
ROLES: tuple[Role, ...] = ("admin", "editor", "viewer")

DeletionPolicy = Literal["Retain", "Delete"]
#: What deleting the Tenant does to its namespace. ``Retain`` (the default) keeps the
#: namespace and its data, labelled orphaned; only an explicit ``Delete`` deletes them.
DELETION_POLICIES: tuple[DeletionPolicy, ...] = ("Retain", "Delete")

#: Namespaces the platform and Kubernetes own; a tenant named like one would take it over.
RESERVED_NAMES = frozenset({
    "default", "kubeflow", "kubeml-system", "istio-system", "monitoring", "cert-manager",
    "knative-serving", "auth", "kubeflow-user-example-com",
})
_RESERVED_PREFIXES = ("kube-", "openshift-")

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_USER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:/+=,-]*$")
_ARN = re.compile(
    r"^arn:aws(-cn|-us-gov)?:iam::[0-9]{12}:role/([A-Za-z0-9+=,.@_-]+/)*[A-Za-z0-9+=,.@_-]{1,64}$"
)
_S3 = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9!_.*'()/-]*)?$")
_COST_CENTER = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")

# Upper bounds: far above any real team's share, low enough to catch a typo such as
# "4000000" cores. Same numbers as the CRD.
MAX_CPU = Decimal(4096)
MAX_MEMORY = Decimal(64 * 2**40)  # 64 Ti bytes
MAX_GPUS = 512
MAX_PODS = 10_000
MAX_OWNERS = 16
MAX_MEMBERS = 256
MAX_NODE_GROUPS = 32


class InvalidTenant(ValueError):
    """The Tenant cannot be reconciled as written; ``reason`` is a CamelCase condition reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason, self.message))


@dataclass(frozen=True)
class Member:
    name: str
    role: Role


@dataclass(frozen=True)
class Quota:
    cpu: str = "8"
    """Total CPU requests (Kubernetes quantity, cores)."""
    memory: str = "32Gi"
    """Total memory requests and limits (Kubernetes quantity, bytes)."""
    gpus: int = 0
    """Total ``nvidia.com/gpu`` requests."""
    pods: int = 100


@dataclass(frozen=True)
class TenantSpec:
    """A validated Tenant: every field is safe to turn into child objects."""

    name: str
    uid: str
    owners: tuple[str, ...]
    members: tuple[Member, ...] = ()
    quota: Quota = Quota()
    node_groups: tuple[str, ...] = ()
    iam_role_arn: str | None = None
    s3_prefix: str | None = None
    cost_center: str | None = None
    deletion_policy: DeletionPolicy = "Retain"
    """``Retain``: deleting the Tenant keeps its namespace (orphaned); ``Delete``: deletes it."""

    @property
    def namespace(self) -> str:
        return self.name

    def subjects(self, role: Role) -> tuple[str, ...]:
        """User names holding ``role``: owners are admins; sorted so output is stable."""
        names = {m.name for m in self.members if m.role == role}
        if role == "admin":
            names.update(self.owners)
        return tuple(sorted(names))


def _fail(reason: str, message: str) -> InvalidTenant:
    return InvalidTenant(reason, message)


def _check_user(field: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _fail("InvalidUser", f"{field} must be a non-empty string, got {value!r}")
    if len(value) > 253 or not _USER.match(value):
        raise _fail("InvalidUser", f"{field} {value!r} must be a plain user name (letters, digits "
                    "and ._@:/+=,-, at most 253 characters); wildcards are not allowed")
    if value.startswith("system:"):
        raise _fail("ForbiddenUser", f"{field} {value!r} is a system: identity; name a person or team user")
    return value


def _quantity(field: str, value: Any, maximum: Decimal, unit: str) -> str:
    if not isinstance(value, str) or len(value) > 32:
        raise _fail("InvalidQuota", f"quota.{field} must be a quantity string such as \"16\", got {value!r}")
    try:
        amount = parse_quantity(value)
    except (ValueError, InvalidOperation):
        raise _fail("InvalidQuota", f"quota.{field} {value!r} is not a Kubernetes quantity") from None
    if amount < 0 or amount > maximum:
        raise _fail("InvalidQuota", f"quota.{field} {value!r} is out of range: 0 to {unit}")
    return value


def _integer(field: str, value: Any, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail("InvalidQuota", f"quota.{field} must be an integer, got {value!r}")
    if not 0 <= value <= maximum:
        raise _fail("InvalidQuota", f"quota.{field} {value} is out of range: 0 to {maximum}")
    return value


def _optional(spec: Mapping[str, Any], key: str, pattern: re.Pattern[str], max_len: int,
              reason: str, hint: str) -> str | None:
    value = spec.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > max_len or not pattern.match(value):
        raise _fail(reason, f"{key} {value!r} is malformed: {hint}")
    return value


def parse_tenant(body: Mapping[str, Any]) -> TenantSpec:
    """Validate a Tenant object (as the apiserver returns it) into a :class:`TenantSpec`.

    Raises:
        InvalidTenant: with a condition reason and a message that says how to fix the spec.
    """
    metadata = body.get("metadata") or {}
    name = metadata.get("name")
    if not isinstance(name, str) or not _DNS_LABEL.match(name):
        raise _fail("InvalidName", f"tenant name {name!r} must be a DNS label (lower-case letters, "
                    "digits, '-'; at most 63 characters): it names the tenant's namespace")
    if name in RESERVED_NAMES or name.startswith(_RESERVED_PREFIXES):
        raise _fail("ReservedName", f"tenant name {name!r} is reserved for the platform; pick another")
    spec = body.get("spec")
    if not isinstance(spec, Mapping):
        raise _fail("InvalidSpec", "spec is missing; a Tenant needs at least spec.owners")

    owners = spec.get("owners")
    if not isinstance(owners, list) or not owners:
        raise _fail("InvalidOwners", "spec.owners must list at least one user")
    if len(owners) > MAX_OWNERS:
        raise _fail("InvalidOwners", f"spec.owners has {len(owners)} entries; at most {MAX_OWNERS}")
    owner_names = tuple(_check_user("owner", o) for o in owners)
    if len(set(owner_names)) != len(owner_names):
        raise _fail("InvalidOwners", "spec.owners lists a user twice")

    members_raw = spec.get("members") or []
    if not isinstance(members_raw, list) or len(members_raw) > MAX_MEMBERS:
        raise _fail("InvalidMembers", f"spec.members must be a list of at most {MAX_MEMBERS} entries")
    members: list[Member] = []
    seen: set[str] = set()
    for entry in members_raw:
        if not isinstance(entry, Mapping):
            raise _fail("InvalidMembers", f"spec.members entry {entry!r} must be {{name, role}}")
        member = _check_user("member", entry.get("name"))
        role = entry.get("role")
        if role not in ROLES:
            raise _fail("InvalidMembers", f"member {member!r} has role {role!r}; use one of {', '.join(ROLES)}")
        if member in seen:
            raise _fail("InvalidMembers", f"member {member!r} is listed twice")
        seen.add(member)
        members.append(Member(member, role))

    quota_raw = spec.get("quota") or {}
    if not isinstance(quota_raw, Mapping):
        raise _fail("InvalidQuota", "spec.quota must be an object with cpu, memory, nvidia.com/gpu, pods")
    unknown = set(quota_raw) - {"cpu", "memory", "nvidia.com/gpu", "pods"}
    if unknown:
        raise _fail("InvalidQuota", f"spec.quota has unknown keys {sorted(unknown)}; "
                    "use cpu, memory, nvidia.com/gpu, pods")
    defaults = Quota()
    quota = Quota(
        cpu=_quantity("cpu", quota_raw.get("cpu", defaults.cpu), MAX_CPU, "4096 cores"),
        memory=_quantity("memory", quota_raw.get("memory", defaults.memory), MAX_MEMORY, "64Ti"),
        gpus=_integer("nvidia.com/gpu", quota_raw.get("nvidia.com/gpu", defaults.gpus), MAX_GPUS),
        pods=_integer("pods", quota_raw.get("pods", defaults.pods), MAX_PODS),
    )

    groups = spec.get("nodeGroups") or []
    if not isinstance(groups, list) or len(groups) > MAX_NODE_GROUPS:
        raise _fail("InvalidNodeGroups", f"spec.nodeGroups must be a list of at most {MAX_NODE_GROUPS} names")
    for group in groups:
        if not isinstance(group, str) or not _DNS_LABEL.match(group):
            raise _fail("InvalidNodeGroups", f"node group {group!r} must be a DNS label")

    deletion_policy = spec.get("deletionPolicy", "Retain")
    if deletion_policy not in DELETION_POLICIES:
        raise _fail("InvalidDeletionPolicy", f"spec.deletionPolicy {deletion_policy!r} must be Retain (keep the "
                    "namespace and its data when the Tenant is deleted) or Delete (delete them)")

    uid = metadata.get("uid")
    return TenantSpec(
        name=name,
        uid=str(uid or ""),
        owners=owner_names,
        members=tuple(members),
        quota=quota,
        node_groups=tuple(sorted(set(groups))),
        iam_role_arn=_optional(spec, "iamRoleArn", _ARN, 2048, "InvalidIamRoleArn",
                               "use arn:aws:iam::<12-digit account>:role/<name>"),
        s3_prefix=_optional(spec, "s3Prefix", _S3, 1024, "InvalidS3Prefix",
                            "use s3://<bucket>/<prefix>"),
        cost_center=_optional(spec, "costCenter", _COST_CENTER, 63, "InvalidCostCenter",
                              "use letters, digits and ._- (a label value, at most 63 characters)"),
        deletion_policy=deletion_policy,
    )
