#!/usr/bin/env bash
# Render manifests/base/platform.yaml from the Helm chart, so the chart stays the one source
# of truth and kustomize users get the same objects. Run after changing the chart;
# tests/unit/operators/test_manifests.py fails while the two disagree.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
helm="${HELM:-helm}"
{
  echo "# Rendered from charts/kubeml-platform by manifests/render-base.sh; do not edit by hand."
  "$helm" template kubeml "$here/../charts/kubeml-platform" --namespace kubeml-system \
    --include-crds --kube-version 1.37.0 \
    | grep -v -e '^# Source:' -e 'helm.sh/chart:' -e 'app.kubernetes.io/managed-by: Helm'
} > "$here/base/platform.yaml"
