#!/usr/bin/env bash
# Render manifests/base/platform.yaml from the Helm chart, so the chart stays the one source
# of truth and kustomize users get the same objects, and copy the chart's CRD to
# manifests/crds. Run after changing the chart; tests/unit/operators/test_manifests.py fails
# while they disagree.
#
# The CRD stays out of the base on purpose: deleting it deletes every Tenant, so
# `kubectl delete -k manifests/overlays/<env>` must not own it. It is applied once, apart:
# `kubectl apply -k manifests/crds`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
helm="${HELM:-helm}"
{
  echo "# Rendered from charts/kubeml-platform by manifests/render-base.sh; do not edit by hand."
  "$helm" template kubeml "$here/../charts/kubeml-platform" --namespace kubeml-system \
    --kube-version 1.37.0 \
    | grep -v -e '^# Source:' -e 'helm.sh/chart:' -e 'app.kubernetes.io/managed-by: Helm'
} > "$here/base/platform.yaml"
{
  echo "# Copied from charts/kubeml-platform/crds by manifests/render-base.sh; do not edit by hand."
  cat "$here/../charts/kubeml-platform/crds/tenants.kubeml.io.yaml"
} > "$here/crds/tenants.kubeml.io.yaml"
