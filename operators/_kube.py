"""The one module of the operator that talks to the Kubernetes API.

A thin, counted REST layer over ``kubernetes.client.ApiClient``: plain dicts in and out
(no generated models, so the Kubeflow Profile and the Tenant need no special casing), JSON
merge patches for updates, and a per-verb request counter that the benchmark and the
"no-op reconcile writes nothing" test read.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kubernetes.client.exceptions import ApiException

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

__all__ = ["ApiCounts", "Conflict", "KubeApi", "NotFound", "ObjectRef"]

# (apiVersion, kind) -> (URL prefix, plural, namespaced)
_RESOURCES: dict[tuple[str, str], tuple[str, str, bool]] = {
    ("v1", "Namespace"): ("/api/v1", "namespaces", False),
    ("v1", "ResourceQuota"): ("/api/v1", "resourcequotas", True),
    ("v1", "LimitRange"): ("/api/v1", "limitranges", True),
    ("v1", "ServiceAccount"): ("/api/v1", "serviceaccounts", True),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): ("/apis/rbac.authorization.k8s.io/v1", "rolebindings", True),
    ("networking.k8s.io/v1", "NetworkPolicy"): ("/apis/networking.k8s.io/v1", "networkpolicies", True),
    ("kubeflow.org/v1", "Profile"): ("/apis/kubeflow.org/v1", "profiles", False),
    ("kubeml.io/v1alpha1", "Tenant"): ("/apis/kubeml.io/v1alpha1", "tenants", False),
}

_WRITE_VERBS = frozenset({"POST", "PATCH", "PUT", "DELETE"})
# Per request, in seconds: long enough for a loaded 2-core test machine, short enough that
# a wedged connection fails the reconcile (which kopf retries) instead of hanging a worker.
_REQUEST_TIMEOUT_S = 30.0


class NotFound(Exception):
    pass


class Conflict(Exception):
    """409: the object already exists, or a precondition failed; re-read and retry."""


@dataclass(frozen=True)
class ObjectRef:
    api_version: str
    kind: str
    name: str
    namespace: str | None = None

    @classmethod
    def of(cls, body: dict[str, Any]) -> ObjectRef:
        meta = body["metadata"]
        return cls(body["apiVersion"], body["kind"], meta["name"], meta.get("namespace"))

    def __str__(self) -> str:
        where = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind} {where}{self.name}"

    def collection_path(self) -> str:
        try:
            prefix, plural, namespaced = _RESOURCES[(self.api_version, self.kind)]
        except KeyError:
            raise ValueError(f"{self.api_version} {self.kind} is not a kind the operator manages") from None
        if namespaced:
            if not self.namespace:
                raise ValueError(f"{self.kind} {self.name} needs a namespace")
            return f"{prefix}/namespaces/{self.namespace}/{plural}"
        return f"{prefix}/{plural}"

    def path(self) -> str:
        return f"{self.collection_path()}/{self.name}"


@dataclass(frozen=True)
class ApiCounts:
    reads: int
    writes: int
    by_verb: dict[str, int]


class KubeApi:
    """Counted JSON access to the API server through an authenticated ``ApiClient``."""

    def __init__(self, client: ApiClient):
        self._client = client
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    # --- accounting -------------------------------------------------------------------------
    def counts(self) -> ApiCounts:
        with self._lock:
            by_verb = dict(self._counts)
        writes = sum(n for verb, n in by_verb.items() if verb in _WRITE_VERBS)
        return ApiCounts(reads=sum(by_verb.values()) - writes, writes=writes, by_verb=by_verb)

    def _request(self, method: str, path: str, body: Any = None, *,
                 content_type: str = "application/json", query: list[tuple[str, str]] | None = None) -> Any:
        with self._lock:
            self._counts[method] += 1
        headers = {"Accept": "application/json", "Content-Type": content_type}
        try:
            response = self._client.call_api(
                path, method, query_params=query or [], header_params=headers, body=body,
                auth_settings=["BearerToken"], _preload_content=False,
                _request_timeout=_REQUEST_TIMEOUT_S, _return_http_data_only=True,
            )
        except ApiException as exc:
            if exc.status == 404:
                raise NotFound(path) from exc
            if exc.status == 409:
                raise Conflict(f"{method} {path}: {_reason(exc)}") from exc
            raise
        data = response.data
        return json.loads(data) if data else None

    # --- objects ----------------------------------------------------------------------------
    def get(self, ref: ObjectRef) -> dict[str, Any] | None:
        try:
            return self._request("GET", ref.path())
        except NotFound:
            return None

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", ObjectRef.of(body).collection_path(), body)

    def patch(self, ref: ObjectRef, patch: dict[str, Any], *, subresource: str = "") -> dict[str, Any]:
        path = ref.path() + (f"/{subresource}" if subresource else "")
        return self._request("PATCH", path, patch, content_type="application/merge-patch+json")

    def delete(self, ref: ObjectRef, *, uid: str | None = None) -> bool:
        """Delete in the background; with ``uid``, only that incarnation. False when absent."""
        body: dict[str, Any] = {"propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self._request("DELETE", ref.path(), body)
            return True
        except NotFound:
            return False

    def list(self, ref: ObjectRef, *, label_selector: str = "") -> list[dict[str, Any]]:
        query = [("labelSelector", label_selector)] if label_selector else []
        return self._request("GET", ref.collection_path(), query=query).get("items", [])


def _reason(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body).get("message") or exc.reason)
    except (TypeError, ValueError):
        return str(exc.reason)
