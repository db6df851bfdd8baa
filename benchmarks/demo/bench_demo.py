"""Times `make demo` on a fresh clone: cold (new .venv, empty .kubeml) and warm (again).

Appends the wall times and each stage's duration (from the run ledger) to
benchmarks/RESULTS.md. "Cold" here means a fresh clone and a fresh virtual environment;
the package download cache in ~/.cache is whatever this machine has, and the table says so.

    python benchmarks/demo/bench_demo.py [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return wall, p.stdout


def stage_times(clone: Path) -> dict[str, float]:
    runs = sorted((clone / ".kubeml" / "artifacts" / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
    out = {}
    for f in sorted((runs[-1] / "stages").glob("*.json")):
        rec = json.loads(f.read_text())
        if rec.get("started") and rec.get("finished"):
            out[rec["stage"]] = rec["finished"] - rec["started"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", action="store_true", help="keep the clone (and its served model)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kubeml-demo-"))
    clone = work / "kubeml"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    try:
        cold, _ = timed(["make", "demo"], clone)
        cold_stages = stage_times(clone)
        warm, _ = timed(["make", "demo"], clone)
        warm_stages = stage_times(clone)
    finally:
        subprocess.run([str(clone / ".venv/bin/kubeml"), "serve", "stop"], cwd=clone, capture_output=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    order = ["ingest", "validate", "train", "evaluate", "gate", "register", "deploy"]
    lines = [
        f"\n## make demo, {date.today().isoformat()}, {platform.machine()} {os.cpu_count()} cores",
        "",
        "Fresh clone; cold = new .venv (package cache warm), warm = second `make demo` in the same clone.",
        "",
        "| run | wall s | " + " | ".join(order) + " |",
        "|---|---|" + "---|" * len(order),
        f"| cold | {cold:.0f} | " + " | ".join(f"{cold_stages.get(s, float('nan')):.1f}" for s in order) + " |",
        f"| warm | {warm:.0f} | " + " | ".join(f"{warm_stages.get(s, float('nan')):.1f}" for s in order) + " |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    results = REPO / "benchmarks" / "RESULTS.md"
    if not results.exists():
        results.write_text("# Benchmark results\n")
    with results.open("a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
