#!/usr/bin/env bash
# Installs the distribution packages a real node needs: runc (the OCI runtime containerd
# drives), iptables (the pod-network guard chain and kube-proxy), conntrack, iproute2 and
# nftables (nft lists and removes the NetworkPolicy enforcer's table). Debian 12 ships
# runc 1.1, which containerd 2.x drives fine. Packages named as
# arguments are installed the same way.
#
# Idempotent and quiet: tools already on PATH are used as they are; apt-get runs only as
# root, and `apt-get update` only when an install fails without it. Without root it says
# what to run and exits 0: a real node needs root anyway, and the kwok-only cluster does
# not need these.
set -euo pipefail

log() { printf '[host-packages] %s\n' "$*" >&2; }

declare -A package_of=([runc]=runc [iptables]=iptables [iptables-save]=iptables [conntrack]=conntrack [ip]=iproute2 [nft]=nftables)
missing=()
for tool in "${!package_of[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("${package_of[$tool]}")
done
# Extra packages named on the command line (their command has the package's name):
# hack/images/build.sh asks for buildah and mmdebstrap this way.
for package in "$@"; do
    command -v "$package" >/dev/null 2>&1 || missing+=("$package")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0
mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sort -u)

if [[ $EUID -ne 0 ]]; then
    log "a real node needs ${packages[*]}; install them with
    sudo apt-get install -y --no-install-recommends ${packages[*]}"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    log "error: ${packages[*]} missing and apt-get is not available; install them with the system's package manager"
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt_opts=(-q -y -o DPkg::Lock::Timeout=300)
workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT
install() { apt-get "${apt_opts[@]}" install --no-install-recommends "${packages[@]}" >"$workdir/apt.log" 2>&1; }
log "installing ${packages[*]} with apt-get"
if ! install; then
    log "install failed; refreshing the package index and retrying"
    if ! apt-get "${apt_opts[@]}" update >"$workdir/apt.log" 2>&1 || ! install; then
        cat "$workdir/apt.log" >&2
        log "error: apt-get could not install ${packages[*]} (output above)"
        exit 1
    fi
fi
