"""Level-triggered reconciliation of one Tenant: read the world, write only the difference.

Order of work, and why:

1. Validate the whole spec (:func:`parse_tenant`) and check that the namespace and the
   Profile are free or already ours. A rejected Tenant gets ``Ready=False`` with a reason
   and *no* child is written, so there is never a half-built tenant.
2. Create or patch each child, Namespace first. Every child carries an owner reference to
   the Tenant, so even a crash between two writes leaves nothing the garbage collector
   would not remove with the Tenant; the next reconcile simply continues.
3. Write ``status`` only if it changed.

A converged Tenant costs one GET per child and no write.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from kubeml.operators._desired import (
    API_VERSION,
    DELETION_POLICY_LABEL,
    ORPHANED_AT_ANNOTATION,
    ORPHANED_FROM_ANNOTATION,
    ORPHANED_LABEL,
    OperatorConfig,
    desired_children,
    namespaced_children,
)
from kubeml.operators._diff import creatable, patch_for
from kubeml.operators._kube import Conflict, KubeApi, ObjectRef
from kubeml.operators._spec import InvalidTenant, parse_tenant

__all__ = ["NamespaceBusy", "Outcome", "cleanup", "reconcile", "tenant_ref"]

log = logging.getLogger("kubeml.operators.tenant")


class NamespaceBusy(Exception):
    """The tenant's namespace is still terminating; retry in a few seconds."""


@dataclass(frozen=True)
class Outcome:
    ready: bool
    reason: str
    message: str
    created: int = 0
    patched: int = 0


def tenant_ref(name: str) -> ObjectRef:
    return ObjectRef(API_VERSION, "Tenant", name)


def _owned_by(obj: dict[str, Any], uid: str) -> bool:
    return any(r.get("uid") == uid for r in obj.get("metadata", {}).get("ownerReferences") or [])


def _preflight(api: KubeApi, children: list[dict[str, Any]], uid: str) -> None:
    """Refuse to take over cluster-scoped objects (Namespace, Profile) someone else owns."""
    for child in children:
        ref = ObjectRef.of(child)
        if ref.namespace is not None:
            continue
        live = api.get(ref)
        if live is None:
            continue
        if not _owned_by(live, uid):
            labels = live["metadata"].get("labels") or {}
            orphaned = ""
            if labels.get(ORPHANED_LABEL) == "true":
                origin = (live["metadata"].get("annotations") or {}).get(ORPHANED_FROM_ANNOTATION, "a deleted Tenant")
                orphaned = (f" (it was retained when {origin} was deleted: move its data, then label it "
                            f"{DELETION_POLICY_LABEL}=Delete and delete it)")
            raise InvalidTenant(
                f"{ref.kind}Conflict",
                f"{ref} already exists and is not managed by this Tenant{orphaned}; a Tenant never takes "
                "over an existing namespace: rename the Tenant or remove the object",
            )
        if ref.kind == "Namespace" and live["metadata"].get("deletionTimestamp"):
            raise NamespaceBusy(f"namespace {ref.name} is terminating")


def _apply(api: KubeApi, desired: dict[str, Any]) -> str:
    """Make one child match; returns "created", "patched" or "unchanged"."""
    ref = ObjectRef.of(desired)
    live = api.get(ref)
    if live is None:
        try:
            api.create(creatable(desired))
            return "created"
        except Conflict:
            # Created concurrently (a resync racing a change event): compare with that one.
            live = api.get(ref)
            if live is None:
                raise
    try:
        patch = patch_for(desired, live)
    except ValueError:
        # An immutable field (a RoleBinding's roleRef) differs: replace this exact object.
        api.delete(ref, uid=live["metadata"]["uid"])
        api.create(creatable(desired))
        return "created"
    if patch is None:
        return "unchanged"
    log.info("repairing %s: %s", ref, sorted(patch))
    api.patch(ref, patch)
    return "patched"


def _write_status(api: KubeApi, tenant: dict[str, Any], outcome: Outcome, namespace: str | None) -> bool:
    generation = tenant["metadata"].get("generation")
    status = tenant.get("status") or {}
    old = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    condition = {
        "type": "Ready",
        "status": "True" if outcome.ready else "False",
        "reason": outcome.reason,
        "message": outcome.message,
        "observedGeneration": generation,
    }
    unchanged = (all(old.get(k) == v for k, v in condition.items())
                 and status.get("namespace") == namespace
                 and status.get("observedGeneration") == generation)
    if unchanged:
        return False
    if old.get("status") == condition["status"] and old.get("lastTransitionTime"):
        condition["lastTransitionTime"] = old["lastTransitionTime"]
    else:
        condition["lastTransitionTime"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    others = [c for c in status.get("conditions") or [] if c.get("type") != "Ready"]
    api.patch(tenant_ref(tenant["metadata"]["name"]),
              {"status": {"namespace": namespace, "observedGeneration": generation,
                          "conditions": [*others, condition]}},
              subresource="status")
    return True


def reconcile(api: KubeApi, tenant: dict[str, Any], config: OperatorConfig) -> Outcome:
    """Bring one Tenant's children to the desired state and record the result in its status.

    Raises:
        NamespaceBusy: the namespace of a previous Tenant of this name is still going away.
        kubernetes.client.exceptions.ApiException: any other API failure (retry later).
    """
    try:
        spec = parse_tenant(tenant)
        children = desired_children(spec, config)
        _preflight(api, children, spec.uid)
    except InvalidTenant as exc:
        outcome = Outcome(False, exc.reason, exc.message)
        _write_status(api, tenant, outcome, None)
        return outcome
    results = [_apply(api, child) for child in children]
    outcome = Outcome(True, "Reconciled", f"{len(children)} objects in namespace {spec.namespace} match the spec",
                      created=results.count("created"), patched=results.count("patched"))
    _write_status(api, tenant, outcome, spec.namespace)
    return outcome


#: Children a retained namespace does not keep: the garbage collector removes the
#: RoleBindings with the Tenant, so its members lose access. Everything else stays, so the
#: namespace stays confined (quota, limits, network policy) and its workloads keep their
#: identity (the IRSA ServiceAccount).
_RELEASED_KINDS = frozenset({"RoleBinding"})


def _without_owner(obj: dict[str, Any], uid: str) -> list[dict[str, Any]] | None:
    kept = [r for r in obj["metadata"].get("ownerReferences") or [] if r.get("uid") != uid]
    return kept or None  # None: a merge patch removes the field


def _orphan(api: KubeApi, tenant: dict[str, Any], config: OperatorConfig) -> None:
    """Keep the namespace and its data: release them from the Tenant, label them orphaned.

    The children first, the namespace last, so a crash in between is finished by the next
    attempt (the namespace still names the Tenant as owner until then). A kept child that is
    missing is created again, released: a foreground deletion lets the garbage collector
    delete the Tenant's dependents before this runs, and the retained namespace must stay
    confined all the same (the namespace itself is protected by the retention policy).
    """
    meta = tenant["metadata"]
    name, uid = meta["name"], meta.get("uid", "")
    ref = ObjectRef("v1", "Namespace", name)
    live_ns = api.get(ref)
    if live_ns is None or not _owned_by(live_ns, uid):
        return  # never ours (a rejected Tenant), or released already
    try:
        wanted = {(c["apiVersion"], c["kind"], c["metadata"]["name"]): c
                  for c in desired_children(parse_tenant(tenant), config)}
    except InvalidTenant:
        wanted = {}  # the spec no longer validates: release what exists, recreate nothing
    for api_version, kind, child in namespaced_children(name, config):
        if kind in _RELEASED_KINDS:
            continue
        child_ref = ObjectRef(api_version, kind, child, name)
        item = api.get(child_ref)
        if item is None and (api_version, kind, child) in wanted:
            released = creatable(wanted[(api_version, kind, child)])
            released["metadata"] = {k: v for k, v in released["metadata"].items() if k != "ownerReferences"}
            with contextlib.suppress(Conflict):
                api.create(released)
        elif item is not None and _owned_by(item, uid):
            api.patch(child_ref, {"metadata": {"ownerReferences": _without_owner(item, uid)}})
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    api.patch(ref, {"metadata": {
        "ownerReferences": _without_owner(live_ns, uid),
        "labels": {ORPHANED_LABEL: "true", DELETION_POLICY_LABEL: "Retain"},
        "annotations": {ORPHANED_AT_ANNOTATION: now, ORPHANED_FROM_ANNOTATION: f"Tenant {name} (uid {uid})"},
    }})
    log.info("tenant %s deleted; namespace %s retained and labelled %s=true", name, name, ORPHANED_LABEL)


def cleanup(api: KubeApi, tenant: dict[str, Any], config: OperatorConfig) -> bool:
    """Release or delete what the Tenant owns, as its ``deletionPolicy`` says; True once done.

    ``Retain`` (the default, and what any value but an exact ``Delete`` means): the namespace
    and its data stay, labelled ``kubeml.io/orphaned=true`` with when and from which Tenant;
    the Tenant's RoleBindings and Profile go with it. ``Delete``: the namespace is deleted,
    which deletes everything in it, and the Profile (cluster-scoped) separately. Only objects
    whose owner reference names this Tenant's uid are touched, so a rejected Tenant never
    deletes or relabels the foreign namespace it collided with.
    """
    meta = tenant["metadata"]
    name, uid = meta["name"], meta.get("uid", "")
    if (tenant.get("spec") or {}).get("deletionPolicy") != "Delete":
        _orphan(api, tenant, config)
        return True
    refs = [ObjectRef("v1", "Namespace", name)]
    if config.kubeflow_profiles:
        refs.insert(0, ObjectRef("kubeflow.org/v1", "Profile", name))
    gone = True
    for ref in refs:
        live = api.get(ref)
        if live is None or not _owned_by(live, uid):
            continue
        gone = False
        if live["metadata"].get("deletionTimestamp"):
            continue
        labels = live["metadata"].get("labels") or {}
        if ref.kind == "Namespace" and labels.get(DELETION_POLICY_LABEL, "Delete") != "Delete":
            # The spec said Delete just before the Tenant was deleted, before a reconcile
            # relabelled the namespace: the retention policy would refuse the delete.
            api.patch(ref, {"metadata": {"labels": {DELETION_POLICY_LABEL: "Delete"}}})
        api.delete(ref, uid=live["metadata"]["uid"])
    return gone
