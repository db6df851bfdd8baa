#!/usr/bin/env bash
# Builds the kubeml images (images/*.Containerfile) without a Docker daemon or a registry,
# caches them by content, and loads them into the local real node when one runs.
#
#   bash hack/images/build.sh [--if-root] [operator] [server] [runtime]   (default: operator)
#
# The default is the operator image, the one the local cluster runs (the platform chart).
# The server and runtime images carry PyTorch's CUDA build (the package index has no other),
# about 5 GB each unpacked; building one here takes about 25 GB of free disk on the way
# (buildah's layers, the archive, containerd's content and snapshot), so they are built only
# when asked for by name, after a check of the free space.
#
# --if-root: without root, say so and exit 0 instead of failing (`make test` uses it: the
# tests that run images need the real node, which needs root as well).
#
# How, since no registry is reachable here:
#   1. a Debian bookworm base with Python 3.11 from Debian's own packages (mmdebstrap),
#      committed into buildah's store as localhost/kubeml-base:bookworm;
#   2. each Containerfile built on that base with buildah (BASE build argument), the host's
#      CA bundle passed as the `ca-bundle` build secret for the package downloads;
#   3. the result saved as an OCI archive in ${KUBEML_CACHE_DIR:-~/.cache/kubeml}/images/,
#      named by a hash of everything that goes into it (the Containerfile, the build context,
#      the base, the build arguments): a second run with nothing changed builds nothing;
#   4. imported into the real node's containerd (namespace k8s.io) if a real node runs.
#
# Elsewhere build the same files with docker or buildah on the default python:3.11-slim
# base and push them to a registry (see the README).
#
# Environment:
#   KUBEML_IMAGE_REGISTRY, KUBEML_IMAGE_TAG   the names (kubeml.images.image_ref)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache_root=${KUBEML_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kubeml}
out="$cache_root/images"
mkdir -p "$out"

log() { printf '[images] %s\n' "$*" >&2; }
die() { printf '[images] error: %s\n' "$*" >&2; exit 1; }

if_root=false
kinds=()
for arg in "$@"; do
    case $arg in
        --if-root) if_root=true ;;
        -*) die "unknown option $arg" ;;
        *) kinds+=("$arg") ;;
    esac
done
[[ ${#kinds[@]} -gt 0 ]] || kinds=(operator)
for kind in "${kinds[@]}"; do
    [[ -f "$repo/images/$kind.Containerfile" ]] || die "no image '$kind' (images/$kind.Containerfile); kubeml has operator, server, runtime"
done

if [[ $EUID -ne 0 && $if_root == true ]]; then
    log "not root: images not built (the tests that run them need root for the real node too)"
    exit 0
fi
[[ $EUID -eq 0 ]] || die "building images here needs root (buildah's store and mmdebstrap's chroot); run as root, or build images/*.Containerfile with docker"
for tool in buildah mmdebstrap; do
    command -v "$tool" >/dev/null 2>&1 || bash "$here/../cluster/host-packages.sh" buildah mmdebstrap
    command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed: apt-get install -y --no-install-recommends buildah mmdebstrap"
done
python=${PYTHON:-python3}

# Free space a build needs on the way, in GB (measured: see benchmarks/RESULTS.md); checked
# only when an image is really built, not when the cached one is up to date.
declare -A need_gb=([operator]=3 [server]=25 [runtime]=30)
free_gb() { mkdir -p "$1"; echo $(( $(df --output=avail -k "$1" | tail -1) / 1024 / 1024 )); }
check_space() {
    local kind=$1 image=$2 dir
    for dir in /var/lib/containers "$out"; do
        (( $(free_gb "$dir") >= need_gb[$kind] )) && continue
        # The image this build replaces goes anyway once it is built; with too little room
        # for both, it goes first (its archive, and the node's copy, stay until replaced).
        if buildah inspect --type image "$image" >/dev/null 2>&1; then
            log "$kind: $(free_gb "$dir") GB free on $dir; removing the previous $image from buildah's store first"
            buildah rmi "$image" >/dev/null 2>&1 || true
        fi
        (( $(free_gb "$dir") >= need_gb[$kind] )) ||
            die "building the $kind image needs about ${need_gb[$kind]} GB free on $dir; $(free_gb "$dir") GB are: free some space first (buildah rmi --prune drops buildah's layer cache)"
    done
}

exec 9>"$out/.build.lock"
flock 9

# --- 1. the base --------------------------------------------------------------------------
base_ref=localhost/kubeml-base:bookworm
base_opts=(--variant=minbase --mode=root --include=python3,python3-venv,ca-certificates
    --dpkgopt=path-exclude=/usr/share/doc/* --dpkgopt=path-exclude=/usr/share/man/*
    --dpkgopt=path-exclude=/usr/share/locale/* --dpkgopt=path-exclude=/usr/share/info/*)
base_key=$(printf '%s\n' bookworm "${base_opts[@]}" | sha256sum | cut -c1-16)
base_tar="$out/base-bookworm-$base_key.tar"
if [[ ! -f "$base_tar" ]]; then
    log "base: mmdebstrap bookworm (python3, python3-venv, ca-certificates)"
    start=$SECONDS
    rm -rf "$out/.base.tmp.tar"
    mmdebstrap --format=tar "${base_opts[@]}" bookworm "$out/.base.tmp.tar" >"$out/base.log" 2>&1 ||
        { tail -20 "$out/base.log" >&2; die "mmdebstrap failed (log above: $out/base.log)"; }
    mv -f "$out/.base.tmp.tar" "$base_tar"
    printf 'base\t%s\t%s\n' $((SECONDS - start)) "$(date -u +%FT%TZ)" >>"$out/build-times.tsv"
fi
if [[ "$(buildah inspect --type image --format '{{index .ImageAnnotations "dev.kubeml.base-key"}}' "$base_ref" 2>/dev/null)" != "$base_key" ]]; then
    log "base: committing $base_ref"
    ctr=$(buildah from scratch)
    mnt=$(buildah mount "$ctr")
    tar -C "$mnt" -xf "$base_tar"
    buildah umount "$ctr" >/dev/null
    buildah config --env PATH=/usr/local/bin:/usr/bin:/bin --env LANG=C.UTF-8 --cmd python3 \
        --annotation "dev.kubeml.base-key=$base_key" "$ctr"
    buildah commit -q --rm "$ctr" "$base_ref" >/dev/null
fi
base_id=$(buildah inspect --type image --format '{{.FromImageID}}' "$base_ref")

# --- 2./3. the images ---------------------------------------------------------------------------
context=(requirements/constraints.txt pyproject.toml README.md kubeml training serving components
    pipelines operators testing)
context_hash=$(cd "$repo" && find "${context[@]}" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 |
    sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
version=$(cd "$repo" && sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)
revision=$(cd "$repo" && git rev-parse HEAD 2>/dev/null || echo unknown)
ca_bundle=
for candidate in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt; do
    [[ -f "$candidate" ]] && { ca_bundle=$candidate; break; }
done

built=()
superseded=()
for kind in "${kinds[@]}"; do
    image=$(cd "$repo" && "$python" "$here/ref.py" "$kind")
    key=$(printf '%s\n' "$(sha256sum "$repo/images/$kind.Containerfile")" "$context_hash" "$base_id" \
        "$image" | sha256sum | cut -c1-16)
    tar="$out/$kind-$key.tar"
    if [[ -f "$tar" && -f "$out/$kind-$key.json" ]]; then
        log "$kind: up to date ($image)"
    else
        check_space "$kind" "$image"
        log "$kind: building $image"
        start=$SECONDS
        old_id=$(buildah inspect --type image --format '{{.FromImageID}}' "$image" 2>/dev/null || true)
        secret=()
        [[ -n "$ca_bundle" ]] && secret=(--secret "id=ca-bundle,src=$ca_bundle")
        (cd "$repo" && buildah bud --quiet --network host --isolation chroot --layers --pull-never \
            "${secret[@]}" --build-arg "BASE=$base_ref" \
            --build-arg "VERSION=$version" --build-arg "REVISION=$revision" \
            -f "images/$kind.Containerfile" -t "$image" . >"$out/$kind.log" 2>&1) ||
            { tail -30 "$out/$kind.log" >&2; die "building $kind failed (log above: $out/$kind.log)"; }
        # Uncompressed: the archive only travels to the local containerd, and gzip on two
        # cores costs minutes for the runtime image.
        buildah push --quiet --disable-compression "$image" "oci-archive:$tar.tmp:$image" >/dev/null
        mv -f "$tar.tmp" "$tar"
        seconds=$((SECONDS - start))
        # Unpacked size: the sum of the layers' uncompressed sizes, as `docker images` shows it.
        size=$(buildah images --json "$image" | "$python" -c 'import json, sys
units = {"B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}
value, unit = json.load(sys.stdin)[0]["size"].split()
print(int(float(value) * units[unit]))')
        printf '{"kind": "%s", "image": "%s", "key": "%s", "size_bytes": %s, "archive_bytes": %s, "seconds": %s, "revision": "%s"}\n' \
            "$kind" "$image" "$key" "${size:-0}" "$(stat -c %s "$tar")" "$seconds" "$revision" >"$out/$kind-$key.json"
        printf '%s\t%s\t%s\n' "$kind" "$seconds" "$(date -u +%FT%TZ)" >>"$out/build-times.tsv"
        new_id=$(buildah inspect --type image --format '{{.FromImageID}}' "$image")
        [[ -n "$old_id" && "$old_id" != "$new_id" ]] && superseded+=("$old_id")
        log "$kind: built in $seconds s"
        # Keep one archive per kind: older keys are superseded.
        find "$out" -maxdepth 1 -name "$kind-*.tar" ! -name "$kind-$key.tar" -delete
        find "$out" -maxdepth 1 -name "$kind-*.json" ! -name "$kind-$key.json" -delete
    fi
    ln -sfn "$kind-$key.tar" "$out/$kind.tar"
    ln -sfn "$kind-$key.json" "$out/$kind.json"
    built+=("$out/$kind.tar")
done

# The image this name had before a rebuild goes (layers other images share stay). Nothing
# is pruned: buildah's layer cache is kept as untagged images, and pruning it would make the
# next code change reinstall every dependency (minutes, and GBs of downloads for PyTorch).
# `buildah rmi --prune` frees that cache by hand.
for old_id in "${superseded[@]}"; do
    buildah rmi "$old_id" >/dev/null 2>&1 || true
done

# --- 4. into the real node ----------------------------------------------------------------------
socket=/run/kubeml/node/containerd.sock
# The reference an archive was written under (`buildah push ... oci-archive:TAR:REF`).
imported_ref() { "$python" -c 'import json, sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    index = json.load(t.extractfile("index.json"))
print(index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"])' "$(readlink -f "$1")"; }
if [[ -S "$socket" ]]; then
    source "$repo/hack/cluster/versions.env"
    ctr_bin="$cache_root/k8s-v$K8S_VERSION/bin/ctr"
    for tar in "${built[@]}"; do
        "$ctr_bin" --address "$socket" --namespace k8s.io images import "$tar" >"$out/import.log" 2>&1 ||
            { cat "$out/import.log" >&2; die "importing $tar into the real node failed"; }
        # Pinned: no registry gives it back if the kubelet reclaims disk (RealNode.import_image).
        "$ctr_bin" --address "$socket" --namespace k8s.io images label "$(imported_ref "$tar")" \
            io.cri-containerd.pinned=pinned >/dev/null ||
            die "pinning the image of $tar in the real node failed"
        log "loaded $(basename "$(readlink -f "$tar")") into the real node"
    done
fi
printf '%s\n' "${built[@]}"
