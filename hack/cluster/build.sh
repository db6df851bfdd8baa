#!/usr/bin/env bash
# Builds the integration-test control plane from Go modules and prints the assets directory.
#
#   export KUBEBUILDER_ASSETS=$(bash hack/cluster/build.sh)
#
# Output (outside the repo, shared by every clone of the same versions):
#   ${KUBEML_CACHE_DIR:-~/.cache/kubeml}/k8s-v<K8S_VERSION>/bin   etcd, kube-apiserver,
#       kube-controller-manager, kube-scheduler, kubectl, kwok, helm, controller-gen
#       kubelet, kube-proxy, containerd, containerd-shim-runc-v2, ctr, cni/{bridge,host-local,loopback,portmap},
#       pause, probe, ray-operator, coredns, kube-network-policies
#                                                 the real node, KubeRay, DNS, NetworkPolicy
#   .../k8s-v<K8S_VERSION>/images                                 the node's own OCI archives
#   .../k8s-v<K8S_VERSION>/crds                                   third-party CRDs (YAML)
#
# Idempotent: each binary carries a stamp (version + hash of the wrapper module's go.sum) and
# is rebuilt only when the stamp changes. A cold build on 2 cores takes tens of minutes, most
# of it compiling kube-apiserver; a warm run takes about a second.
#
# Environment:
#   KUBEML_CACHE_DIR   cache root (default: $XDG_CACHE_HOME/kubeml or ~/.cache/kubeml)
#   KUBEML_BUILD_JOBS  parallel Go compile jobs (default: number of CPUs); lower it to keep a
#                      small machine responsive while the build runs
#   BUILD_ONLY         space-separated subset of: etcd kube-apiserver kube-controller-manager
#                      kube-scheduler kubectl kubelet kube-proxy kwok helm controller-gen crds containerd
#                      cni node-images host-packages kuberay coredns netpol
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

cache_root=${KUBEML_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kubeml}
dest="$cache_root/k8s-v$K8S_VERSION"
bin="$dest/bin"
crds="$dest/crds"
mkdir -p "$bin" "$crds"

log() { printf '[cluster-assets] %s\n' "$*" >&2; }
die() { printf '[cluster-assets] error: %s\n' "$*" >&2; exit 1; }

command -v go >/dev/null || die "Go is not installed; install Go >= 1.26 (https://go.dev/dl) and re-run."
go_minor=$(go env GOVERSION | sed -E 's/^go1\.([0-9]+).*/\1/')
[[ "$go_minor" =~ ^[0-9]+$ && "$go_minor" -ge 26 ]] ||
    die "Go $(go env GOVERSION) is too old; kubernetes v$K8S_VERSION needs Go >= 1.26."

# The pytest fixture and `make cluster-assets` may start at the same time: one build at a time.
exec 9>"$dest/.build.lock"
flock 9

# -trimpath keeps local paths out of the binaries (and the build cache keys stable);
# -mod=readonly makes a go.mod/go.sum drift an error instead of a silent re-resolve.
# CGO off: static binaries, no C toolchain needed; the upstream release builds do the same.
export GOFLAGS="-trimpath -mod=readonly"
export CGO_ENABLED=0
jobs=${KUBEML_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}
# -s -w drops the symbol and DWARF tables; stripped, the eight binaries take ~520 MB.
strip_flags="-s -w"
# One line per compiled binary: name, seconds, date. benchmarks/cluster reads the cold
# build time from it (a warm run compiles nothing and adds no line).
record_time() { printf '%s\t%s\t%s\n' "$1" "$2" "$(date -u +%FT%TZ)" >>"$dest/build-times.tsv"; }

want() { [[ -z "${BUILD_ONLY:-}" || " $BUILD_ONLY " == *" $1 "* ]]; }
# Stamp of a binary: bin/.NAME.stamp, with a '/' in NAME (cni/bridge) written as '-'.
stamp_file() { echo "$bin/.${1//\//-}.stamp"; }
fresh() { [[ -x "$bin/$1" && "$(cat "$(stamp_file "$1")" 2>/dev/null)" == "$2" ]]; }

# go_build NAME STAMP MODULE_DIR PACKAGE LDFLAGS: builds into a temp name, then renames, so
# an interrupted build never leaves a truncated binary behind.
go_build() {
    local name=$1 stamp=$2 dir=$3 pkg=$4 ldflags=$5 start
    if fresh "$name" "$stamp"; then log "$name: up to date"; return; fi
    log "$name: building $pkg (this can take a while)"
    start=$SECONDS
    (cd "$dir" && go build -p "$jobs" -ldflags "$ldflags" -o "$bin/.$name.tmp" "$pkg")
    mv -f "$bin/.$name.tmp" "$bin/$name"
    echo "$stamp" >"$(stamp_file "$name")"
    record_time "$name" $((SECONDS - start))
    log "$name: built in $((SECONDS - start)) s"
}

# go_install NAME VERSION PACKAGE@VERSION LDFLAGS: tools whose own go.mod has no replace
# directives install straight from the module proxy.
go_install() {
    local name=$1 version=$2 pkg=$3 ldflags=$4 start tmp
    if fresh "$name" "$version"; then log "$name: up to date"; return; fi
    log "$name: installing $pkg"
    start=$SECONDS
    tmp=$(mktemp -d "$dest/.gobin.XXXXXX")
    (cd "$tmp" && GOFLAGS=-trimpath GOBIN="$tmp" go install -p "$jobs" -ldflags "$ldflags" "$pkg")
    mv -f "$tmp/${name##*/}" "$bin/$name"
    rm -rf "$tmp"
    echo "$version" >"$(stamp_file "$name")"
    record_time "$name" $((SECONDS - start))
    log "$name: built in $((SECONDS - start)) s"
}

check_require() { # MODULE_DIR MODULE VERSION
    local got
    got=$(cd "$1" && go list -m -f '{{.Version}}' "$2")
    [[ "$got" == "$3" ]] || die "$1/go.mod requires $2 $got but versions.env says $3; bump them together."
}

module_stamp() { # VERSION MODULE_DIR
    echo "$1 $(cat "$2/go.mod" "$2/go.sum" | sha256sum | cut -c1-16)"
}

# --- Kubernetes -------------------------------------------------------------------------
k8s_dir="$here/k8s"
check_require "$k8s_dir" k8s.io/kubernetes "v$K8S_VERSION"
# Version ldflags: helm, kwok and `kubectl version` read these. The module proxy does not
# carry the git commit, so gitCommit stays empty and the tree state says it came from an
# archive; buildDate is the tag time of the module so rebuilds are reproducible.
k8s_time=$(cd "$k8s_dir" && go list -m -f '{{.Time}}' k8s.io/kubernetes | cut -d' ' -f1-2 | sed 's/ /T/')Z
k8s_minor=$(echo "$K8S_VERSION" | cut -d. -f2)
k8s_ld="$strip_flags"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    k8s_ld+=" -X $pkg.gitVersion=v$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$k8s_minor"
    k8s_ld+=" -X $pkg.gitTreeState=archive -X $pkg.buildDate=$k8s_time -X $pkg.gitCommit="
done
k8s_stamp=$(module_stamp "v$K8S_VERSION" "$k8s_dir")
for cmd in kube-apiserver kubectl kube-controller-manager kube-scheduler kubelet kube-proxy; do
    want "$cmd" && go_build "$cmd" "$k8s_stamp" "$k8s_dir" "k8s.io/kubernetes/cmd/$cmd" "$k8s_ld"
done

# --- etcd -------------------------------------------------------------------------------
etcd_dir="$here/etcd"
if want etcd; then
    check_require "$etcd_dir" go.etcd.io/etcd/server/v3 "v$ETCD_VERSION"
    go_build etcd "$(module_stamp "v$ETCD_VERSION" "$etcd_dir")" "$etcd_dir" go.etcd.io/etcd/server/v3 \
        "$strip_flags -X go.etcd.io/etcd/api/v3/version.GitSHA=v$ETCD_VERSION-module"
fi

# --- Tools without replace directives -----------------------------------------------------
want kwok && go_install kwok "v$KWOK_VERSION" "sigs.k8s.io/kwok/cmd/kwok@v$KWOK_VERSION" \
    "$strip_flags -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION"
want helm && go_install helm "v$HELM_VERSION" "helm.sh/helm/v3/cmd/helm@v$HELM_VERSION" \
    "$strip_flags -X helm.sh/helm/v3/internal/version.version=v$HELM_VERSION"
want controller-gen && go_install controller-gen "v$CONTROLLER_TOOLS_VERSION" \
    "sigs.k8s.io/controller-tools/cmd/controller-gen@v$CONTROLLER_TOOLS_VERSION" "$strip_flags"

# --- KubeRay: the operator that turns RayJobs into Ray clusters on the real node ----------
# Same version as the CRDs (crds/kuberay); its go.mod has no replace directives.
want kuberay && go_install ray-operator "v$KUBERAY_VERSION" \
    "github.com/ray-project/kuberay/ray-operator@v$KUBERAY_VERSION" "$strip_flags"

# --- CoreDNS: Service names for the real node's pods -------------------------------------
# Our own main (hack/cluster/coredns) with only the plugins the node's Corefile uses: the
# full upstream build compiles every cloud DNS SDK as well.
coredns_dir="$here/coredns"
if want coredns; then
    check_require "$coredns_dir" github.com/coredns/coredns "v$COREDNS_VERSION"
    go_build coredns "$(module_stamp "v$COREDNS_VERSION" "$coredns_dir") $(sha256sum <"$coredns_dir/main.go" | cut -c1-16)" \
        "$coredns_dir" . "$strip_flags -X github.com/coredns/coredns/coremain.GitCommit=v$COREDNS_VERSION-module"
fi

# --- NetworkPolicy for the real node: kube-network-policies (Kubernetes SIG Network) ---------
# Its module has no replace directives, but its command reads only the in-cluster config;
# netpol/ is a small main around the same controller package that takes a kubeconfig.
netpol_dir="$here/netpol"
if want netpol; then
    check_require "$netpol_dir" sigs.k8s.io/kube-network-policies "v$KUBE_NETWORK_POLICIES_VERSION"
    go_build kube-network-policies "$(module_stamp "v$KUBE_NETWORK_POLICIES_VERSION" "$netpol_dir") $(sha256sum <"$netpol_dir/main.go" | cut -c1-16)" \
        "$netpol_dir" . "$strip_flags"
fi

# --- The real node: containerd, CNI plugins, runc, and its own small images ---------------
# containerd 2.x (the 1.37 kubelet needs the 2.x CRI; Debian's 1.6 is too old) and the CNI
# plugins install straight from the module proxy: neither has replace directives.
for cmd in containerd containerd-shim-runc-v2 ctr; do
    want containerd && go_install "$cmd" "v$CONTAINERD_VERSION" \
        "github.com/containerd/containerd/v2/cmd/$cmd@v$CONTAINERD_VERSION" "$strip_flags"
done
if want cni; then
    mkdir -p "$bin/cni"
    for plugin in main/bridge ipam/host-local main/loopback meta/portmap; do
        name=${plugin#*/}
        go_install "cni/$name" "v$CNI_PLUGINS_VERSION" \
            "github.com/containernetworking/plugins/plugins/$plugin@v$CNI_PLUGINS_VERSION" "$strip_flags"
    done
fi
# The pause process of every pod sandbox and the probe the real-node tests run: our own
# static programs (hack/cluster/node), packed into single-layer OCI archives that the node
# imports into containerd at start; no registry is needed.
node_dir="$here/node"
if want node-images; then
    node_stamp="$(cd "$node_dir" && cat go.mod ./*/*.go mkimage.py | sha256sum | cut -c1-16)"
    for prog in pause probe; do
        go_build "$prog" "$node_stamp" "$node_dir" "./$prog" "$strip_flags"
    done
    mkdir -p "$dest/images"
    for prog in pause probe; do
        image_stamp="$node_stamp $(cat "$bin/.$prog.stamp")"
        if [[ -f "$dest/images/$prog.tar" && "$(cat "$dest/images/.$prog.stamp" 2>/dev/null)" == "$image_stamp" ]]; then
            log "image $prog: up to date"; continue
        fi
        user=65535:65535
        python3 "$node_dir/mkimage.py" -o "$dest/images/$prog.tar" --name "kubeml.local/$prog:1" \
            --file "$bin/$prog:/$prog" --entrypoint "/$prog" --user "$user" \
            --label "org.opencontainers.image.source=hack/cluster/node/$prog" >/dev/null
        echo "$image_stamp" >"$dest/images/.$prog.stamp"
        log "image $prog: written"
    done
fi
# runc, iptables and conntrack come from the distribution (Debian: runc 1.1).
if want host-packages; then
    bash "$here/host-packages.sh"
fi

# kwok ships its stage definitions (how fake nodes become Ready, how pods reach Running) as
# YAML inside its module; kwokctl embeds them, the bare kwok binary needs them as --config.
# Take them from the same module version, so they always match the binary.
if want kwok; then
    kwok_dir=$(cd "$dest" && GOFLAGS= go mod download -json "sigs.k8s.io/kwok@v$KWOK_VERSION" |
        sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
    [[ -d "$kwok_dir" ]] || die "could not locate the sigs.k8s.io/kwok@v$KWOK_VERSION module source"
    stages="$kwok_dir/kustomize/stage"
    mkdir -p "$dest/kwok"
    for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
        pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
        cat "$stages/$f"
        echo "---"
    done >"$dest/kwok/.stages.yaml.tmp"
    mv -f "$dest/kwok/.stages.yaml.tmp" "$dest/kwok/stages.yaml"
fi

# --- Third-party CRDs from upstream Go API types ----------------------------------------------
if want crds; then
    KUBEML_CRDS_OUT="$crds" CONTROLLER_GEN="$bin/controller-gen" bash "$here/crds/generate.sh"
fi

echo "$bin"
