#!/usr/bin/env bash
# Builds the policy scanner (kube-score) from its Go module and prints the binary's path.
#
#   bash hack/policy/install.sh
#
# Output (outside the repo, shared by every clone of the same version):
#   ${KUBEML_CACHE_DIR:-~/.cache/kubeml}/kube-score-v<KUBE_SCORE_VERSION>/bin/kube-score
#
# kube-score is one static Go program whose module has no replace directives, so it installs
# straight from the module proxy (the checksum database verifies what arrives). The binary
# carries a stamp (the version) and is rebuilt only when versions.env changes: a cold build on
# 2 cores takes about 80 s (module download included), a warm run returns at once. The scan
# itself needs no network: tests/unit/test_policy_scan.py runs the cached binary.
#
# Environment:
#   KUBEML_CACHE_DIR   cache root (default: $XDG_CACHE_HOME/kubeml or ~/.cache/kubeml)
#   KUBEML_BUILD_JOBS  parallel Go compile jobs (default: number of CPUs)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

log() { printf '[policy-assets] %s\n' "$*" >&2; }
die() { printf '[policy-assets] error: %s\n' "$*" >&2; exit 1; }

cache_root=${KUBEML_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kubeml}
dest="$cache_root/kube-score-v$KUBE_SCORE_VERSION"
bin="$dest/bin"
stamp="v$KUBE_SCORE_VERSION"
mkdir -p "$bin"

if [[ -x "$bin/kube-score" && "$(cat "$bin/.kube-score.stamp" 2>/dev/null)" == "$stamp" ]]; then
    echo "$bin/kube-score"
    exit 0
fi
command -v go >/dev/null || die "Go is not installed; install Go >= 1.24 (https://go.dev/dl) and re-run."

# The pytest run and `make policy` may start at the same time: one build at a time.
exec 9>"$dest/.build.lock"
flock 9
if [[ -x "$bin/kube-score" && "$(cat "$bin/.kube-score.stamp" 2>/dev/null)" == "$stamp" ]]; then
    echo "$bin/kube-score"
    exit 0
fi

log "kube-score: installing github.com/zegl/kube-score/cmd/kube-score@$stamp"
start=$SECONDS
tmp=$(mktemp -d "$dest/.gobin.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
# Static, stripped, no local paths; the version ldflag is what `kube-score version` prints.
(cd "$tmp" && CGO_ENABLED=0 GOFLAGS=-trimpath GOBIN="$tmp" \
    go install -p "${KUBEML_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}" \
    -ldflags "-s -w -X main.version=$KUBE_SCORE_VERSION" \
    "github.com/zegl/kube-score/cmd/kube-score@$stamp")
mv -f "$tmp/kube-score" "$bin/kube-score"
echo "$stamp" >"$bin/.kube-score.stamp"
printf '%s\t%s\t%s\n' kube-score $((SECONDS - start)) "$(date -u +%FT%TZ)" >>"$dest/build-times.tsv"
log "kube-score: built in $((SECONDS - start)) s"
echo "$bin/kube-score"
