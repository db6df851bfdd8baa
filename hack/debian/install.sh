#!/usr/bin/env bash
# Installs one Debian package for the test tiers, quietly and without starting its service.
#
#   bash hack/debian/install.sh PACKAGE PROBE [HINT]
#
# PROBE says whether the package is already there: a command on PATH, or a path glob
# (e.g. '/usr/lib/postgresql/*/bin/postgres'). When it matches, nothing runs (a second call
# costs nothing). Otherwise, as root, apt-get installs PACKAGE; `apt-get update` runs only
# when the install fails without it, because it downloads every package index. Without
# root it says what to run and fails: the tests need the package. HINT is said then too.
#
# Package services must not start: the tests start their own processes (own port, own
# data directory), and a daemon appearing on a developer machine would be a surprise. A
# policy-rc.d that denies every start is in place during the install (unless one is already
# there, as in most container images, which do the same).
set -euo pipefail

package=${1:?usage: install.sh PACKAGE PROBE [HINT]}
probe=${2:?usage: install.sh PACKAGE PROBE [HINT]}
hint=${3:-}

log() { printf '[%s] %s\n' "$package" "$*" >&2; }
die() { printf '[%s] error: %s\n' "$package" "$*" >&2; exit 1; }

present() {
    if [[ $probe == */* ]]; then
        compgen -G "$probe" >/dev/null
    else
        command -v "$probe" >/dev/null 2>&1
    fi
}

present && exit 0

if [[ $EUID -ne 0 ]]; then
    die "$probe is missing and installing it needs root. Run
    sudo apt-get install -y --no-install-recommends $package
${hint:+$hint
}and re-run."
fi
command -v apt-get >/dev/null 2>&1 || die "$probe is missing and apt-get is not available${hint:+; $hint}"

policy=/usr/sbin/policy-rc.d
workdir=$(mktemp -d)
cleanup() {
    if [[ -f "$workdir/own-policy" ]]; then rm -f "$policy"; fi
    rm -rf "$workdir"
}
trap cleanup EXIT
if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\n# Temporary: hack/debian/install.sh keeps package services stopped.\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    touch "$workdir/own-policy"
fi

export DEBIAN_FRONTEND=noninteractive
# Waits for a concurrent apt/dpkg run (another install on the same machine) instead of failing.
apt_opts=(-q -y -o DPkg::Lock::Timeout=300)

install() {
    apt-get "${apt_opts[@]}" install --no-install-recommends "$package" >"$workdir/apt.log" 2>&1
}

log "installing $package with apt-get"
if ! install; then
    log "install failed; refreshing the package index and retrying"
    if ! apt-get "${apt_opts[@]}" update >"$workdir/apt.log" 2>&1 || ! install; then
        cat "$workdir/apt.log" >&2
        die "apt-get could not install $package (output above)"
    fi
fi
present || die "the $package package installed nothing that matches $probe"
