#!/usr/bin/env bash
# Generates the third-party CRDs that every test cluster installs, from the upstream Go API
# types, with controller-gen. Called by hack/cluster/build.sh; writes *.yaml into
# $KUBEML_CRDS_OUT.
#
# Each upstream project gets its own wrapper module (kserve/, kuberay/, ...): the projects pin
# different k8s.io and controller-runtime versions, and one shared module would type-check
# their API packages against versions none of them was built with. controller-gen loads the
# packages by import path through the wrapper's go.mod, so the schemas are exactly what
# upstream's own `make manifests` derives from the same source.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${KUBEML_CRDS_OUT:?set KUBEML_CRDS_OUT to the output directory}
controller_gen=${CONTROLLER_GEN:?set CONTROLLER_GEN to the controller-gen binary}

log() { printf '[cluster-assets] %s\n' "$*" >&2; }

# wrapper dir | controller-gen crd options (as in upstream's Makefile) | API package | files kept
#   | post-generation edits upstream applies (fixups/main.go), if any
# Only the kinds kubeml creates are kept: each extra CRD costs install time on every `cluster up`.
# RayService too: the KubeRay operator of the real node watches it and exits without its CRD.
# Checked against the CRD YAML each project publishes in the same module version: the
# schemas are identical (KServe after its fixups; KubeRay and ACK modulo descriptions,
# which are dropped here with maxDescLen=0 to keep etcd objects small).
specs=(
    "kserve|crd:maxDescLen=0|github.com/kserve/kserve/pkg/apis/serving/v1beta1|serving.kserve.io_inferenceservices.yaml|kserve-inferenceservice"
    "kuberay|crd:maxDescLen=0,generateEmbeddedObjectMeta=true,allowDangerousTypes=true|github.com/ray-project/kuberay/ray-operator/apis/ray/v1|ray.io_rayjobs.yaml ray.io_rayclusters.yaml ray.io_rayservices.yaml"
    "sagemaker|crd:allowDangerousTypes=true,maxDescLen=0|github.com/aws-controllers-k8s/sagemaker-controller/apis/v1alpha1|sagemaker.services.k8s.aws_trainingjobs.yaml"
    "prometheus|crd:crdVersions=v1,maxDescLen=0|github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1|monitoring.coreos.com_servicemonitors.yaml monitoring.coreos.com_prometheusrules.yaml"
    "kubeflow|crd:maxDescLen=0|kubeml.dev/hack/cluster/crds/kubeflow/profile/v1|kubeflow.org_profiles.yaml"
)

stamp_file="$out/.stamp"
stamp=$( (cat "$0"; "$controller_gen" --version; cat "$here"/*/go.mod "$here"/*/go.sum; find "$here" -name '*.go' -print0 | sort -z | xargs -0 cat) | sha256sum | cut -c1-16)
if [[ "$(cat "$stamp_file" 2>/dev/null)" == "$stamp" ]]; then
    log "crds: up to date"
    exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
start=$SECONDS
for spec in "${specs[@]}"; do
    IFS='|' read -r dir options package keep fixup <<<"$spec"
    log "crds: $dir ($package)"
    mkdir -p "$tmp/$dir"
    (cd "$here/$dir" && "$controller_gen" "$options" paths="$package" output:crd:dir="$tmp/$dir")
    if [[ -n "$fixup" ]]; then
        (cd "$here/fixups" && go run . "$fixup" "$tmp/$dir/$keep")
    fi
    for file in $keep; do
        [[ -f "$tmp/$dir/$file" ]] || { log "error: controller-gen produced no $file for $package"; exit 1; }
        cp "$tmp/$dir/$file" "$tmp/$file"
    done
done
rm -f "$out"/*.yaml
for spec in "${specs[@]}"; do
    IFS='|' read -r _ _ _ keep _ <<<"$spec"
    for file in $keep; do cp "$tmp/$file" "$out/$file"; done
done
echo "$stamp" >"$stamp_file"
log "crds: generated $(ls "$out"/*.yaml | wc -l) CRDs in $((SECONDS - start)) s"
