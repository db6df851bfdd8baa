#!/usr/bin/env bash
# Makes a `prometheus` binary available for the rollout-analysis integration tests.
#
#   bash hack/prometheus/install.sh
#
# The tests start their own Prometheus process (a free port, a temp config and storage
# directory), so all that is needed is the binary. It comes from the distribution's package
# (Debian/Ubuntu `prometheus`, ~100 MB with its web assets; 2.42 on Debian 12), installed
# with apt-get when running as root (CI). Without root it says what to run instead.
#
# Idempotent and quiet: a binary already on PATH is used as is (a second run costs
# nothing), and apt-get's output is shown only when it fails. `apt-get update` runs only
# when the install fails without it, because it downloads every package index.
#
# The package's service must not start: the tests never use it, and a daemon listening on
# :9090 would be a surprise on a developer machine. Services are held back with a
# policy-rc.d that denies every start during the install (unless one is already there,
# as in most container images, which do the same).
set -euo pipefail

log() { printf '[prometheus-assets] %s\n' "$*" >&2; }
die() { printf '[prometheus-assets] error: %s\n' "$*" >&2; exit 1; }

if command -v prometheus >/dev/null 2>&1; then
    exit 0
fi

if [[ $EUID -ne 0 ]]; then
    die "prometheus is not on PATH and installing it needs root. Run
    sudo apt-get install -y --no-install-recommends prometheus
(or put any Prometheus >= 2.40 binary on PATH) and re-run."
fi
command -v apt-get >/dev/null 2>&1 ||
    die "prometheus is not on PATH and apt-get is missing; install a Prometheus >= 2.40 binary on PATH."

policy=/usr/sbin/policy-rc.d
workdir=$(mktemp -d)
cleanup() {
    if [[ -f "$workdir/own-policy" ]]; then rm -f "$policy"; fi
    rm -rf "$workdir"
}
trap cleanup EXIT
if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\n# Temporary: hack/prometheus/install.sh keeps package services stopped.\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    touch "$workdir/own-policy"
fi

export DEBIAN_FRONTEND=noninteractive
# Waits for a concurrent apt/dpkg run (another install on the same machine) instead of failing.
apt_opts=(-q -y -o DPkg::Lock::Timeout=300)

install() {
    apt-get "${apt_opts[@]}" install --no-install-recommends prometheus >"$workdir/apt.log" 2>&1
}

log "installing prometheus with apt-get"
if ! install; then
    log "install failed; refreshing the package index and retrying"
    if ! apt-get "${apt_opts[@]}" update >"$workdir/apt.log" 2>&1 || ! install; then
        cat "$workdir/apt.log" >&2
        die "apt-get could not install prometheus (output above)"
    fi
fi
command -v prometheus >/dev/null 2>&1 || die "the prometheus package installed no prometheus on PATH"
log "$(prometheus --version 2>&1 | head -n1)"
