#!/usr/bin/env bash
# Fetches the Kafka broker jars and their runtime dependencies from Maven and prints the
# folder that holds them:
#
#   libs=$(bash hack/kafka/fetch.sh)
#
# Output (outside the repo, shared by every clone of the same version):
#   ${KUBEML_CACHE_DIR:-~/.cache/kubeml}/kafka-<KAFKA_VERSION>/libs   ~45 jars, ~45 MB
#
# Idempotent: a stamp holds the versions and a hash of pom.xml; a warm run only compares it
# (well under a second). A cold run downloads through Maven (~1-2 min) into ~/.m2 first.
# `make kafka-assets` and the pytest fixture may run it at the same time: a lock serialises
# them, and the jars are copied to a temporary folder that is renamed into place, so a
# half-done fetch is never taken for a finished one.
#
# Environment:
#   KUBEML_CACHE_DIR   cache root (default: $XDG_CACHE_HOME/kubeml or ~/.cache/kubeml)
#   MAVEN_ARGS         extra arguments for mvn (e.g. -o to work offline from ~/.m2)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

log() { printf '[kafka-assets] %s\n' "$*" >&2; }
die() { printf '[kafka-assets] error: %s\n' "$*" >&2; exit 1; }

cache_root=${KUBEML_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kubeml}
dest="$cache_root/kafka-$KAFKA_VERSION"
libs="$dest/libs"
mkdir -p "$dest"

stamp="$KAFKA_VERSION scala-$SCALA_BINARY_VERSION log4j-$LOG4J_VERSION pom-$(sha256sum "$here/pom.xml" | cut -c1-16)"
fresh() { [[ -d "$libs" && "$(cat "$dest/.stamp" 2>/dev/null)" == "$stamp" ]]; }

if fresh; then
    log "kafka $KAFKA_VERSION: up to date"
    echo "$libs"
    exit 0
fi

command -v java >/dev/null || die "Java is not installed; Kafka $KAFKA_VERSION needs Java >= 17 (apt-get install openjdk-17-jre-headless)."
command -v mvn >/dev/null || die "Maven is not installed; install Maven >= 3.6 (apt-get install maven) and re-run."

exec 9>"$dest/.fetch.lock"
flock 9
if fresh; then  # another run finished while this one waited for the lock
    echo "$libs"
    exit 0
fi

log "kafka $KAFKA_VERSION: resolving the broker and its dependencies with Maven"
start=$SECONDS
work=$(mktemp -d "$dest/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT
cp "$here/pom.xml" "$work/pom.xml"
# Maven's output goes to a log, shown only when it fails (quiet mode still prints colour codes).
# shellcheck disable=SC2086
if ! mvn -B -q -Dstyle.color=never ${MAVEN_ARGS:-} -f "$work/pom.xml" \
    -Dkafka.version="$KAFKA_VERSION" \
    -Dscala.binary.version="$SCALA_BINARY_VERSION" \
    -Dlog4j.version="$LOG4J_VERSION" \
    -Dkafka.libs="$work/libs" \
    package >"$work/mvn.log" 2>&1; then
    tail -n 40 "$work/mvn.log" >&2
    die "Maven could not resolve kafka_$SCALA_BINARY_VERSION:$KAFKA_VERSION (see above)"
fi
[[ -f "$work/libs/kafka_$SCALA_BINARY_VERSION-$KAFKA_VERSION.jar" ]] ||
    die "Maven finished but kafka_$SCALA_BINARY_VERSION-$KAFKA_VERSION.jar is missing from $work/libs"

rm -rf "$libs"
mv "$work/libs" "$libs"
echo "$stamp" >"$dest/.stamp"
log "kafka $KAFKA_VERSION: $(ls "$libs" | wc -l) jars in $libs ($((SECONDS - start)) s)"
echo "$libs"
