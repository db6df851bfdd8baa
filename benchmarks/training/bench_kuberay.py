"""KubeRay on the real node against a local Ray run: the same training, in pods and here.

    sudo .venv/bin/python benchmarks/training/bench_kuberay.py [--epochs 6] [--append]

One run brings up a cluster with the real node (the KubeRay operator, CoreDNS, the
runtime image built by ``hack/images/build.sh runtime`` and loaded into the node), and
moto's S3 server on loopback that the pods reach through the node's address. Then, in
this order, the pipeline's train stage trains the digits CNN with 2 Ray Train workers:

1. ``training.target: local``: a local Ray runtime on this machine;
2. ``training.target: kuberay``: a RayJob in a restricted namespace, head and 2 worker pods;
3. ``training.target: local`` again, so that a change in the machine's load shows up as a
   difference between the two local runs.

Reported:

- RayJob create -> first training step: from just before the train stage creates the
  RayJob to the end of the first optimizer step (``first_step_wall`` in the job's
  checkpoint, written by the head on the same clock); the job's status sequence is printed
  beside it (not timed);
- steady training throughput: samples/s over all epochs but the first, median, in pods and
  in the local runs, and the ratio pods / local (the mean of the two local runs).

The pods are CPU-limited (the node has this machine's cores, and the head and submitter take
their share): the ratio states what a RayJob costs here, with its limits printed beside it.
A head below about 400m of CPU on 2 cores times out starting Ray ("The current node timed
out during startup") and restarts over and over; 500m leaves it room.
``--append`` adds a dated section to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
LIMITS = {"cpus_per_worker": "600m", "worker_cpu_limit": "2", "memory_per_worker": "3Gi", "head_cpu": "500m",
          "head_cpu_limit": "2", "head_memory": "3Gi", "submitter_cpu": "200m", "submitter_cpu_limit": "1",
          "submitter_memory": "512Mi"}


def _steady(history: list[dict[str, Any]]) -> float:
    rates = [h["samples_per_s"] for h in history[1:] if h.get("samples_per_s")]
    return statistics.median(rates) if rates else float("nan")


def _first_step_wall(store: Any, run_id: str) -> float | None:
    for key in sorted(store.list(f"checkpoints/{run_id}/")):
        if key.endswith("/state.json"):
            extra = json.loads(store.get_bytes(key)).get("extra") or {}
            # Checkpoints store dicts in a tagged form ({"__dict__": {...}}, training/checkpoint.py).
            extra = extra.get("__dict__", extra)
            if extra.get("first_step_wall"):
                return float(extra["first_step_wall"])
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--append", action="store_true", help="append the results to benchmarks/RESULTS.md")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("the real node needs root: run with sudo", file=sys.stderr)
        return 2

    import boto3
    from kubernetes.client import CoreV1Api
    from moto.server import ThreadedMotoServer

    from kubeml._proc import free_port
    from kubeml.artifacts import open_store
    from kubeml.config import KubemlConfig
    from kubeml.ledger import Ledger
    from kubeml.pipelines.stages import ingest_stage, train_stage
    from kubeml.testing.cluster import REAL_NODE_TAINT, Cluster
    from kubeml.testing.cluster.fixtures import temporary_namespace

    os.environ.update(CREDENTIALS)
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    s3 = f"http://127.0.0.1:{port}"
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3).create_bucket(Bucket=bucket)
    home = Path(tempfile.mkdtemp(prefix="bench-kuberay-"))
    cluster = Cluster(f"bench-kuberay-{os.getpid()}", state_dir=home / "cluster", node_groups=(), real_node=True)
    toleration = {"key": REAL_NODE_TAINT.key, "operator": "Equal", "value": REAL_NODE_TAINT.value,
                  "effect": REAL_NODE_TAINT.effect}
    runs: dict[str, dict[str, Any]] = {}
    try:
        cluster.up(build_assets=True, timeout_s=300, owner_pid=os.getpid())
        build = subprocess.run(["bash", str(REPO / "hack/images/build.sh"), "runtime"], cwd=REPO,
                               capture_output=True, text=True, timeout=3000)
        if build.returncode != 0:
            print(build.stderr[-3000:], file=sys.stderr)
            return 1
        os.environ["KUBECONFIG"] = str(cluster.admin_kubeconfig)
        os.environ.pop("KUBERNETES_SERVICE_HOST", None)
        with cluster.api_client() as client, temporary_namespace(
                client, prefix="bench", labels={"pod-security.kubernetes.io/enforce": "restricted"}) as ns, \
                cluster.node.host_service(port, what="the S3 API (moto)") as pod_s3:
            core = CoreV1Api(client)
            core.create_namespaced_service_account(ns, {"metadata": {"name": "kubeml-train"},
                                                        "automountServiceAccountToken": False})
            core.create_namespaced_secret(ns, {"metadata": {"name": "s3-credentials"}, "stringData": CREDENTIALS})
            launcher = {"namespace": ns, "node_group": "local", "head_node_group": "local",
                        "tolerations": [toleration], "head_tolerations": [toleration], "gpus_per_worker": 0,
                        "shm_size": "256Mi", "env_secret": "s3-credentials",
                        "artifact_endpoint_url": f"http://{pod_s3}", "poll_s": 0.5,
                        "wait_timeout_s": 3000, "stall_timeout_s": 900, "image_grace_s": 60, **LIMITS}
            for label, target in (("local-1", "local"), ("kuberay", "kuberay"), ("local-2", "local")):
                env = {"artifact_store": {"uri": f"s3://{bucket}/kubeml", "endpoint_url": s3},
                       "home": str(home / label),
                       "training": {"target": target, "workers": 2, "epochs": args.epochs, "launcher": launcher}}
                cfg = KubemlConfig(environments={"staging": env}).environment("staging")
                config_json = cfg.model_dump_json()
                run_id = f"bench-{label}"
                dataset, version = ingest_stage(config_json, run_id)
                started = time.time()
                train_stage(config_json, run_id, dataset, version)
                wall = time.time() - started
                store = open_store(cfg.artifact_store.uri, endpoint_url=s3)
                out = Ledger(store, run_id).read("train").outputs
                first = _first_step_wall(store, run_id)
                runs[label] = {"wall_s": round(wall, 1), "steady_samples_per_s": round(_steady(out["history"]), 1),
                               "first_step_s": round(first - started, 1) if first else None,
                               "job": out.get("job", {}).get("transitions")}
                print(label, json.dumps(runs[label]), flush=True)
    finally:
        cluster.down()
        moto.stop()

    local = statistics.mean([runs["local-1"]["steady_samples_per_s"], runs["local-2"]["steady_samples_per_s"]])
    pods = runs["kuberay"]["steady_samples_per_s"]
    report = {"epochs": args.epochs, "runs": runs, "ratio_pods_over_local": round(pods / local, 2), "limits": LIMITS,
              "load": os.getloadavg()[0]}
    print(json.dumps(report, indent=2))
    if args.append:
        today = datetime.now(timezone.utc).date().isoformat()
        lines = [
            f"\n## KubeRay on the real node vs local Ray ({today})\n",
            f"Machine: {platform.node() or 'vm'}, {os.cpu_count()} cores, load average {report['load']:.2f} "
            f"at the end. Digits CNN, 2 Ray Train workers, {args.epochs} epochs, the train stage on each "
            f"target. Pod CPU request/limit: workers {LIMITS['cpus_per_worker']}/{LIMITS['worker_cpu_limit']} "
            f"({LIMITS['memory_per_worker']}), head {LIMITS['head_cpu']}/{LIMITS['head_cpu_limit']}, "
            f"submitter {LIMITS['submitter_cpu']}/{LIMITS['submitter_cpu_limit']}.\n",
            "| run | wall | create/call -> first step | steady samples/s |",
            "|---|---|---|---|",
        ]
        for label, run in runs.items():
            lines.append(f"| {label} | {run['wall_s']} s | {run['first_step_s']} s | {run['steady_samples_per_s']} |")
        lines.append(f"\nSteady throughput, pods / local (mean of the two local runs): "
                     f"{report['ratio_pods_over_local']}.\n")
        with RESULTS.open("a") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
