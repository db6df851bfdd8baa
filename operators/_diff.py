"""Desired-versus-live comparison: pure, so "a no-op reconcile writes nothing" is testable.

The operator never writes an object that already matches. For each child it computes a
JSON merge patch (RFC 7386) that turns the live object into the desired one for the fields
the operator owns, and sends it only when that patch is not empty:

* ``metadata.labels`` / ``metadata.annotations``: only the keys the operator sets; ``None``
  in the desired manifest means "must be absent"; other keys (kubectl, other tools) stay.
* ``metadata.ownerReferences``: the Tenant's reference must be present.
* every other top-level field (``spec``, ``subjects``, ``roleRef``): must equal the desired
  value exactly, so an extra ingress rule slipped into a deny policy counts as drift.
"""

from __future__ import annotations

from typing import Any

from kubeml.operators._desired import quantity_equal

__all__ = ["merge_patch", "patch_for"]

# Fields under these keys are Kubernetes quantities; the apiserver canonicalises them
# ("1024Mi" is stored as "1Gi"), so they are compared by value.
_QUANTITY_MAPS = frozenset({"hard", "default", "defaultRequest", "max", "min"})
_IMMUTABLE = frozenset({"roleRef"})


def _empty(value: Any) -> bool:
    # Built-in types drop empty lists and maps on the wire (omitempty): desired
    # ``subjects: []`` comes back as no ``subjects`` key at all.
    return value is None or value == [] or value == {}


def _equal(desired: Any, live: Any, quantities: bool = False) -> bool:
    if _empty(desired) and _empty(live):
        return True
    if isinstance(desired, dict):
        if not isinstance(live, dict):
            return False
        keys = {k for k, v in desired.items() if not _empty(v)} | {k for k, v in live.items() if not _empty(v)}
        return all(_equal(desired.get(k), live.get(k), quantities or k in _QUANTITY_MAPS) for k in keys)
    if isinstance(desired, list):
        return (isinstance(live, list) and len(desired) == len(live)
                and all(_equal(d, x, quantities) for d, x in zip(desired, live)))
    if quantities and isinstance(desired, str) and isinstance(live, str):
        return quantity_equal(desired, live)
    return bool(desired == live and type(desired) is type(live))


def merge_patch(live: Any, desired: Any) -> Any:
    """The RFC 7386 merge patch that turns ``live`` into ``desired`` (whole value if not dicts)."""
    if not (isinstance(live, dict) and isinstance(desired, dict)):
        return desired
    patch: dict[str, Any] = {}
    for key in live.keys() - desired.keys():
        patch[key] = None
    for key, value in desired.items():
        if key not in live:
            patch[key] = value
        elif not _equal(value, live[key], key in _QUANTITY_MAPS):
            patch[key] = merge_patch(live[key], value)
    return patch


def _metadata_patch(desired: dict[str, Any], live: dict[str, Any]) -> dict[str, Any]:
    patch: dict[str, Any] = {}
    for field in ("labels", "annotations"):
        want = desired.get(field) or {}
        have = live.get(field) or {}
        changes = {k: v for k, v in want.items() if have.get(k) != v}
        if changes:
            patch[field] = changes
    refs = desired.get("ownerReferences") or []
    live_refs = live.get("ownerReferences") or []
    live_uids = {r.get("uid") for r in live_refs}
    if any(r["uid"] not in live_uids for r in refs):
        # Keep references other controllers hold, minus a stale controller reference.
        kept = [r for r in live_refs if not r.get("controller")]
        patch["ownerReferences"] = kept + refs
    return patch


def patch_for(desired: dict[str, Any], live: dict[str, Any]) -> dict[str, Any] | None:
    """The merge patch to send, ``None`` when live already matches (nothing to write).

    Raises:
        ValueError: an immutable field differs; the object must be deleted and recreated.
    """
    patch: dict[str, Any] = {}
    meta = _metadata_patch(desired.get("metadata", {}), live.get("metadata", {}))
    if meta:
        patch["metadata"] = meta
    for key, value in desired.items():
        if key in ("apiVersion", "kind", "metadata"):
            continue
        if not _equal(value, live.get(key), key in _QUANTITY_MAPS):
            if key in _IMMUTABLE and key in live:
                raise ValueError(f"{key} is immutable")
            patch[key] = merge_patch(live.get(key), value)
    return patch or None


def creatable(desired: dict[str, Any]) -> dict[str, Any]:
    """``desired`` without the ``None`` "must be absent" markers, ready to POST."""
    body = dict(desired)
    meta = dict(body["metadata"])
    for field in ("labels", "annotations"):
        if field in meta:
            meta[field] = {k: v for k, v in meta[field].items() if v is not None}
    body["metadata"] = meta
    return body
