#!/usr/bin/env bash
# Makes PostgreSQL's server binaries available for the tests of the shared MLflow tracking
# server (its backend store).
#
#   bash hack/postgres/install.sh
#
# The tests run their own server (initdb into a temp directory, a free port on 127.0.0.1,
# a socket directory of their own; see kubeml.testing.postgres), so all that is needed is
# Debian's `postgresql` package (PostgreSQL 15 on Debian 12). hack/debian/install.sh
# installs it: idempotent, quiet, root only, and the package's own cluster never starts.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bash "$here/../debian/install.sh" postgresql '/usr/lib/postgresql/*/bin/postgres' \
    "(or put PostgreSQL's initdb and postgres on PATH)"
