"""kfp.local's cost per step, against bare calls of the same stage functions, and compile time.

    .venv/bin/python benchmarks/pipelines/bench_kfp_local.py [--repeats 3] [--append]

Steps: the first three of the training pipeline (configure -> ingest -> validate) on 200
rows of digits, with a local artifact store:

- bare: the component functions called in this process (``python_func``), with artifact
  objects on local paths, as KFP's executor would call them;
- kfp.local: the same three components as a pipeline on ``kfp.local``'s subprocess runner
  (what ``kubeml run`` uses): one Python process per step, inputs and outputs through the
  local pipeline root.

The overhead per step is (kfp.local - bare) / 3, medians over ``--repeats`` runs each,
alternated so that a change in the machine's load hits both. Compile time is the median
of compiling the whole training pipeline to IR, plain and with the default pod settings
of ``kubeflow.tasks``. ``--append`` adds a dated section to ``benchmarks/RESULTS.md``.
"""

# No postponed annotations: kfp reads the inner pipeline function's parameter types.

import argparse
import os
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
STEPS = 3


def _config(root: Path) -> str:
    from kubeml.config import EnvironmentConfig

    return EnvironmentConfig.model_validate({
        "data": {"max_rows": 200}, "artifact_store": {"uri": f"file://{root}/store"}, "home": str(root / "home"),
    }).model_dump_json()


def _bare(root: Path, run_id: str) -> float:
    from kfp import dsl

    from kubeml.components.configure.component import configure
    from kubeml.components.ingest.component import ingest
    from kubeml.components.validate.component import validate

    t0 = time.perf_counter()
    config = dsl.Artifact(uri=str(root / run_id / "config"))
    configure.python_func(config_json=_config(root), config=config)
    data = dsl.Dataset(uri=str(root / run_id / "data"))
    ingest.python_func(config=config, run_id=run_id, data=data)
    validate.python_func(config=config, run_id=run_id, data=data)
    return time.perf_counter() - t0


def _local(root: Path, run_id: str) -> float:
    from kfp import dsl, local

    from kubeml.components.configure.component import configure
    from kubeml.components.ingest.component import ingest
    from kubeml.components.validate.component import validate

    @dsl.pipeline(name="bench-three-steps")
    def three(config_json: str, run_id: str):
        config = configure(config_json=config_json).outputs["config"]
        data = ingest(config=config, run_id=run_id).outputs["data"]
        validate(config=config, run_id=run_id, data=data)

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root / "pipeline-root"))
    t0 = time.perf_counter()
    three(config_json=_config(root), run_id=run_id)
    return time.perf_counter() - t0


def _compile(kubeflow: bool) -> float:
    from kubeml.config import KubeflowConfig
    from kubeml.pipelines.kubeflow import compile_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        compile_pipeline(Path(tmp) / "p.yaml", kubeflow=KubeflowConfig() if kubeflow else None)
        return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--append", action="store_true", help="add the results to benchmarks/RESULTS.md")
    args = parser.parse_args()

    bare, local_runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _bare(root, "warm-up")  # imports and the dataset download cache, outside the timings
        for i in range(args.repeats):
            bare.append(_bare(root, f"bare-{i}"))
            local_runs.append(_local(root, f"local-{i}"))
    compiles = [_compile(False) for _ in range(args.repeats)]
    compiles_tasks = [_compile(True) for _ in range(args.repeats)]
    b, lo = statistics.median(bare), statistics.median(local_runs)
    per_step = (lo - b) / STEPS
    load = os.getloadavg()[0]
    lines = [
        f"bare {STEPS} steps: {b:.2f} s (median of {args.repeats}: {', '.join(f'{x:.2f}' for x in bare)})",
        f"kfp.local {STEPS} steps: {lo:.2f} s ({', '.join(f'{x:.2f}' for x in local_runs)})",
        f"overhead per step: {per_step:.2f} s; kfp.local / bare: {lo / b:.1f}x",
        f"compile: {statistics.median(compiles):.2f} s plain, {statistics.median(compiles_tasks):.2f} s with pod settings",
        f"load average at the end: {load:.2f}",
    ]
    print("\n".join(lines))
    if args.append:
        today = datetime.now(timezone.utc).date().isoformat()
        section = [
            f"\n## kfp.local step overhead and pipeline compile time ({today})\n",
            f"Machine: {platform.node() or 'vm'}, {os.cpu_count()} cores, load average {load:.2f} at the end. "
            f"configure -> ingest -> validate on 200 rows of digits, local store; medians of {args.repeats}, "
            "bare and kfp.local runs alternated (`benchmarks/pipelines/bench_kfp_local.py`).\n",
            "| measure | seconds |",
            "|---|---|",
            f"| 3 steps, bare calls of the component functions | {b:.2f} |",
            f"| 3 steps on kfp.local (subprocess runner) | {lo:.2f} |",
            f"| overhead per step | {per_step:.2f} |",
            f"| compile the training pipeline to IR | {statistics.median(compiles):.2f} |",
            f"| the same, with the pod settings of kubeflow.tasks | {statistics.median(compiles_tasks):.2f} |",
            "",
        ]
        with RESULTS.open("a") as f:
            f.write("\n".join(section))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
