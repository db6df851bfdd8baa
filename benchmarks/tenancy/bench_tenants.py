"""Benchmark: N Tenants to Ready on the local control plane, and API calls per reconcile.

    python benchmarks/tenancy/bench_tenants.py --tenants 500 [--append]

Starts its own cluster, installs the chart's CRD and tenant roles, and measures:

* operator: create N Tenants at once, time until every one is Ready (in-process operator,
  the same code and settings as the container, resync 60 s so resyncs stay out of the way);
* peer: the same 14 x N child objects written directly, one POST each, from the same process
  (no operator, no status, no reads): the floor the apiserver sets on this machine;
* API calls per reconcile: of the first (creating) reconcile and of a converged one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kubernetes import client as k8s

from kubeml.testing.cluster import Cluster, find_assets
from kubeml.operators import KubeApi, OperatorConfig, desired_children, parse_tenant, reconcile
from kubeml.testing.operators import running_operator

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
TENANTS = ("kubeml.io", "v1alpha1", "tenants")


def install_platform(cluster: Cluster) -> None:
    helm = find_assets().binary("helm")
    subprocess.run([str(helm), f"--kubeconfig={cluster.admin_kubeconfig}", "upgrade", "--install", "kubeml",
                    str(REPO / "charts" / "kubeml-platform"), "-n", "kubeml-system", "--create-namespace",
                    "--set", "replicaCount=0"], check=True, capture_output=True)


def wait_all_ready(custom: k8s.CustomObjectsApi, prefix: str, n: int, timeout_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        items = custom.list_cluster_custom_object(*TENANTS)["items"]
        ready = sum(1 for t in items if t["metadata"]["name"].startswith(prefix) and any(
            c.get("type") == "Ready" and c.get("status") == "True" for c in (t.get("status") or {}).get("conditions", [])))
        if ready >= n:
            return time.monotonic() - start
        time.sleep(0.5)
    raise TimeoutError(f"only {ready}/{n} tenants Ready after {timeout_s:.0f} s")


def body(name: str) -> dict:
    return {"apiVersion": "kubeml.io/v1alpha1", "kind": "Tenant", "metadata": {"name": name},
            "spec": {"owners": ["alice"], "members": [{"name": "bob", "role": "editor"}],
                     "quota": {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": 2, "pods": 100},
                     "iamRoleArn": "arn:aws:iam::123456789012:role/bench"}}


def _without_owner(manifest: dict) -> dict:
    # The peer has no Tenant to point at; drop the reference and the "must be absent" markers.
    meta = {k: v for k, v in manifest["metadata"].items() if k != "ownerReferences"}
    for field in ("labels", "annotations"):
        if field in meta:
            meta[field] = {k: v for k, v in meta[field].items() if v is not None}
    return {**manifest, "metadata": meta}


def run(n: int, workers: int) -> dict[str, float]:
    cluster = Cluster(f"bench-tenancy-{os.getpid() % 10000}")
    cluster.up(build_assets=True, timeout_s=180)
    try:
        install_platform(cluster)
        with cluster.api_client() as admin:
            custom = k8s.CustomObjectsApi(admin)
            config = OperatorConfig(resync_s=60)
            reconciles = {"n": 0}
            lock = threading.Lock()

            def count(_: str, __: object) -> None:
                with lock:
                    reconciles["n"] += 1

            with running_operator(config, admin, on_outcome=count) as operator:
                start = time.monotonic()
                for i in range(n):
                    custom.create_cluster_custom_object(*TENANTS, body(f"op-{i}"))
                wait_all_ready(custom, "op-", n, timeout_s=60 + n * 3)
                op_s = time.monotonic() - start
                first = operator.api.counts()
                first_reconciles = reconciles["n"]
                # Converged reconciles, counted on their own client so that resync timers
                # firing meanwhile (after 60 s) do not inflate the numbers.
                items = custom.list_cluster_custom_object(*TENANTS)["items"]
                probe = KubeApi(admin)
                for item in items:
                    reconcile(probe, item, config)
                after = probe.counts()
            # Peer: the same children, written directly (one POST each), same concurrency as kopf.
            api = KubeApi(admin)
            manifests = []
            for i in range(n):
                spec = parse_tenant({**body(f"peer-{i}"), "metadata": {"name": f"peer-{i}", "uid": "0"}})
                manifests.append([_without_owner(m) for m in desired_children(spec, config)])
            start = time.monotonic()

            def write(children: list[dict]) -> None:
                for child in children:
                    api.create(child)

            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(write, manifests))
            peer_s = time.monotonic() - start
        converged = (after.reads, after.writes)
        return {
            "n": n, "operator_s": op_s, "peer_s": peer_s,
            "first_calls_per_reconcile": (first.reads + first.writes) / max(first_reconciles, 1),
            "first_reads": first.reads / n, "first_writes": first.writes / n, "reconciles": first_reconciles,
            "converged_reads": converged[0] / len(items), "converged_writes": converged[1] / len(items),
        }
    finally:
        cluster.down()


def report(r: dict[str, float]) -> str:
    today = dt.date.today().isoformat()
    return f"""
## Tenancy: {int(r['n'])} Tenants to Ready ({today})

Machine: {os.cpu_count()} cores / 24 GiB, shared; local control plane (etcd, kube-apiserver 1.37.2,
controller-manager, scheduler, kwok), Python {platform.python_version()}. Command:
`python benchmarks/tenancy/bench_tenants.py --tenants {int(r['n'])} --append`.

| measure | value |
|---|---|
| {int(r['n'])} Tenants created at once -> all Ready (in-process operator) | {r['operator_s']:.1f} s ({r['n'] / r['operator_s']:.1f} tenants/s) |
| peer: the same {int(r['n']) * 14} children POSTed directly, no operator | {r['peer_s']:.1f} s |
| ratio operator / peer | {r['operator_s'] / r['peer_s']:.2f}x |
| API requests per Tenant until Ready (incl. any resyncs in that time) | {r['first_reads']:.1f} reads + {r['first_writes']:.1f} writes ({int(r['reconciles'])} reconciles for {int(r['n'])} tenants) |
| API requests per converged reconcile (resync) | {r['converged_reads']:.1f} reads, {r['converged_writes']:.1f} writes |

Reads: one GET per child (14) plus the ownership checks of the Namespace and the Profile
before anything is written (2). Writes: one POST per child plus one status patch. A converged
resync writes nothing, so steady-state load is 16 GETs per Tenant per resync interval.
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tenants", type=int, default=100)
    p.add_argument("--workers", type=int, default=8, help="peer concurrency (threads)")
    p.add_argument("--append", action="store_true", help=f"append the result to {RESULTS}")
    args = p.parse_args()
    result = run(args.tenants, args.workers)
    text = report(result)
    print(text)
    if args.append:
        with RESULTS.open("a") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
