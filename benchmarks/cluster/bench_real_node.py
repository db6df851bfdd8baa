"""Benchmark of the real node: bring-up time, pod create -> Running, image build times.

    sudo .venv/bin/python benchmarks/cluster/bench_real_node.py [--pods 10] [--runs 2] [--append]

- bring-up: wall time of ``Cluster.up()`` with a real node against the same cluster without
  one, ``--runs`` times each, in the same run; the difference is the node's share (target:
  the real node up within 60 s warm).
- pod create -> Running: ``--pods`` pods created one after another on the real node (the
  probe image, already present), against the same on a kwok node, whose "Running" is a
  status write without any container: the ratio is what a real container start costs.
- cold builds: the per-asset compile times ``hack/cluster/build.sh`` records, and the image
  build times ``hack/images/build.sh`` records, with the images' sizes.

``--append`` adds a dated section to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from kubernetes.client import CoreV1Api

from kubeml.testing.cluster import NODE_IMAGES, Cluster, NodeGroup, find_assets, real_node_pod_spec
from kubeml.testing.cluster._assets import cache_root

RESULTS = Path(__file__).resolve().parents[1] / "RESULTS.md"
ONE_KWOK = (NodeGroup("cpu", "m5.large", count=1, cpu="8", memory="32Gi"),)


def _up(real_node: bool) -> tuple[float, Cluster]:
    state = Path(tempfile.mkdtemp(prefix="bench-node-"))
    cluster = Cluster("bench-node", state_dir=state / "s", node_groups=ONE_KWOK, real_node=real_node)
    start = time.monotonic()
    cluster.up(timeout_s=300)
    return time.monotonic() - start, cluster


def _pod(name: str, real: bool) -> dict:
    container = {"name": "c", "image": NODE_IMAGES["probe"], "imagePullPolicy": "Never", "args": ["sleep"]}
    if real:
        spec = real_node_pod_spec([container])
    else:
        spec = {"nodeSelector": {"type": "kwok"}, "containers": [container], "terminationGracePeriodSeconds": 0}
    return {"metadata": {"name": name}, "spec": spec}


def _create_to_running(core: CoreV1Api, real: bool, count: int) -> list[float]:
    times = []
    prefix = "real" if real else "kwok"
    for i in range(count):
        name = f"{prefix}-{i}"
        start = time.monotonic()
        core.create_namespaced_pod("default", _pod(name, real))
        while core.read_namespaced_pod(name, "default").status.phase != "Running":
            if time.monotonic() - start > 120:
                raise TimeoutError(f"{name} not Running in 120 s")
            time.sleep(0.02)
        times.append(time.monotonic() - start)
    for i in range(count):
        core.delete_namespaced_pod(f"{prefix}-{i}", "default", grace_period_seconds=0)
    return times


def _tsv(path: Path) -> list[tuple[str, int]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        name, seconds, *_ = line.split("\t")
        rows.append((name, int(seconds)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pods", type=int, default=10)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--append", action="store_true")
    args = parser.parse_args()

    ups: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.runs):
        for real in (False, True):
            seconds, cluster = _up(real)
            ups[real].append(seconds)
            cluster.down()
    seconds, cluster = _up(True)
    try:
        with cluster.api_client() as client:
            core = CoreV1Api(client)
            real = _create_to_running(core, True, args.pods)
            kwok = _create_to_running(core, False, args.pods)
    finally:
        cluster.down()

    bin_dir = find_assets().bin_dir
    node_builds = [r for r in _tsv(bin_dir.parent / "build-times.tsv")
                   if r[0] in ("kubelet", "kube-proxy", "containerd", "containerd-shim-runc-v2", "ctr", "pause",
                               "probe") or r[0].startswith("cni/")]
    images_dir = cache_root() / "images"
    image_builds = _tsv(images_dir / "build-times.tsv")
    sizes = {}
    for kind in ("operator", "server", "runtime"):
        meta = images_dir / f"{kind}.json"
        if meta.exists():
            sizes[kind] = json.loads(meta.read_text())

    med = statistics.median
    lines = [
        f"## Real node (kubelet + containerd) ({dt.date.today().isoformat()})",
        "",
        f"Machine: {platform.node()}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.2f} at the end of the run (shared machine).",
        "",
        "| measure | without real node | with real node | ratio |",
        "|---|---|---|---|",
        f"| `Cluster.up()` (median of {args.runs}) | {med(ups[False]):.1f} s | {med(ups[True]):.1f} s | "
        f"{med(ups[True]) / med(ups[False]):.2f} |",
        f"| pod create -> Running, median of {args.pods} (kwok / real) | {med(kwok) * 1000:.0f} ms | "
        f"{med(real) * 1000:.0f} ms | {med(real) / med(kwok):.1f} |",
        f"| pod create -> Running, max (kwok / real) | {max(kwok) * 1000:.0f} ms | {max(real) * 1000:.0f} ms | "
        f"{max(real) / max(kwok):.1f} |",
        "",
        f"The real node's share of bring-up: {med(ups[True]) - med(ups[False]):.1f} s (target: up within 60 s).",
        "",
    ]
    if node_builds:
        lines += ["Compile times of the node's binaries, as last built (`build-times.tsv`; the Go build "
                  "cache was warm unless the machine was fresh):", ""]
        last = dict(node_builds)
        lines += [f"- {name}: {seconds} s" for name, seconds in last.items()]
        lines.append("")
    if image_builds or sizes:
        lines += ["Images (`hack/images/build.sh`, the last build of each):", ""]
        for kind, meta in sizes.items():
            lines.append(f"- {kind}: {meta['image']}, {meta['size_bytes'] / 1e6:.0f} MB unpacked, "
                         f"built in {meta['seconds']} s")
        if image_builds:
            lines.append(f"- base (mmdebstrap): {dict(image_builds).get('base', 'cached')} s")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.append:
        with RESULTS.open("a") as handle:
            handle.write("\n" + text)


if __name__ == "__main__":
    main()
