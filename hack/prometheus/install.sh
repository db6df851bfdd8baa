#!/usr/bin/env bash
# Makes a `prometheus` binary available for the rollout-analysis integration tests.
#
#   bash hack/prometheus/install.sh
#
# The tests start their own Prometheus process (a free port, a temp config and storage
# directory), so all that is needed is the binary. It comes from the distribution's package
# (Debian/Ubuntu `prometheus`, ~100 MB with its web assets; 2.42 on Debian 12), installed
# by hack/debian/install.sh: idempotent, quiet, root only, and the package's service never
# starts (a daemon on :9090 would be a surprise on a developer machine).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bash "$here/../debian/install.sh" prometheus prometheus "(or put any Prometheus >= 2.40 binary on PATH)"
