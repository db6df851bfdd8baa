"""kubeml.operators: Kubernetes operators of the platform (kopf).

The Tenant operator turns one ``tenants.kubeml.io`` object into a ready team namespace.
Layers, outermost first: :mod:`~kubeml.operators.tenant` (kopf wiring) ->
``_reconcile`` (what to do) -> ``_desired`` / ``_diff`` / ``_spec`` (pure: what the world
should look like) and ``_kube`` (the only module that talks to the API server).

Run it with ``python -m kubeml.operators``; in tests use :mod:`kubeml.testing.operators`.
"""

from kubeml.operators._desired import OperatorConfig, desired_children
from kubeml.operators._diff import patch_for
from kubeml.operators._kube import ApiCounts, KubeApi, ObjectRef
from kubeml.operators._reconcile import Outcome, cleanup, reconcile
from kubeml.operators._spec import InvalidTenant, TenantSpec, parse_tenant
from kubeml.operators.tenant import TenantOperator, load_api_client

__all__ = [
    "ApiCounts",
    "InvalidTenant",
    "KubeApi",
    "ObjectRef",
    "OperatorConfig",
    "Outcome",
    "TenantOperator",
    "TenantSpec",
    "cleanup",
    "desired_children",
    "load_api_client",
    "parse_tenant",
    "patch_for",
    "reconcile",
]
