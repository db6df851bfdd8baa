"""Benchmark of the local control plane: asset build time, warm `up` time, memory.

    python benchmarks/cluster/bench_cluster.py [--runs 3] [--append]

- cold build: read from ``build-times.tsv``, which ``hack/cluster/build.sh`` writes next to
  the binaries each time it compiles one (a warm build compiles nothing, so the file keeps
  the cold figures). Re-measure with an empty cache: ``KUBEML_CACHE_DIR=$(mktemp -d)`` and
  ``GOCACHE=$(mktemp -d)`` (the Go build cache would otherwise make it warm).
- warm `up`: wall time of ``Cluster.up()`` with the assets built, ``--runs`` times; the
  target is 20 s, and the ratio to it is printed.
- memory: resident set (VmRSS) of each component once the cluster is up and idle (after
  the nodes are Ready and the CRDs installed, with the default EKS-like node groups).

``--append`` adds a dated section to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from kubeml.testing.cluster import Cluster, find_assets

TARGET_UP_S = 20.0
RESULTS = Path(__file__).resolve().parents[1] / "RESULTS.md"


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024  # kB -> MiB
    return 0.0


def _cold_build(bin_dir: Path) -> list[tuple[str, int]]:
    path = bin_dir.parent / "build-times.tsv"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        name, seconds, *_ = line.split("\t")
        rows.append((name, int(seconds)))
    return rows


def _machine() -> str:
    mem_kib = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal")).split()[1])
    return f"{os.cpu_count()} cores / {mem_kib / 1024 / 1024:.0f} GiB, {platform.machine()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="warm `up` runs (default 3)")
    parser.add_argument("--append", action="store_true", help="append a section to benchmarks/RESULTS.md")
    args = parser.parse_args()

    assets = find_assets()
    up_times, down_times, get_nodes = [], [], []
    rss: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="kubeml-bench-") as tmp:
        for run in range(args.runs):
            cluster = Cluster("bench", state_dir=Path(tmp) / f"run{run}", assets=assets)
            start = time.monotonic()
            cluster.up()
            up_times.append(time.monotonic() - start)
            try:
                time.sleep(5)  # let start-up caches settle before reading RSS
                for component in cluster.status().components:
                    rss.setdefault(component.name, []).append(_rss_mib(component.pid))
                start = time.monotonic()
                subprocess.run([str(assets.binary("kubectl")), f"--kubeconfig={cluster.admin_kubeconfig}",
                                "get", "nodes"], check=True, capture_output=True)
                get_nodes.append(time.monotonic() - start)
            finally:
                start = time.monotonic()
                cluster.down()
                down_times.append(time.monotonic() - start)
            print(f"run {run + 1}: up {up_times[-1]:.1f} s, down {down_times[-1]:.1f} s")

    load = os.getloadavg()
    median_up = statistics.median(up_times)
    rss_median = {name: statistics.median(values) for name, values in rss.items()}
    total_rss = sum(rss_median.values())
    cold = _cold_build(assets.bin_dir)

    lines = [
        f"## Local control plane (kubeml.testing.cluster) — {dt.date.today().isoformat()}",
        "",
        f"Machine: {_machine()}. Kubernetes {assets.bin_dir.parent.name.removeprefix('k8s-')}, "
        f"{args.runs} warm runs, default node groups (2 CPU + 2 p4d GPU kwok nodes), 7 CRDs. "
        f"Load average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min; "
        "other work on the machine slows every figure below except the build's).",
        "",
        "| measure | value |",
        "|---|---|",
        f"| warm `cluster up` (median of {args.runs}) | {median_up:.1f} s "
        f"(min {min(up_times):.1f}, max {max(up_times):.1f}); {median_up / TARGET_UP_S:.2f}x the 20 s target |",
        f"| `cluster down` (median) | {statistics.median(down_times):.1f} s |",
        f"| `kubectl get nodes` (median, incl. process start) | {statistics.median(get_nodes):.2f} s |",
        f"| control-plane RSS, idle (sum) | {total_rss:.0f} MiB |",
    ]
    for name, value in sorted(rss_median.items(), key=lambda kv: -kv[1]):
        lines.append(f"| — {name} RSS | {value:.0f} MiB |")
    if cold:
        lines.append(f"| cold asset build (sum of per-binary compile times) | {sum(s for _, s in cold) / 60:.1f} min |")
        for name, seconds in cold:
            lines.append(f"| — {name} | {seconds} s |")
    else:
        lines.append("| cold asset build | not recorded (no build-times.tsv next to the binaries) |")
    report = "\n".join(lines) + "\n"
    print()
    print(report)
    if args.append:
        if not RESULTS.exists():
            RESULTS.write_text("# Benchmark results\n")
        with RESULTS.open("a") as handle:
            handle.write("\n" + report)
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
